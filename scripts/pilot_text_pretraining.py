"""
Pilots behind the demo base's text pretraining (docs/world.md, "The base, pretrained once and committed"):
what makes the demo's tiny Llama answer text-only questions about a described scene, and why it stops.

    python scripts/pilot_text_pretraining.py text '{"steps": 1000, "lr": 1e-3}'          # one variant
    python scripts/pilot_text_pretraining.py text '{"llm": {"rope_theta": 10000}, "caption_weight": 1.0}'
    python scripts/pilot_text_pretraining.py recall '{"dense": true}'                      # the bare look-up

`text` trains DEMO_LLM (with the "llm" overrides) on the shapes world's text and prints text QA per type
on 500 fresh scenes at each step in "evals". Knobs: steps, lr, warmup, batch, questions (a scene),
repeat_kinds (kinds drawn with repetition, then `kinds` restricts them), caption_weight (0: the loss on
the answers alone; 1: every token), n_objects (a list: scenes with only those numbers of objects),
save (a directory). `recall` trains the same architecture on associative recall: 3 pairs `key f f value`
(`gap` fillers f, 2 unless given), then a key; predict its value (`dense`: every pair queried once, in a
random order). One thread each. `{"llm": {"rope_theta": 100}}` is the RoPE base with which the look-up
forms (docs/world.md, "The cause: the RoPE base"); DEMO_LLM's 1e6 is the committed base's.
"""
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shapes_world import demo_base as B  # noqa: E402
from shapes_world import shapes as SH  # noqa: E402


def text_pilot(args: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    steps, lr, warm = args.get("steps", 1000), args.get("lr", 3e-3), args.get("warmup", 50)
    bs, nq, caption_weight = args.get("batch", 32), args.get("questions", 5), args.get("caption_weight", 0.0)
    evals = set(args.get("evals", [250, 500, 1000])) | {steps}
    tok = SH.build_shapes_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **{**B.DEMO_LLM, **args.get("llm", {})},
                                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    rng, spec = random.Random(1), SH.ShapesSpec()

    def scene():
        while True:
            objects = SH.random_objects(rng, spec)
            if len(objects) in args.get("n_objects", [1, 2, 3]):
                return objects

    def conversation():
        objects, kinds = scene(), args.get("kinds", SH.QUESTION_KINDS)
        kinds = [rng.choice(kinds) for _ in range(nq)] if args.get("repeat_kinds") else rng.sample(kinds, nq)
        messages = []
        for t, kind in enumerate(kinds):
            q, a, _ = SH.make_question(rng, objects, kind, multiple_choice=rng.random() < 0.5)
            messages += [{"role": "user", "content": f"{SH.detailed_caption(objects)}\n{q}" if t == 0 else q},
                         {"role": "assistant", "content": a}]
        return messages

    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm)))))
    t0 = time.time()
    for step in range(1, steps + 1):
        llm.train()
        tok.padding_side = "right"
        enc = tok([B.render(tok, conversation()) for _ in range(bs)], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        answers = (B.answer_labels(enc.input_ids, tok) != -100).float()
        weight = (answers + caption_weight * (1 - answers) * enc.attention_mask)[:, 1:]
        logits = llm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), enc.input_ids[:, 1:].flatten(), reduction="none")
        loss = (ce.view_as(weight) * weight).sum() / weight.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step in evals:
            llm.eval()
            qa = B.text_qa_accuracy(llm, tok, 500, 2)
            print(json.dumps({"step": step, "s": round(time.time() - t0), "loss": round(loss.item(), 4), **qa}),
                  flush=True)
    if args.get("save"):
        llm.save_pretrained(args["save"])
        tok.save_pretrained(args["save"])


def recall_pilot(args: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    keys, values, sep, pairs = list(range(10, 30)), list(range(30, 50)), 5, 3
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, **{**B.DEMO_LLM, **args.get("llm", {})}, bos_token_id=None,
                                       eos_token_id=None, pad_token_id=0))
    opt = torch.optim.AdamW(llm.parameters(), lr=args.get("lr", 1e-3), weight_decay=0.0)
    rng, gap = random.Random(0), args.get("gap", 2)

    def batch(n: int, dense: bool):
        xs, ys = [], []
        for _ in range(n):
            ks = rng.sample(keys, pairs)
            vs = [rng.choice(values) for _ in ks]
            x = [t for k, v in zip(ks, vs) for t in (k, *(rng.randrange(50, 60) for _ in range(gap)), v, 6)] + [sep]
            y = [-100] * len(x)
            for q in (rng.sample(range(pairs), pairs) if dense else [rng.randrange(pairs)]):
                x += [ks[q], vs[q]]
                y += [-100, vs[q]]
            xs.append(x)
            ys.append(y)
        return torch.tensor(xs), torch.tensor(ys)
    for step in range(1, args.get("steps", 800) + 1):
        x, y = batch(64, args.get("dense", False))
        loss = llm(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            with torch.no_grad():
                x, _ = batch(500, False)
                accuracy = (llm(input_ids=x[:, :-1]).logits[:, -1].argmax(-1) == x[:, -1]).float().mean().item()
            print(json.dumps({"step": step, "loss": round(loss.item(), 3), "accuracy": round(accuracy, 3)}), flush=True)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("text", "recall"))
    ap.add_argument("settings", nargs="?", default="{}", help="the knobs above, as a JSON object")
    args = ap.parse_args()
    try:
        settings = json.loads(args.settings)
    except json.JSONDecodeError as e:
        ap.error(f"settings: not JSON ({e})")
    known = {"text": {"steps", "lr", "warmup", "batch", "questions", "caption_weight", "evals", "llm", "n_objects",
                      "kinds", "repeat_kinds", "save"}, "recall": {"llm", "lr", "steps", "dense", "gap"}}[args.kind]
    if not isinstance(settings, dict) or set(settings) - known:
        ap.error(f"settings: a JSON object of {sorted(known)} (unknown: {sorted(set(settings) - known)})"
                 if isinstance(settings, dict) else "settings: a JSON object")
    torch.set_num_threads(1)
    {"text": text_pilot, "recall": recall_pilot}[args.kind](settings)
