"""
The demo's base models: a tiny CLIP vision tower and a tiny Llama that stand in for pretrained ones,
and the demo's inputs (these models and the generated shapes data). A reader of the method may skip
this file; train.py builds the base on the demo's first run:

    python demo_base.py            # build (or reuse) out/demo/base and print what was measured

ViCToR starts from a pretrained LLM (Vicuna-7B, Qwen2.5-7B): stage 1 aligns a projector to a model that
already has its language, and stage 1.5 teaches that model to read visual tokens. So the demo's Llama
is pretrained here on the shapes world's text alone (no images): a scene told as its detailed caption,
then questions about it and their answers, next-token loss on every token. It then answers text-only
questions about a described scene far above chance (measured and recorded in base/demo_base.json).

The vision tower is the same class as CLIP ViT-L's. A random one carries the objects only weakly in
each of a cell's four patch tokens (a linear probe reads a token's object 0.77 of the time, its shape
0.80); a real CLIP tower was trained to see. So it is pretrained briefly too (~10 s): each grid cell's
object (empty, or colour x shape) is classified from the mean of the cell's tokens at the layer victor
reads (the second-to-last); the probe then reads 0.92 / 0.93. Its position embeddings are scaled up, as a
trained tower's say where a patch is. The tower stays frozen in the demo's stages.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import torch

import data as D
from distributed import barrier, setup_distributed

# The tower: patch 16 on 96-px images = 36 visual tokens, 2 x 2 per grid cell, so a replaced token's
# neighbours carry part of its object (the premise of reconstructing it, as with natural images' patches).
DEMO_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, patch_size=16)
# A trained tower's patch features say where each patch is. A random one at CLIP's init barely does
# (position embeddings std 0.02, far below the patch content), and the LLM cannot find "the object at
# the top left". At std 0.4 a probe reads every token's cell.
DEMO_POSITION_SCALE = 20
# 8 heads of 16, init std 1/sqrt(width) and RoPE base 1e6 (docs/demo_log.md)
DEMO_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=8, head_dim=16, initializer_range=128 ** -0.5, rope_theta=1e6,
                max_position_embeddings=512)
# The LLM's text pretraining: ~50 s on 2 CPU cores. Each sequence is one scene (its detailed caption)
# and 4 questions about it, in the chat template the later stages use.
DEMO_TEXT_PRETRAIN = dict(steps=240, batch_size=32, lr=5e-3, warmup_steps=25, adam_beta2=0.95, questions=4,
                          data_seed=1, eval_questions=500, eval_seed=2)

# The tower's pretraining: ~10 s on 2 CPU cores
DEMO_VISION_PRETRAIN = dict(steps=150, batch_size=32, lr=1e-3, data_seed=3)


def demo_base_configs():
    """The demo's tiny CLIP tower and Llama, as transformers configs (for build_demo_base and --plan)."""
    from transformers import CLIPVisionConfig, LlamaConfig
    tok = D.build_shapes_tokenizer()
    return (CLIPVisionConfig(**DEMO_VISION, image_size=D.ShapesSpec().image_size),
            LlamaConfig(vocab_size=len(tok), **DEMO_LLM, tie_word_embeddings=False, bos_token_id=None,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=D.CHATML_TEMPLATE, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def pretrain_on_text(llm, tokenizer, steps: int, batch_size: int, lr: float, warmup_steps: int, adam_beta2: float,
                     questions: int, data_seed: int, **_) -> float:
    """Next-token training on the world's text (text_conversation), every token supervised (a
    pretraining corpus has no prompt/answer split). AdamW, warm-up then cosine. Returns the mean loss
    of the last 20 steps."""
    rng, spec = random.Random(data_seed), D.ShapesSpec()
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, adam_beta2), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup_steps) / max(1, steps - warmup_steps)))))
    tokenizer.padding_side = "right"
    llm.train()
    losses = []
    for _ in range(steps):
        texts = [render(tokenizer, D.text_conversation(rng, spec, questions)[0]) for _ in range(batch_size)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = llm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    llm.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)


def cell_objects(objects) -> list[int]:
    """The 9 cells of an image as classes: 0 empty, else 1 + colour * 3 + shape."""
    cells = [0] * len(D.CELLS)
    for o in objects:
        cells[D.CELLS.index(o["cell"])] = 1 + sorted(D.COLOURS).index(o["colour"]) * len(D.SHAPES) + \
            D.SHAPES.index(o["shape"])
    return cells


def pixels(images, processor) -> torch.Tensor:
    """The processor's normalisation of images already at the tower's size (no resize needed)."""
    import numpy as np
    x = torch.tensor(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    return (x - mean) / std


def pretrain_tower(vision, processor, steps: int, batch_size: int, lr: float, data_seed: int) -> float:
    """Each grid cell's object (13 classes) from the mean of the cell's patch tokens at the second-to-last
    layer (CLS dropped, as victor reads them), on fresh shapes images. Returns the last 20 steps' loss."""
    spec = D.ShapesSpec()
    rng = random.Random(data_seed)
    side = spec.image_size // vision.config.patch_size
    rows, cols = torch.arange(side * side) // side, torch.arange(side * side) % side
    token_cell = (rows * spec.grid // side) * spec.grid + cols * spec.grid // side
    per_cell = torch.bincount(token_cell, minlength=spec.grid ** 2).float().view(1, -1, 1)
    head = torch.nn.Linear(vision.config.hidden_size, 1 + len(D.COLOURS) * len(D.SHAPES))
    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    vision.train()
    losses = []
    for _ in range(steps):
        drawn = [D.draw_shapes_image(rng, spec) for _ in range(batch_size)]
        labels = torch.tensor([cell_objects(objects) for _, objects in drawn])
        h = vision(pixel_values=pixels([im for im, _ in drawn], processor),
                   output_hidden_states=True).hidden_states[-2][:, 1:]
        cells = torch.zeros(batch_size, spec.grid ** 2, h.shape[-1]).index_add_(1, token_cell, h) / per_cell
        loss = torch.nn.functional.cross_entropy(head(cells).flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    vision.eval()
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def text_qa_accuracy(llm, tokenizer, n: int, seed: int, batch: int = 100) -> dict:
    """Text-only questions about a described scene (caption + one question, fresh scenes), greedy answers:
    accuracy overall and per kind, beside chance (1 / options for multiple choice; open questions
    have no chance level and are scored exactly)."""
    rng, spec = random.Random(seed), D.ShapesSpec()
    items = []
    for _ in range(n):
        messages, kinds = D.text_conversation(rng, spec, questions=1)
        items.append((messages, kinds[0]))
    tokenizer.padding_side = "left"
    right: dict[str, list[bool]] = {}
    for i in range(0, n, batch):
        chunk = items[i:i + batch]
        enc = tokenizer([render(tokenizer, m[:1], True) for m, _ in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = llm.generate(**enc, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        for (messages, kind), new in zip(chunk, out[:, enc.input_ids.shape[1]:]):
            answer = tokenizer.decode(new, skip_special_tokens=True).strip()
            right.setdefault(kind, []).append(answer == messages[1]["content"])
    tokenizer.padding_side = "right"
    per_kind = {k: round(sum(v) / len(v), 4) for k, v in sorted(right.items())}
    return {"accuracy": round(sum(sum(v) for v in right.values()) / n, 4), "per_kind": per_kind}


def build_demo_base(out_dir: str, seed: int = 0, pretrain: dict | None = None,
                    vision_pretrain: dict | None = None) -> tuple[str, str]:
    """Save the tiny CLIP tower (+ image processor) and the tiny Llama (+ shapes tokenizer), the tower
    pretrained to see the world's objects (`vision_pretrain`: DEMO_VISION_PRETRAIN's fields) and the Llama on
    its text (`pretrain`: DEMO_TEXT_PRETRAIN's fields); steps 0 leaves a model random.
    A base folder built from other values is rebuilt. Returns (vision_dir, llm_dir)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM
    pretrain = {**DEMO_TEXT_PRETRAIN, **(pretrain or {})}
    vision_pretrain = {**DEMO_VISION_PRETRAIN, **(vision_pretrain or {})}
    vision_dir, llm_dir = os.path.join(out_dir, "base", "vision"), os.path.join(out_dir, "base", "llm")
    recipe_file = os.path.join(out_dir, "base", "demo_base.json")
    recipe = {"vision": DEMO_VISION, "position_scale": DEMO_POSITION_SCALE, "llm": DEMO_LLM, "seed": seed,
              "vision_pretraining": vision_pretrain, "text_pretraining": pretrain}
    if os.path.isfile(recipe_file):
        with open(recipe_file) as f:
            if json.load(f).get("recipe") == recipe:
                return vision_dir, llm_dir
    if os.path.isdir(os.path.join(out_dir, "base")):
        print(f"note: {os.path.join(out_dir, 'base')} was built by another version of the demo: rebuilding it")
    t0 = time.time()
    vision_config, llm_config = demo_base_configs()
    torch.manual_seed(seed)
    size = D.ShapesSpec().image_size
    vision = CLIPVisionModel(vision_config)
    with torch.no_grad():
        vision.embeddings.position_embedding.weight.mul_(DEMO_POSITION_SCALE)
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    measured = {}
    if vision_pretrain["steps"] > 0:
        measured["vision_loss"] = round(pretrain_tower(vision, processor, **vision_pretrain), 4)
        print(f"demo base: vision tower pretrained ({vision_pretrain['steps']} steps, cell-object loss "
              f"{measured['vision_loss']})", flush=True)
    vision.save_pretrained(vision_dir)
    processor.save_pretrained(vision_dir)
    tok = D.build_shapes_tokenizer()
    llm = LlamaForCausalLM(llm_config)
    if pretrain["steps"] > 0:
        print(f"demo base: pretraining the LLM on the shapes world's text ({pretrain['steps']} steps)", flush=True)
        measured["text_loss"] = round(pretrain_on_text(llm, tok, **pretrain), 4)
        measured["text_qa"] = text_qa_accuracy(llm, tok, pretrain["eval_questions"], pretrain["eval_seed"])
        print(f"demo base: text loss {measured['text_loss']}, text-only questions answered "
              f"{measured['text_qa']['accuracy']:.3f} {measured['text_qa']['per_kind']}", flush=True)
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    measured["seconds"] = round(time.time() - t0, 1)
    with open(recipe_file, "w") as f:  # last: a build cut short is redone
        json.dump({"recipe": recipe, "measured": measured}, f, indent=1)
    return vision_dir, llm_dir


def demo_inputs(overrides: dict, out_root: str, num_images: int) -> dict:
    """The demo recipe's shapes data and tiny base models, generated on first use unless given; their paths
    go into overrides. Returns the data file of each stage ({} when the data was given)."""
    given = {k for k, v in overrides.items() if v}
    need_data = not ({"data", "image_folder"} <= given or ("data" in given and D.is_parquet(overrides["data"])))
    need_base = not ("init" in given or {"vision_model", "llm"} <= given)
    rank, _, _ = setup_distributed()
    spec = D.ShapesSpec(num_train_images=num_images)
    if rank == 0:
        if need_data:
            D.shapes_files(os.path.join(out_root, "shapes"), spec)
        if need_base:
            build_demo_base(out_root)
    barrier()
    if need_base:
        overrides.setdefault("vision_model", os.path.join(out_root, "base", "vision"))
        overrides.setdefault("llm", os.path.join(out_root, "base", "llm"))
    if not need_data:
        return {}
    files = D.shapes_files(os.path.join(out_root, "shapes"), spec)
    overrides.setdefault("image_folder", os.path.join(out_root, "shapes"))
    return {"1": files["stage1"], "1.5": files["stage1.5"], "2": files["stage2"]}


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "out/demo"
    build_demo_base(out)
    with open(os.path.join(out, "base", "demo_base.json")) as f:
        print(json.dumps(json.load(f)["measured"], indent=1))

