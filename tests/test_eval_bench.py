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
from engineering import benchmarks as B
from engineering.checkpoints import save_checkpoint
from victor import VictorModel

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
    assert B.extract_answer(text, options) == want


@pytest.mark.parametrize("text,want", [
    ("Yes", "yes"), ("no.", "no"), ("Yes, there is a circle", "yes"), ("There is not a circle", "no"),
    ("No, there is none", "no"), ("I think yes", "yes"), ("circle", ""), ("", ""),
])
def test_extract_yes_no(text, want):
    assert B.extract_yes_no(text) == want


def test_pope_metrics_by_hand():
    preds = ["yes", "yes", "no", "no", "yes", "", "no", "yes"]
    truth = ["yes", "no", "yes", "no", "yes", "yes", "no", "no"]
    # TP = 2 (0, 4), FP = 2 (1, 7), FN = 2 (2, 5: unparsed is not yes), TN = 2 (3, 6)
    m = B.pope_metrics(preds, truth)
    assert m["n"] == 8 and m["unparsed"] == 1
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(4 / 8)
    assert B.pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0  # no yes predicted: no division by zero
    assert B.pope_metrics([], [])["accuracy"] == 0.0


def test_short_uuid():
    ids = {B.short_uuid() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 22 and i.isalnum() for i in ids)


# -----------------------------------------------------------------------------
# Loading and prompting


def test_load_bench_prompts_like_llava(tmp_path):
    kind, items = B.load_bench(write_tsv(tmp_path / "mc.tsv", mc_rows(tmp_path)))
    assert kind == "multiple_choice" and len(items) == 5
    assert items[1]["question"] == ("There is one object.\nWhat colour is the square?\nA. red\nB. green\nC. blue\n"
                                    "D. yellow\nAnswer with the option's letter from the given choices directly.")
    assert items[2]["question"].startswith("What shape is there?\nA. circle\nB. square\n")  # hint "nan" dropped
    assert [len(it["options"]) for it in items] == [3, 4, 2, 3, 2]
    assert items[3]["image_b64"] == items[0]["image_b64"]  # an index reference resolved
    assert items[4]["image_path"] == str(tmp_path / "y.png")
    kind, items = B.load_bench(write_tsv(tmp_path / "yn.tsv", yn_rows()))
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
    _, items = B.load_bench(tsv)
    for p, it in zip(preds, items):
        assert p["prediction"] == B.extract_answer(p["output"], it["options"])
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
    assert all(p["prediction"] == B.extract_yes_no(p["output"]) for p in preds)
    assert res["pope"] == pytest.approx(B.pope_metrics([p["prediction"] for p in preds], [p["answer"] for p in preds]))
    assert set(res["pope"]) == {"n", "accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed"}
    assert res["accuracy"] == pytest.approx(res["pope"]["accuracy"])
    check_grouped(res, preds, "category", "per_category")
    assert "per_l2_category" not in res


def test_yes_no_jsonl_detected(ckpt, tmp_path):
    Image.new("RGB", (32, 32), COLOURS[0]).save(tmp_path / "r.png")
    path = tmp_path / "mme.jsonl"
    path.write_text("".join(json.dumps({"index": i, "question": "Is it red?", "answer": a, "image_path": "r.png"})
                            + "\n" for i, a in enumerate(["Yes", "No", "yes"])))
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
        B.load_bench(write_tsv(tmp_path / "x.tsv", rows))


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
        B.load_bench(write_tsv(tmp_path / "bad.tsv", rows))


def test_undecodable_image_is_named(ckpt, tmp_path):
    rows = mc_rows(tmp_path)
    rows[1]["image"] = base64.b64encode(b"valid base64, not an image").decode()
    with pytest.raises(ValueError, match=r"#1.*cannot be decoded"):
        E.evaluate_bench(ckpt, write_tsv(tmp_path / "bad.tsv", rows))


def test_mixed_kinds_rejected(tmp_path):
    rows = mc_rows(tmp_path)[:2] + yn_rows()[:2]
    with pytest.raises(ValueError, match="mixes"):
        B.load_bench(write_tsv(tmp_path / "mixed.tsv", rows))


def bad_bench(tmp_path, change):
    rows = mc_rows(tmp_path)
    rows[2].update(change)
    return write_tsv(tmp_path / "bad.tsv", rows)


@pytest.mark.parametrize("argv, said", [
    (lambda ck, tmp: [ck, "--bench", str(tmp / "none.tsv")], "none.tsv"),
    (lambda ck, tmp: [str(tmp / "nowhere"), "--bench", bad_bench(tmp, {})], "nowhere: no such checkpoint directory"),
    (lambda ck, tmp: [ck, "--bench", bad_bench(tmp, {"answer": "D"})], "index 12): answer 'D'"),
    (lambda ck, tmp: [ck, "--bench", write_tsv(tmp / "x.tsv", [{"index": 1, "question": "q"}])],
     "missing required column"),
    (lambda ck, tmp: [ck, "--test-file", str(tmp / "t.jsonl"), "--image-folder", str(tmp)], "image not found"),
    (lambda ck, tmp: [ck, "--visualize", str(tmp / "none.png")], "none.png"),
], ids=["no bench file", "no checkpoint", "bad row", "no answer column", "no test image", "no image"])
def test_command_line_mistakes_are_one_line(ckpt, tmp_path, argv, said):
    """A missing or malformed file is one line (SystemExit with a message: no traceback) naming it."""
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "a", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nIs it red ?"}, {"from": "gpt", "value": "yes"}]}) + "\n")
    with pytest.raises(SystemExit) as e:
        E.main(argv(ckpt, tmp_path))
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and said in e.value.code


def test_a_programming_error_keeps_its_traceback(ckpt, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(E, "generate_answers", broken)
    with pytest.raises(KeyError):
        E.main([ckpt, "--bench", write_tsv(tmp_path / "mc.tsv", mc_rows(tmp_path)), "--out", str(tmp_path / "r.json")])


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
    assert res["pope"] == pytest.approx(B.pope_metrics([p["prediction"] for p in exists],
                                                       [p["answer"].lower() for p in exists]))
    assert res["pope"]["accuracy"] == pytest.approx(res["per_type"]["exists"]["accuracy"])


# -----------------------------------------------------------------------------
# Scored as the leaderboards score: MMBench's circular evaluation, MMStar's l2_category, MME's score


def canned_answers(monkeypatch, answers):
    """The model's outputs fixed, in record order: the scoring alone is under test."""
    monkeypatch.setattr(E, "generate_answers", lambda model, tok, proc, template, records, *a, **k:
                        {r["id"]: answers[i] for i, r in enumerate(records)})


def test_mmbench_circular_accuracy_by_hand(ckpt, tmp_path, monkeypatch, capsys):
    """Question 1 has 4 circular copies (index 1, 1000001, 2000001, 3000001), question 2 has 2, question 3 one.
    Answers: copies of q1 right, right, right, wrong; q2 both right; q3 right.
    Plain accuracy 6/7; circular: q1 wrong (one copy wrong), q2 right, q3 right -> 2/3."""
    img = png_b64(COLOURS[0])
    opts = ["red", "green", "blue", "yellow"]
    rows = []
    for k, truth in enumerate("ABCD"):  # q1 rotated 4 times: the right option moves through the letters
        rows.append({"index": 1 + k * 1_000_000, "question": "Colour?", **dict(zip("ABCD", opts[-k:] + opts[:-k])),
                     "answer": truth, "image": img, "category": "colour"})
    for k, truth in enumerate("AB"):
        rows.append({"index": 2 + k * 1_000_000, "question": "Shape?", "A": "circle" if k == 0 else "square",
                     "B": "square" if k == 0 else "circle", "answer": truth, "image": img, "category": "shape"})
    rows.append({"index": 3, "question": "Count?", "A": "1", "B": "2", "answer": "B", "image": img,
                 "category": "count"})
    canned_answers(monkeypatch, ["A", "B", "C", "A", "A", "B", "B"])  # the 4th copy of q1 is wrong (D is right)
    res = E.evaluate_bench(ckpt, write_tsv(tmp_path / "MMBench.tsv", rows))
    assert [p["correct"] for p in res["predictions"]] == [True, True, True, False, True, True, True]
    assert res["accuracy"] == pytest.approx(6 / 7)
    assert res["circular"]["n"] == 3 and res["circular"]["accuracy"] == pytest.approx(2 / 3)
    assert res["circular"]["per_category"] == {"colour": {"accuracy": 0.0, "n": 1}, "count": {"accuracy": 1.0, "n": 1},
                                               "shape": {"accuracy": 1.0, "n": 1}}
    assert "circular (MMBench)" in E.format_table(res)
    # a file without copies has no circular score
    canned_answers(monkeypatch, ["A", "C", "B", "C", "B"])
    assert "circular" not in E.evaluate_bench(ckpt, write_tsv(tmp_path / "plain.tsv", mc_rows(tmp_path)))


def test_mmstar_l2_category_column(ckpt, tmp_path, monkeypatch):
    """MMStar writes l2_category (underscore); MMBench l2-category: both are read. Two rows of
    'coarse perception' (one right), one of 'math' (right)."""
    rows = [{"index": i, "question": "Q?", "A": "a", "B": "b", "answer": "A", "image": png_b64(COLOURS[i]),
             "category": "c", "l2_category": l2}
            for i, l2 in enumerate(["coarse perception", "coarse perception", "math"])]
    _, items = B.load_bench(write_tsv(tmp_path / "MMStar.tsv", rows))
    assert [it["l2-category"] for it in items] == ["coarse perception", "coarse perception", "math"]
    canned_answers(monkeypatch, ["A", "B", "A"])
    res = E.evaluate_bench(ckpt, write_tsv(tmp_path / "MMStar.tsv", rows))
    assert res["per_l2_category"] == {"coarse perception": {"accuracy": 0.5, "n": 2}, "math": {"accuracy": 1.0, "n": 1}}


def test_mme_score_by_hand(ckpt, tmp_path, monkeypatch, capsys):
    """MME pairs a yes and a no question per image. existence: image A both right, image B one right ->
    accuracy 3/4 = 75, accuracy+ 1/2 = 50, score 125. count: image C both right -> 100 + 100 = 200.
    code_reasoning: image D one right -> 50 + 0 = 50. Perception 125 + 200 = 325, cognition 50, total 375.
    Image A's second row refers to its first by index (VLMEvalKit's TSVs); C and D come by image_path."""
    for name, colour in (("c.png", COLOURS[2]), ("d.png", COLOURS[3])):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    a, b = png_b64(COLOURS[0]), png_b64(COLOURS[1])
    rows = [{"index": 0, "question": "Is there a circle?", "answer": "Yes", "image": a, "category": "existence"},
            {"index": 1, "question": "Is there a square?", "answer": "No", "image": "0", "category": "existence"},
            {"index": 2, "question": "Is there a circle?", "answer": "Yes", "image": b, "category": "existence"},
            {"index": 3, "question": "Is there a square?", "answer": "No", "image": b, "category": "existence"},
            {"index": 4, "question": "Are there two objects?", "answer": "Yes", "image_path": "c.png",
             "category": "count"},
            {"index": 5, "question": "Are there three?", "answer": "No", "image_path": "c.png", "category": "count"},
            {"index": 6, "question": "Does it print 3?", "answer": "Yes", "image_path": "d.png",
             "category": "code_reasoning"},
            {"index": 7, "question": "Does it print 4?", "answer": "No", "image_path": "d.png",
             "category": "code_reasoning"}]
    canned_answers(monkeypatch, ["Yes", "No", "Yes", "Yes", "Yes", "No", "No", "No"])
    res = E.evaluate_bench(ckpt, write_tsv(tmp_path / "MME.tsv", rows))
    m = res["mme"]
    assert m["per_subtask"]["existence"] == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0,
                                             "questions": 4, "images": 2}
    assert m["per_subtask"]["count"]["score"] == 200.0
    assert m["per_subtask"]["code_reasoning"] == {"accuracy": 50.0, "accuracy_plus": 0.0, "score": 50.0,
                                                  "questions": 2, "images": 1}
    assert (m["perception"], m["cognition"], m["total"]) == (325.0, 50.0, 375.0)
    assert "color" in m["missing"] and "existence" not in m["missing"]
    E.main([ckpt, "--bench", write_tsv(tmp_path / "MME.tsv", rows), "--out", str(tmp_path / "mme.json")])
    assert "MME score: perception 325.00  cognition 50.00  total 375.00" in capsys.readouterr().out
    # a yes/no file whose categories are not MME's sub-tasks (POPE) gets no MME score
    canned_answers(monkeypatch, ["Yes"] * 6)
    assert "mme" not in E.evaluate_bench(ckpt, write_tsv(tmp_path / "POPE.tsv", yn_rows()))
