"""Memory: the plan of what each GPU will hold (--plan), and FSDP reading the weights once.

What is checked: the plan's parameter counts equal a real model's, part by part and trained or not, and
LLaMA-7B's and Qwen2.5-7B's hand counts; its per-GPU figures are whole under DDP and 1/world under FSDP;
`python train.py --plan` runs offline for both paper recipes and names the mode, FSDP in the stages that
train the 7B LLM; a run that cannot fit is refused with the flag that fixes it. Under FSDP (2 processes,
gloo) rank 1 never holds the whole model, its buffers equal rank 0's, and the trained weights equal, bitwise,
those of every rank reading the whole model; a fresh token pool and head are rank 0's, as in one process.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import forked
import train as T
from conftest import cli_flags, tiny_config, together
from engineering import memory_plan as MP
from engineering.checkpoints import save_checkpoint
from victor import VictorConfig, VictorModel

PAPER_RECIPES = ("llava15-vicuna7b", "siglip-qwen25-7b")
LLAMA_7B = 6_738_415_616  # published parameter count of LLaMA-7B (= Vicuna-7B)
QWEN25_7B = 7_615_616_512  # published parameter count of Qwen2.5-7B


def part_counts(model: VictorModel, stage: str, vision_lr: float) -> dict:
    """(parameters, trained parameters) per part of a real model, from its own parameter groups."""
    trained = {id(p) for g in model.param_groups(stage, 1e-3, vision_lr, 1e-2) for p in g["params"]}
    counts = {}
    for name in MP.PLAN_PARTS:
        params = [model.token_pool] if name == "token_pool" else list(getattr(model, name).parameters())
        counts[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if id(p) in trained))
    return counts


# -----------------------------------------------------------------------------
# 1. The plan counts what the model holds


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("stage,vision_lr", [("1", 0.0), ("1.5", 0.0), ("1.5", 1e-4), ("2", 1e-4)])
def test_plan_counts_equal_the_real_model(vision, stage, vision_lr):
    settings = tiny_config(vision)
    model = VictorModel(settings)
    real = part_counts(model, stage, vision_lr)
    cfg = T.TrainConfig(recipe="custom", model_overrides=settings.to_dict(), vision_lr=vision_lr)
    plan = MP.memory_plan(cfg, stage, world=2)
    assert plan["parts"] == real
    assert all(params > 0 for params, _ in real.values())
    assert (real["vision_tower"][1] > 0) == (vision_lr > 0 and stage != "1")  # both branches are exercised
    assert plan["params"] == sum(p.numel() for p in model.parameters())


def test_plan_reads_init_checkpoints_and_local_base_models(base):
    """--init: the checkpoint's config.json (with its pool size); --vision-model/--llm: local directories."""
    real = part_counts(VictorModel(VictorConfig(vision_model=base.vision, llm=base.llm, pool_size=32)), "1.5", 1e-4)
    from_init = MP.memory_plan(T.TrainConfig(init=base.init, vision_lr=1e-4), "1.5", world=1)
    from_dirs = MP.memory_plan(T.TrainConfig(recipe="custom", vision_model=base.vision, llm=base.llm,
                                            model_overrides={"pool_size": 32}, vision_lr=1e-4), "1.5", world=1)
    assert from_init["parts"] == from_dirs["parts"] == real
    with pytest.raises(ValueError, match=r"pool_size 64 \(--pool-size\) cannot apply"):  # refused as the run refuses it
        MP.memory_plan(T.TrainConfig(init=base.init, model_overrides={"pool_size": 64}), "1.5", world=1)


def test_plan_7b_counts_by_hand():
    h, i, layers, vocab = 4096, 11008, 32, 32000  # LLaMA-7B
    llama = 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    h, i, layers, vocab, kv = 3584, 18944, 28, 152064, 4 * 128  # Qwen2.5-7B: 4 KV heads of 128, q/k/v biases
    qwen = 2 * vocab * h + layers * (2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * i + 2 * h) + h
    assert (llama, qwen) == (LLAMA_7B, QWEN25_7B)
    for recipe, want in zip(PAPER_RECIPES, (LLAMA_7B, QWEN25_7B)):
        plan = MP.memory_plan(T.stage_config(recipe, "2", {}), "2", world=8)
        assert plan["parts"]["llm"] == (want, want)  # stage 2 trains all of it


def test_plan_ddp_whole_fsdp_split_by_world_size():
    plans = {w: MP.memory_plan(T.stage_config("llava15-vicuna7b", "2", {}), "2", world=w) for w in (1, 2, 8)}
    params, trained = plans[1]["params"], plans[1]["trained"]
    tensors = len([p for g in plans[1]["model"].param_groups("2", 1e-5, 2e-6) for p in g["params"]])
    for w, plan in plans.items():
        # fp32 weights; fp32 grads + 2 AdamW moments, and AdamW's fp32 step count per trained tensor
        assert plan["DDP"]["states"] == 4 * params + 12 * trained + 4 * tensors
        # FSDP: rank 0's shard, each tensor's rows padded to a multiple of the world size
        assert plan["DDP"]["states"] <= plan["FSDP"]["states"] * w <= plan["DDP"]["states"] * (1 + 1e-4)
        assert plan["mode"] == ("one process" if w == 1 else "FSDP")
    assert plans[2]["DDP"]["working"] - plans[1]["DDP"]["working"] == 4 * trained  # DDP's gradient buckets
    assert plans[8]["FSDP"]["total"][0] < plans[2]["FSDP"]["total"][0] < plans[1]["DDP"]["total"][0]
    # activations grow with the sequence, and gradient checkpointing keeps far less
    acts = plans[8]["activations"]
    assert acts[False][0] < acts[False][1] and acts[True][0] < acts[True][1]
    assert acts[True][1] < acts[False][1] / 4


def test_paper_recipes_shard_the_stages_that_train_the_llm():
    for recipe in PAPER_RECIPES:
        assert [T.stage_config(recipe, s, {}).fsdp for s in ("1", "1.5", "2")] == [False, True, True]
        assert T.stage_config(recipe, "2", {"fsdp": False}).fsdp is False  # the flag still wins
    assert not any(T.stage_config("demo", s, {}).fsdp for s in ("1", "1.5", "2"))


# -----------------------------------------------------------------------------
# 2. The command line, and a run that cannot fit


def plan_cli(*flags):
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # nothing may be fetched
    return forked.run(["train.py", *flags], env=env, timeout=600)


@pytest.mark.parametrize("recipe,llm_params", [("llava15-vicuna7b", "6738.4M"), ("siglip-qwen25-7b", "7615.6M")])
def test_plan_cli_offline_names_the_mode(recipe, llm_params):
    proc = plan_cli("--recipe", recipe, "--stage", "all", "--plan", "--world-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = proc.stdout.split("memory plan:")[1:]
    assert [p.split(",")[1].strip() for p in plans] == ["stage 1", "stage 1.5", "stage 2"]
    modes = [p.split("this run: ")[1].split("\n")[0] for p in plans]
    assert modes == ["DDP over 8 processes (--no-fsdp)"] + ["FSDP over 8 processes (--fsdp)"] * 2
    assert all(llm_params in p.split("\n  llm")[1].split("\n")[0] for p in plans)


def test_world_size_without_plan_is_refused_in_one_line():
    proc = plan_cli("--recipe", "llava15-vicuna7b", "--stage", "2", "--world-size", "8")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: --world-size applies to --plan only (a run's world size is torchrun's --nproc_per_node x --nnodes)"]
    proc = plan_cli("--recipe", "demo", "--stage", "2", "--plan", "--llm", "no-such/model")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "no architecture for 'no-such/model' offline" in proc.stderr


def test_a_run_that_cannot_fit_is_refused_naming_the_fix():
    gpu = 80 * 10 ** 9  # an 80 GB H100
    ddp = MP.memory_plan(T.stage_config("llava15-vicuna7b", "2", {"fsdp": False}), "2", world=8)
    fsdp = MP.memory_plan(T.stage_config("llava15-vicuna7b", "2", {}), "2", world=8)
    alone = MP.memory_plan(T.stage_config("llava15-vicuna7b", "2", {}), "2", world=1)
    assert "add --fsdp" in MP.fit_problem(ddp, gpu)  # ~16 bytes per parameter under DDP: 105 GiB of states
    assert MP.fit_problem(fsdp, gpu) == ""
    assert "several GPUs with --fsdp" in MP.fit_problem(alone, gpu)
    no_ckpt = MP.memory_plan(T.stage_config("llava15-vicuna7b", "2", {"gradient_checkpointing": False}), "2", world=8)
    fixed = no_ckpt["FSDP"]["states"] + no_ckpt["FSDP"]["working"]
    between = int(fixed + (no_ckpt["activations"][True][0] + no_ckpt["activations"][False][0]) / 2)
    assert "add --gradient-checkpointing" in MP.fit_problem(no_ckpt, between)
    assert MP.fit_problem(fsdp, between) == ""
    assert "lower --batch-size" in MP.fit_problem(fsdp, int(fixed + fsdp["activations"][True][0] / 2))


# -----------------------------------------------------------------------------
# 3. FSDP: rank 0 reads the weights, the other ranks build on the meta device


def big_checkpoint(path, shapes_tokenizer, tiny_image_processor) -> int:
    """A full checkpoint whose LLM is ~160 MiB of fp32 weights in 12 layers (no tensor above 3 MiB), far
    above what any process holds besides; returns its weight bytes."""
    settings = tiny_config(pool_size=32)
    settings.llm_config.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                                num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    torch.manual_seed(0)
    model = VictorModel(settings)
    save_checkpoint(model, str(path), shapes_tokenizer, tiny_image_processor)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def probe_run(loader, values, probe_dir):
    """2-process FSDP stage 1.5 through tests/fsdp_load_probe.py; returns each rank's record."""
    os.makedirs(probe_dir)
    proc = forked.run(["tests/fsdp_load_probe.py", loader, *cli_flags(values)], procs=2,
                      env={"PROBE_DIR": str(probe_dir)}, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    records = []
    for rank in (0, 1):
        with open(os.path.join(probe_dir, f"rank-{rank}.json")) as f:
            records.append(json.load(f))
    return records


def stage15(base, init, out_dir, **overrides):
    values = dict(recipe="demo", stage="1.5", data=base.data["1.5"], image_folder=base.shapes, init=str(init),
                  model_overrides={"pool_size": 32}, lr=1e-3, vision_lr=1e-4, pool_lr=1e-2, max_steps=2,
                  warmup_steps=1, global_batch_size=4, batch_size=2, num_workers=0, log_every=1, max_length=256,
                  seed=0, bf16=False, fsdp=True, out_dir=str(out_dir))
    return {**values, **overrides}


def test_fsdp_reads_the_weights_once(base, shapes_tokenizer, tiny_image_processor, tmp_path):
    model_bytes = big_checkpoint(tmp_path / "init", shapes_tokenizer, tiny_image_processor)
    mib = 2 ** 20
    # one training step is enough to show the loaded weights train (and train alike under both loaders)
    runs = {loader: probe_run(loader, stage15(base, tmp_path / "init", tmp_path / loader, max_steps=1),
                              tmp_path / f"probe-{loader}")
            for loader in ("once", "every-rank")}
    growth = {loader: [(r["peak_loading_kib"] - r["rss_before_build_kib"]) * 1024 for r in records]
              for loader, records in runs.items()}
    peaks = {loader: [r["peak_run_kib"] / 1024 for r in records] for loader, records in runs.items()}
    print(f"model {model_bytes / mib:.0f} MiB; peak RSS growth while loading (rank 0, rank 1): "
          + ", ".join(f"{loader} {g[0] / mib:.0f}, {g[1] / mib:.0f} MiB" for loader, g in growth.items())
          + "; peak RSS of the whole run: "
          + ", ".join(f"{loader} {p[0]:.0f}, {p[1]:.0f} MiB" for loader, p in peaks.items()))
    assert growth["once"][1] < 0.75 * model_bytes  # rank 1: its half of the shards, never the whole model
    assert growth["every-rank"][1] > model_bytes  # the reference: rank 1 read it all
    assert growth["once"][0] > model_bytes  # rank 0 holds the whole model, once
    for records in runs.values():
        assert records[0]["meta_tensors"] == records[1]["meta_tensors"] == []
    # the buffers no state dict holds (rotary inv_freq, position_ids): rank 1 has rank 0's, which are what
    # rank 1 computed itself when it built the whole model
    once, reference = runs["once"], runs["every-rank"]
    assert set(once[1]["buffers"]) == {"vision_tower.embeddings.position_ids", "llm.model.rotary_emb.inv_freq",
                                       "llm.model.rotary_emb.original_inv_freq"}
    assert once[1]["buffers"] == once[0]["buffers"] == reference[1]["buffers"]
    a, b, init = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("once", "every-rank", "init"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "weights differ from every-rank loading"
    key = "llm.model.layers.11.mlp.down_proj.weight"
    assert not torch.equal(a[key], init[key])  # it did train


def test_fsdp_fresh_pool_and_head_are_rank_0s(base, shapes_tokenizer, tiny_image_processor, tmp_path):
    """From a projector-only (stage-1) checkpoint the pool and the reconstruction head are new: under FSDP
    every shard now comes from rank 0's draw, so 2 processes train what one process trains."""
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1"
    save_checkpoint(VictorModel(VictorConfig(vision_model=base.vision, llm=base.llm, pool_size=32)), str(stage1),
                    shapes_tokenizer, tiny_image_processor, parts="projector")
    one = stage15(base, stage1, tmp_path / "one", batch_size=4, fsdp=False)
    two = stage15(base, stage1, tmp_path / "two")

    def train(values, procs):
        proc = forked.run(["train.py", *cli_flags(values)], procs=procs, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    together(lambda: train(one, 1), lambda: train(two, 2))  # the two runs at once
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"fresh pool and head, FSDP 2 x 2 vs one process 1 x 4: max weight diff {diff:.2e}")
    assert diff < 1e-5
