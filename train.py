"""
Train victor: stage 1 (projector), stage 1.5 (ViCToR), stage 2 (instruction tuning).

The built-in demo (no arguments): generates the shapes data, builds tiny random models,
runs stages 1 -> 1.5 -> 2 on the CPU in a few minutes and saves out/demo/stage{1,1.5,2}:
    python train.py
One stage of a paper recipe, on 8 GPUs:
    torchrun --nproc_per_node 8 train.py --recipe llava15-vicuna7b --stage 1.5 \\
        --init out/llava15/stage1 --data recap_cc3m.json --image-folder images/ --out-dir out/llava15/stage1.5
Every TrainConfig field is a flag (--lr, --max-steps, --batch-size, ...) and overrides the recipe.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
from victor import STAGES, VictorConfig, VictorModel, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    recipe: str = "demo"
    stage: str = "all"  # 1 | 1.5 | 2 | all
    # data
    data: str = ""  # LLaVA JSON / JSONL
    image_folder: str = ""
    template: str = "auto"  # auto | plain | vicuna_v1 | chatml | chat (the tokenizer's own)
    max_length: int = 2048
    strict: bool = False  # fail on the first bad record instead of skipping and counting it
    # model: where to start
    init: str = ""  # checkpoint of the previous stage; empty: build from vision_model + llm
    vision_model: str = ""
    llm: str = ""
    model_overrides: dict = field(default_factory=dict)  # extra VictorConfig fields (pool_size, ...)
    # optimisation (DESIGN.md §1: lr / vision_lr / pool_lr per stage; vision_lr 0 = frozen tower)
    lr: float = 1e-5
    vision_lr: float = 2e-6
    pool_lr: float = 1.5e-4
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # the HF/LLaVA default; the demo's tiny batches learn faster with 0.95
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    grad_clip: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0  # overrides epochs when > 0
    global_batch_size: int = 128  # = batch_size x grad_accum x world size
    batch_size: int = 16  # per device
    # systems
    bf16: bool = True  # autocast on CUDA
    gradient_checkpointing: bool = False
    num_workers: int = 2
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # steps between resumable training states (out_dir/checkpoints/step-N); 0: none
    resume: str = ""  # "auto": continue from the newest complete state in out_dir/checkpoints; or a state dir
    out_dir: str = "out/demo"
    demo_images: int = 4000  # demo recipe: how many shapes training images to generate


PAPER = dict(warmup_ratio=0.03, weight_decay=0.0, epochs=1.0, bf16=True, gradient_checkpointing=True,
             max_length=2048, batch_size=16, num_workers=8)
RECIPES = {
    # the published settings (DESIGN.md §1); per-stage global batch 256 / 128 / 128
    "llava15-vicuna7b": dict(
        model=dict(vision_model="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5",
                   model_overrides=dict(pool_size=2048)),
        stages={"1": dict(PAPER, lr=1e-3, vision_lr=0.0, global_batch_size=256, batch_size=32, template="plain"),
                "1.5": dict(PAPER, lr=1e-5, vision_lr=2e-6, pool_lr=1.5e-4, global_batch_size=128,
                            template="vicuna_v1"),
                "2": dict(PAPER, lr=1e-5, vision_lr=2e-6, global_batch_size=128, template="vicuna_v1")}),
    "siglip-qwen25-7b": dict(
        model=dict(vision_model="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-7B-Instruct",
                   model_overrides=dict(pool_size=2048)),
        stages={"1": dict(PAPER, lr=1e-3, vision_lr=0.0, global_batch_size=256, batch_size=32, template="plain"),
                "1.5": dict(PAPER, lr=1e-5, vision_lr=2e-6, pool_lr=1.5e-4, global_batch_size=128, template="chat"),
                "2": dict(PAPER, lr=1e-5, vision_lr=2e-6, global_batch_size=128, template="chat")}),
    # tiny random models on the shapes data: all three stages in a few CPU minutes.
    # The vision tower stays frozen (vision_lr 0): a random tower learns as fast and runs faster (DESIGN §5).
    "demo": dict(
        model=dict(model_overrides=dict(pool_size=128)),
        stages={"1": dict(lr=1e-3, vision_lr=0.0, max_steps=20, warmup_steps=5, global_batch_size=32,
                          batch_size=32, template="plain", max_length=256, num_workers=0),
                "1.5": dict(lr=1e-3, vision_lr=0.0, pool_lr=1e-2, max_steps=150, warmup_steps=20, adam_beta2=0.95,
                            global_batch_size=8, batch_size=8, max_length=256, num_workers=0),
                "2": dict(lr=1e-3, vision_lr=0.0, max_steps=1800, warmup_steps=30, adam_beta2=0.95, global_batch_size=8,
                          batch_size=8, max_length=256, num_workers=0)}),
}


# -----------------------------------------------------------------------------
# The demo's base models: random-init, tiny, the same classes as the paper's 7B models


def build_demo_base(out_dir: str) -> tuple[str, str]:
    """Save a tiny CLIP vision tower (+ image processor) and a tiny Llama (+ shapes tokenizer)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    vision_dir, llm_dir = os.path.join(out_dir, "base", "vision"), os.path.join(out_dir, "base", "llm")
    if os.path.isfile(os.path.join(llm_dir, "config.json")) and os.path.isfile(os.path.join(vision_dir, "config.json")):
        return vision_dir, llm_dir
    torch.manual_seed(0)
    size = D.ShapesSpec().image_size
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                              num_attention_heads=4, image_size=size, patch_size=32))
    vision.save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(vision_dir)
    tok = D.build_shapes_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=512, tie_word_embeddings=False,
                                       bos_token_id=None, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    return vision_dir, llm_dir


# -----------------------------------------------------------------------------
# Distributed helpers: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


# -----------------------------------------------------------------------------
# What each stage trains (DESIGN.md §1)


def trainable_param_groups(model: VictorModel, stage: str, cfg: TrainConfig) -> list[dict]:
    """Freeze everything, then unfreeze this stage's parts, each group with its learning rate."""
    model.requires_grad_(False)
    groups = [("projector", model.projector.parameters(), cfg.lr)]
    if stage in ("1.5", "2"):
        groups.append(("llm", model.llm.parameters(), cfg.lr))
        if cfg.vision_lr > 0:
            groups.append(("vision_tower", model.vision_tower.parameters(), cfg.vision_lr))
    if stage == "1.5":
        groups.append(("token_pool", [model.token_pool], cfg.pool_lr))
        groups.append(("recon_head", model.recon_head.parameters(), cfg.lr))
    out = []
    for name, params, lr in groups:
        params = list(params)
        for p in params:
            p.requires_grad_(True)
        out.append({"name": name, "params": params, "lr": lr, "weight_decay": cfg.weight_decay})
    return out


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 0 (the LLaVA/HF 'cosine' schedule)."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# -----------------------------------------------------------------------------
# Resumable training state: model, optimizer, scheduler, RNG, data position


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start its next epoch part-way through (after a resume)."""
    start = 0  # indices of this process to skip, once

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)


def latest_training_state(state_dir: str) -> str:
    """The newest complete state in state_dir ('' if none); half-written '.tmp' dirs are ignored."""
    if not os.path.isdir(state_dir):
        return ""
    steps = [int(d[5:]) for d in os.listdir(state_dir) if d.startswith("step-") and d[5:].isdigit()]
    return os.path.join(state_dir, f"step-{max(steps)}") if steps else ""


def save_training_state(state_dir: str, progress: dict, model, optimizer, scheduler, select_gen, rank: int,
                        keep: int = 2):
    """Write state_dir/step-N atomically: into step-N.tmp, then one rename, so a run killed while
    saving leaves the previous state intact. Model and optimizer are the same on every DDP process;
    the random generators are per process."""
    from safetensors.torch import save_model
    final = os.path.join(state_dir, f"step-{progress['step']}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    torch.save({"torch": torch.get_rng_state(), "select": select_gen.get_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng-{rank}.pt"))
    if rank == 0:
        save_model(model, os.path.join(tmp, "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump(progress, f)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted((d for d in os.listdir(state_dir) if d.startswith("step-") and d[5:].isdigit()),
                          key=lambda d: int(d[5:]))[:-keep]:
            shutil.rmtree(os.path.join(state_dir, old), ignore_errors=True)
    barrier()


def load_training_state(path: str, model, optimizer, scheduler, select_gen, rank: int) -> dict:
    from safetensors.torch import load_model
    if not os.path.isfile(os.path.join(path, "progress.json")):
        raise FileNotFoundError(f"{path}: not a training state (no progress.json)")
    load_model(model, os.path.join(path, "model.safetensors"))
    opt = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(os.path.join(path, f"rng-{rank}.pt"), map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["torch"])
    select_gen.set_state(rng["select"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(path, "progress.json")) as f:
        return json.load(f)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# One stage


def build_model(cfg: TrainConfig, stage: str):
    from transformers import AutoImageProcessor, AutoTokenizer
    if cfg.init:
        model, tokenizer, image_processor = load_checkpoint(cfg.init)
    else:
        if stage != "1":
            print(f"note: stage {stage} without --init starts from the base models (no stage-1 projector)")
        vcfg = VictorConfig(vision_model=cfg.vision_model, llm=cfg.llm, **cfg.model_overrides)
        for key in ("vision_model", "llm"):  # local dirs by absolute path, so checkpoints can refer to them
            if os.path.isdir(getattr(vcfg, key)):
                setattr(vcfg, key, os.path.abspath(getattr(vcfg, key)))
        vcfg.validate()
        model = VictorModel(vcfg)
        tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
        image_processor = AutoImageProcessor.from_pretrained(cfg.vision_model)
    if tokenizer.pad_token is None:  # Llama/Vicuna have none; LLaVA pads with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer, image_processor


def train_stage(cfg: TrainConfig, stage: str) -> str:
    """Train one stage and save its checkpoint to cfg.out_dir; returns cfg.out_dir."""
    assert stage in STAGES
    rank, world, device = setup_distributed()
    master = rank == 0
    if cfg.global_batch_size % (cfg.batch_size * world):
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                         f"batch_size {cfg.batch_size} x {world} processes")
    grad_accum = cfg.global_batch_size // (cfg.batch_size * world)
    if not cfg.data or not os.path.isfile(cfg.data):
        raise FileNotFoundError(f"stage {stage}: data file {cfg.data!r} not found (--data)")
    torch.manual_seed(cfg.seed + rank)

    model, tokenizer, image_processor = build_model(cfg, stage)
    model.to(device)
    groups = trainable_param_groups(model, stage, cfg)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.vision_lr > 0 and stage != "1":
            model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    records, bad_records = D.load_records(cfg.data, strict=cfg.strict)
    if master and bad_records:
        print(f"{cfg.data}: {len(bad_records)} bad records will be skipped\n{D.skip_report(bad_records)}")
    template = D.resolve_template(cfg.template, tokenizer, stage)
    dataset = D.LlavaDataset(records, cfg.image_folder, tokenizer, image_processor, template,
                             model.num_image_tokens, cfg.max_length, model.cfg.image_token_id)
    # one sampler for 1 or many processes: the same global order either way
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=D.Collator(tokenizer.pad_token_id),
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    steps_per_epoch = len(loader) // grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(dataset)} records are fewer than one global batch "
                         f"({cfg.global_batch_size})")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    # stage 1.5's token selection draws from its own generator, so a resumed run draws the same
    select_gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "skipped": []}
    state_dir = os.path.join(cfg.out_dir, "checkpoints")
    resume_from = latest_training_state(state_dir) if cfg.resume == "auto" else cfg.resume
    if resume_from:
        progress = load_training_state(resume_from, model, optimizer, scheduler, select_gen, rank)
        sampler.start = progress["batches_in_epoch"] * cfg.batch_size
        if master:
            print(f"stage {stage}: resuming from {resume_from} at step {progress['step']}")

    train_model = model
    if world > 1:  # DDP; text-only records leave the vision side unused in some steps, and a trained
        # vision tower's layers after vision_feature_layer (and its post-layernorm) never get a gradient
        text_only = any(not D.record_images(r) for r in records)
        vision_trained = any(g["name"] == "vision_tower" for g in groups)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=text_only or vision_trained)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    skipped: list[tuple[str, str]] = [tuple(x) for x in progress["skipped"]]
    batches = None

    def next_batch():
        nonlocal batches
        while True:
            if batches is None:
                sampler.set_epoch(progress["epoch"])
                batches = iter(loader)
            try:
                b = next(batches)
            except StopIteration:
                progress["epoch"], progress["batches_in_epoch"], batches = progress["epoch"] + 1, 0, None
                continue
            progress["batches_in_epoch"] += 1
            if cfg.strict and b["skipped"]:
                rid, why = b["skipped"][0]
                raise ValueError(f"{cfg.data}: record {rid}: {why} (strict: not skipping it)")
            skipped.extend(b["skipped"])
            if "input_ids" in b:  # an all-skipped batch is simply passed over
                return b

    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a" if resume_from else "w") if master else None
    bar = tqdm(range(progress["step"], total_steps), initial=progress["step"], total=total_steps,
               desc=f"stage {stage}", disable=not master, dynamic_ncols=True)
    model.train()
    t0, samples_seen = time.time(), 0
    for step in bar:
        micro = [next_batch() for _ in range(grad_accum)]
        # normalise by the whole global batch, so that 1 or N processes and any accumulation
        # give the same loss and gradient: sum over tokens / global token count
        n_label = all_reduce_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), device)
        n_recon = all_reduce_sum(sum(int((b["input_ids"] == model.cfg.image_token_id).sum()) for b in micro), device)
        log = {"loss": 0.0, "lm_loss": 0.0, "recon_loss": 0.0}
        for i, b in enumerate(micro):
            sync = contextlib.nullcontext() if (world == 1 or i == grad_accum - 1) else train_model.no_sync()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = train_model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                                  labels=b["labels"].to(device), stage=stage, generator=select_gen,
                                  pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(device))
                lm = out.lm_loss * (out.num_label_tokens / max(n_label, 1))
                recon = (out.recon_loss * (out.num_recon_tokens / max(n_recon, 1))
                         if out.recon_loss is not None else torch.zeros((), device=device))
                (world * (lm + recon)).backward()  # DDP averages gradients over processes
            log["lm_loss"] += lm.item()
            log["recon_loss"] += recon.item()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        step_lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (scheduler.step() moves it on)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        samples_seen += cfg.global_batch_size
        log = {k: all_reduce_sum(v, device) for k, v in log.items()}
        log["loss"] = log["lm_loss"] + log["recon_loss"]
        log.update(step=step + 1, lr=step_lr, grad_norm=float(grad_norm),
                   samples_per_s=samples_seen / (time.time() - t0), skipped=len(skipped))
        if master:
            bar.set_postfix(loss=f"{log['loss']:.3f}", lm=f"{log['lm_loss']:.3f}", rec=f"{log['recon_loss']:.3f}",
                            lr=f"{log['lr']:.1e}", sps=f"{log['samples_per_s']:.0f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                metrics.write(json.dumps({"stage": stage, **log}) + "\n")
                metrics.flush()
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            progress.update(step=step + 1, skipped=skipped)
            save_training_state(state_dir, progress, model, optimizer, scheduler, select_gen, rank)

    # the end-of-run report: every skipped record, from every process
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, skipped)
        skipped = [s for part in gathered for s in part]
    if master:
        all_skipped = [(rid, why) for rid, why in bad_records] + skipped
        print(D.skip_report(all_skipped))
        with open(os.path.join(cfg.out_dir, "skipped.json"), "w") as f:
            json.dump([{"id": rid, "reason": why} for rid, why in all_skipped], f, indent=1)
        metrics.write(json.dumps({"stage": stage, "done": True, "skipped": len(all_skipped)}) + "\n")
        metrics.close()
        save_checkpoint(model, cfg.out_dir, tokenizer, image_processor, parts="projector" if stage == "1" else "all",
                        extra={"train_config": {**dataclasses.asdict(cfg), "stage": stage}})
        print(f"stage {stage}: saved {cfg.out_dir} ({total_steps} steps, {time.time() - t0:.0f}s)")
    if world > 1:
        dist.barrier()
    return cfg.out_dir


# -----------------------------------------------------------------------------
# Recipes and the command line


def stage_config(recipe: str, stage: str, overrides: dict) -> TrainConfig:
    """Recipe defaults for one stage, then the command line's overrides."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    r = RECIPES[recipe]
    values = {**r["model"], **r["stages"][stage], **overrides, "recipe": recipe, "stage": stage}
    return TrainConfig(**values)


def run(overrides: dict) -> list[str]:
    """Run one stage, or all three in a row (each initialised from the one before)."""
    recipe, stage = overrides.pop("recipe", "demo"), overrides.pop("stage", "all")
    out_root = overrides.pop("out_dir", "out/demo" if recipe == "demo" else f"out/{recipe}")
    stages = list(STAGES) if stage == "all" else [stage]
    if stage == "all" and "data" in overrides and recipe != "demo":
        raise ValueError("--stage all needs different data per stage: run the stages one by one with --data")
    demo_data = {}
    if recipe == "demo":  # generate the data and the tiny base models on first use, unless they were given
        given = {k for k, v in overrides.items() if v}
        need_data = not {"data", "image_folder"} <= given
        need_base = not ("init" in given or {"vision_model", "llm"} <= given)
        rank, _, _ = setup_distributed()
        spec = D.ShapesSpec(num_train_images=overrides.get("demo_images", TrainConfig.demo_images))
        if rank == 0:
            if need_data:
                D.shapes_files(os.path.join(out_root, "shapes"), spec)
            if need_base:
                build_demo_base(out_root)
        if dist.is_initialized():
            dist.barrier()
        if need_base:
            overrides.setdefault("vision_model", os.path.join(out_root, "base", "vision"))
            overrides.setdefault("llm", os.path.join(out_root, "base", "llm"))
        if need_data:
            files = D.shapes_files(os.path.join(out_root, "shapes"), spec)
            overrides.setdefault("image_folder", os.path.join(out_root, "shapes"))
            demo_data = {"1": files["stage1"], "1.5": files["stage1.5"], "2": files["stage2"]}
    outs, init = [], overrides.pop("init", "")
    for s in stages:
        o = dict(overrides)
        if s in demo_data:
            o.setdefault("data", demo_data[s])
        cfg = stage_config(recipe, s, o)
        cfg.init = init
        cfg.out_dir = os.path.join(out_root, f"stage{s}") if stage == "all" else out_root
        init = train_stage(cfg, s)
        outs.append(init)
    return outs


def parse_args(argv=None) -> dict:
    """Every TrainConfig field becomes a --flag; only the flags given override the recipe."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif f.type == "dict":
            ap.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, help="JSON, e.g. '{\"pool_size\": 4096}'")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            ap.add_argument(flag, type=kind, default=argparse.SUPPRESS)
    return vars(ap.parse_args(argv))


if __name__ == "__main__":
    args = parse_args()
    if args.get("stage", "all") not in (*STAGES, "all"):
        sys.exit(f"--stage must be one of 1, 1.5, 2, all (got {args['stage']!r})")
    t = time.time()
    run(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done in {time.time() - t:.0f}s")
    if dist.is_initialized():
        dist.destroy_process_group()
