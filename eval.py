"""
Evaluate a victor checkpoint (victor's own, the original LLaVA code's or llava-hf's), offline, greedy, batched:

    python eval.py                                   # the demo's shapes test set: accuracy per type beside chance
    python eval.py out/demo/stage2 --out results.json --limit 200
    python eval.py CKPT --bench MMStar.tsv --out mmstar.json   # VLMEvalKit TSV, multiple choice: accuracy
    python eval.py CKPT --bench POPE.tsv             # yes/no: POPE's precision/recall/F1 (and MME's score)
    python eval.py CKPT --question-file q.jsonl --image-folder imgs --answers-file answers.jsonl  # LLaVA format
    python eval.py out/demo/stage1.5 --visualize IMAGE.png   # pool row per patch + reconstruction error
    python eval.py --curves out/demo/stage1.5/metrics.jsonl out/demo/stage2/metrics.jsonl  # training curves
    python eval.py CKPT --export-llava-hf OUT        # a transformers LlavaForConditionalGeneration directory
    python eval.py CKPT --image IMAGE.png --ask "What is left of the red circle?"   # one answer
    python eval.py CKPT --image IMAGE.png --ask      # a conversation about the image, until an empty line

Every evaluation takes one path: a reader turns its file into items (prompt records plus what scoring
needs), generate_answers answers them, and score (or the answers file) takes each item by its kind.
"""
from __future__ import annotations

import argparse
import base64
import colorsys
import csv
import io
import json
import os
import re
import secrets
import sys
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data as D
from checkpoints import WEIGHT_FILES, export_llava_hf, read_config_json
from flags import Range, out_of_range
from victor import default_device, load_checkpoint, match_tokens_to_pool


class InputError(ValueError):
    """A mistake in the files or flags given (not in the code): main prints it as one line."""


# -----------------------------------------------------------------------------
# Reading: every input format becomes a list of items. An item is a LLaVA prompt record ("id",
# "conversations" up to the question, an "image" list of paths, an "image_path" or an "image_b64"),
# plus what scoring needs: "kind" (multiple_choice, yes_no or open), "options", "answer", and the
# fields reported with each prediction (type or category, index, l2-category, question_id...).

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # benchmarks may have more options than the shapes set's A-D
YES_NO_SUFFIX = "Answer the question using a single word or phrase."


def _is_none(value) -> bool:
    """Empty, NaN or None, as pandas writes them into a TSV (LLaVA's is_none)."""
    return value is None or (isinstance(value, float) and value != value) or \
        str(value).strip().lower() in ("", "nan", "none")


def _question(text: str, has_image: bool) -> list[dict]:
    return [{"from": "human", "value": (f"{D.IMAGE_PLACEHOLDER}\n" if has_image else "") + text}]


def read_rows(path: str) -> list:
    """data.read_jsonl; a line that is not JSON is the user's to fix."""
    try:
        return D.read_jsonl(path)
    except ValueError as e:
        raise InputError(str(e)) from None


def read_test_set(test_file: str, image_folder: str) -> list[dict]:
    """LLaVA records (the shapes test set) whose last turn is the answer: a "type", and "options"
    for a multiple-choice question (the answer is an option's text) or none for yes/no."""
    try:
        records, _ = D.load_records(test_file, strict=True, image_folder=image_folder)  # images too, before the model
    except ValueError as e:
        raise InputError(str(e)) from None
    items = []
    for i, r in enumerate(records):
        answer, options = r["conversations"][-1]["value"].strip(), r.get("options") or []
        if not options and answer.lower() not in ("yes", "no"):
            raise InputError(f"{test_file}: record {D.record_id(r, i)}: no options, and the answer {answer!r} "
                             f"is not yes/no")
        items.append({**r, "id": D.record_id(r, i), "conversations": r["conversations"][:-1],
                      "image": [os.path.join(image_folder, p) for p in D.record_images(r)],
                      "kind": "multiple_choice" if options else "yes_no", "options": options, "answer": answer,
                      "type": r.get("type", "all")})
    if len({it["id"] for it in items}) < len(items):
        raise InputError(f"{test_file}: record ids repeat; each answer is matched to its record by id")
    return items


def load_bench(path: str, image_folder: str = "") -> tuple[str, list[dict]]:
    """A VLMEvalKit TSV (or JSONL with the same fields) -> (kind, items), kind "multiple_choice" or "yes_no".

    Each item: index, question (the full prompt text, without <image>), options, answer (a letter or
    yes/no), category, l2-category, and image_b64 or image_path. Raises InputError naming the row."""
    if path.endswith(".jsonl"):
        rows = read_rows(path)
    else:
        csv.field_size_limit(sys.maxsize)  # base64 images are long
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise InputError(f"{path}: no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: every row must be an object with index, question, answer")
    missing = [c for c in ("index", "question", "answer") if c not in rows[0]]
    if missing:
        raise InputError(f"{path}: missing required column(s) {missing} (have {sorted(rows[0])})")
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    b64_by_index = {str(r["index"]): r.get("image") for r in rows if not _is_none(r.get("image"))}
    items = [_bench_item(row, n, f"{path}: row {n + 1} (index {row.get('index')})", folder, b64_by_index)
             for n, row in enumerate(rows)]
    kinds = {it["kind"] for it in items}
    if len(kinds) > 1:
        raise InputError(f"{path}: mixes multiple-choice rows and yes/no rows")
    return kinds.pop(), items


def _bench_item(row: dict, n: int, where: str, folder: str, b64_by_index: dict) -> dict:
    """One row of a benchmark file as an item, prompted as LLaVA's evaluation prompts."""
    if any(_is_none(row.get(c)) for c in ("index", "question", "answer")):
        raise InputError(f"{where}: empty index/question/answer")
    options = []
    for letter in OPTION_LETTERS:  # A, B, ... as far as they are present and non-empty
        if _is_none(row.get(letter)):
            break
        options.append(str(row[letter]).strip())
    answer, question = str(row["answer"]).strip(), str(row["question"]).strip()
    if options:
        if answer not in OPTION_LETTERS[:len(options)]:
            raise InputError(f"{where}: answer {answer!r} is not one of the option letters "
                             f"{OPTION_LETTERS[:len(options)]}")
        if not _is_none(row.get("hint")):
            question = str(row["hint"]).strip() + "\n" + question
        question += "".join(f"\n{letter}. {opt}" for letter, opt in zip(OPTION_LETTERS, options))
        question += "\n" + D.MC_SUFFIX
    elif answer.lower() in ("yes", "no"):
        answer, question = answer.lower(), question + "\n" + YES_NO_SUFFIX
    else:
        raise InputError(f"{where}: no options (columns A, B, ...) and the answer {answer!r} is not yes/no")
    item = {"id": f"#{n}", "index": str(row["index"]), "question": question, "options": options, "answer": answer,
            "kind": "multiple_choice" if options else "yes_no",
            "category": "all" if _is_none(row.get("category")) else str(row["category"])}
    l2 = row.get("l2-category", row.get("l2_category"))  # MMBench writes l2-category, MMStar l2_category
    if not _is_none(l2):
        item["l2-category"] = str(l2)
    image = row.get("image")
    if not _is_none(image):
        image = str(image).strip()
        if len(image) <= 64 and image in b64_by_index and image != item["index"]:  # MMBench: another row's index
            image = str(b64_by_index[image])
        try:
            base64.b64decode(image, validate=True)
        except ValueError as e:  # binascii.Error is one
            raise InputError(f"{where}: the image is not valid base64 ({e})") from None
        item["image_b64"] = image
        item["image_key"] = image  # the same string object: no copy
    if not _is_none(row.get("image_path")):  # which image a row asks about (MME: two questions per image)
        item["image_key"] = str(row["image_path"]).strip()
        if "image_b64" not in item:
            item["image_path"] = os.path.join(folder, item["image_key"])  # unchanged when absolute
            if not os.path.isfile(item["image_path"]):
                raise InputError(f"{where}: image_path {item['image_path']} not found")
    item["conversations"] = _question(question, "image_b64" in item or "image_path" in item)
    return item


def read_question_file(question_file: str, image_folder: str) -> list[dict]:
    """LLaVA's question JSONL, {question_id, image, text} a line -> open items."""
    items = []
    for n, q in enumerate(read_rows(question_file), 1):
        if not isinstance(q, dict) or "question_id" not in q or _is_none(q.get("text")):
            raise InputError(f"{question_file}: line {n}: needs 'question_id' and 'text'")
        item = {"id": f"#{n}", "kind": "open", "question_id": q["question_id"], "text": q["text"],
                "conversations": _question(q["text"], not _is_none(q.get("image")))}
        if not _is_none(q.get("image")):
            item["image_path"] = os.path.join(image_folder, q["image"])
            if not os.path.isfile(item["image_path"]):
                raise InputError(f"{question_file}: line {n} (question_id {q['question_id']}): "
                                 f"image {item['image_path']} not found")
        items.append(item)
    return items


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
    for batch in tqdm(loader, desc="eval", disable=not progress):
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


def why_it_cannot_answer(checkpoint: str) -> str | None:
    """Why a checkpoint cannot answer questions, or None: a stage-1 checkpoint holds a projector alone
    (victor's saved_parts "projector", LLaVA's mm_projector.bin without the model's weights), and its
    LLM was never taught to take an image and a question."""
    if read_config_json(checkpoint).get("saved_parts") == "projector" or (
            os.path.isfile(os.path.join(checkpoint, "mm_projector.bin"))
            and not any(os.path.isfile(os.path.join(checkpoint, n)) for n in WEIGHT_FILES)):
        return (f"{checkpoint} is a stage-1 checkpoint (a projector alone, trained to caption): it cannot "
                f"answer questions; ask a stage-1.5 or stage-2 checkpoint")
    return None


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
        turns = self.turns + _question(question, has_image=not self.turns)
        item = {"id": "question", "conversations": turns, "image_path": self.image_path}
        answer = generate_answers(self.model, self.tokenizer, self.image_processor, self.template, [item], 1,
                                  self.max_new_tokens, self.device, self.sampling, progress=False)["question"]
        self.turns = turns + [{"from": "gpt", "value": answer}]
        return answer


# -----------------------------------------------------------------------------
# Scoring by kind: multiple choice and yes/no -> accuracies (+ POPE, MMBench circular, MME);
# open answers -> LLaVA's answers file


def extract_yes_no(text: str) -> str:
    """yes / no from a free answer ("Yes, there is" -> yes, "There is not" -> no), "" when neither."""
    words = re.findall(r"[a-z]+", text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    if "no" in words or "not" in words:
        return "no"
    return "yes" if "yes" in words else ""


def extract_answer(text: str, options: list[str] | None) -> str:
    """The model's answer: an option letter for multiple choice, else yes/no (extract_yes_no)."""
    text = text.strip()
    if not options:
        return extract_yes_no(text)
    letters = OPTION_LETTERS[:len(options)]
    m = re.match(rf"^\(?([{letters}])\b", text)  # "B", "(B)", "B. text", "B)"
    if m:
        return m.group(1)
    # "The answer is B", "Answer: (B)", "the correct option is B."
    m = re.search(rf"(?i:answer|option|choice)\W{{0,3}}(?:(?i:is)\W{{1,3}})?\(?([{letters}])\b", text)
    if m:
        return m.group(1)
    for letter, opt in zip(letters, options):  # the option's text alone
        if text.lower().rstrip(" .") == opt.lower():
            return letter
    return ""


def chance_of(item: dict) -> float:
    return 1.0 / len(item["options"]) if item.get("options") else 0.5


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _grouped(items: list[dict], predictions: list[dict], key: str, chance: bool) -> dict:
    groups = defaultdict(list)
    for it, p in zip(items, predictions):
        if key in it:
            groups[it[key]].append((p["correct"], chance_of(it)))
    return {k: {"accuracy": _mean(c for c, _ in v), **({"chance": _mean(h for _, h in v)} if chance else {}),
                "n": len(v)} for k, v in sorted(groups.items())}


def score(items: list[dict], outputs: dict, group: str, fields: tuple[str, ...], chance: bool = False) -> dict:
    """Multiple-choice and yes/no items: each prediction (with the item's `fields`), accuracy overall,
    per `group` and per l2-category (beside chance if asked); POPE's metrics over the yes/no items;
    MMBench's circular accuracy and MME's score where the file calls for them."""
    predictions = []
    for it in items:
        out = outputs[it["id"]]
        pred = extract_answer(out, it["options"])
        truth = extract_answer(it["answer"], it["options"])  # a letter, an option's text, or yes/no
        predictions.append({**{k: it[k] for k in fields if k in it}, "output": out, "prediction": pred,
                            "answer": it["answer"], "correct": pred != "" and pred == truth})
    results = {"num_questions": len(items), "accuracy": _mean(p["correct"] for p in predictions)}
    if chance:
        results["chance"] = _mean(map(chance_of, items))
    results[f"per_{group}"] = _grouped(items, predictions, group, chance)
    if any("l2-category" in it for it in items):
        results["per_l2_category"] = _grouped(items, predictions, "l2-category", chance)
    yes_no = [(it, p) for it, p in zip(items, predictions) if it["kind"] == "yes_no"]
    if yes_no:
        results["pope"] = pope_metrics([p["prediction"] for _, p in yes_no],
                                       [extract_yes_no(it["answer"]) for it, _ in yes_no])
    kinds = {it["kind"] for it in items}
    if kinds == {"multiple_choice"} and (circular := circular_accuracy(predictions)):
        results["circular"] = circular
    if kinds == {"yes_no"} and (mme := mme_scores(items, predictions)):
        results["mme"] = mme
    results["predictions"] = predictions
    return results


def pope_metrics(predictions: list[str], answers: list[str]) -> dict:
    """POPE's metrics, positive = yes: accuracy, precision, recall, F1 and the ratio of yes answers.
    A prediction that is neither yes nor no counts as wrong (and as not yes)."""
    pairs = [(p.lower(), a.lower()) for p, a in zip(predictions, answers)]
    tp = sum(p == "yes" and a == "yes" for p, a in pairs)
    fp = sum(p == "yes" and a == "no" for p, a in pairs)
    fn = sum(p != "yes" and a == "yes" for p, a in pairs)
    precision, recall = (tp / (tp + fp), tp / (tp + fn)) if tp else (0.0, 0.0)
    return {"n": len(pairs), "accuracy": _mean(p == a for p, a in pairs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
            "yes_ratio": _mean(p == "yes" for p, _ in pairs), "unparsed": sum(p not in ("yes", "no") for p, _ in pairs)}


def circular_accuracy(predictions: list[dict]) -> dict | None:
    """MMBench's circular evaluation (as VLMEvalKit): the copies of a question with its options rotated
    share index mod 1e6, and the question counts as right only if every copy is answered right.
    None when the file has no copies (or no indices that are numbers)."""
    try:
        keys = [int(float(p.get("index", ""))) % 1_000_000 for p in predictions]
    except ValueError:
        return None
    groups = defaultdict(list)
    for key, p in zip(keys, predictions):
        groups[key].append(p)
    if all(len(g) == 1 for g in groups.values()):
        return None
    right = {key: all(p["correct"] for p in g) for key, g in groups.items()}
    per_category = defaultdict(list)
    for key, g in groups.items():
        per_category[g[0]["category"]].append(right[key])
    return {"accuracy": _mean(right.values()), "n": len(right),
            "per_category": {k: {"accuracy": _mean(v), "n": len(v)} for k, v in sorted(per_category.items())}}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "ocr")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(items: list[dict], predictions: list[dict]) -> dict | None:
    """MME's leaderboard score. Per sub-task (category): accuracy over its questions plus accuracy+ over its
    images (an image counts when every question about it, two in MME, is right), each x100, so at most
    200; perception and cognition are the sums over their sub-tasks. None unless every category is an
    MME sub-task."""
    tasks = [it.get("category", "").strip().lower().replace(" ", "_") for it in items]  # "OCR", "code reasoning"
    if not tasks or not set(tasks) <= set(MME_PERCEPTION + MME_COGNITION):
        return None
    per_task = {}
    for task in sorted(set(tasks)):
        rows = [(it, p) for t, it, p in zip(tasks, items, predictions) if t == task]
        if any("image_key" not in it for it, _ in rows):
            raise InputError(f"MME sub-task {task}: every row needs an image (image or image_path) to pair "
                             f"its questions for accuracy+")
        by_image = defaultdict(list)
        for it, p in rows:
            by_image[it["image_key"]].append(p["correct"])
        acc = 100 * _mean(p["correct"] for _, p in rows)
        acc_plus = 100 * _mean(all(v) for v in by_image.values())
        per_task[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus,
                          "questions": len(rows), "images": len(by_image)}
    perception = sum(per_task[t]["score"] for t in MME_PERCEPTION if t in per_task)
    cognition = sum(per_task[t]["score"] for t in MME_COGNITION if t in per_task)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "per_subtask": per_task, "missing": [t for t in MME_PERCEPTION + MME_COGNITION if t not in per_task]}


def short_uuid() -> str:
    """A random id like shortuuid's (22 characters of base 57), as in LLaVA's answer files."""
    return "".join(secrets.choice("23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz") for _ in range(22))


# -----------------------------------------------------------------------------
# Pictures (matplotlib): the pool row step 3 matches to each patch beside its reconstruction error
# (--visualize), and training curves (--curves)

GOLDEN = 0.6180339887498949


def pool_colour(row: int) -> tuple[int, int, int]:
    """A deterministic colour per pool row: golden-ratio hue steps, so nearby rows differ."""
    r, g, b = colorsys.hsv_to_rgb((int(row) * GOLDEN) % 1.0, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def pool_picture_layout(grid: int, panel: int = 384) -> dict:
    """Geometry of draw_pool_picture's output in pixels: size, the two panels' top-left corners, cell side."""
    cell = max(1, panel // grid)
    side = cell * grid
    pad, gap, top, bottom, legend = 20, 40, 64, 56, 90
    return {"size": (pad + 2 * side + gap + legend + pad, top + side + bottom), "left": (pad, top),
            "right": (pad + side + gap, top), "cell": cell, "side": side}


def _figure(width: int, height: int):
    """A matplotlib figure of width x height pixels, drawn without a display (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _picture(fig, out_png: str | None) -> Image.Image:
    """The figure as an RGB PIL image, written to out_png if given."""
    fig.canvas.draw()
    picture = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    if out_png:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        picture.save(out_png)
    return picture


def draw_pool_picture(image, pool_indices, errors, replaced, panel: int = 384, title: str = "",
                      error_name: str = "SmoothL1") -> Image.Image:
    """The picture, from arrays alone. image: a PIL image (shown square, as the model sees it);
    pool_indices, errors, replaced: grid*grid values in row-major patch order (the pool row matched to
    each patch, its reconstruction error, whether the forward that gave the errors replaced it).
    Returns an RGB PIL image of size pool_picture_layout(grid, panel)["size"]."""
    from matplotlib.patheffects import withStroke
    rows = np.asarray(pool_indices).reshape(-1).astype(int)
    errs = np.asarray(errors, dtype=np.float64).reshape(-1)
    rep = np.asarray(replaced).reshape(-1).astype(bool)
    n, grid = len(rows), int(round(len(rows) ** 0.5))
    if grid * grid != n or len(errs) != n or len(rep) != n:
        raise ValueError(f"pool_indices, errors and replaced must each hold grid*grid values; "
                         f"got {len(rows)}, {len(errs)}, {len(rep)}")
    lay = pool_picture_layout(grid, panel)
    (width, height), cell, side = lay["size"], lay["cell"], lay["side"]
    fig = _figure(width, height)

    def axes(x, y, w):  # a box in pixels from the top left, as matplotlib's figure fractions
        ax = fig.add_axes((x / width, 1 - (y + side) / height, w / width, side / height))
        ax.set(xticks=[], yticks=[])
        return ax

    # left: the image, each patch half its pool row's colour, with the row's number
    base = np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float64)
    tint = np.array([pool_colour(r) for r in rows], dtype=np.float64).reshape(grid, grid, 3)
    left = axes(*lay["left"], side)
    left.imshow(((base + tint.repeat(cell, 0).repeat(cell, 1)) / 2).astype(np.uint8), interpolation="nearest")
    left.set_title(f"pool row matched to each patch ({n} tokens)", fontsize=11)
    left.set_xlabel(f"same colour = same pool row; {len(set(rows.tolist()))} distinct rows", fontsize=10)
    # right: each patch's reconstruction error; a dot marks a token replaced by its pool row
    right = axes(*lay["right"], side)
    heat = right.imshow(errs.reshape(grid, grid), cmap="viridis", interpolation="nearest")
    i, j = np.divmod(np.flatnonzero(rep), grid)
    right.scatter(j - 0.3, i - 0.3, s=30, c="white", edgecolors="black", linewidths=0.8)
    right.set_title(f"reconstruction error per patch ({error_name})", fontsize=11)
    right.set_xlabel(f"dot = replaced by its pool row ({int(rep.sum())} of {n}); mean {errs.mean():.3g}", fontsize=10)
    x1, y1 = lay["right"]
    fig.colorbar(heat, cax=axes(x1 + side + 14, y1, 18))
    outline = [withStroke(linewidth=2, foreground="black")]
    for k in range(n):  # the numbers, where the cells are large enough to hold them
        i, j = divmod(k, grid)
        if cell >= 18:
            left.text((j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5, str(rows[k]), ha="center", va="center",
                      color="white", fontsize=min(14, cell // 5), path_effects=outline)
        if cell >= 44:
            right.text(j, i, f"{errs[k]:.3g}", ha="center", va="center", color="white",
                       fontsize=min(10, cell // 6), path_effects=outline)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 8 / height, va="top")
    return _picture(fig, None)


@torch.no_grad()
def pool_rows_and_errors(model, input_ids, pixel_values, seed: int = 0, assignment: str = "hungarian"):
    """For one image: (the pool row matched to each of its N visual tokens, each token's reconstruction
    error in a stage-1.5 forward, which tokens that forward replaced, the assignment used), arrays of N."""
    was_training = model.training
    model.eval()
    try:
        _, _, visual = model.embed_inputs(input_ids, pixel_values)
        n = visual.shape[1]
        if model.token_pool.shape[0] < n:  # too few rows to give every token its own: each its nearest
            assignment = "nearest"
        rows = match_tokens_to_pool(visual.float(), model.token_pool, assignment)[0]
        # every token's error, also where training reconstructs only a share of the images (VDEP); the
        # labels (none supervised) give Croc's mixed attention its prefix, as in training
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        out = model(input_ids, torch.ones_like(input_ids), labels=torch.full_like(input_ids, D.IGNORE_INDEX),
                    pixel_values=pixel_values, stage="1.5", generator=generator,
                    reconstruct_every_image=True, return_token_errors=True)
    finally:
        model.train(was_training)
    errors = torch.zeros(n)
    if out.token_errors is not None:  # shown at the token reconstructed (recon_target_offset: VDEP's next token)
        errors[model.cfg.recon_target_offset:] = out.token_errors[0].float().cpu()
    replaced = out.replaced_mask[0] if out.replaced_mask is not None else torch.zeros(n, dtype=torch.bool)
    return rows.cpu().numpy(), errors.numpy(), replaced.cpu().numpy(), assignment


def visualize_pool(checkpoint_or_model, image_path: str, out_png: str | None = None, tokenizer=None,
                   image_processor=None, template: str | None = None, seed: int = 0, device: str | None = None,
                   panel: int = 384, assignment: str = "hungarian", dtype: torch.dtype | None = None):
    """Draw, for one image, the pool row step 3's matching gives each visual token (all N at once)
    and the per-patch reconstruction error of a stage-1.5 forward (replacement drawn with a fixed
    torch.Generator seeded with `seed`, as in training). Writes out_png if given; returns the PIL image.

    checkpoint_or_model: a checkpoint directory, or a VictorModel (then give tokenizer and
    image_processor; template defaults to "auto" for stage 1.5). assignment: "hungarian" (one-to-one,
    as in training: every patch of the image gets a distinct row) or "nearest" (each token's nearest
    row, so similar regions can share a row and a colour). dtype: as answer_items' (a checkpoint only).
    """
    if assignment not in ("hungarian", "nearest"):
        raise ValueError(f"assignment must be 'hungarian' or 'nearest', got {assignment!r}")
    if isinstance(checkpoint_or_model, str):
        model, tok, proc = load_model(checkpoint_or_model, default_device(device), dtype)
        tokenizer, image_processor = tokenizer or tok, image_processor or proc
        trained = read_config_json(checkpoint_or_model).get("train_config", {})
        template, stage = template or trained.get("template", "auto"), trained.get("stage", "1.5")
        name = os.path.basename(os.path.normpath(checkpoint_or_model))
    else:
        if tokenizer is None or image_processor is None:
            raise ValueError("visualize_pool(model, ...) needs tokenizer= and image_processor=")
        model, template, stage, name = checkpoint_or_model, template or "auto", "1.5", "model"
    device = next(model.parameters()).device
    template = D.resolve_template(template, tokenizer, stage="1.5" if stage == "1" else stage)
    image = D.load_image(image_path)
    pixel_values = D.preprocess_images([image], image_processor).to(device)
    messages = [{"role": "user", "content": f"{D.IMAGE_PLACEHOLDER}\n{D.DETAIL_PROMPT}"}]
    ids, _ = D.tokenize_conversation(messages, tokenizer, template, model.num_image_tokens,
                                     image_token_id=model.cfg.image_token_id)
    rows, errors, replaced, assignment = pool_rows_and_errors(model, torch.tensor([ids], device=device), pixel_values,
                                                              seed, assignment)
    fill = tuple(int(255 * m) for m in image_processor.image_mean)
    title = (f"checkpoint {name} (stage {stage}): {os.path.basename(image_path)}, "
             f"pool {model.token_pool.shape[0]} rows, {assignment} match, replacement seed {seed}")
    picture = draw_pool_picture(D.expand_to_square(image, fill), rows, errors, replaced, panel=panel, title=title)
    if out_png:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        picture.save(out_png)
    return picture


CURVE_METRICS = (("loss", "loss"), ("lm_loss", "LM loss"), ("recon_loss", "reconstruction loss"),
                 ("lr", "learning rate"))


def read_curves(paths: list[str]) -> dict[str, list[dict]]:
    """metrics.jsonl files -> {series label: rows with a "step"}, one series per (file, stage).
    ValueError naming the file when one is not JSON or has no such rows."""
    series: dict[str, list[dict]] = {}
    for path in paths:
        rows = [r for r in D.read_jsonl(path) if isinstance(r, dict) and "step" in r]  # not e.g. {"done": true}
        if not rows:
            raise ValueError(f"{path}: no rows with a 'step' key (expected a metrics.jsonl written by train.py)")
        for row in rows:
            label = os.path.basename(os.path.dirname(os.path.abspath(path))) if len(paths) > 1 else ""
            if "stage" in row and str(row["stage"]) not in label:
                label = f"{label} stage {row['stage']}".strip()
            series.setdefault(label or os.path.basename(path), []).append(row)
    return series


def draw_curves(series: dict[str, list[dict]], title: str, out_png: str | None = None) -> Image.Image:
    """Four panels (loss, LM loss, reconstruction loss, learning rate) against the step, one line per
    series, with a legend: a 1040x706 PIL image, written to out_png if given."""
    fig = _figure(1040, 706)
    lines = {}
    for ax, (key, name) in zip(fig.subplots(2, 2).flat, CURVE_METRICS):
        for k, (label, rows) in enumerate(series.items()):  # a series keeps its colour in every panel
            points = sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
            if points:
                lines[label] = ax.plot(*zip(*points), color=f"C{k}", marker=".", markersize=4, linewidth=1.5)[0]
        if not ax.lines:
            ax.text(0.5, 0.5, f"no '{key}' values", transform=ax.transAxes, ha="center", color="grey")
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.legend(lines.values(), lines.keys(), loc="lower center", ncol=max(1, len(lines)), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))  # room for the legend below and the title above
    return _picture(fig, out_png)


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


def format_table(results: dict) -> str:
    """The results as printed: accuracy per type or category (beside chance where known), overall,
    then the leaderboards' scores."""
    def row(name, t):
        return f"{name[:28]:<28} {t['n']:>6} {t['accuracy']:>9.3f}" + (f" {t['chance']:>7.3f}" if "chance" in t else "")

    group = "type" if "per_type" in results else "category"
    rows = [f"{group:<28} {'n':>6} {'accuracy':>9}" + (f" {'chance':>7}" if "chance" in results else "")]
    rows += [row(k, t) for k, t in results[f"per_{group}"].items()]
    rows += [row("l2: " + k, t) for k, t in results.get("per_l2_category", {}).items()]
    rows.append(row("overall", {**results, "n": results["num_questions"]}))
    if "circular" in results:
        rows.append(row("circular (MMBench)", results["circular"]))
    if results.get("pope", {}).get("n"):
        m = results["pope"]
        rows.append(f"yes/no (n={m['n']}): accuracy {m['accuracy']:.3f}  precision {m['precision']:.3f}  "
                    f"recall {m['recall']:.3f}  F1 {m['f1']:.3f}  yes-ratio {m['yes_ratio']:.3f}")
    if "mme" in results:
        m = results["mme"]
        missing = f"  (sub-tasks missing: {', '.join(m['missing'])})" if m["missing"] else ""
        rows.append(f"MME score: perception {m['perception']:.2f}  cognition {m['cognition']:.2f}  "
                    f"total {m['total']:.2f}{missing}")
    return "\n".join(rows)


format_bench_table = format_table  # the name for benchmark results: one table for every results dict


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
        folder = folder or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "shapes")
        test_file = os.path.join(folder, "test.jsonl")
        if not os.path.isfile(test_file):
            raise InputError(f"{test_file} not found: give --test-file and --image-folder")
    results = evaluate(args.checkpoint, test_file, folder, args.batch_size, args.limit,
                       max_new_tokens=args.max_new_tokens or 8, device=args.device, dtype=run_dtype(args))
    print(format_table(results))
    return write_results(results, args.out or os.path.join(args.checkpoint, "eval.json"))


def bench_main(args) -> dict:
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


def export_main(args) -> str:
    """The checkpoint (any format load_checkpoint reads) as a llava-hf directory."""
    model, tokenizer, image_processor = load_checkpoint(args.checkpoint)
    try:
        out = export_llava_hf(model, tokenizer, image_processor, args.export_llava_hf)
    except ValueError as e:  # where llava-hf would compute something else: the reason, no directory
        raise InputError(f"{args.checkpoint}: {e}") from None
    print(f"wrote a LlavaForConditionalGeneration directory to {out} (transformers, vLLM and lmms-eval load it)")
    return out


def pictures_main(args) -> str:
    """--visualize / --curves: a PNG instead of an evaluation."""
    if args.visualize:
        stem = os.path.splitext(os.path.basename(args.visualize))[0]
        out = args.out_png or os.path.join(args.checkpoint, f"pool_{stem}.png")
        picture = visualize_pool(args.checkpoint, args.visualize, out, seed=args.seed, device=args.device,
                                 assignment=args.pool_assign, dtype=run_dtype(args))
    else:
        out = args.out_png or os.path.join(os.path.dirname(args.curves[0]), "curves.png")  # as given, like --visualize
        try:
            series = read_curves(args.curves)
        except ValueError as e:  # a file that is not a metrics.jsonl (read_curves raises nothing else)
            raise InputError(str(e)) from None
        picture = draw_curves(series, "training curves: " + ", ".join(args.curves), out)
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
    "export": ("export_llava_hf", export_main, {"export_llava_hf"}),
    "visualize": ("visualize", pictures_main, {"visualize", "out_png", "seed", "pool_assign", "bf16"}),
    "curves": ("curves", pictures_main, {"curves", "out_png"}),
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default="out/demo/stage2")
    ap.add_argument("--test-file", default="", help="LLaVA-format test records (default: the shapes test set)")
    ap.add_argument("--image-folder", default="")
    ap.add_argument("--out", default="", help="results JSON (default: CHECKPOINT/eval.json)")
    ap.add_argument("--batch-size", type=int, default=32, help=f"questions per batch ({RANGES['batch_size']})")
    ap.add_argument("--limit", type=int, default=0, help=f"the first N questions only; 0: all ({RANGES['limit']})")
    ap.add_argument("--device", default=None)
    ap.add_argument("--bf16", action="store_true",
                    help="the model's weights and computation in bfloat16 (half the memory; default: float32)")
    ap.add_argument("--visualize", default="", metavar="IMAGE", help="pool rows and reconstruction error of IMAGE")
    ap.add_argument("--curves", nargs="+", default=None, metavar="METRICS_JSONL", help="plot training curves")
    ap.add_argument("--out-png", default="", help="PNG path for --visualize / --curves")
    ap.add_argument("--seed", type=int, default=0,
                    help=f"replacement seed for --visualize; sampling seed for --ask with --temperature > 0 "
                         f"({RANGES['seed']})")
    ap.add_argument("--pool-assign", choices=("hungarian", "nearest"), default="hungarian",
                    help="--visualize: one-to-one matching of all tokens, or each token's nearest pool row")
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
    ap.add_argument("--export-llava-hf", default="", metavar="OUT",
                    help="write CHECKPOINT as a transformers LlavaForConditionalGeneration directory, no evaluation")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    problem = out_of_range(vars(args), RANGES)
    if problem:
        raise SystemExit(f"error: {problem}")
    mode = refuse_unused_flags(ap, args)
    try:
        if mode != "curves" and not os.path.isdir(args.checkpoint):
            raise InputError(f"{args.checkpoint}: no such checkpoint directory (run `python train.py` first)")
        return MODES[mode][1](args)
    except (InputError, D.SampleError, FileNotFoundError) as e:  # the user's to fix (SampleError: an image)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
