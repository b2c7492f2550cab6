"""
The files eval.py evaluates, read into items, and the scores particular to a benchmark:

    python eval.py                                   # the demo's shapes test set (read_test_set)
    python eval.py CKPT --bench MMStar.tsv           # a VLMEvalKit TSV, multiple choice (load_bench)
    python eval.py CKPT --bench POPE.tsv             # yes/no: POPE's metrics (and MME's score)
    python eval.py CKPT --question-file q.jsonl --image-folder imgs --answers-file a.jsonl  # read_question_file

Readers turn each format into items (LLaVA prompt records plus what scoring needs); eval.py answers them
and score scores them by kind: the answer a free text gives (extract_answer), accuracy per group beside
chance, POPE's precision/recall/F1, MMBench's circular accuracy and MME's perception/cognition score; then
the table printed (format_table). File formats and leaderboard rules, not the method: a reader of the method
may skip this file.
"""
from __future__ import annotations

import base64
import csv
import os
import re
import secrets
import sys
from collections import defaultdict

import data as D
from engineering import records as RC


class InputError(ValueError):
    """A mistake in the files or flags given (not in the code): eval.main prints it as one line."""


# -----------------------------------------------------------------------------
# Reading: every input format becomes a list of items. An item is a LLaVA prompt record ("id",
# "conversations" up to the question, an "image" list of paths, an "image_path" or an "image_b64"),
# plus what scoring needs: "kind" (multiple_choice, yes_no or open), "options", "answer", and the
# fields reported with each prediction (type or category, index, l2-category, question_id...).

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # benchmarks may have more options than the shapes set's A-D
MC_SUFFIX = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's MMBench prompt
YES_NO_SUFFIX = "Answer the question using a single word or phrase."


def _is_none(value) -> bool:
    """Empty, NaN or None, as pandas writes them into a TSV (LLaVA's is_none)."""
    return value is None or (isinstance(value, float) and value != value) or \
        str(value).strip().lower() in ("", "nan", "none")


def question_turns(text: str, has_image: bool) -> list[dict]:
    """The user's turn asking text, the image's placeholder before it when the turn carries the image."""
    return [{"from": "human", "value": (f"{D.IMAGE_PLACEHOLDER}\n" if has_image else "") + text}]


def read_rows(path: str) -> list:
    """data.read_jsonl; a line that is not JSON is the user's to fix."""
    try:
        return RC.read_jsonl(path)
    except ValueError as e:
        raise InputError(str(e)) from None


def read_test_set(test_file: str, image_folder: str) -> list[dict]:
    """LLaVA records (the shapes test set) whose last turn is the answer: a "type", and "options"
    for a multiple-choice question (the answer is an option's text) or none for yes/no."""
    try:
        records, _ = RC.load_records(test_file, strict=True, image_folder=image_folder)  # images too, before the model
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
        question += "\n" + MC_SUFFIX
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
    item["conversations"] = question_turns(question, "image_b64" in item or "image_path" in item)
    return item


def read_question_file(question_file: str, image_folder: str) -> list[dict]:
    """LLaVA's question JSONL, {question_id, image, text} a line -> open items."""
    items = []
    for n, q in enumerate(read_rows(question_file), 1):
        if not isinstance(q, dict) or "question_id" not in q or _is_none(q.get("text")):
            raise InputError(f"{question_file}: line {n}: needs 'question_id' and 'text'")
        item = {"id": f"#{n}", "kind": "open", "question_id": q["question_id"], "text": q["text"],
                "conversations": question_turns(q["text"], not _is_none(q.get("image")))}
        if not _is_none(q.get("image")):
            item["image_path"] = os.path.join(image_folder, q["image"])
            if not os.path.isfile(item["image_path"]):
                raise InputError(f"{question_file}: line {n} (question_id {q['question_id']}): "
                                 f"image {item['image_path']} not found")
        items.append(item)
    return items


# -----------------------------------------------------------------------------
# Scores particular to a benchmark (eval.score calls them where the file calls for them)


def mean(values) -> float:
    """The mean, 0.0 of nothing."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def pope_metrics(predictions: list[str], answers: list[str]) -> dict:
    """POPE's metrics, positive = yes: accuracy, precision, recall, F1 and the ratio of yes answers.
    A prediction that is neither yes nor no counts as wrong (and as not yes)."""
    pairs = [(p.lower(), a.lower()) for p, a in zip(predictions, answers)]
    tp = sum(p == "yes" and a == "yes" for p, a in pairs)
    fp = sum(p == "yes" and a == "no" for p, a in pairs)
    fn = sum(p != "yes" and a == "yes" for p, a in pairs)
    precision, recall = (tp / (tp + fp), tp / (tp + fn)) if tp else (0.0, 0.0)
    return {"n": len(pairs), "accuracy": mean(p == a for p, a in pairs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
            "yes_ratio": mean(p == "yes" for p, _ in pairs), "unparsed": sum(p not in ("yes", "no") for p, _ in pairs)}


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
    return {"accuracy": mean(right.values()), "n": len(right),
            "per_category": {k: {"accuracy": mean(v), "n": len(v)} for k, v in sorted(per_category.items())}}


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
        acc = 100 * mean(p["correct"] for _, p in rows)
        acc_plus = 100 * mean(all(v) for v in by_image.values())
        per_task[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus,
                          "questions": len(rows), "images": len(by_image)}
    perception = sum(per_task[t]["score"] for t in MME_PERCEPTION if t in per_task)
    cognition = sum(per_task[t]["score"] for t in MME_COGNITION if t in per_task)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "per_subtask": per_task, "missing": [t for t in MME_PERCEPTION + MME_COGNITION if t not in per_task]}


# -----------------------------------------------------------------------------
# Scoring by kind: multiple choice and yes/no -> accuracies (+ POPE, MMBench circular, MME: above);
# open answers -> LLaVA's answers file (eval.answer_question_file)


def chance_of(item: dict) -> float:
    return 1.0 / len(item["options"]) if item.get("options") else 0.5


def _grouped(items: list[dict], predictions: list[dict], key: str, chance: bool) -> dict:
    groups = defaultdict(list)
    for it, p in zip(items, predictions):
        if key in it:
            groups[it[key]].append((p["correct"], chance_of(it)))
    return {k: {"accuracy": mean(c for c, _ in v), **({"chance": mean(h for _, h in v)} if chance else {}),
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
    results = {"num_questions": len(items), "accuracy": mean(p["correct"] for p in predictions)}
    if chance:
        results["chance"] = mean(map(chance_of, items))
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


# -----------------------------------------------------------------------------
# Reading a question and a free answer, and the results as printed


def words_outside_vocabulary(tokenizer, text: str) -> list[str]:
    """The pieces of text that the tokenizer can only read as its unknown token (a word-level vocabulary,
    like the shapes world's; a byte-level BPE has none)."""
    if tokenizer.unk_token_id is None:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(dict.fromkeys(text[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
                              if t == tokenizer.unk_token_id))


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


def short_uuid() -> str:
    """A random id like shortuuid's (22 characters of base 57), as in LLaVA's answer files."""
    return "".join(secrets.choice("23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz") for _ in range(22))


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
