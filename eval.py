"""
Evaluate a victor checkpoint (victor's own, the original LLaVA code's or llava-hf's), offline, greedy, batched:

    python eval.py                                   # the demo's shapes test set: accuracy per type beside chance
    python eval.py out/demo/stage2 --out results.json --limit 200
    python eval.py CKPT --bench MMStar.tsv --out mmstar.json   # VLMEvalKit TSV, multiple choice: accuracy
    python eval.py CKPT --bench POPE.tsv             # yes/no: POPE's precision/recall/F1 (and MME's score)
    python eval.py CKPT --question-file q.jsonl --image-folder imgs --answers-file answers.jsonl  # LLaVA format
    python eval.py CKPT --visualize out/demo/shapes/images   # the pool as a visual vocabulary (64 images)
    python eval.py CKPT --visualize IMAGE.png        # one image: tokens replaced, how well each reconstructed
    python eval.py CKPT --image IMAGE.png --ask "What is left of the red circle?"   # one answer
    python eval.py CKPT --image IMAGE.png --ask      # a conversation about the image, until an empty line

Every evaluation takes one path: a reader (benchmarks.py) turns its file into items (prompt records plus what
scoring needs), generate_answers answers them, and benchmarks.score (or the answers file) takes each item by
its kind.
The pictures (--visualize) are drawn in engineering/pictures.py. Not evaluation, so elsewhere:
scripts/export_llava_hf.py (a llava-hf directory) and scripts/plot_curves.py (training curves).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

import data as D
from engineering import pictures as P
from engineering.benchmarks import (
    InputError,
    format_table,
    load_bench,
    question_turns,
    read_question_file,
    read_test_set,
    score,
    short_uuid,
    words_outside_vocabulary,
)
from engineering.checkpoints import (
    default_device,
    load_checkpoint,
    read_config_json,
    why_it_cannot_answer,
    why_not_a_checkpoint,
)
from engineering.flags import Range, out_of_range
from engineering.reporting import bars_wanted

# -----------------------------------------------------------------------------
# Generating: one greedy, batched loop for every kind of item


class EvalDataset(D.LlavaDataset):
    """LlavaDataset whose records may also carry their image whole: "image_b64" (benchmark TSVs)
    or "image_path" (already resolved)."""

    def load_images(self, rec: dict) -> list[Image.Image]:
        if rec.get("image_b64"):
            try:
                with Image.open(io.BytesIO(base64.b64decode(rec["image_b64"]))) as im:
                    return [D.to_rgb(im)]
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise D.SampleError(f"the base64 image cannot be decoded: {e}") from None
        if rec.get("image_path"):
            return [D.load_image(rec["image_path"])]
        return super().load_images(rec)


def load_model(checkpoint: str, device, dtype: torch.dtype | None = None):
    """(model, tokenizer, image_processor) from any checkpoint load_checkpoint reads, the model in dtype
    (bfloat16: half the memory of float32; a CPU without native bf16 computes it more slowly)."""
    model, tokenizer, image_processor = load_checkpoint(checkpoint, device)
    return (model if dtype is None else model.to(dtype)), tokenizer, image_processor


@torch.no_grad()
def generate_answers(model, tokenizer, image_processor, template, records, batch_size: int, max_new_tokens: int,
                     device, sampling: dict | None = None, progress: bool = True) -> dict:
    """Answers to prompt records (items), batched with left padding: {record id: text}. Greedy, unless
    sampling gives generate's do_sample/temperature/top_p. A record that cannot be used (an image missing
    or unreadable, a conversation the template cannot take) is an error naming it: an evaluation never
    shrinks silently."""
    dataset = EvalDataset(records, "", tokenizer, image_processor, template, model.num_image_tokens,
                          max_length=None, image_token_id=model.cfg.image_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=D.Collator(tokenizer.pad_token_id, padding_side="left"))
    outputs = {}
    for batch in tqdm(loader, desc="eval", disable=not progress or not bars_wanted()):
        if batch["skipped"]:
            raise InputError("; ".join(f"record {rid}: {why}" for rid, why in batch["skipped"]))
        pixel_values = None if batch["pixel_values"] is None else batch["pixel_values"].to(device)
        new = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), pixel_values,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **(sampling or {}))
        outputs.update(zip(batch["ids"], (t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))))
    return outputs


def load_for_answers(checkpoint: str, device, dtype: torch.dtype | None = None) -> tuple:
    """(model, tokenizer, image processor, chat template): the checkpoint ready to answer (the model in dtype,
    as load_model), prompted with the template it was trained with (else its tokenizer's own, else vicuna_v1)."""
    model, tokenizer, image_processor = load_model(checkpoint, device, dtype)
    model.eval()
    trained = read_config_json(checkpoint).get("train_config", {})  # {} for the other formats
    template = D.resolve_template(trained.get("template", "auto"), tokenizer, stage="2")
    D.ensure_pad_token(tokenizer)
    return model, tokenizer, image_processor, template


def answer_items(checkpoint: str, items: list[dict], batch_size: int, max_new_tokens: int, device=None,
                 dtype: torch.dtype | None = None) -> dict:
    """The checkpoint's greedy answer to every item, {item id: text}, prompted with its own chat template.
    dtype: the model's weights and computation (torch.bfloat16: --bf16); None keeps the checkpoint's float32."""
    device = default_device(device)
    torch.manual_seed(0)
    model, tokenizer, image_processor, template = load_for_answers(checkpoint, device, dtype)
    return generate_answers(model, tokenizer, image_processor, template, items, batch_size, max_new_tokens, device)


def single_turn_note(checkpoint: str) -> str:
    """A note for a follow-up question to a model trained on one question per image (the demo's stage 2)."""
    trained = read_config_json(checkpoint).get("train_config") or {}
    if trained.get("recipe") == "demo":
        return ("note: this model's stage 2 saw one question per image (the demo recipe): its answers to "
                "follow-up questions are unreliable; ask each question alone (--ask QUESTION)")
    return ""


class Conversation:
    """A conversation about one image, in the chat template: the image before the first question, every
    earlier question and answer in each prompt. Each answer is generated by generate_answers, the path
    every evaluation takes, so one question gets the answer an evaluation gets."""

    def __init__(self, checkpoint: str, image_path: str, device=None, max_new_tokens: int = 128,
                 sampling: dict | None = None):
        self.device = default_device(device)
        self.model, self.tokenizer, self.image_processor, self.template = load_for_answers(checkpoint, self.device)
        self.image_path, self.max_new_tokens, self.sampling = image_path, max_new_tokens, sampling
        self.turns: list[dict] = []

    def ask(self, question: str) -> str:
        if D.IMAGE_PLACEHOLDER in question:  # one image, placed before the first question
            raise InputError(f"the question contains {D.IMAGE_PLACEHOLDER}: the image is given once, by --image")
        unknown = words_outside_vocabulary(self.tokenizer, question)
        if unknown:  # they would be read as <unk>, and the answer would be a guess
            raise InputError(f"words outside this model's vocabulary: {', '.join(map(repr, unknown))}; ask with "
                             f"the words it was trained on")
        turns = self.turns + question_turns(question, has_image=not self.turns)
        item = {"id": "question", "conversations": turns, "image_path": self.image_path}
        answer = generate_answers(self.model, self.tokenizer, self.image_processor, self.template, [item], 1,
                                  self.max_new_tokens, self.device, self.sampling, progress=False)["question"]
        self.turns = turns + [{"from": "gpt", "value": answer}]
        return answer


# -----------------------------------------------------------------------------
# Entry points, one per input format, all on the path above


def evaluate(checkpoint: str, test_file: str, image_folder: str, batch_size: int = 32, limit: int = 0,
             max_new_tokens: int = 8, device: str | None = None, dtype: torch.dtype | None = None) -> dict:
    """The shapes test set (LLaVA records with a type and options): accuracy overall and per type,
    each beside chance; POPE's metrics over the yes/no questions."""
    items = read_test_set(test_file, image_folder)[:limit or None]
    outputs = answer_items(checkpoint, items, batch_size, max_new_tokens, device, dtype)
    return {"checkpoint": checkpoint, "test_file": test_file,
            **score(items, outputs, group="type", fields=("id", "type"), chance=True)}


def evaluate_bench(checkpoint: str, bench_file: str, image_folder: str = "", batch_size: int = 32, limit: int = 0,
                   max_new_tokens: int = 16, device: str | None = None, dtype: torch.dtype | None = None) -> dict:
    """Accuracy (overall, per category and per l2-category) on a multiple-choice benchmark TSV, or
    POPE's metrics on a yes/no one; with the leaderboards' own scores where the file calls for them:
    MMBench's circular accuracy (circular copies present) and MME's score (MME's sub-tasks)."""
    kind, items = load_bench(bench_file, image_folder)
    items = items[:limit or None]
    outputs = answer_items(checkpoint, items, batch_size, max_new_tokens, device, dtype)
    return {"checkpoint": checkpoint, "bench": bench_file, "kind": kind,
            **score(items, outputs, group="category", fields=("index", "category", "l2-category"))}


def answer_question_file(checkpoint: str, question_file: str, image_folder: str, answers_file: str,
                         batch_size: int = 32, limit: int = 0, max_new_tokens: int = 128,
                         device: str | None = None, dtype: torch.dtype | None = None) -> list[dict]:
    """LLaVA's model_vqa: question lines {question_id, image, text} -> answer lines
    {question_id, prompt, text, answer_id, model_id}, so LLaVA's scoring scripts read them unchanged."""
    items = read_question_file(question_file, image_folder)[:limit or None]
    outputs = answer_items(checkpoint, items, batch_size, max_new_tokens, device, dtype)
    model_id = os.path.basename(os.path.normpath(checkpoint))
    answers = [{"question_id": it["question_id"], "prompt": it["text"], "text": outputs[it["id"]],
                "answer_id": short_uuid(), "model_id": model_id, "metadata": {}} for it in items]
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    with open(answers_file, "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in answers)
    return answers


# -----------------------------------------------------------------------------
# Command line: one function per mode; a mistake in the files or flags is one line, without a traceback


def write_results(results: dict, out: str) -> dict:
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return results


def run_dtype(args) -> torch.dtype | None:
    """--bf16: the model in bfloat16; else as saved (float32)."""
    return torch.bfloat16 if args.bf16 else None


def shapes_main(args) -> dict:
    test_file, folder = args.test_file, args.image_folder
    if not test_file:  # the shapes test set beside the demo run that made the checkpoint
        if why := why_not_a_checkpoint(args.checkpoint):
            raise InputError(why)
        folder = folder or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "shapes")
        test_file = os.path.join(folder, "test.jsonl")
        if not os.path.isfile(test_file):
            raise InputError(f"{test_file} not found: give --test-file and --image-folder")
    results = evaluate(args.checkpoint, test_file, folder, args.batch_size, args.limit,
                       max_new_tokens=args.max_new_tokens or 8, device=args.device, dtype=run_dtype(args))
    print(format_table(results))
    # a partial evaluation (--limit) never takes the full one's file
    default_out = os.path.join(args.checkpoint, f"eval_limit{args.limit}.json" if args.limit else "eval.json")
    return write_results(results, args.out or default_out)


def bench_main(args) -> dict:
    if not os.path.isfile(args.bench):
        raise InputError(f"--bench {args.bench}: no such file; give a VLMEvalKit TSV (MMStar, POPE...; README, "
                         "\"Evaluation\")")
    results = evaluate_bench(args.checkpoint, args.bench, args.image_folder, args.batch_size, args.limit,
                             args.max_new_tokens or 16, args.device, run_dtype(args))
    print(format_table(results))
    name = os.path.splitext(os.path.basename(args.bench))[0]
    return write_results(results, args.out or os.path.join(args.checkpoint, f"eval_{name}.json"))


def question_file_main(args) -> list[dict]:
    if not args.answers_file:
        raise InputError("--question-file needs --answers-file")
    answers = answer_question_file(args.checkpoint, args.question_file, args.image_folder, args.answers_file,
                                   args.batch_size, args.limit, args.max_new_tokens or 128, args.device,
                                   run_dtype(args))
    print(f"wrote {len(answers)} answers to {args.answers_file}")
    return answers


def visualize_main(args) -> str:
    """--visualize: what the pool learned, from the training's own stage-1.5 forward (engineering/pictures.py):
    over a folder's images, the patches each often-used pool row replaced; on one image, the tokens replaced and
    how well each was reconstructed. A pool that never trained is refused: its rows are the random ones."""
    if args.limit and os.path.isfile(args.visualize):
        raise InputError("--limit: no effect with --visualize IMAGE (it counts the images of a folder)")
    paths = P.image_paths(args.visualize, args.limit or 64)
    P.check_pool_trained(args.checkpoint)
    model, tokenizer, image_processor = load_model(args.checkpoint, default_device(args.device), run_dtype(args))
    trained = read_config_json(args.checkpoint).get("train_config", {})
    template = D.resolve_template(trained.get("template", "auto"), tokenizer, stage="1.5")
    messages = [{"role": "user", "content": f"{D.IMAGE_PLACEHOLDER}\n{D.DETAIL_PROMPT}"}]  # stage 1.5's prompt
    ids, _ = D.tokenize_conversation(messages, tokenizer, template, model.num_image_tokens,
                                     image_token_id=model.cfg.image_token_id)
    folder = os.path.isdir(args.visualize)
    stem = "vocabulary" if folder else os.path.splitext(os.path.basename(args.visualize))[0]
    out = args.out_png or os.path.join(args.checkpoint, f"pool_{stem}.png")

    def load(some: list[str]):  # the images as training prepares them
        return D.preprocess_images([D.load_image(p) for p in some], image_processor)
    name = f"{os.path.basename(os.path.normpath(args.checkpoint))} (stage {trained.get('stage', '?')})"
    if str(trained.get("stage")) == "2":  # stage 2 has no step 6: its LLM moved on, its head did not
        name += " [stage 2 trains no reconstruction: its head (cos) is stage 1.5's; draw stage 1.5's checkpoint]"
    picture = P.draw_checkpoint(model, ids, paths, load, image_processor, args.seed, out, name, folder)
    print(f"wrote {out} ({picture.size[0]}x{picture.size[1]})")
    return out


def sampling_settings(args) -> dict | None:
    """--temperature / --top-p as generate takes them (their ranges are checked with every flag's, RANGES):
    None (greedy) at temperature 0."""
    if args.temperature == 0:
        if args.top_p != 1.0:
            raise InputError("--top-p: no effect when answers are greedy (give --temperature > 0 to sample)")
        if args.seed != 0:
            raise InputError("--seed: no effect when answers are greedy (give --temperature > 0 to sample)")
        return None
    return dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)


def ask_main(args) -> list[str]:
    """--ask QUESTION: print the answer. --ask alone: a conversation on stdin, one question a line,
    until an empty line or the end of input. Returns the answers."""
    sampling = sampling_settings(args)
    if not args.image:
        raise InputError("--ask needs --image PATH: the image to ask about")
    D.load_image(args.image)  # a missing or unreadable image is one line, before the model loads
    why = why_it_cannot_answer(args.checkpoint)
    if why:
        raise InputError(why)
    torch.manual_seed(args.seed)  # sampling's seed
    chat = Conversation(args.checkpoint, args.image, args.device, args.max_new_tokens or 128, sampling)
    if args.ask:  # a question given
        answer = chat.ask(args.ask)
        print(answer)
        return [answer]
    print(f"asking {args.checkpoint} about {args.image}; an empty line or end of input ends the conversation")
    answers = []
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            print()
            break
        if not sys.stdin.isatty():  # piped questions are not echoed by a terminal: the transcript shows them
            print(question)
        if not question:
            break
        if answers and (note := single_turn_note(args.checkpoint)) and len(answers) == 1:
            print(note)
        try:
            answers.append(chat.ask(question))
        except InputError as e:  # a question the conversation cannot take: say so, and go on
            print(f"error: {e}")
            continue
        print(f"ASSISTANT: {answers[-1]}")
    return answers


# each mode: the flag that selects it (the first one given; else the shapes test set), the function that
# runs it, and the flags it reads: any other flag given is refused, never ignored
ASK_INTERACTIVELY = ""  # --ask without a question
EVAL_FLAGS = {"image_folder", "batch_size", "limit", "max_new_tokens", "bf16"}
MODES = {
    "ask": ("ask", ask_main, {"ask", "image", "max_new_tokens", "temperature", "top_p", "seed"}),
    "visualize": ("visualize", visualize_main, {"visualize", "out_png", "seed", "limit", "bf16"}),
    "question file": ("question_file", question_file_main, {"question_file", "answers_file", *EVAL_FLAGS}),
    "bench": ("bench", bench_main, {"bench", "out", *EVAL_FLAGS}),
    "shapes test set": (None, shapes_main, {"test_file", "out", *EVAL_FLAGS}),
}
COMMON_FLAGS = {"checkpoint", "device"}


def refuse_unused_flags(ap: argparse.ArgumentParser, args) -> str:
    """The mode the flags select; one clear line when a flag given has no effect in it."""
    given = {k for k, v in vars(args).items() if v != ap.get_default(k)}
    mode = next(mode for mode, (key, _, _) in MODES.items() if key is None or key in given)
    unused = ", ".join("--" + k.replace("_", "-") for k in sorted(given - MODES[mode][2] - COMMON_FLAGS))
    if unused:
        ap.error(f"{unused}: no effect when evaluating the {mode}" if mode == "shapes test set" else
                 f"{unused}: no effect with --{mode.replace(' ', '-')}")
    return mode


# the numeric flags' valid ranges, declared once: main checks every flag against it, --help shows it
RANGES = {"batch_size": Range(1), "limit": Range(0), "seed": Range(0), "max_new_tokens": Range(0),
          "temperature": Range(0), "top_p": Range(0, 1, lo_open=True)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("checkpoint", nargs="?", default="out/demo/stage2")
    ap.add_argument("--test-file", default="", help="LLaVA-format test records (default: the shapes test set)")
    ap.add_argument("--image-folder", default="")
    ap.add_argument("--out", default="", help="results JSON (default: CHECKPOINT/eval.json)")
    ap.add_argument("--batch-size", type=int, default=32, help=f"questions per batch ({RANGES['batch_size']})")
    ap.add_argument("--limit", type=int, default=0, help=f"the first N questions only; 0: all; --visualize FOLDER: "
                                                             f"the first N images, 0: 64 ({RANGES['limit']})")
    ap.add_argument("--device", default=None)
    ap.add_argument("--bf16", action="store_true",
                    help="the model's weights and computation in bfloat16 (half the memory; default: float32)")
    ap.add_argument("--visualize", default="", metavar="IMAGE_OR_FOLDER",
                    help="a folder: the patches each pool row replaced (its first --limit images, default 64); "
                         "an image: its replaced tokens and their reconstruction")
    ap.add_argument("--out-png", default="", help="the PNG --visualize writes (default: CHECKPOINT/pool_NAME.png)")
    ap.add_argument("--seed", type=int, default=0,
                    help=f"replacement seed for --visualize; sampling seed for --ask with --temperature > 0 "
                         f"({RANGES['seed']})")
    ap.add_argument("--bench", default="", help="a VLMEvalKit TSV (multiple choice or yes/no): MMStar, POPE...")
    ap.add_argument("--question-file", default="", help="LLaVA question JSONL {question_id, image, text}")
    ap.add_argument("--answers-file", default="", help="with --question-file: the LLaVA answers JSONL to write")
    ap.add_argument("--max-new-tokens", type=int, default=0,
                    help=f"0: 16 (TSV), 128 (questions, --ask), 8 (shapes) ({RANGES['max_new_tokens']})")
    ap.add_argument("--ask", nargs="?", const=ASK_INTERACTIVELY, default=None, metavar="QUESTION",
                    help="with --image: print the answer to QUESTION; without QUESTION, a conversation on stdin")
    ap.add_argument("--image", default="", help="the image --ask asks about")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help=f"--ask: 0 answers greedily, > 0 samples ({RANGES['temperature']})")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help=f"--ask with --temperature > 0: nucleus sampling ({RANGES['top_p']})")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    problem = out_of_range(vars(args), RANGES)
    if problem:
        raise SystemExit(f"error: {problem}")
    mode = refuse_unused_flags(ap, args)
    try:
        if not os.path.isdir(args.checkpoint):
            raise InputError(f"{args.checkpoint}: no such checkpoint directory (run `python train.py` first)")
        return MODES[mode][1](args)
    except (InputError, D.SampleError, FileNotFoundError) as e:  # the user's to fix (SampleError: an image)
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        print(f"interrupted ({mode}): nothing was written for this run", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
