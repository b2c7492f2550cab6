"""Every numeric flag of train.py and eval.py is range-checked from one declaration, before anything is built,
as one line naming the flag and its range; flags that replace or do not reach a recipe setting say so."""
import dataclasses
import subprocess
import sys

import pytest

import eval as E
import train as T
from conftest import MAIN, subprocess_env, train_says
from engineering import config as CF
from engineering import flags as FL


def numeric_fields():
    return [f for f in dataclasses.fields(T.TrainConfig) if f.type in ("int", "float")]


def just_outside(rng, integer: bool) -> list:
    """Values just outside a Range: at an open bound, the bound itself; at a closed one, the next value out."""
    step = 1 if integer else 1e-6
    values = []
    if rng.lo is not None:
        values.append(rng.lo if rng.lo_open else rng.lo - step)
    if rng.hi is not None:
        values.append(rng.hi if rng.hi_open else rng.hi + step)
    return values if integer else [float(v) for v in values]  # as argparse gives a float flag


def test_every_numeric_field_declares_a_range_and_a_help():
    assert numeric_fields()
    for f in dataclasses.fields(T.TrainConfig):
        assert f.metadata["help"], f.name
        if f.type in ("int", "float"):
            assert f.metadata["range"] is not None, f"{f.name}: no declared range"
            assert f.default in f.metadata["range"], f.name  # the default itself is valid
    for recipe in CF.RECIPES.values():  # and so are the recipes' values
        for values in recipe["stages"].values():
            assert FL.out_of_range(values, CF.RANGES) == ""


CASES = [(f.name, value) for f in numeric_fields() for value in just_outside(f.metadata["range"], f.type == "int")]
CASES += [("lr", float("nan"))]


@pytest.mark.parametrize("name,value", CASES)
def test_a_train_flag_just_outside_its_range_is_one_line(name, value, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(T, "demo_inputs", lambda *a: pytest.fail("data was made before the ranges were checked"))
    monkeypatch.setattr(T, "train_stage", lambda *a: pytest.fail("a stage started before the ranges were checked"))
    flag = "--" + name.replace("_", "-")
    code, said = train_says(["--stage", "2", "--out-dir", str(tmp_path), f"{flag}={value}"], capsys)
    assert code == 2
    assert said.startswith(f"error: {flag} ") and f"must be {CF.RANGES[name]}" in said, said


def test_the_range_check_runs_before_a_plan_too(capsys):
    assert train_says(["--stage", "2", "--plan", "--batch-size=0"], capsys) == (
        2, "error: --plan: --batch-size 0: must be >= 1")


def test_out_of_range_flag_from_the_shell_prints_no_traceback():
    proc = subprocess.run([sys.executable, "train.py", "--stage", "2", "--lr=-1"], cwd=MAIN, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: --lr -1.0: must be > 0"]


def eval_numeric_flags():
    return [a for a in E.build_parser()._actions if a.type in (int, float)]


def test_every_numeric_eval_flag_declares_a_range():
    assert {a.dest for a in eval_numeric_flags()} == set(E.RANGES)


EVAL_CASES = [(a.dest, a.option_strings[0], value) for a in eval_numeric_flags()
              for value in just_outside(E.RANGES[a.dest], a.type is int)]


@pytest.mark.parametrize("dest,flag,value", EVAL_CASES)
def test_an_eval_flag_just_outside_its_range_is_one_line(dest, flag, value, monkeypatch):
    monkeypatch.setattr(E, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        E.main(["out/no-such-checkpoint", f"{flag}={value}"])
    assert e.value.code == f"error: {flag} {value!r}: must be {E.RANGES[dest]}"


# -----------------------------------------------------------------------------
# Flags that replace a recipe setting, and settings without effect in the stage run


def test_epochs_replaces_the_recipes_step_count(capsys):
    cfg = T.stage_config("demo", "2", {"epochs": 0.05})
    assert cfg.epochs == 0.05 and cfg.max_steps == 0  # the recipe's 1500 steps no longer win
    assert T.stage_config("demo", "2", {}).max_steps == CF.RECIPES["demo"]["stages"]["2"]["max_steps"]
    assert T.stage_config("demo", "2", {"epochs": 2.0, "max_steps": 7}).max_steps == 7  # the flag still wins
    cfg = T.stage_config("demo", "1", {"warmup_ratio": 0.1})
    assert cfg.warmup_ratio == 0.1 and cfg.warmup_steps == 0
    CF.note_replaced_counts({"epochs": 0.05}, "demo", ["1", "1.5", "2"])
    out = capsys.readouterr().out
    assert "note: --epochs 0.05 replaces the demo recipe's max_steps (stage 1: 200, stage 1.5: 200, stage 2: 2000)" \
        in out, out
    with pytest.raises(FL.UsageError, match="--epochs has no effect with --max-steps"):
        CF.check_knobs({"epochs": 1.0, "max_steps": 5}, "demo", ["2"])


@pytest.mark.parametrize("key", CF.STAGE15_FIELDS)
def test_a_stage15_override_outside_stage15_gets_a_note(key, capsys):
    CF.check_knobs({"model_overrides": {key: 3}}, "demo", ["2"])
    assert f"note: --model-overrides {key}: a stage-1.5 setting, no effect in stage 2" in capsys.readouterr().out
    CF.check_knobs({"model_overrides": {key: 3}}, "demo", ["1"])
    assert "applies in stage 1.5 from it" in capsys.readouterr().out
    CF.check_knobs({"model_overrides": {key: 3}}, "demo", ["1", "1.5", "2"])
    assert capsys.readouterr().out == ""  # stage 1.5 runs: it takes effect there
    CF.check_knobs({"model_overrides": {"normalize_visual_tokens": False}}, "demo", ["2"])
    assert capsys.readouterr().out == ""  # read in every stage


def test_variant_llava_is_llava15_and_exports(tmp_path):
    cfg = T.stage_config("demo", "1", {"variant": "llava"})
    assert cfg.model_overrides["normalize_visual_tokens"] is False  # LLaVA-1.5's math
    assert CF.stages_to_run("all", "llava") == ["1", "2"]
    # with --init the preset still takes effect (a checkpoint's normalisation is a setting, not a weight)
    from engineering.checkpoints import config_with_overrides
    from victor import VictorConfig
    saved = VictorConfig(vision_model="v", llm="l")
    cfg = T.stage_config("demo", "2", {"variant": "llava"}, init="ckpt")
    assert config_with_overrides(saved, cfg.model_overrides, True, "ckpt").normalize_visual_tokens is False


def test_every_ablation_arm_normalises_alike():
    """bench_ablation's arms differ only by stage 1.5: llava keeps normalize_visual_tokens=True explicitly."""
    sys.path.insert(0, f"{MAIN}/scripts")
    from bench_ablation import ARMS

    from engineering.checkpoints import config_with_overrides
    from victor import VictorConfig
    stage1 = VictorConfig(vision_model="v", llm="l")  # the shared stage-1 checkpoint's settings (no variant)
    for arm, spec in ARMS.items():
        cfg = T.stage_config("demo", "2", {"variant": spec["variant"], "model_overrides": spec.get("model_overrides",
                                                                                                  {})}, init="ckpt")
        merged = config_with_overrides(stage1, {k: v for k, v in cfg.model_overrides.items() if k != "pool_size"},
                                       True, "ckpt")
        assert merged.normalize_visual_tokens is True, arm


def test_plan_before_init_exists_plans_from_the_recipe(tmp_path, capsys):
    missing = str(tmp_path / "stage1.5")
    with pytest.raises(SystemExit) as e:
        T.main(["--recipe", "demo", "--stage", "2", "--init", missing, "--plan"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"note: --init {missing} does not exist yet: planning from the demo recipe's models" in out
    assert "memory plan: recipe demo, stage 2" in out
