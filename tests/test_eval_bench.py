"""eval.py on benchmark files users already have (offline, tiny random model, CPU, seconds).

What is checked: VLMEvalKit TSVs (multiple choice and yes/no, base64 images or image paths, JSONL too)
are prompted as LLaVA does and scored overall / per category / per l2-category, with POPE's metrics
for yes/no; LLaVA question files give LLaVA answer files; the letter and yes/no extractors; the
metrics against hand computations; malformed files fail naming the row; the shapes eval's POPE summary.
"""
import base64
import csv
import io
import json
import os

import pytest
import torch
from PIL import Image

import eval as E
from conftest import tiny_config
from victor import VictorModel, save_checkpoint

COLOURS = [(215, 40, 40), (40, 165, 60), (45, 85, 225), (235, 205, 35)]


def png_b64(colour, size=(40, 32)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows, columns=None):
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, shapes_tokenizer, tiny_image_processor):
    path = str(tmp_path_factory.mktemp("bench") / "tiny-ckpt")
    torch.manual_seed(0)
    save_checkpoint(VictorModel(tiny_config()), path, shapes_tokenizer, tiny_image_processor,
                    extra={"train_config": {"template": "chatml"}})
    return path


def mc_rows(tmp_path):
    Image.new("RGB", (32, 32), COLOURS[3]).save(tmp_path / "y.png")
    return [
        {"index": 10, "question": "What colour is the circle?", "A": "red", "B": "green", "C": "blue",
         "answer": "A", "image": png_b64(COLOURS[0]), "category": "colour", "l2-category": "perception"},
        {"index": 11, "question": "What colour is the square?", "A": "red", "B": "green", "C": "blue", "D": "yellow",
         "answer": "B", "image": png_b64(COLOURS[1]), "category": "colour", "l2-category": "perception",
         "hint": "There is one object."},
        {"index": 12, "question": "What shape is there?", "A": "circle", "B": "square", "answer": "B",
         "image": png_b64(COLOURS[2]), "category": "shape", "l2-category": "perception", "hint": "nan"},
        {"index": 13, "question": "How many objects?", "A": "1", "B": "2", "C": "3", "answer": "C",
         "image": "10", "category": "count", "l2-category": "reasoning"},  # MMBench: refers to row 10's image
        {"index": 14, "question": "What colour?", "A": "red", "B": "yellow", "answer": "B",
         "image_path": "y.png", "category": "colour", "l2-category": "perception"},
    ]


def yn_rows():
    answers = ["yes", "no", "Yes", "No", "yes", "no"]
    return [{"index": i, "question": "Is there a circle in the image?", "answer": a, "image": png_b64(COLOURS[i % 4]),
             "category": "adversarial" if i < 3 else "random"} for i, a in enumerate(answers)]


# -----------------------------------------------------------------------------
# Extractors and metrics on hand-made cases


OPTS = ["red", "blue", "green", "yellow"]


@pytest.mark.parametrize("text,options,want", [
    ("B", OPTS, "B"), ("(B)", OPTS, "B"), ("B. blue", OPTS, "B"), ("B)", OPTS, "B"), ("B) blue", OPTS, "B"),
    ("The answer is B", OPTS, "B"), ("The answer is (C).", OPTS, "C"), ("Answer: B", OPTS, "B"),
    ("answer: D", OPTS, "D"), ("The correct option is A.", OPTS, "A"),
    ("blue", OPTS, "B"), ("Yellow.", OPTS, "D"), ("GREEN", OPTS, "C"),
    ("E", OPTS, ""), ("E", OPTS + ["purple"], "E"), ("The answer is E", OPTS, ""),
    ("bottom", ["top", "left", "right"], ""), ("purple", OPTS, ""), ("", OPTS, ""), ("I am not sure", OPTS, ""),
])
def test_extract_letter(text, options, want):
    assert E.extract_answer(text, options) == want


@pytest.mark.parametrize("text,want", [
    ("Yes", "yes"), ("no.", "no"), ("Yes, there is a circle", "yes"), ("There is not a circle", "no"),
    ("No, there is none", "no"), ("I think yes", "yes"), ("circle", ""), ("", ""),
])
def test_extract_yes_no(text, want):
    assert E.extract_yes_no(text) == want


def test_pope_metrics_by_hand():
    preds = ["yes", "yes", "no", "no", "yes", "", "no", "yes"]
    truth = ["yes", "no", "yes", "no", "yes", "yes", "no", "no"]
    # TP = 2 (0, 4), FP = 2 (1, 7), FN = 2 (2, 5: unparsed is not yes), TN = 2 (3, 6)
    m = E.pope_metrics(preds, truth)
    assert m["n"] == 8 and m["unparsed"] == 1
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(4 / 8)
    assert E.pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0  # no yes predicted: no division by zero
    assert E.pope_metrics([], [])["accuracy"] == 0.0


def test_short_uuid():
    ids = {E.short_uuid() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 22 and i.isalnum() for i in ids)


# -----------------------------------------------------------------------------
# Loading and prompting


def test_load_bench_prompts_like_llava(tmp_path):
    kind, items = E.load_bench(write_tsv(tmp_path / "mc.tsv", mc_rows(tmp_path)))
    assert kind == "multiple_choice" and len(items) == 5
    assert items[1]["question"] == ("There is one object.\nWhat colour is the square?\nA. red\nB. green\nC. blue\n"
                                    "D. yellow\nAnswer with the option's letter from the given choices directly.")
    assert items[2]["question"].startswith("What shape is there?\nA. circle\nB. square\n")  # hint "nan" dropped
    assert [len(it["options"]) for it in items] == [3, 4, 2, 3, 2]
    assert items[3]["image_b64"] == items[0]["image_b64"]  # an index reference resolved
    assert items[4]["image_path"] == str(tmp_path / "y.png")
    kind, items = E.load_bench(write_tsv(tmp_path / "yn.tsv", yn_rows()))
    assert kind == "yes_no" and [it["answer"] for it in items] == ["yes", "no", "yes", "no", "yes", "no"]
    assert items[0]["question"] == "Is there a circle in the image?\nAnswer the question using a single word or phrase."


# -----------------------------------------------------------------------------
# End to end: tiny random checkpoint


def check_grouped(res, preds, key, out_key):
    groups = {}
    for p in preds:
        groups.setdefault(p[key], []).append(p["prediction"] == p["answer"])
    assert set(res[out_key]) == set(groups)
    for k, v in groups.items():
        assert res[out_key][k]["n"] == len(v)
        assert res[out_key][k]["accuracy"] == pytest.approx(sum(v) / len(v))


def test_mc_bench_end_to_end(ckpt, tmp_path, capsys):
    tsv = write_tsv(tmp_path / "MMStar.tsv", mc_rows(tmp_path))
    out = str(tmp_path / "res.json")
    ret = E.main([ckpt, "--bench", tsv, "--out", out, "--batch-size", "2"])
    with open(out) as f:
        res = json.load(f)
    assert {"checkpoint", "bench", "kind", "num_questions", "accuracy", "per_category", "per_l2_category",
            "predictions"} <= set(res)
    assert res["kind"] == "multiple_choice" and "pope" not in res
    assert res["num_questions"] == len(res["predictions"]) == 5
    preds = res["predictions"]
    assert [p["index"] for p in preds] == ["10", "11", "12", "13", "14"]
    assert [p["answer"] for p in preds] == ["A", "B", "B", "C", "B"]
    _, items = E.load_bench(tsv)
    for p, it in zip(preds, items):
        assert p["prediction"] == E.extract_answer(p["output"], it["options"])
    assert res["accuracy"] == pytest.approx(sum(p["prediction"] == p["answer"] for p in preds) / 5)
    check_grouped(res, preds, "category", "per_category")
    check_grouped(res, preds, "l2-category", "per_l2_category")
    assert {k: v["n"] for k, v in res["per_category"].items()} == {"colour": 3, "shape": 1, "count": 1}
    table = capsys.readouterr().out
    assert "overall" in table and "l2: reasoning" in table
    # deterministic; batching and --limit
    again = E.evaluate_bench(ckpt, tsv, batch_size=5)
    assert [p["output"] for p in again["predictions"]] == [p["output"] for p in ret["predictions"]]
    assert E.evaluate_bench(ckpt, tsv, batch_size=1, limit=2)["num_questions"] == 2


def test_yes_no_bench_end_to_end(ckpt, tmp_path):
    tsv = write_tsv(tmp_path / "POPE.tsv", yn_rows())
    out = str(tmp_path / "pope.json")
    E.main([ckpt, "--bench", tsv, "--out", out, "--batch-size", "4"])
    with open(out) as f:
        res = json.load(f)
    assert res["kind"] == "yes_no" and res["num_questions"] == 6
    preds = res["predictions"]
    assert all(p["prediction"] == E.extract_yes_no(p["output"]) for p in preds)
    assert res["pope"] == pytest.approx(E.pope_metrics([p["prediction"] for p in preds], [p["answer"] for p in preds]))
    assert set(res["pope"]) == {"n", "accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed"}
    assert res["accuracy"] == pytest.approx(res["pope"]["accuracy"])
    check_grouped(res, preds, "category", "per_category")
    assert "per_l2_category" not in res


def test_yes_no_jsonl_detected(ckpt, tmp_path):
    Image.new("RGB", (32, 32), COLOURS[0]).save(tmp_path / "r.png")
    path = tmp_path / "mme.jsonl"
    path.write_text("".join(json.dumps({"index": i, "question": "Is it red?", "answer": a, "image_path": "r.png"}) + "\n"
                            for i, a in enumerate(["Yes", "No", "yes"])))
    res = E.evaluate_bench(ckpt, str(path), batch_size=3)
    assert res["kind"] == "yes_no" and res["num_questions"] == 3 and res["pope"]["n"] == 3


def test_bench_metrics_with_known_outputs(ckpt, tmp_path, monkeypatch):
    """The scoring, with the model's outputs fixed: exact accuracies per category and POPE numbers."""
    canned = {"mc": ["A", "The answer is C", "(B)", "3", "yellow"], "yn": ["Yes", "Yes", "No", "no", "sure", "No"]}

    def fake(model, tokenizer, image_processor, template, records, *a, **k):
        return {r["id"]: canned[which][i] for i, r in enumerate(records)}

    monkeypatch.setattr(E, "generate_answers", fake)
    which = "mc"
    res = E.evaluate_bench(ckpt, write_tsv(tmp_path / "mc.tsv", mc_rows(tmp_path)))
    assert [p["prediction"] for p in res["predictions"]] == ["A", "C", "B", "C", "B"]
    assert res["accuracy"] == pytest.approx(4 / 5)
    assert res["per_category"] == {"colour": {"accuracy": pytest.approx(2 / 3), "n": 3},
                                   "count": {"accuracy": 1.0, "n": 1}, "shape": {"accuracy": 1.0, "n": 1}}
    assert res["per_l2_category"]["perception"] == {"accuracy": 0.75, "n": 4}
    which = "yn"
    res = E.evaluate_bench(ckpt, write_tsv(tmp_path / "yn.tsv", yn_rows()))
    # truth yes no yes no yes no; pred yes yes no no "" no: TP 1, FP 1, FN 2, TN 2
    assert res["pope"]["accuracy"] == pytest.approx(3 / 6)
    assert res["pope"]["precision"] == pytest.approx(1 / 2)
    assert res["pope"]["recall"] == pytest.approx(1 / 3)
    assert res["pope"]["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert res["pope"]["yes_ratio"] == pytest.approx(2 / 6) and res["pope"]["unparsed"] == 1


def test_question_file_mode(ckpt, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, c in enumerate(COLOURS[:3]):
        Image.new("RGB", (48, 32), c).save(folder / f"{i}.png")
    qfile = tmp_path / "q.jsonl"
    qs = [{"question_id": 100 + i, "image": f"{i}.png", "text": "What colour is the image?", "category": "x"}
          for i in range(3)] + [{"question_id": "t", "text": "What colour ?"}]  # a text-only question
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    afile = tmp_path / "out" / "answers.jsonl"
    E.main([ckpt, "--question-file", str(qfile), "--image-folder", str(folder), "--answers-file", str(afile),
            "--batch-size", "2", "--max-new-tokens", "6"])
    answers = [json.loads(line) for line in afile.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [100, 101, 102, "t"]
    for a, q in zip(answers, qs):
        assert {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(a)
        assert a["prompt"] == q["text"] and a["model_id"] == "tiny-ckpt" and isinstance(a["text"], str)
    assert len({a["answer_id"] for a in answers}) == 4
    with pytest.raises(SystemExit, match="answers-file"):
        E.main([ckpt, "--question-file", str(qfile)])
    qfile.write_text(json.dumps({"question_id": 7, "image": "missing.png", "text": "?"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 \(question_id 7\).*not found"):
        E.answer_question_file(ckpt, str(qfile), str(folder), str(afile))


# -----------------------------------------------------------------------------
# Malformed files fail, naming the row


def test_missing_required_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in yn_rows()]
    with pytest.raises(ValueError, match=r"missing required column.*answer"):
        E.load_bench(write_tsv(tmp_path / "x.tsv", rows))


@pytest.mark.parametrize("change,match", [
    ({"image": "not base64 at all!!" * 5}, r"index 12\).*base64"),
    ({"A": "", "B": "", "answer": "B"}, r"index 12\).*no options"),
    ({"answer": "D"}, r"index 12\).*not one of the option letters"),
    ({"image": "", "image_path": "nowhere.png"}, r"index 12\).*nowhere.png not found"),
    ({"question": ""}, r"index 12\).*empty"),
])
def test_malformed_row_is_named(tmp_path, change, match):
    rows = mc_rows(tmp_path)
    rows[2].update(change)
    with pytest.raises(ValueError, match=match):
        E.load_bench(write_tsv(tmp_path / "bad.tsv", rows))


def test_undecodable_image_is_named(ckpt, tmp_path):
    rows = mc_rows(tmp_path)
    rows[1]["image"] = base64.b64encode(b"valid base64, not an image").decode()
    with pytest.raises(ValueError, match=r"#1.*cannot be decoded"):
        E.evaluate_bench(ckpt, write_tsv(tmp_path / "bad.tsv", rows))


def test_mixed_kinds_rejected(tmp_path):
    rows = mc_rows(tmp_path)[:2] + yn_rows()[:2]
    with pytest.raises(ValueError, match="mixes"):
        E.load_bench(write_tsv(tmp_path / "mixed.tsv", rows))


# -----------------------------------------------------------------------------
# The shapes evaluation: the exists questions scored as POPE


def test_shapes_eval_has_pope(ckpt, shapes_dir, tmp_path):
    out = str(tmp_path / "eval.json")
    E.main([ckpt, "--test-file", os.path.join(shapes_dir, "test.jsonl"), "--image-folder", shapes_dir,
            "--out", out, "--batch-size", "10"])
    with open(out) as f:
        res = json.load(f)
    exists = [p for p in res["predictions"] if p["type"] == "exists"]
    assert exists and res["pope"]["n"] == len(exists) == res["per_type"]["exists"]["n"]
    assert res["pope"] == pytest.approx(E.pope_metrics([p["prediction"] for p in exists],
                                                       [p["answer"].lower() for p in exists]))
    assert res["pope"]["accuracy"] == pytest.approx(res["per_type"]["exists"]["accuracy"])
