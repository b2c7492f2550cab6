"""
Evaluate a victor checkpoint on the shapes test set (multiple-choice and yes/no questions):
accuracy overall and per question type, each beside its chance level.

    python eval.py                                  # the demo's final checkpoint, out/demo/stage2
    python eval.py out/demo/stage2 --out results.json --limit 200
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

import torch
from tqdm import tqdm

import data as D
from victor import load_checkpoint


def extract_answer(text: str, options: list[str] | None) -> str:
    """The model's answer: an option letter for multiple choice, else the first word (yes/no)."""
    text = text.strip()
    if options:
        letters = D.LETTERS[:len(options)]
        m = re.match(rf"^\(?([{letters}])\b", text)
        if m:
            return m.group(1)
        for letter, opt in zip(letters, options):  # the option's text alone
            if text.lower().rstrip(" .") == opt.lower():
                return letter
        return ""
    m = re.match(r"^\W*(\w+)", text)
    return m.group(1).lower() if m else ""


def chance_of(rec) -> float:
    return 1.0 / len(rec["options"]) if rec.get("options") else 0.5


@torch.no_grad()
def evaluate(checkpoint: str, test_file: str, image_folder: str, batch_size: int = 32, limit: int = 0,
             max_new_tokens: int = 8, device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, image_processor = load_checkpoint(checkpoint, device)
    model.eval()
    with open(os.path.join(checkpoint, "config.json")) as f:
        template_name = json.load(f).get("train_config", {}).get("template", "auto")
    template = D.resolve_template(template_name, tokenizer, stage="2")
    records, bad = D.load_records(test_file, strict=True)
    if limit:
        records = records[:limit]
    # the prompt: every turn but the last answer; the model answers after the generation prompt
    prompts = [{**r, "conversations": r["conversations"][:-1]} for r in records]
    dataset = D.LlavaDataset(prompts, image_folder, tokenizer, image_processor, template, model.num_image_tokens,
                             max_length=None, image_token_id=model.cfg.image_token_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=D.Collator(tokenizer.pad_token_id, padding_side="left"))
    by_id = {D.record_id(r, i): r for i, r in enumerate(records)}
    per_type = defaultdict(lambda: {"correct": 0, "total": 0, "chance_sum": 0.0})
    predictions, skipped = [], []
    for batch in tqdm(loader, desc="eval"):
        skipped += batch["skipped"]
        if "input_ids" not in batch:
            continue
        new = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        for rid, out in zip(batch["ids"], tokenizer.batch_decode(new, skip_special_tokens=True)):
            rec = by_id[rid]
            answer = rec["conversations"][-1]["value"].strip()
            pred = extract_answer(out, rec.get("options"))
            truth = extract_answer(answer, rec.get("options"))  # the answer may be a letter or the option's text
            kind = rec.get("type", "all")
            t = per_type[kind]
            t["total"] += 1
            t["correct"] += int(pred != "" and pred == truth)
            t["chance_sum"] += chance_of(rec)
            predictions.append({"id": rid, "type": kind, "output": out, "prediction": pred, "answer": answer})
    if skipped:
        raise RuntimeError(f"{len(skipped)} test records could not be used: {skipped[:5]}")
    total = sum(t["total"] for t in per_type.values())
    results = {
        "checkpoint": checkpoint, "test_file": test_file, "num_questions": total,
        "accuracy": sum(t["correct"] for t in per_type.values()) / max(total, 1),
        "chance": sum(t["chance_sum"] for t in per_type.values()) / max(total, 1),
        "per_type": {k: {"accuracy": t["correct"] / t["total"], "chance": t["chance_sum"] / t["total"],
                         "n": t["total"]} for k, t in sorted(per_type.items())},
        "predictions": predictions,
    }
    return results


def format_table(results: dict) -> str:
    rows = [f"{'type':<10} {'n':>5} {'accuracy':>9} {'chance':>7}"]
    for k, t in results["per_type"].items():
        rows.append(f"{k:<10} {t['n']:>5} {t['accuracy']:>9.3f} {t['chance']:>7.3f}")
    rows.append(f"{'overall':<10} {results['num_questions']:>5} {results['accuracy']:>9.3f} {results['chance']:>7.3f}")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default="out/demo/stage2")
    ap.add_argument("--test-file", default="", help="LLaVA-format test records (default: the shapes test set)")
    ap.add_argument("--image-folder", default="")
    ap.add_argument("--out", default="", help="results JSON (default: CHECKPOINT/eval.json)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"{args.checkpoint}: no such checkpoint directory (run `python train.py` first)")
    test_file, folder = args.test_file, args.image_folder
    if not test_file:  # the shapes test set beside the demo run that made the checkpoint
        folder = folder or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "shapes")
        test_file = os.path.join(folder, "test.jsonl")
        if not os.path.isfile(test_file):
            raise SystemExit(f"{test_file} not found: give --test-file and --image-folder")
    torch.manual_seed(0)
    results = evaluate(args.checkpoint, test_file, folder, args.batch_size, args.limit, device=args.device)
    print(format_table(results))
    out = args.out or os.path.join(args.checkpoint, "eval.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
