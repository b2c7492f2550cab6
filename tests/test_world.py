"""The demo's small world keeps the method's premises: an LLM that has the world's language before
stage 1, and several visual tokens per object; and the ablation's statistics are what they say."""
import os
import random
import sys

import numpy as np
import pytest
import torch

import data as D
from conftest import MAIN
from shapes_world import demo_base as B
from shapes_world import shapes as SH

sys.path.insert(0, os.path.join(MAIN, "scripts"))
import bench_ablation as A  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_conversation_tells_a_scene_then_asks_about_it():
    messages, kinds = SH.text_conversation(random.Random(0), SH.ShapesSpec(), questions=4)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4 and len(set(kinds)) == 4
    assert messages[0]["content"].startswith("There ") and "\n" in messages[0]["content"]
    assert all("There " not in m["content"] for m in messages[2::2])  # the scene is told once
    again, _ = SH.text_conversation(random.Random(0), SH.ShapesSpec(), questions=4)
    assert again == messages  # deterministic from the generator


def test_question_mix_weighs_the_kinds_and_refuses_unknown_ones():
    """With question_mix each question's kind is drawn with its weight (repeats allowed); a kind of weight 0
    is never asked; an unknown kind, a non-integer weight and a mix with no weight > 0 are refused."""
    rng, spec = random.Random(0), SH.ShapesSpec()
    mix = dict(colour=1, shape=0, position=2, count=1, exists=0)
    kinds = [k for _ in range(400) for k in SH.text_conversation(rng, spec, 5, mix)[1]]
    share = {k: kinds.count(k) / len(kinds) for k in SH.QUESTION_KINDS}
    assert share["shape"] == share["exists"] == 0
    assert abs(share["position"] - 0.5) < 0.03 and abs(share["colour"] - 0.25) < 0.03
    with pytest.raises(ValueError, match="question_mix.*'size'"):
        SH.text_conversation(rng, spec, 5, dict(colour=1, size=1))
    with pytest.raises(ValueError, match="question_mix: at least one weight must be > 0"):
        SH.text_conversation(rng, spec, 5, dict(colour=0, position=0))
    with pytest.raises(ValueError, match="question_mix: integer weights"):
        SH.text_conversation(rng, spec, 5, dict(colour=True))


def test_the_committed_base_was_built_with_the_code_s_recipe():
    """`demo_base.py --rebuild` makes the committed base again: its record's recipe is the code's."""
    recipe = B.load_base_record()["recipe"]
    assert recipe["llm"] == B.DEMO_LLM and recipe["vision"] == B.DEMO_VISION
    assert recipe["text_pretraining"] == B.DEMO_TEXT_PRETRAIN
    assert recipe["vision_pretraining"] == B.DEMO_VISION_PRETRAIN and recipe["checks"] == B.BASE_CHECKS
    assert recipe["position_scale"] == B.DEMO_POSITION_SCALE and recipe["seed"] == 0


def test_a_base_below_the_bar_is_named_type_by_type():
    """shortfalls names each text-QA type and the probe below BASE_BAR (seed 1's build: position 0.782);
    the committed base has none, and the check prints so."""
    measured = {"text_qa": {"per_kind": dict(colour=1.0, count=1.0, exists=0.99, position=0.782, shape=0.969)},
                "tower_probe": {"object": 0.95}}
    assert B.shortfalls(measured) == ["text QA position 0.782 < 0.97", "text QA shape 0.969 < 0.97",
                                      "tower probe 0.95 < 0.97"]
    assert B.bar_line(measured).startswith("warning: this base falls short of the bar (text QA position 0.782")
    assert B.shortfalls(B.load_base_record()["measured"]) == []
    assert "stands in for a pretrained one" in B.bar_line(B.load_base_record()["measured"])


def test_the_tower_probe_leaves_the_callers_random_state_alone():
    """The probe seeds its own init; the build's next model (the LLM) is then seeded by the build's seed alone."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype("float32"), rng.integers(0, 3, 60)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    B.linear_probe(x, y, x, y, classes=3, steps=5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_pretrained_llm_answers_text_only_questions_far_above_chance():
    """A short text pretraining (a thirtieth of the base's; lr 3e-3 to make its 50 steps count) already answers
    questions about a described scene: counting is learned first; the random LLM answers nothing."""
    from transformers import LlamaForCausalLM
    tok = SH.build_shapes_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(B.demo_base_configs()[1])
    before = B.text_qa_accuracy(llm, tok, n=100, seed=5)
    loss = B.pretrain_on_text(llm, tok, **{**B.DEMO_TEXT_PRETRAIN, "steps": 50, "lr": 3e-3, "warmup_steps": 10})
    after = B.text_qa_accuracy(llm, tok, n=100, seed=5)
    assert before["accuracy"] < 0.1 and loss < 1.0  # the answers' loss (log 4 = 1.39 for a guess among 4)
    assert after["per_kind"]["count"] >= 0.9  # chance 1/3 (multiple choice) or below (open)
    assert after["accuracy"] > before["accuracy"] + 0.3


def probe_features(vision, processor, n, seed):
    images, labels = B.probe_images(n, seed)
    with torch.no_grad():
        h = vision(pixel_values=D.preprocess_images(images, processor), output_hidden_states=True).hidden_states[-2]
    return h[:, 1:].numpy(), labels  # CLIP: drop CLS, as the model does


def test_several_visual_tokens_per_object_and_neighbours_carry_a_replaced_token():
    """The demo tower (patch 16 on 96 px) gives 36 tokens, 2 x 2 per grid cell. A linear probe reads a
    cell's object from a *neighbouring* token of the same cell (what is left when a token is
    replaced) far above chance, and not from a token of another cell."""
    from transformers import CLIPImageProcessor, CLIPVisionModel
    torch.manual_seed(0)
    vision = CLIPVisionModel(B.demo_base_configs()[0]).eval()
    with torch.no_grad():
        vision.embeddings.position_embedding.weight.mul_(B.DEMO_POSITION_SCALE)
    size = SH.ShapesSpec().image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    h_fit, y_fit = probe_features(vision, processor, 300, 0)
    h_test, y_test = probe_features(vision, processor, 150, 1)
    n = h_fit.shape[1]
    cells = B.token_cells(n, SH.ShapesSpec().grid)
    assert n == 36 and np.bincount(cells).tolist() == [4] * 9
    side = 6
    right = np.arange(n) + np.where(np.arange(n) % 2 == 0, 1, -1)  # the other token of its cell in its row
    assert (cells[right] == cells).all()
    other = (np.arange(n) + 2 * side) % n  # two rows down: a token of another cell
    assert (cells[other] != cells).all()
    d = h_fit.shape[-1]

    def probe(source):
        return B.linear_probe(h_fit[:, source].reshape(-1, d), y_fit[:, cells].reshape(-1),
                              h_test[:, source].reshape(-1, d), y_test[:, cells].reshape(-1), 13)
    neighbour, elsewhere = probe(right), probe(other)
    assert neighbour["object"] > 0.5 and neighbour["colour"] > 0.8  # chance 1/12 and 1/4
    assert elsewhere["object"] < 0.3 and neighbour["object"] > elsewhere["object"] + 0.3


def test_paired_differences_equal_a_hand_computation():
    a, b = [0.80, 0.83, 0.81, 0.85, 0.81], [0.78, 0.80, 0.80, 0.81, 0.78]
    p = A.paired(a, b)
    d = [0.02, 0.03, 0.01, 0.04, 0.03]
    mean = sum(d) / 5
    sd = (sum((x - mean) ** 2 for x in d) / 4) ** 0.5
    half = 2.7764451051977987 * sd / 5 ** 0.5  # t(0.975, 4 degrees of freedom)
    assert p["per_seed"] == pytest.approx(d) and p["mean"] == pytest.approx(mean)
    assert p["half_width"] == pytest.approx(half) and p["ci95"] == pytest.approx([mean - half, mean + half])
    assert A.verdict(p) == "better" and A.verdict(A.paired(b, a)) == "worse"
    assert A.verdict(A.paired([0.8, 0.7], [0.75, 0.76])) == "within noise"
    assert A.paired([0.8], [0.7])["ci95"] is None and A.verdict(A.paired([0.8], [0.7])) == "one seed"
    # one seed's test-sampling error: per-question differences 1, 0, -1 over the same questions
    se = A.test_sampling_se("1101", "1000")
    q = np.array([0, 1, 0, 1], dtype=float)
    assert se == pytest.approx(q.std(ddof=1) / 2)


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    import json
    path = tmp_path / "result.json"
    wanted = A.run_settings("victor", A.FULL)
    assert A.stale(str(path), wanted) == ""  # nothing there: run it
    path.write_text(json.dumps({"settings": A.run_settings("victor", A.QUICK)}))
    why = A.stale(str(path), wanted)
    assert why and "lengths" in why and "world" in why  # a quick run is not a full one
    path.write_text(json.dumps({"settings": A.run_settings("victor-recon0", A.FULL)}))
    assert "arm" in A.stale(str(path), wanted)
    path.write_text(json.dumps({"settings": wanted}))
    assert A.stale(str(path), wanted) is None


def test_grid_plan_is_the_pre_registered_one():
    plan = A.grid_plan(None, None, quick=False)
    assert all(len(plan[a]) >= 5 for a in A.CORE_ARMS) and all(len(s) >= 3 for s in plan.values())
    assert set(plan) == set(A.GRID_ARMS) and set(A.CORE_ARMS) <= set(plan)
    assert A.grid_plan(["victor"], None, quick=True) == {"victor": [0]}
    assert A.grid_plan(["victor", "llava"], [3, 4], quick=False) == {"victor": [3, 4], "llava": [3, 4]}


def test_the_committed_base_is_the_recorded_one_and_answers_as_recorded():
    """The committed base (shapes_world/base): every file as its sha256 record says, at most 10 MB, and it
    answers as recorded: the build's own 1000 text-only questions within 0.03 per type (the same questions:
    what differs is the machine's arithmetic), 300 fresh scenes within 3 standard errors of the difference
    of two samples per type (at 60 questions a type, 0.03 is inside the sampling error), and the tower's
    probe (half its images) within 0.03."""
    from transformers import AutoImageProcessor, CLIPVisionModel, LlamaForCausalLM
    record = B.load_base_record()
    assert record["bytes"] <= 10 * 2 ** 20
    vision_dir, llm_dir = B.demo_base()
    llm = LlamaForCausalLM.from_pretrained(llm_dir).eval()
    tok = SH.build_shapes_tokenizer()
    checks, recorded = record["recipe"]["checks"], record["measured"]["text_qa"]["per_kind"]
    same = B.text_qa_accuracy(llm, tok, n=checks["text_questions"], seed=checks["text_seed"])
    fresh = B.text_qa_accuracy(llm, tok, n=300, seed=checks["text_seed"] + 100)
    assert set(same["per_kind"]) == set(fresh["per_kind"]) == set(recorded) == set(SH.QUESTION_KINDS)
    for kind, value in recorded.items():
        assert same["per_kind"][kind] >= value - 0.03, (kind, same["per_kind"][kind], value)
        n_recorded, n_fresh = checks["text_questions"] / len(recorded), 300 / len(recorded)
        se = (value * (1 - value) * (1 / n_recorded + 1 / n_fresh)) ** 0.5
        assert fresh["per_kind"][kind] >= value - max(0.03, 3 * se), (kind, fresh["per_kind"][kind], value)
    vision = CLIPVisionModel.from_pretrained(vision_dir).eval()
    probe = B.tower_probe(vision, AutoImageProcessor.from_pretrained(vision_dir, backend="pil"), 300, 150)
    assert probe["object"] >= record["measured"]["tower_probe"]["object"] - 0.03
