"""eval.py --image --ask: asking a checkpoint about one image (offline, tiny models, CPU, seconds).

What is checked: on a trained tiny checkpoint, --ask gives exactly the shapes evaluation's answer to the
same question about the same image; the loop on stdin is a multi-turn conversation in the chat template
(each answer is the one the whole conversation so far gets); sampling flags reach generate; a missing
image, a stage-1 projector-only checkpoint and flags without effect are one line each.
"""
import io
import json
import os

import pytest
import torch

import data as D
import eval as E
import train as T
from conftest import tiny_model
from engineering import records as RC
from engineering.checkpoints import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """Stage 2 from the common init, a few steps: a checkpoint as train.py writes it (its template recorded)."""
    out = str(tmp_path_factory.mktemp("ask") / "stage2")
    T.run(dict(recipe="demo", stage="2", data=base.data["2"], image_folder=base.shapes, init=base.init,
               lr=3e-3, vision_lr=0.0, max_steps=20, warmup_steps=4, global_batch_size=8, batch_size=8,
               num_workers=0, log_every=20, max_length=256, seed=0, bf16=False, out_dir=out))
    return out


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, shapes_tokenizer, tiny_image_processor):
    """Random weights: answers of several words that change with any change in the prompt (a trained tiny
    model without a pretrained LLM answers nearly everything alike), so equal answers mean equal prompts."""
    path = str(tmp_path_factory.mktemp("ask") / "untrained")
    save_checkpoint(tiny_model(), path, shapes_tokenizer, tiny_image_processor,
                    extra={"train_config": {"template": "chatml"}})
    return path


def ask(argv, capsys) -> str:
    E.main(argv)
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_ask_gives_the_shapes_evaluations_answer(which, request, base, tmp_path, capsys):
    ckpt = request.getfixturevalue(which)
    out = str(tmp_path / "eval.json")
    E.main([ckpt, "--test-file", os.path.join(base.shapes, "test.jsonl"), "--image-folder", base.shapes,
            "--out", out, "--batch-size", "8"])  # batched and left-padded, as evaluations run
    capsys.readouterr()
    with open(out) as f:
        predictions = {p["id"]: p["output"] for p in json.load(f)["predictions"]}
    records = {r["id"]: r for r in RC.read_jsonl(os.path.join(base.shapes, "test.jsonl"))}
    if which == "untrained":
        assert len(set(predictions.values())) >= 10, "answers alike: equal answers would prove little"
    for rid, output in list(predictions.items())[:5]:  # one question of each type (a model load each)
        record = records[rid]
        question = record["conversations"][0]["value"].removeprefix(D.IMAGE_PLACEHOLDER + "\n")
        image = os.path.join(base.shapes, record["image"])
        assert ask([ckpt, "--image", image, "--ask", question, "--max-new-tokens", "8"], capsys) == output, rid


def test_the_loop_on_stdin_is_a_conversation(untrained, base, monkeypatch, capsys):
    """On the untrained checkpoint, whose answers change with every earlier turn."""
    image = os.path.join(base.shapes, "images", "000000.png")
    questions = ["What colour is the object at the center ?", "How many objects are there ?",
                 "Is there a red circle in the image ? Answer yes or no ."]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(questions) + "\n\nnever asked\n"))
    answers = E.main([untrained, "--image", image, "--ask", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert len(answers) == 3 and "never asked" not in printed  # the empty line ends it
    assert [line.removeprefix("ASSISTANT: ") for line in printed.splitlines() if "ASSISTANT: " in line] == answers
    # each answer is the one generate_answers gives the whole conversation so far, image before the first turn
    model, tokenizer, processor, template = E.load_for_answers(untrained, "cpu")
    turns = []
    for question, answer in zip(questions, answers):
        turns += [{"from": "human", "value": (D.IMAGE_PLACEHOLDER + "\n" if not turns else "") + question}]
        item = {"id": "q", "conversations": turns, "image_path": image}
        assert E.generate_answers(model, tokenizer, processor, template, [item], 1, 8, "cpu")["q"] == answer
        turns += [{"from": "gpt", "value": answer}]
    # and the rendered prompt carries the earlier turns in the chat template
    ids, _ = D.tokenize_conversation(D.to_messages(turns[:-1]), tokenizer, template, model.num_image_tokens,
                                     image_token_id=model.cfg.image_token_id)
    text = tokenizer.decode([i for i in ids if i != model.cfg.image_token_id]).replace(" ", "")  # words spaced
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3
    assert answers[0].replace(" ", "") in text and answers[1].replace(" ", "") in text


def test_the_loop_ends_at_end_of_input(trained, base, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("How many objects are there ?"))  # no newline, then EOF
    answers = E.main([trained, "--image", os.path.join(base.shapes, "images", "000001.png"), "--ask"])
    assert len(answers) == 1 and f"ASSISTANT: {answers[0]}" in capsys.readouterr().out


def test_a_question_with_its_own_image_placeholder_is_one_line_and_the_loop_goes_on(trained, base, monkeypatch,
                                                                                     capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("<image> what ?\nHow many objects are there ?\n"))
    answers = E.main([trained, "--image", os.path.join(base.shapes, "images", "000001.png"), "--ask"])
    assert len(answers) == 1 and "error: the question contains <image>" in capsys.readouterr().out


def test_sampling_flags_reach_generate(untrained, base, monkeypatch, capsys):
    seen = []
    real = E.generate_answers

    def recording(*args, **kwargs):
        seen.append(kwargs.get("sampling", args[8] if len(args) > 8 else None))
        return real(*args, **kwargs)
    monkeypatch.setattr(E, "generate_answers", recording)
    image = os.path.join(base.shapes, "images", "000002.png")
    argv = [untrained, "--image", image, "--ask", "How many objects are there ?", "--temperature", "5",
            "--top-p", "0.9", "--max-new-tokens", "6"]
    sampled = [ask(argv + ["--seed", str(s)], capsys) for s in (1, 1, 2)]
    assert seen[0] == dict(do_sample=True, temperature=5.0, top_p=0.9)
    assert sampled[0] == sampled[1]  # the seed fixes the sample
    assert sampled[2] != sampled[0]  # at temperature 5, six tokens differ between seeds (greedy would not)
    ask([untrained, "--image", image, "--ask", "How many objects are there ?"], capsys)
    assert seen[-1] is None  # greedy by default


@pytest.mark.parametrize("extra, said", [
    (["--image", "nowhere.png", "--ask", "q"], "image not found: nowhere.png"),
    (["--ask", "q"], "--ask needs --image"),
    (["--image", "IMAGE", "--ask", "q", "--top-p", "0.5"], "--top-p: no effect when answers are greedy"),
    (["--image", "IMAGE", "--ask", "q", "--seed", "3"], "--seed: no effect when answers are greedy"),
    (["--image", "IMAGE", "--ask", "q", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--image", "IMAGE", "--ask", "q", "--limit", "3"], "--limit: no effect with --ask"),
], ids=["missing image", "no image", "top-p greedy", "seed greedy", "negative temperature", "limit"])
def test_mistakes_are_one_line(trained, base, extra, said, capsys):
    image = os.path.join(base.shapes, "images", "000000.png")
    with pytest.raises(SystemExit) as e:
        E.main([trained] + [image if a == "IMAGE" else a for a in extra])
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert said in message and "Traceback" not in message


def test_image_without_ask_is_refused(trained, base, capsys):
    with pytest.raises(SystemExit):
        E.main([trained, "--image", os.path.join(base.shapes, "images", "000000.png")])
    assert "--image: no effect when evaluating the shapes test set" in capsys.readouterr().err


def test_stage1_projector_only_checkpoints_cannot_answer(base, tmp_path, shapes_tokenizer, tiny_image_processor):
    image = os.path.join(base.shapes, "images", "000000.png")
    victor_stage1 = str(tmp_path / "stage1")
    model = tiny_model()
    model.cfg.vision_model, model.cfg.llm = base.vision, base.llm
    save_checkpoint(model, victor_stage1, shapes_tokenizer, tiny_image_processor, parts="projector")
    llava_stage1 = tmp_path / "llava-stage1"  # LLaVA's pretrain output: config.json and mm_projector.bin
    llava_stage1.mkdir()
    (llava_stage1 / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_vision_tower": base.vision}))
    torch.save({"model.mm_projector.0.weight": torch.zeros(1)}, llava_stage1 / "mm_projector.bin")
    for ckpt in (victor_stage1, str(llava_stage1)):
        with pytest.raises(SystemExit) as e:
            E.main([ckpt, "--image", image, "--ask", "How many objects are there ?"])
        assert e.value.code == f"error: {ckpt} is a stage-1 checkpoint (a projector alone, trained to caption): " \
                               "it cannot answer questions; ask a stage-1.5 or stage-2 checkpoint"
