"""scripts/trace_step.py: the real training step traced on fake tensors, held to the plan and to a real run.

A tiny recipe (the demo's models) is traced at world sizes 2 and 8 under a fake process group: the sharded
weights, gradients and AdamW state it holds equal the memory plan's per-part counts exactly. The same step on
real tensors, measured by the same tracker (one process; FSDP over 2 gloo processes), agrees with its fake
trace within 10 %.
"""
import json
import re
import sys

import pytest

import forked
from conftest import MAIN
from engineering import memory_plan as MP
from engineering.config import stage_config

sys.path.insert(0, f"{MAIN}/scripts")
import trace_step  # noqa: E402

DEMO = {"global_batch_size": 64}  # a multiple of the demo's per-GPU batch (8) x 8 processes
SHORT = 48  # tokens per sample (the demo's 16 visual tokens and 31 of text): seconds, not minutes


@pytest.mark.parametrize("world", [2, 8])
def test_tiny_recipe_traced_holds_the_plans_states_exactly(world):
    result = trace_step.trace("demo", "1.5", world, "FSDP", seq_len=SHORT, overrides=DEMO)
    plan = MP.memory_plan(stage_config("demo", "1.5", {**DEMO, "fsdp": True, "bf16": True}), "1.5", world)
    assert result["mode"] == "FSDP" and result["world"] == world
    for part in ("params", "grads", "optimizer"):
        assert result["states"][part] == plan["FSDP"]["state_parts"][part], part
    # what the trace says per GPU is whole: every part there, and the peak their sum
    assert result["peak"] == sum(v for k, v in result["parts"].items() if k != "total") > 0
    assert result["parts"]["activations"] > 0 and result["parts"]["communication"] > 0
    assert result["flops_per_step"] > 0 and 0 <= result["padding_share"] < 1
    assert result["seconds"] < 60


@pytest.mark.parametrize("tied", [False, True])
def test_one_process_trace_holds_the_plans_states_exactly(tied):
    """tied: the LLM's embeddings and LM head one tensor (as Qwen2.5-0.5B's), counted once by both."""
    with open(f"{MAIN}/shapes_world/base/llm/config.json") as f:
        llm = {**json.load(f), "tie_word_embeddings": tied}
    overrides = {"model_overrides": {"llm_config": llm, "pool_size": 128}}
    result = trace_step.trace("demo", "2", 1, seq_len=SHORT, overrides=overrides)
    plan = MP.memory_plan(stage_config("demo", "2", {**overrides, "bf16": True}), "2", 1)
    for part in ("params", "grads", "optimizer"):
        assert result["states"][part] == plan["DDP"]["state_parts"][part], part


def run_real(tmp_path, procs, *flags):
    out = tmp_path / f"real-{procs}.json"
    proc = forked.run(["scripts/trace_step.py", "--recipe", "demo", "--stage", "1.5", "--real", "--seq-len", str(SHORT),
                       "--json", str(out), *flags], procs=procs, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("procs", [1, 2])
def test_fake_trace_agrees_with_the_real_step_within_10_percent(tmp_path, procs):
    overrides = {"global_batch_size": 32}  # 2 micro-batches a step: accumulation traced too
    flags = ["--fsdp", "--overrides", json.dumps(overrides)] if procs == 2 else []
    real = run_real(tmp_path, procs, *flags)
    fake = trace_step.trace("demo", "1.5", procs, "FSDP" if procs == 2 else None, seq_len=SHORT,
                            overrides=overrides if procs == 2 else None)
    assert real["real"] and not fake["real"] and real["mode"] == fake["mode"]
    assert real["peak"] == pytest.approx(fake["peak"], rel=0.10)
    assert real["states"] == fake["states"]  # what is held between steps: exactly
    assert real["flops_per_step"] == fake["flops_per_step"]


# -----------------------------------------------------------------------------
# --plan's verdict (issue 37, point 13): fits the given GPUs, or what would


def verdict(recipe, stage, world, gpu_gib=80, **overrides):
    cfg = stage_config(recipe, stage, overrides)
    return MP.plan_verdict(cfg, stage, MP.memory_plan(cfg, stage, world), gpu_gib * MP.GIB)


def test_verdict_names_what_would_fit():
    alone = verdict("llava15-vicuna7b", "2", 1)  # the 7B stage 2 on one GPU: ~118 GiB
    assert "one process" in alone and re.search(r": does not fit; what would: \d+ GPUs with --fsdp \(", alone)
    ddp = verdict("siglip-qwen25-7b", "2", 8, fsdp=False)
    assert ": does not fit; what would: --fsdp (" in ddp and "GPUs with" not in ddp  # the least change first
    assert verdict("llava15-vicuna7b", "1.5", 8).endswith(": fits")
    assert "fits" in verdict("siglip-qwen25-0.5b", "2", 1, gpu_gib=24)
    no_ckpt = verdict("llava15-vicuna7b", "1.5", 8, gpu_gib=24, gradient_checkpointing=False)
    assert "--gradient-checkpointing (" in no_ckpt
    # a smaller per-GPU batch that divides the global batch (stage 1: 256 over 8 GPUs), more accumulation
    assert "; --batch-size 16 (" in verdict("llava15-vicuna7b", "1", 8, gpu_gib=36)
    assert "no one change does" in verdict("llava15-vicuna7b", "2", 8, gpu_gib=4)


def test_plan_cli_ends_with_the_verdict_and_gpu_memory_needs_plan():
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = forked.run(["train.py", "--recipe", "siglip-qwen25-7b", "--stage", "1", "--plan", "--world-size", "8",
                       "--gpu-memory", "40"], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("  verdict for 8 GPUs of 40 GiB: stage 1, DDP over 8, ") and "does not fit" in last
    proc = forked.run(["train.py", "--recipe", "demo", "--gpu-memory", "40"], env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --gpu-memory applies to --plan only (a run checks the memory of the GPU it runs on)"]
