"""train.py and eval.py end to end, on tiny random models and a tiny shapes dataset (CPU, seconds).

What is checked: each stage trains exactly its parts with its learning rates; gradient accumulation
and 2-process DDP (torchrun, gloo) reproduce the single-process losses and weights; the three stages
run in a row and write loadable checkpoints and metrics; eval.py scores a checkpoint against the
right chance levels; bad records are skipped and reported (or fail under strict); the command line.
"""
import functools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import eval as E
import forked
import train as T
from conftest import MAIN, cli_flags, crash_while_saving_then_resume, read_metrics, subprocess_env
from engineering import benchmarks as B
from engineering import config as CF
from engineering import distributed as DI
from engineering import flags as FL
from engineering.checkpoints import load_checkpoint
from shapes_world import demo_base as DB
from shapes_world import shapes as SH
from victor import VictorModel

pytestmark = pytest.mark.usefixtures("one_thread")
PARTS = ("projector", "llm", "vision_tower", "token_pool", "recon_head")
LR, VISION_LR, POOL_LR = 1e-3, 3e-4, 1e-2  # distinct, so each group's lr is recognisable


def part_of(key):
    return key.split(".")[0]


# -----------------------------------------------------------------------------
# Fixtures: tiny base models saved like Hugging Face checkpoints, and a full victor checkpoint


def stage_config(base, stage, out_dir, **overrides) -> T.TrainConfig:
    values = dict(stage=stage, data=base.data[stage], image_folder=base.shapes, init=base.init,
                  model_overrides={"pool_size": 32}, lr=LR, vision_lr=0.0, pool_lr=POOL_LR, weight_decay=0.0,
                  warmup_steps=2, max_steps=2, global_batch_size=4, batch_size=4, num_workers=0, log_every=1,
                  max_length=256, bf16=False, seed=0, out_dir=str(out_dir))
    values.update(overrides)
    return T.TrainConfig(**values)


@pytest.fixture
def capture(monkeypatch):
    """Record the optimizer train_stage builds and the model's full state when it saves."""
    seen = SimpleNamespace(optimizers=[], states=[])
    real_adamw, real_save = torch.optim.AdamW, T.save_checkpoint

    class RecordingAdamW(real_adamw):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.optimizers.append(self)

    def recording_save(model, path, *args, **kwargs):
        seen.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        seen.model = model
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(T, "save_checkpoint", recording_save)
    return seen


# -----------------------------------------------------------------------------
# 1. Each stage trains exactly its parameter groups, each with its learning rate


def expected_groups(stage, vision_lr):
    groups = {"projector": LR}
    if stage in ("1.5", "2"):
        groups["llm"] = LR
        if vision_lr > 0:
            groups["vision_tower"] = vision_lr
    if stage == "1.5":
        groups.update(token_pool=POOL_LR, recon_head=LR)
    return groups


@pytest.mark.parametrize("stage", ["1", "1.5", "2"])
@pytest.mark.parametrize("vision_lr", [0.0, VISION_LR])
def test_trainable_param_groups(model, stage, vision_lr):
    cfg = T.TrainConfig(lr=LR, vision_lr=vision_lr, pool_lr=POOL_LR, weight_decay=0.05)
    groups = T.trainable_param_groups(model, stage, cfg)
    model.set_trainable(stage, train_vision=vision_lr > 0)  # what prepare_model does (param_groups sets nothing)
    want = expected_groups(stage, vision_lr)
    assert {g["name"]: g["lr"] for g in groups} == want
    assert all(g["weight_decay"] == 0.05 for g in groups)
    # the vision tower's layers after the feature layer (-2), and its final norm, never get a gradient
    unused_vision = {n for n, _ in model.named_parameters()
                     if n.startswith(("vision_tower.encoder.layers.1.", "vision_tower.post_layernorm."))}
    assert unused_vision
    for g in groups:  # each group is exactly its module's parameters (the tower: those in use)
        module = getattr(model, g["name"])
        module_params = ([module] if isinstance(module, torch.nn.Parameter) else
                         [p for n, p in module.named_parameters(prefix=g["name"]) if n not in unused_vision])
        assert {id(p) for p in g["params"]} == {id(p) for p in module_params}
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():  # requires_grad on exactly the grouped parameters
        assert p.requires_grad == (id(p) in in_groups), name
        assert (part_of(name) in want and name not in unused_vision) == p.requires_grad, name


@pytest.mark.parametrize("stage,vision_lr", [
    ("1", VISION_LR),  # stage 1 keeps the tower frozen even when a vision lr is configured
    ("1.5", 0.0), ("1.5", VISION_LR), ("2", 0.0), ("2", VISION_LR)])
def test_stage_trains_only_its_parts(base, tmp_path, capture, stage, vision_lr):
    cfg = stage_config(base, stage, tmp_path / "out", vision_lr=vision_lr)
    T.train_stage(cfg, stage)
    want = expected_groups(stage, vision_lr)

    # the optimizer carries the configured learning rates, one group per trained part
    (opt,) = capture.optimizers
    assert {g["name"]: g["initial_lr"] for g in opt.param_groups} == want
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    rows, _ = read_metrics(cfg.out_dir)
    assert [r["step"] for r in rows] == [1, 2]
    # the logged lr is the one each step used: linear warm-up over 2 steps -> lr/2, lr
    assert [r["lr"] for r in rows] == pytest.approx([LR / 2, LR])

    before = load_file(os.path.join(base.init, "model.safetensors"))
    (after,) = capture.states
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for part in PARTS:
        keys = {k for k in before if part_of(k) == part}
        assert keys, part
        if part not in want:  # frozen: bitwise identical
            assert not (keys & changed), f"stage {stage}: frozen {part} changed: {sorted(keys & changed)[:3]}"
        elif part == "vision_tower":
            # features come from the second-to-last layer, so the tower's input side must move
            assert any(k.endswith("embeddings.patch_embedding.weight") for k in changed)
            assert any(".encoder.layers.0." in k for k in changed)
            # and what lies after it is not trained at all (no optimizer state, no change)
            assert not {k for k in changed if k.startswith(("vision_tower.encoder.layers.1.",
                                                              "vision_tower.post_layernorm."))}
        else:  # every tensor of a trained part gets a gradient and moves
            assert keys <= changed, f"stage {stage}: {part} not updated: {sorted(keys - changed)[:3]}"
    if stage == "1":  # stage 1 saves only what it trained
        assert set(load_file(os.path.join(cfg.out_dir, "model.safetensors"))) == {
            k for k in before if part_of(k) == "projector"}
    else:
        saved = load_file(os.path.join(cfg.out_dir, "model.safetensors"))
        assert all(torch.equal(saved[k], after[k]) for k in after)


# -----------------------------------------------------------------------------
# 2. and 3. Gradient accumulation and 2-process DDP reproduce one process at the same global batch

LOSS_TOL = 1e-5  # absolute, on losses around 4
WEIGHT_TOL = 1e-5  # absolute, on any weight after 3 AdamW steps at lr 1e-3


def stage2_overrides(base, out_dir, **overrides):
    """Stage 2 of the demo recipe, from the common init, vision tower trained (as in the paper)."""
    values = dict(recipe="demo", stage="2", data=base.data["2"], image_folder=base.shapes, init=base.init,
                  lr=LR, vision_lr=1e-4, max_steps=3, warmup_steps=1, global_batch_size=8, batch_size=8,
                  num_workers=0, log_every=1, max_length=256, seed=0, bf16=False, out_dir=str(out_dir))
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def stage2_reference(base, tmp_path_factory):
    """One process, one micro-batch of 8 per step."""
    out = tmp_path_factory.mktemp("stage2_single")
    T.run(stage2_overrides(base, out))
    return str(out)


def compare_runs(ref_dir, other_dir):
    """(max |loss difference| over steps and loss kinds, max |weight difference|)."""
    ref_rows, _ = read_metrics(ref_dir)
    rows, _ = read_metrics(other_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3]
    loss_diff = max(abs(a[k] - b[k]) for a, b in zip(ref_rows, rows) for k in ("loss", "lm_loss"))
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in ref_rows])
    ref_w = load_file(os.path.join(ref_dir, "model.safetensors"))
    w = load_file(os.path.join(other_dir, "model.safetensors"))
    assert set(ref_w) == set(w)
    weight_diff = max(float((ref_w[k] - w[k]).abs().max()) for k in ref_w)
    return loss_diff, weight_diff


def test_grad_accumulation_matches_one_big_batch(base, stage2_reference, tmp_path):
    out = tmp_path / "accum"
    T.run(stage2_overrides(base, out, batch_size=4))  # 2 micro-batches of 4 per step
    loss_diff, weight_diff = compare_runs(stage2_reference, str(out))
    print(f"accumulation (2 x 4) vs one batch of 8: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff < LOSS_TOL
    assert weight_diff < WEIGHT_TOL
    # and training did something: the weights moved from the init much more than the tolerance
    init = load_file(os.path.join(base.init, "model.safetensors"))
    final = load_file(os.path.join(str(out), "model.safetensors"))
    assert max(float((init[k] - final[k]).abs().max()) for k in init) > 100 * WEIGHT_TOL


def test_ddp_two_processes_match_one(base, stage2_reference, tmp_path):
    out = tmp_path / "ddp"
    flags = cli_flags(stage2_overrides(base, out, batch_size=4))  # 2 processes x 4 = global batch 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *flags]
    proc = subprocess.run(cmd, cwd=MAIN, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "skipped records: none" in proc.stdout + proc.stderr
    loss_diff, weight_diff = compare_runs(stage2_reference, str(out))
    print(f"DDP (2 x 4) vs 1 process (1 x 8): max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff < LOSS_TOL
    assert weight_diff < WEIGHT_TOL


# -----------------------------------------------------------------------------
# 4. All three stages in a row, through the demo recipe's own data generation


@pytest.fixture(scope="module")
def all_stages(base, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("all"))
    with pytest.MonkeyPatch.context() as mp:  # the demo's shapes data, but at the tiny models' 32 px
        mp.setattr(SH, "ShapesSpec", functools.partial(SH.ShapesSpec, image_size=32, num_test_images=20))
        outs = T.run(dict(recipe="demo", stage="all", out_dir=root, demo_images=24, vision_model=base.vision,
                          llm=base.llm, model_overrides={"pool_size": 32}, max_steps=2, warmup_steps=1,
                          batch_size=4, global_batch_size=4, num_workers=0, log_every=1, max_length=256,
                          bf16=False))
    return SimpleNamespace(root=root, outs=outs, shapes=os.path.join(root, "shapes"))


def test_all_stages_checkpoints(base, all_stages):
    root = all_stages.root
    assert all_stages.outs == [os.path.join(root, f"stage{s}") for s in ("1", "1.5", "2")]
    with open(os.path.join(all_stages.shapes, "spec.json")) as f:
        assert json.load(f)["image_size"] == 32
    assert not os.path.exists(os.path.join(root, "base"))  # base models were given: none built
    for out in all_stages.outs:
        files = set(os.listdir(out))
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
                "skipped.json"} <= files, (out, files)
        assert "tokenizer.json" in files

    stage1, stage15, stage2 = all_stages.outs
    with open(os.path.join(stage1, "config.json")) as f:
        meta1 = json.load(f)
    assert meta1["saved_parts"] == "projector"
    assert meta1["victor"]["vision_model"] == os.path.abspath(base.vision)
    assert meta1["victor"]["llm"] == os.path.abspath(base.llm)
    weights1 = load_file(os.path.join(stage1, "model.safetensors"))
    assert weights1 and all(k.startswith("projector.") for k in weights1)
    # the stage-1 checkpoint loads too: its projector, and the base LLM untouched
    m1, _, _ = load_checkpoint(stage1)
    assert all(torch.equal(m1.state_dict()[k], v) for k, v in weights1.items())
    base_llm = load_file(os.path.join(base.llm, "model.safetensors"))
    assert torch.equal(m1.llm.model.embed_tokens.weight, base_llm["model.embed_tokens.weight"])

    for out, stage, init in ((stage15, "1.5", stage1), (stage2, "2", stage15)):
        with open(os.path.join(out, "config.json")) as f:
            meta = json.load(f)
        assert meta["saved_parts"] == "all"
        assert meta["train_config"]["stage"] == stage and meta["train_config"]["init"] == init
        model, tokenizer, processor = load_checkpoint(out)
        assert isinstance(model, VictorModel) and model.num_image_tokens == 16
        saved = load_file(os.path.join(out, "model.safetensors"))
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        assert tokenizer.pad_token == "<pad>" and processor.crop_size["height"] == 32
    # later stages continued from earlier ones: stage 2 starts from stage 1.5's pool, which it does not train
    s15 = load_file(os.path.join(stage15, "model.safetensors"))
    s2 = load_file(os.path.join(stage2, "model.safetensors"))
    assert torch.equal(s15["token_pool"], s2["token_pool"])
    assert not torch.equal(s15["llm.lm_head.weight"], s2["llm.lm_head.weight"])


def test_all_stages_metrics(all_stages):
    for out, stage in zip(all_stages.outs, ("1", "1.5", "2")):
        rows, done = read_metrics(out)
        assert len(rows) == 2 and len(done) == 1 and done[0]["skipped"] == 0
        for r in rows:
            assert {"loss", "lm_loss", "recon_loss", "lr", "samples_per_s", "step", "grad_norm"} <= set(r)
            assert r["stage"] == stage
            assert r["lm_loss"] > 0 and r["lr"] > 0 and r["samples_per_s"] > 0
            assert r["loss"] == pytest.approx(r["lm_loss"] + r["recon_loss"])
            if stage == "1.5":
                assert r["recon_loss"] > 0
            else:
                assert r["recon_loss"] == 0


# -----------------------------------------------------------------------------
# 5. eval.py


def test_eval_end_to_end(all_stages, tmp_path):
    ckpt = all_stages.outs[-1]
    test_file = os.path.join(all_stages.shapes, "test.jsonl")
    out = str(tmp_path / "eval.json")
    E.main([ckpt, "--test-file", test_file, "--image-folder", all_stages.shapes, "--out", out, "--batch-size", "8"])
    with open(out) as f:
        res = json.load(f)
    with open(test_file) as f:
        records = [json.loads(line) for line in f]
    assert res["num_questions"] == len(records) == 20
    assert 0.0 <= res["accuracy"] <= 1.0
    assert len(res["predictions"]) == 20
    # a multiple-choice prediction is the option's letter, a yes/no one the word
    by_id = {r["id"]: r for r in records}

    def right(p):
        options = by_id[p["id"]]["options"]
        if options is None:
            return p["prediction"].lower() == p["answer"].lower()
        letters = list(SH.LETTERS[:len(options)])
        return p["prediction"] in letters and options[letters.index(p["prediction"])] == p["answer"]
    assert res["accuracy"] == pytest.approx(sum(map(right, res["predictions"])) / 20)
    # chance: 1/len(options) for multiple choice, 0.5 for yes/no; per type and overall
    chance = {}
    for r in records:
        chance.setdefault(r["type"], []).append(1 / len(r["options"]) if r["options"] else 0.5)
    assert set(res["per_type"]) == set(chance) == set(SH.QUESTION_KINDS)
    for kind, t in res["per_type"].items():
        assert set(t) == {"accuracy", "chance", "n"}
        assert t["n"] == len(chance[kind])
        assert t["chance"] == pytest.approx(sum(chance[kind]) / len(chance[kind]))
        assert 0.0 <= t["accuracy"] <= 1.0
    assert res["per_type"]["exists"]["chance"] == 0.5
    assert res["per_type"]["shape"]["chance"] == pytest.approx(1 / 3)  # 3 shapes -> 3 options
    assert res["per_type"]["colour"]["chance"] == pytest.approx(1 / 4)
    assert res["chance"] == pytest.approx(sum(sum(c) for c in chance.values()) / 20)


@pytest.mark.parametrize("text,options,want", [
    ("B", ["red", "blue", "green"], "B"),
    ("(B)", ["red", "blue", "green"], "B"),
    ("B. blue", ["red", "blue", "green"], "B"),
    (" C . green", ["red", "blue", "green"], "C"),
    ("blue", ["red", "blue", "green"], "B"),
    ("Top Left .", ["top", "top left", "left", "center"], "B"),
    ("D", ["red", "blue", "green"], ""),  # not one of the 3 letters
    ("bottom", ["top", "left", "right"], ""),  # a lower-case word is not the letter B
    ("purple", ["red", "blue", "green"], ""),
    ("yes", None, "yes"),
    ("No.", None, "no"),
    ("  Yes, there is", None, "yes"),
    ("", None, ""),
])
def test_extract_answer(text, options, want):
    assert B.extract_answer(text, options) == want


# -----------------------------------------------------------------------------
# 6. Bad records: skipped, counted and reported; strict fails naming the record


@pytest.fixture
def bad_data(base, tmp_path):
    with open(base.data["2"]) as f:
        good = json.load(f)[:7]
    missing = {**good[0], "id": "missing-image", "image": "images/does_not_exist.png"}
    broken = {"id": "no-answer", "image": good[1]["image"],
              "conversations": [{"from": "human", "value": "<image>\nWhat colour is it ?"}]}
    path = str(tmp_path / "bad.json")
    with open(path, "w") as f:
        json.dump(good[:3] + [missing] + good[3:] + [broken], f)
    return path, missing, broken, good


def test_bad_records_are_skipped_and_reported(base, bad_data, tmp_path, capsys):
    path, _, _, _ = bad_data
    # 7 good records = 1 step of 4; the two bad ones are found by the validation pass, before training
    cfg = stage_config(base, "2", tmp_path / "out", data=path, max_steps=2)
    T.train_stage(cfg, "2")
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "2 bad records will be skipped" in text
    assert "missing-image ([3]): image not found" in text and "no-answer ([8]): no 'gpt' turn" in text
    assert "skipped records: 2" in text
    with open(os.path.join(cfg.out_dir, "skipped.json")) as f:
        skipped = {s["id"]: s["reason"] for s in json.load(f)}
    assert set(skipped) == {"missing-image ([3])", "no-answer ([8])"}
    why = skipped["missing-image ([3])"]
    assert "image not found" in why and "does_not_exist.png" in why
    with open(os.path.join(cfg.out_dir, "bad_records.json")) as f:
        assert [r["record"] for r in json.load(f)] == ["missing-image ([3])", "no-answer ([8])"]
    rows, done = read_metrics(cfg.out_dir)
    assert done[0]["skipped"] == 2 and rows[-1]["skipped"] == 0  # the loop itself skipped nothing
    assert done[0]["skipped_ids"] == ["missing-image ([3])", "no-answer ([8])"]
    assert os.path.isfile(os.path.join(cfg.out_dir, "model.safetensors"))


def test_strict_fails_on_a_malformed_record(base, bad_data, tmp_path):
    path, _, _, _ = bad_data
    with pytest.raises(ValueError, match="no-answer"):
        T.train_stage(stage_config(base, "2", tmp_path / "out", data=path, strict=True), "2")


def test_strict_fails_on_a_missing_image_before_training(base, bad_data, tmp_path, monkeypatch):
    _, missing, _, good = bad_data
    path = str(tmp_path / "missing_only.json")
    with open(path, "w") as f:
        json.dump([missing] + good, f)
    monkeypatch.setattr(T, "build_model", lambda *a: pytest.fail("a model was built before validation failed"))
    with pytest.raises(ValueError, match=r"missing-image \(\[0\]\): image not found"):
        T.train_stage(stage_config(base, "2", tmp_path / "out", data=path, strict=True, max_steps=2), "2")
    assert not os.path.exists(os.path.join(tmp_path, "out", "model.safetensors"))


# -----------------------------------------------------------------------------
# 7. The command line


def test_cli_help():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=MAIN, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for field in T.dataclasses.fields(T.TrainConfig):
        assert "--" + field.name.replace("_", "-") in proc.stdout
    assert "--no-bf16" in proc.stdout


def test_parse_args_maps_flags_to_fields():
    args = T.parse_args(["--lr", "0.5", "--stage", "1.5", "--model-overrides", '{"pool_size": 64}', "--no-bf16",
                         "--max-steps", "7", "--gradient-checkpointing", "--data", "x.json"])
    assert args == {"lr": 0.5, "stage": "1.5", "model_overrides": {"pool_size": 64}, "bf16": False,
                    "max_steps": 7, "gradient_checkpointing": True, "data": "x.json"}
    assert isinstance(args["lr"], float) and isinstance(args["max_steps"], int)
    assert T.parse_args([]) == {}  # flags not given do not override the recipe
    # recipe values, then the flags on top
    stage = args.pop("stage")
    cfg = T.stage_config("demo", stage, args)
    assert (cfg.lr, cfg.max_steps, cfg.bf16, cfg.gradient_checkpointing) == (0.5, 7, False, True)
    assert cfg.model_overrides == {"pool_size": 64} and cfg.stage == "1.5" and cfg.recipe == "demo"
    for key, value in CF.RECIPES["demo"]["stages"]["1.5"].items():
        if key not in args:
            assert getattr(cfg, key) == value, key
    with pytest.raises(SystemExit):
        T.parse_args(["--model-overrides", "{not json"])
    with pytest.raises(SystemExit):
        T.parse_args(["--no-such-flag", "1"])


def test_unknown_recipe_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        T.run({"recipe": "nope", "stage": "2", "out_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown recipe"):
        T.stage_config("nope", "1", {})


@pytest.mark.parametrize("global_batch,batch", [(10, 4), (4, 8)])
def test_global_batch_must_divide(base, tmp_path, global_batch, batch):
    cfg = stage_config(base, "2", tmp_path, global_batch_size=global_batch, batch_size=batch)
    with pytest.raises(ValueError, match=f"global_batch_size {global_batch} is not a multiple of batch_size {batch}"):
        T.train_stage(cfg, "2")


# -----------------------------------------------------------------------------
# 8. Resume: a run killed with SIGKILL and resumed ends with the same weights, bitwise


def stage15_overrides(base, out_dir, **overrides):
    values = dict(recipe="demo", stage="1.5", data=base.data["1.5"], image_folder=base.shapes, init=base.init,
                  model_overrides={"pool_size": 32}, lr=LR, vision_lr=0.0, pool_lr=POOL_LR, max_steps=40,
                  warmup_steps=2, global_batch_size=4, batch_size=4, num_workers=0, log_every=1, max_length=256,
                  seed=0, bf16=False, out_dir=str(out_dir))
    values.update(overrides)
    return values


def test_latest_training_state_ignores_half_written(tmp_path):
    assert DI.latest_training_state(str(tmp_path / "none")) == ""
    for d in ("step-5", "step-10", "step-15.tmp"):
        (tmp_path / d).mkdir()
    assert DI.latest_training_state(str(tmp_path)) == str(tmp_path / "step-10")


def test_a_crash_while_saving_keeps_the_previous_state(base, tmp_path, monkeypatch):
    """The process dies between writing step-4.tmp and renaming it: step-2 stays the newest
    complete state, and resuming from it ends bitwise where an uninterrupted run does."""
    def cfg(out, **kw):
        return T.TrainConfig(**{**stage15_overrides(base, out, max_steps=6, save_every=2), **kw})
    ref, run = crash_while_saving_then_resume(cfg, tmp_path, monkeypatch)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_and_resumed_run_equals_uninterrupted(base, tmp_path):
    """Stage 1.5 (random token selection, pool, optimizer state), 40 steps crossing two epochs of
    the 64-image set: SIGKILL right after the first saved state, then --resume auto."""
    ref, run = tmp_path / "ref", tmp_path / "killed"
    cmd = ["train.py"]
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run goes on while the other is killed and resumed
        uninterrupted = pool.submit(forked.run, cmd + cli_flags(stage15_overrides(base, ref)), timeout=300)
        resumed = kill_and_resume(base, cmd, run)
    done = uninterrupted.result()
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m = re.search(r"resuming from \S+step-(\d+) at step (\d+)", resumed.stdout + resumed.stderr)
    assert m and 5 <= int(m.group(2)) < 40, (resumed.stdout + resumed.stderr)[-2000:]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # the metrics log of the resumed run continues where the killed one left off
    rows, _ = read_metrics(str(run))
    ref_rows, _ = read_metrics(str(ref))
    assert rows[-1]["step"] == ref_rows[-1]["step"] == 40
    assert rows[-1]["loss"] == ref_rows[-1]["loss"]


def kill_and_resume(base, cmd, run):
    """The run SIGKILLed right after its first saved state (step 5), then resumed with --resume auto."""
    import signal
    import time
    job = forked.start(cmd + cli_flags(stage15_overrides(base, run, save_every=5)))
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-5").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    job.kill()
    assert job.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "model.safetensors").exists()
    return forked.run(cmd + cli_flags(stage15_overrides(base, run, save_every=5, resume="auto")), timeout=300)


def test_a_reduced_rebuild_makes_a_base_whose_files_are_checked(tmp_path, monkeypatch, capsys):
    """`demo_base.py --rebuild`'s build, a few steps each: the design's models, a record of the recipe, the
    measurements and every file's sha256, and a warning that it falls short of the bar; a missing or changed
    file is refused in one line naming it."""
    out = str(tmp_path / "base")
    vision_dir, llm_dir = DB.build_demo_base(out, text=dict(steps=2), vision=dict(steps=2),
                                             checks=dict(text_questions=10, probe_fit=20, probe_test=10))
    assert "demo base: warning: this base falls short of the bar (text QA " in capsys.readouterr().out
    llm = json.load(open(os.path.join(llm_dir, "config.json")))
    assert llm["num_attention_heads"] == DB.DEMO_LLM["num_attention_heads"]
    assert llm["rope_parameters"]["rope_theta"] == DB.DEMO_LLM["rope_theta"]
    first = load_file(os.path.join(vision_dir, "model.safetensors"))["embeddings.position_embedding.weight"]
    assert 0.3 < first.std() < 0.5  # CLIP's init (0.02) x DEMO_POSITION_SCALE
    record = DB.load_base_record(out)
    assert record["recipe"]["text_pretraining"]["steps"] == record["recipe"]["vision_pretraining"]["steps"] == 2
    assert set(record["measured"]) >= {"text_loss", "text_qa", "vision_loss", "tower_probe", "seconds"}
    assert {"vision/model.safetensors", "llm/model.safetensors", "llm/tokenizer.json"} <= set(record["sha256"])
    assert DB.demo_base(out) == (vision_dir, llm_dir)
    # the seed reaches both models' init: another seed, other weights in each (--rebuild --seed)
    other = str(tmp_path / "base-seed1")
    DB.build_demo_base(other, seed=1, text=dict(steps=2), vision=dict(steps=2),
                       checks=dict(text_questions=10, probe_fit=20, probe_test=10))  # all but the seed as above
    for sub in ("vision", "llm"):
        digest = DB.load_base_record(other)["sha256"][f"{sub}/model.safetensors"]
        assert digest != record["sha256"][f"{sub}/model.safetensors"], sub
    with pytest.raises(SystemExit):
        DB.main(["--seed", "1"])  # a seed without --rebuild would be ignored: refused
    weights = os.path.join(llm_dir, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 1  # one bit of one weight
    open(weights, "wb").write(bytes(data))
    with pytest.raises(FL.UsageError, match=rf"^the demo's base file {re.escape(weights)} differs from the sha256 "
                                           r".*demo_base\.py --rebuild"):
        DB.demo_base(out)
    # train.py's demo recipe loads the base through the same check: one line, before anything is built
    monkeypatch.setattr(DB, "BASE_DIR", out)
    with pytest.raises(FL.UsageError, match=r"^the demo's base file .*model\.safetensors differs"):
        T.run(dict(recipe="demo", stage="1", out_dir=str(tmp_path / "run"), max_steps=1))
    assert not (tmp_path / "run").exists()
    os.remove(weights)
    with pytest.raises(FL.UsageError, match=rf"^the demo's base file {re.escape(weights)} is missing: "):
        DB.demo_base(out)
    proc = forked.run(["shapes_world/demo_base.py", "--base", out], timeout=60)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and line.startswith(f"error: the demo's base file {weights} is missing: restore it")
    assert line.endswith(f"or rebuild the base: {DB.REBUILD}")
