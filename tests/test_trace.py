"""scripts/trace_step.py: the real training step traced on fake tensors, held to the plan and to a real run.

A tiny recipe (the demo's models) is traced at world sizes 2 and 8 under a fake process group: the sharded
weights, gradients and AdamW state it holds equal the memory plan's per-part counts exactly. The same step on
real tensors, measured by the same tracker (one process; FSDP over 2 gloo processes), agrees with its fake
trace within 10 %.
"""
import json
import sys

import pytest

import forked
from conftest import MAIN
from engineering import memory_plan as MP
from engineering.config import stage_config

sys.path.insert(0, f"{MAIN}/scripts")
import trace_step  # noqa: E402

DEMO = {"global_batch_size": 64}  # a multiple of the demo's per-GPU batch (8) x 8 processes


@pytest.mark.parametrize("world", [2, 8])
def test_tiny_recipe_traced_holds_the_plans_states_exactly(world):
    result = trace_step.trace("demo", "1.5", world, "FSDP", overrides=DEMO)
    plan = MP.memory_plan(stage_config("demo", "1.5", {**DEMO, "fsdp": True, "bf16": True}), "1.5", world)
    assert result["mode"] == "FSDP" and result["world"] == world
    for part in ("params", "grads", "optimizer"):
        assert result["states"][part] == plan["FSDP"]["state_parts"][part], part
    # what the trace says per GPU is whole: every part there, and the peak their sum
    assert result["peak"] == sum(v for k, v in result["parts"].items() if k != "total") > 0
    assert result["parts"]["activations"] > 0 and result["parts"]["communication"] > 0
    assert result["flops_per_step"] > 0 and 0 <= result["padding_share"] < 1
    assert result["seconds"] < 60


def test_one_process_trace_holds_the_plans_states_exactly():
    result = trace_step.trace("demo", "2", 1)
    plan = MP.memory_plan(stage_config("demo", "2", {"bf16": True}), "2", 1)
    for part in ("params", "grads", "optimizer"):
        assert result["states"][part] == plan["DDP"]["state_parts"][part], part


def run_real(tmp_path, procs, *flags):
    out = tmp_path / f"real-{procs}.json"
    proc = forked.run(["scripts/trace_step.py", "--recipe", "demo", "--stage", "1.5", "--real", "--json", str(out),
                       *flags], procs=procs, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("procs", [1, 2])
def test_fake_trace_agrees_with_the_real_step_within_10_percent(tmp_path, procs):
    flags = ["--fsdp", "--overrides", json.dumps({"global_batch_size": 32})] if procs == 2 else []
    real = run_real(tmp_path, procs, *flags)
    fake = trace_step.trace("demo", "1.5", procs, "FSDP" if procs == 2 else None,
                            overrides={"global_batch_size": 32} if procs == 2 else None)
    assert real["real"] and not fake["real"] and real["mode"] == fake["mode"]
    assert real["peak"] == pytest.approx(fake["peak"], rel=0.10)
    assert real["states"] == fake["states"]  # what is held between steps: exactly
    assert real["flops_per_step"] == fake["flops_per_step"]
