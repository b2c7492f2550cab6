"""
Train victor: stage 1 (projector), stage 1.5 (ViCToR), stage 2 (instruction tuning).

The built-in demo (no arguments): generates the shapes data, builds tiny random models,
runs stages 1 -> 1.5 -> 2 on the CPU in a few minutes and saves out/demo/stage{1,1.5,2}:
    python train.py
One stage of a paper recipe, on 8 GPUs:
    torchrun --nproc_per_node 8 train.py --recipe llava15-vicuna7b --stage 1.5 \\
        --init out/llava15/stage1 --data recap_cc3m.json --image-folder images/ --out-dir out/llava15/stage1.5
Every TrainConfig field is a flag (--lr, --max-steps, --batch-size, ...) and overrides the recipe.
Models that do not fit one GPU: add --fsdp. Surviving failures: --save-every N --resume auto (the
paper recipes' default) under `torchrun --max-restarts K`, which restarts a group whose worker died.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data as D
from engineering.batches import Batches, make_loader, report_unused_data, stop_if_out_of_data, validate_data
from engineering.checkpoints import load_init_checkpoint
from engineering.distributed import (
    all_reduce_sum,
    barrier,
    build_model_once,
    computes_in_bf16,
    end_processes,
    gathered_state_dict,
    latest_training_state,
    load_training_state,
    save_training_state,
    setup_distributed,
    uses_fsdp,
    wrap_for_processes,
)
from engineering.flags import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    MissingDependency,
    Range,
    StageStopped,
    UsageError,
    add_config_flags,
    check_ranges,
    declared_ranges,
    first_line,
    knob,
    parse_steps,
)
from engineering.memory_plan import check_memory_fits, format_plan, memory_plan
from engineering.reporting import MetricsReporter, StageLog
from shapes_world.demo_base import demo_inputs
from victor import (
    IGNORE_INDEX,
    STAGE15_FIELDS,
    STAGES,
    VARIANTS,
    VictorConfig,
    VictorModel,
    save_checkpoint,
)


@dataclass
class TrainConfig:
    """One stage's settings. Every field is a train.py flag (--help prints each field's help); a recipe
    sets them per stage and the flags given override it."""
    recipe: str = knob("demo", "demo | llava15-vicuna7b | siglip-qwen25-7b | siglip-qwen25-0.5b: per-stage settings "
                                       "and base models")
    stage: str = knob("all", "1 | 1.5 | 2 | all (each stage initialised from the one before)")
    # data
    data: str = knob("", "LLaVA-format JSON / JSONL of this stage, or its parquet shards with the images in "
                         "their rows (a .parquet file, a directory, a glob); the demo recipe generates its own")
    image_folder: str = knob("", "the folder the JSON records' image paths are relative to (not for parquet)")
    template: str = knob("auto", "auto | plain | vicuna_v1 | chatml | chat (the tokenizer's own); "
                                 "auto: plain in stage 1, else the tokenizer's own, else vicuna_v1")
    max_length: int = knob(2048, "tokens per sample: a longer one is cut (or skipped where the cut would "
                                 "go through its image tokens)", AT_LEAST_1)
    strict: bool = knob(False, "fail on the first bad record instead of skipping and counting it")
    # model: where to start
    init: str = knob("", "checkpoint of the previous stage; empty: build from --vision-model and --llm")
    vision_model: str = knob("", "vision tower: a Hugging Face name or local directory")
    llm: str = knob("", "language model: a Hugging Face name or local directory")
    model_overrides: dict = knob({}, "extra VictorConfig fields as JSON, e.g. '{\"pool_size\": 4096}'; "
                                     "wins over --variant")
    variant: str = knob("", "victor | croc | vdep | captions | llava: a preset of VictorConfig fields "
                            "(README, \"The family\")")
    # optimisation (the paper's recipe: lr / vision_lr / pool_lr per stage; vision_lr 0 = frozen tower)
    lr: float = knob(1e-5, "peak learning rate of the projector, the LLM and the reconstruction head", POSITIVE)
    vision_lr: float = knob(2e-6, "peak learning rate of the vision tower; 0: frozen", NON_NEGATIVE)
    pool_lr: float = knob(1.5e-4, "peak learning rate of the token pool (stage 1.5)", NON_NEGATIVE)
    weight_decay: float = knob(0.0, "AdamW weight decay", NON_NEGATIVE)
    adam_beta2: float = knob(0.999, "AdamW beta2 (the HF/LLaVA default; the demo's tiny batches learn faster "
                                    "with 0.95)", Range(0, 1, hi_open=True))
    warmup_ratio: float = knob(0.03, "linear warm-up over this share of the steps, then cosine decay",
                               Range(0, 1))
    warmup_steps: int = knob(0, "warm-up steps; overrides --warmup-ratio when > 0", NON_NEGATIVE)
    grad_clip: float = knob(1.0, "clip the gradients' total norm to this (inf: no clipping)", POSITIVE)
    epochs: float = knob(1.0, "passes over the data (may be fractional); a given --epochs replaces the "
                              "recipe's --max-steps", POSITIVE)
    max_steps: int = knob(0, "optimizer steps; overrides --epochs when > 0", NON_NEGATIVE)
    global_batch_size: int = knob(128, "samples per optimizer step = batch size x accumulation x processes",
                                  AT_LEAST_1)
    batch_size: int = knob(16, "samples per device per forward pass", AT_LEAST_1)
    # systems
    bf16: bool | None = knob(None, "compute in bf16 (autocast; under --fsdp: bf16 parameters, fp32 gradient "
                                   "reduction). Not given: bf16 on CUDA, float32 on a CPU (slow in bf16 without "
                                   "native support); --bf16 / --no-bf16: as said, on any device")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward: less memory, more time")
    fsdp: bool = knob(False, "shard with FSDP2 (one unit per decoder / vision layer) instead of DDP")
    num_workers: int = knob(2, "data-loading processes per training process (0: in the training process)",
                            NON_NEGATIVE)
    seed: int = knob(0, "seed of the data order, stage 1.5's token choice and the new weights", NON_NEGATIVE)
    log_every: int = knob(10, "steps between rows of OUT/metrics.jsonl", AT_LEAST_1)
    report_to: str = knob("", "tensorboard | wandb | tensorboard,wandb: metrics.jsonl's rows go there too")
    snapshot_steps: str = knob("", "e.g. 250,500: also save the model at these steps (OUT/snapshots/step-N)")
    save_every: int = knob(0, "steps between resumable training states (OUT/checkpoints/step-N); 0: none",
                           NON_NEGATIVE)
    resume: str = knob("", "auto: continue from the newest complete state in OUT/checkpoints; or a state "
                           "directory")
    overwrite: bool = knob(False, "train every stage anew, removing its earlier outputs (default: a stage that "
                                  "finished with the same settings is kept, an interrupted one resumes from its "
                                  "last saved state or starts again)")
    max_bad_steps: int = knob(5, "steps in a row with a non-finite loss or gradient that stop the run "
                                 "(each one is skipped)", AT_LEAST_1)
    out_dir: str = knob("out/demo", "where the checkpoint, metrics and reports go (--stage all: a folder "
                                    "per stage under it)")
    demo_images: int = knob(4000, "demo recipe: how many shapes training images to generate", AT_LEAST_1)


RANGES = declared_ranges(TrainConfig)


PAPER = dict(warmup_ratio=0.03, weight_decay=0.0, epochs=1.0, gradient_checkpointing=True,
             max_length=2048, batch_size=16, num_workers=8, save_every=500, resume="auto")
RECIPES = {
    # the published settings (arXiv 2410.14332, training details); per-stage global batch 256 / 128 / 128.
    # Stages 1.5 and 2 train the whole 7B LLM: ~16 bytes per parameter of fp32 weights, gradients and AdamW state, more
    # than one GPU holds, so they shard it (FSDP; the paper used ZeRO-3). Stage 1 trains the projector
    # alone and fits replicated (DDP). `--plan` prints the figures.
    "llava15-vicuna7b": dict(
        model=dict(vision_model="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5",
                   model_overrides=dict(pool_size=2048)),
        stages={"1": dict(PAPER, lr=1e-3, vision_lr=0.0, global_batch_size=256, batch_size=32, template="plain"),
                "1.5": dict(PAPER, lr=1e-5, vision_lr=2e-6, pool_lr=1.5e-4, global_batch_size=128,
                            template="vicuna_v1", fsdp=True),
                "2": dict(PAPER, lr=1e-5, vision_lr=2e-6, global_batch_size=128, template="vicuna_v1", fsdp=True)}),
    "siglip-qwen25-7b": dict(
        model=dict(vision_model="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-7B-Instruct",
                   model_overrides=dict(pool_size=2048)),
        stages={"1": dict(PAPER, lr=1e-3, vision_lr=0.0, global_batch_size=256, batch_size=32, template="plain"),
                "1.5": dict(PAPER, lr=1e-5, vision_lr=2e-6, pool_lr=1.5e-4, global_batch_size=128, template="chat",
                            fsdp=True),
                "2": dict(PAPER, lr=1e-5, vision_lr=2e-6, global_batch_size=128, template="chat", fsdp=True)}),
    # one GPU of 24-80 GB, small published models: SigLIP-B/16-224 (196 visual tokens) and Qwen2.5-0.5B-Instruct,
    # the paper's siglip-qwen25-7b at a size that trains on one card. Global batches and learning rates are
    # LLaVA-1.5's (arXiv 2310.03744, Table 9: stage 1 256 at 1e-3, fine-tuning 128 at 2e-5), which TinyLLaVA
    # (arXiv 2402.14289) keeps for its 0.5-3B LLMs with SigLIP; the tower at 2e-6 and the pool at 15x the
    # LLM's rate are the paper's ratios. One GPU: no sharding; the global batch by gradient accumulation.
    # Per-GPU batches so that --plan's worst case (every sequence at max_length, gradient checkpointing)
    # fits 24 GB: stage 1's captions are short (196 image tokens + a caption: max_length 512 cuts none).
    "siglip-qwen25-0.5b": dict(
        model=dict(vision_model="google/siglip-base-patch16-224", llm="Qwen/Qwen2.5-0.5B-Instruct",
                   model_overrides=dict(pool_size=2048)),
        stages={"1": dict(PAPER, lr=1e-3, vision_lr=0.0, global_batch_size=256, batch_size=16, max_length=512,
                          template="plain"),
                "1.5": dict(PAPER, lr=2e-5, vision_lr=2e-6, pool_lr=3e-4, global_batch_size=128, batch_size=4,
                            template="chat"),
                "2": dict(PAPER, lr=2e-5, vision_lr=2e-6, global_batch_size=128, batch_size=4, template="chat")}),
    # tiny models on the shapes data (demo_base.py: a tower and an LLM pretrained once, committed in
    # shapes_world/base): all three stages in a few CPU minutes. Chosen from the base models and the
    # no-stage-1.5 (llava) arm alone, on a development copy of the world (docs/world.md): stage 1 until its
    # loss flattens, stage 2 until llava's test curve flattens (2000 steps on the committed base), stage 1.5
    # at stage 2's learning rate as in the paper (pool lr 15x, the paper's 1.5e-4 / 1e-5). The tower stays
    # frozen (vision_lr 0).
    "demo": dict(
        model=dict(model_overrides=dict(pool_size=128)),
        stages={"1": dict(lr=1e-3, vision_lr=0.0, max_steps=200, warmup_steps=10, global_batch_size=32,
                          batch_size=32, template="plain", max_length=256, num_workers=0),
                "1.5": dict(lr=5e-4, vision_lr=0.0, pool_lr=7.5e-3, max_steps=200, warmup_steps=20, adam_beta2=0.95,
                            global_batch_size=8, batch_size=8, max_length=256, num_workers=0),
                "2": dict(lr=5e-4, vision_lr=0.0, max_steps=2000, warmup_steps=30, adam_beta2=0.95,
                          global_batch_size=16, batch_size=16, max_length=256, num_workers=0)}),
}


CROC_LR = 2e-5  # Croc's learning rate in stages 1.5 and 2 (the paper recipes; ViCToR's is 1e-5)


# -----------------------------------------------------------------------------
# One stage: set up (processes, data, model, loader, optimizer), the loop, the report and the checkpoint


def trainable_param_groups(model: VictorModel, stage: str, cfg: TrainConfig) -> list[dict]:
    """This stage's optimizer groups (VictorModel.param_groups) with the run's learning rates."""
    return model.param_groups(stage, cfg.lr, cfg.vision_lr, cfg.pool_lr, cfg.weight_decay)


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 0 (the LLaVA/HF 'cosine' schedule)."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_model(cfg: TrainConfig, stage: str, settings: dict | None = None):
    """The run's model, tokenizer and image processor: loaded from --init, or built from the base models.
    settings: rank 0's model settings (FSDP, the other ranks: build_model_once), from which the same
    model is built on the meta device, without weights."""
    from transformers import AutoImageProcessor, AutoTokenizer
    if settings is not None:
        with torch.device("meta"):  # a LLaVA projector (projector_path) arrives with rank 0's weights
            model = VictorModel(VictorConfig.from_dict({**settings, "projector_path": ""}), load_weights=False)
        tokenizer = AutoTokenizer.from_pretrained(cfg.init or cfg.llm)
        image_processor = AutoImageProcessor.from_pretrained(cfg.init or cfg.vision_model, backend="pil")
    elif cfg.init:
        given = {"vision_model": cfg.vision_model, "llm": cfg.llm}
        model, tokenizer, image_processor = load_init_checkpoint(cfg.init, cfg.model_overrides, given)
    else:
        if stage != "1":
            print(f"note: stage {stage} without --init starts from the base models (no stage-1 projector)")
        vcfg = VictorConfig.from_dict({"vision_model": cfg.vision_model, "llm": cfg.llm, **cfg.model_overrides})
        for key in ("vision_model", "llm"):  # local dirs by absolute path, so checkpoints can refer to them
            if os.path.isdir(getattr(vcfg, key)):
                setattr(vcfg, key, os.path.abspath(getattr(vcfg, key)))
        vcfg.validate()
        try:
            model = VictorModel(vcfg)
            tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
            image_processor = AutoImageProcessor.from_pretrained(cfg.vision_model, backend="pil")
        except OSError as e:  # transformers' way of saying a base model is not there
            raise UsageError(f"cannot load the base models (--vision-model {cfg.vision_model!r}, --llm "
                             f"{cfg.llm!r}): {first_line(e)}") from None
    attn = model.llm.config._attn_implementation
    if stage == "1.5" and model.cfg.stage15_attention == "mixed" and attn not in ("sdpa", "eager"):
        # Croc's mask is 4-D, which flash-attention cannot take: this stage runs on SDPA
        print(f"note: stage15_attention='mixed' needs a 4-D attention mask, which {attn} cannot take: "
              f"stage 1.5 runs with sdpa")
        model.llm.set_attn_implementation("sdpa")
    return model, D.ensure_pad_token(tokenizer), image_processor


def prepare_model(cfg: TrainConfig, stage: str, rank: int, world: int, device: torch.device):
    """This stage's model on its device, wrapped for the processes: (model, train_model, tokenizer,
    image_processor). The loop calls train_model (DDP's wrapper, or the model itself) and reads and saves
    model (under FSDP, sharded in place)."""
    fsdp = uses_fsdp(cfg, world)
    if cfg.fsdp and world == 1 and rank == 0:
        print("note: --fsdp with one process: nothing to shard over, training unsharded")
    build = functools.partial(build_model, cfg, stage)  # build(settings=...): the same model on the meta device
    model, tokenizer, image_processor = build_model_once(build, rank) if fsdp else build()
    trainable_param_groups(model, stage, cfg)  # what this stage trains (requires_grad), before any wrapping
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.vision_lr > 0 and stage != "1":
            model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, train_model = wrap_for_processes(model, fsdp, computes_in_bf16(cfg, device), world, device)
    return model, train_model, tokenizer, image_processor


def make_optimizer(cfg: TrainConfig, model: VictorModel, stage: str, device: torch.device, total_steps: int):
    """(AdamW over this stage's parameter groups, its lr schedule)."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    # fused: one kernel over all tensors (CPU too: ~10 % of a demo step)
    optimizer = torch.optim.AdamW(trainable_param_groups(model, stage, cfg), betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))


@dataclass
class StageRun:
    """One stage as start_stage sets it up: what the loop works with."""
    cfg: TrainConfig
    stage: str
    rank: int
    world: int
    device: torch.device
    model: VictorModel  # read and saved (under FSDP, sharded in place)
    train_model: torch.nn.Module  # what the loop calls: DDP's wrapper, or the model itself
    tokenizer: object
    image_processor: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches
    first_step: int  # > 0 when resumed
    total_steps: int
    grad_accum: int
    snapshots: set
    bad_records: list  # the validation pass's

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return uses_fsdp(self.cfg, self.world)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoints")


def start_stage(cfg: TrainConfig, stage: str) -> StageRun:
    """Everything before the first step, cheapest checks first: the processes, the batch arithmetic, the
    memory plan, the data's validation pass, then the model, the loader, the optimizer, a resumed state."""
    rank, world, device = setup_distributed()
    if cfg.global_batch_size % (cfg.batch_size * world):
        raise UsageError(f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                         f"batch_size {cfg.batch_size} x {world} processes")
    grad_accum = cfg.global_batch_size // (cfg.batch_size * world)
    check_memory_fits(cfg, stage, world, device)
    if not cfg.data or not (os.path.isfile(cfg.data) or D.is_parquet(cfg.data)):  # parquet_files names a miss
        raise FileNotFoundError(f"stage {stage}: data file {cfg.data!r} not found (--data)")
    records, bad_records = validate_data(cfg, rank == 0)
    torch.manual_seed(cfg.seed + rank)
    model, train_model, tokenizer, image_processor = prepare_model(cfg, stage, rank, world, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    loader, sampler = make_loader(cfg, stage, records, model, tokenizer, image_processor, rank, world)
    if not records and not bad_records:
        raise UsageError(f"{cfg.data}: the file has no records")
    if not records:
        raise UsageError(f"{cfg.data}: no usable record: all {len(bad_records)} are bad (listed in "
                         f"{os.path.join(cfg.out_dir, 'bad_records.json')})")
    if len(loader) < grad_accum:
        raise UsageError(f"{cfg.data}: {len(loader.dataset)} records are fewer than one global batch "
                         f"({cfg.global_batch_size})")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * (len(loader) // grad_accum))
    snapshots = parse_steps(cfg.snapshot_steps)
    if snapshots and max(snapshots) > total_steps:
        raise UsageError(f"--snapshot-steps {cfg.snapshot_steps}: this run has only {total_steps} steps")
    optimizer, scheduler = make_optimizer(cfg, model, stage, device, total_steps)
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "skipped": [], "truncated": []}
    resume_from = (latest_training_state(os.path.join(cfg.out_dir, "checkpoints")) if cfg.resume == "auto"
                   else cfg.resume)
    if resume_from:
        progress = load_training_state(resume_from, model, optimizer, scheduler, rank)
        if rank == 0:
            print(f"stage {stage}: resuming from {resume_from} at step {progress['step']}")
    return StageRun(cfg, stage, rank, world, device, model, train_model, tokenizer, image_processor, optimizer,
                    scheduler, Batches(loader, sampler, progress, cfg), progress["step"], total_steps, grad_accum,
                    snapshots, bad_records)


def global_target_counts(r: StageRun, micro: list[dict]) -> tuple[float, float]:
    """This step's label tokens and reconstruction targets over every process: the losses' denominators."""
    n_label = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    n_recon = (sum(r.model.num_reconstruction_targets(len(b["seeds"]), b["seeds"]) for b in micro)
               if r.stage == "1.5" else 0)
    return all_reduce_sum(n_label, r.device), all_reduce_sum(n_recon, r.device)


def forward_backward(r: StageRun, b: dict, n_label: float, n_recon: float, sync: bool) -> tuple[float, float]:
    """One micro-batch forward and backward; returns its share of the step's (LM, reconstruction) loss.
    The processes reduce their gradients only on the step's last micro-batch (sync)."""
    if r.fsdp:
        r.model.set_requires_gradient_sync(sync)
    context = r.train_model.no_sync() if (r.world > 1 and not r.fsdp and not sync) else contextlib.nullcontext()
    with context, torch.autocast(r.device.type, dtype=torch.bfloat16, enabled=computes_in_bf16(r.cfg, r.device)):
        out = r.train_model(input_ids=b["input_ids"].to(r.device), attention_mask=b["attention_mask"].to(r.device),
                            labels=b["labels"].to(r.device), stage=r.stage, selection_seeds=b["seeds"],
                            pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(r.device))
        # normalise by the whole global batch, so that 1 or N processes and any accumulation
        # give the same loss and gradient: sum over tokens / global token count
        lm = out.lm_loss * (out.num_label_tokens / max(n_label, 1))
        recon = (out.recon_loss * (out.num_recon_tokens / max(n_recon, 1))
                 if out.recon_loss is not None else torch.zeros((), device=r.device))
        (r.world * (lm + recon)).backward()  # DDP / FSDP average gradients over processes
    return lm.item(), recon.item()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the trained parameters' gradients to a total norm of max_norm; returns the norm before."""
    norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, update: bool):
    """Update the weights (unless told not to: the schedule moves on all the same), then clear the gradients."""
    if update:
        optimizer.step()
    with warnings.catch_warnings():  # after a skipped update torch warns that the optimizer did not step
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_loop(r: StageRun, log: StageLog):
    """The steps. Each: grad_accum micro-batches per process, the loss normalised by the global token
    counts; clip; update unless the loss or the gradient is not finite (max_bad_steps such steps in a
    row stop the run, the state before them saved); snapshots and resumable states on the way."""
    cfg, bad_in_a_row = r.cfg, 0
    r.model.train()
    for step in log.bar:
        micro = [next(r.batches) for _ in range(r.grad_accum)]
        stop_if_out_of_data(r)
        if r.master and (warning := r.batches.high_skip_rate()):
            tqdm.write(f"{warning} (every one listed at the end and in skipped.json)")
        n_label, n_recon = global_target_counts(r, micro)
        losses = [forward_backward(r, b, n_label, n_recon, sync=i == r.grad_accum - 1) for i, b in enumerate(micro)]
        grad_norm = clip_gradients(r.optimizer, cfg.grad_clip)
        lm, recon = (all_reduce_sum(sum(part), r.device) for part in zip(*losses))  # the same on every process
        lr = r.optimizer.param_groups[0]["lr"]  # this step's (the scheduler then moves it on)
        finite = math.isfinite(lm + recon) and math.isfinite(grad_norm)
        optimizer_step(r.optimizer, r.scheduler, update=finite)
        bad_in_a_row = 0 if finite else bad_in_a_row + 1
        if not finite and r.master:
            tqdm.write(f"warning: step {step + 1}: non-finite loss {lm + recon} / grad norm {grad_norm}: "
                       f"optimizer step skipped ({bad_in_a_row} in a row, stop at {cfg.max_bad_steps})")
        done = step + 1
        log.step(dict(step=done, loss=lm + recon, lm_loss=lm, recon_loss=recon, lr=lr, grad_norm=grad_norm),
                 finite, r.batches)
        if bad_in_a_row >= cfg.max_bad_steps:
            save_training_state(r.state_dir, r.batches.state(done), r.model, r.optimizer, r.scheduler, r.rank)
            raise StageStopped(f"stage {r.stage}: {bad_in_a_row} steps in a row had a non-finite loss or gradient "
                               f"(last: step {done}); stopped. The state before them is saved in "
                               f"{latest_training_state(r.state_dir)}: lower the learning rate or look at the data, "
                               f"then --resume auto")
        if done < r.total_steps and done in r.snapshots:  # a model checkpoint part-way, e.g. for learning curves
            save_model(r, os.path.join(cfg.out_dir, "snapshots", f"step-{done}"))
        if done < r.total_steps and cfg.save_every and done % cfg.save_every == 0:
            save_training_state(r.state_dir, r.batches.state(done), r.model, r.optimizer, r.scheduler, r.rank)


def finish_stage(r: StageRun, log: StageLog):
    """The end-of-run report (every skipped and truncated record, from every process) and the checkpoint."""
    all_skipped, truncated = report_unused_data(r)  # a collective; rank 0 says it and writes the lists
    if r.master:
        log.close({"done": True, "skipped": len(all_skipped), "truncated": len(truncated),
                   "skipped_ids": [rid for rid, _ in all_skipped]})
    save_model(r, r.cfg.out_dir)
    if r.master:
        print(f"stage {r.stage}: saved {r.cfg.out_dir} ({r.total_steps} steps, {time.time() - log.t0:.0f}s)")
    barrier()


def train_stage(cfg: TrainConfig, stage: str) -> str:
    """Train one stage and save its checkpoint to cfg.out_dir; returns cfg.out_dir."""
    assert stage in STAGES
    reporter = MetricsReporter(cfg.report_to)  # every process: a missing package fails here, not mid-run
    r = start_stage(cfg, stage)
    log = StageLog(r, reporter)
    train_loop(r, log)
    finish_stage(r, log)
    return cfg.out_dir


def save_model(r: StageRun, path: str):
    """Write the model as a checkpoint directory (victor.save_checkpoint): stage 1 its projector, later
    stages everything. Under FSDP every process takes part in gathering the full weights."""
    full_state = gathered_state_dict(r.model, r.fsdp)  # FSDP: every process takes part
    if r.master:
        save_checkpoint(r.model, path, r.tokenizer, r.image_processor, parts="projector" if r.stage == "1" else "all",
                        extra={"train_config": {**dataclasses.asdict(r.cfg), "stage": r.stage}}, state_dict=full_state)


# -----------------------------------------------------------------------------
# Recipes and the command line


def stage_config(recipe: str, stage: str, overrides: dict, init: str = "") -> TrainConfig:
    """Recipe defaults for one stage, then the variant's preset, then the command line's overrides.
    With --init the checkpoint holds the model's settings: only the variant's and the command line's
    model settings apply, and each takes effect or is refused (checkpoints.config_with_overrides)."""
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    variant = overrides.get("variant", "")
    r = RECIPES[recipe]
    base = {} if init else {k: v for k, v in r["model"].items() if k != "model_overrides"}
    model_overrides = {**({} if init else r["model"].get("model_overrides", {})), **variant_preset(variant),
                       **overrides.get("model_overrides", {})}
    stage_values = dict(r["stages"][stage])
    for flag, replaced in (("epochs", "max_steps"), ("warmup_ratio", "warmup_steps")):
        if flag in overrides and replaced not in overrides:  # the user's --epochs over the recipe's step count
            stage_values.pop(replaced, None)
    if variant == "croc" and stage in ("1.5", "2") and recipe != "demo":
        stage_values["lr"] = CROC_LR
    values = {**base, **stage_values, **overrides, "model_overrides": model_overrides,
              "recipe": recipe, "stage": stage, "init": init}
    return TrainConfig(**values)


def variant_preset(variant: str) -> dict:
    """--variant's VictorConfig fields ({} for none)."""
    if variant and variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS.get(variant, {})


def stages_to_run(stage: str, variant: str) -> list[str]:
    """--stage (1 | 1.5 | 2 | all) as a list; LLaVA has no stage 1.5."""
    stages = list(STAGES) if stage == "all" else [stage]
    if variant == "llava":
        if stage == "1.5":
            raise UsageError("--variant llava has no stage 1.5 (it trains stage 1, then stage 2)")
        stages = [s for s in stages if s != "1.5"]
    return stages


def check_knobs(given: dict, recipe: str, stages: list[str]):
    """Refuse a flag that contradicts another; say so when a flag has no effect in this stage (a flag
    set shared by all stages of an experiment is common, so that is a note, not an error), or when a
    flag replaces a recipe setting."""
    def off(flag, why, refuse):
        if refuse:
            raise UsageError(f"--{flag} {why}")
        print(f"note: --{flag} {why}")
    if "1.5" not in stages:
        where = " and ".join(f"stage {s}" for s in stages)
        later = " (saved with the checkpoint, it applies in stage 1.5 from it)" if "1" in stages else ""
        for key in sorted(set(given.get("model_overrides", {})) & set(STAGE15_FIELDS)):
            print(f"note: --model-overrides {key}: a stage-1.5 setting, no effect in {where}{later}")
        preset = VARIANTS.get(given.get("variant", ""), {})
        if preset and set(preset) <= set(STAGE15_FIELDS):
            print(f"note: --variant {given['variant']}: its settings are stage 1.5's, no effect in {where}{later}")
    if "demo_images" in given and recipe != "demo":
        off("demo-images", f"applies to the demo recipe only (this is {recipe!r})", True)
    if given.get("max_steps") and "epochs" in given:
        off("epochs", "has no effect with --max-steps", True)
    if given.get("warmup_steps") and "warmup_ratio" in given:
        off("warmup-ratio", "has no effect with --warmup-steps", True)
    if given.get("vision_lr") and "1" in stages:
        off("vision-lr", "has no effect in stage 1 (it trains the projector only)", False)
    if "pool_lr" in given and set(stages) - {"1.5"}:
        off("pool-lr", "has no effect outside stage 1.5 (the only stage that trains the token pool)", False)
    if given.get("bf16") and not torch.cuda.is_available():
        print("note: --bf16 on a CPU: autocast to bfloat16 (under --fsdp: bf16 parameters), slower than float32 "
              "where the CPU has no native bf16")
    if given.get("variant") == "croc" and recipe == "demo" and set(stages) & {"1.5", "2"}:
        print(f"note: --variant croc: Croc's learning rate {CROC_LR} (stages 1.5 and 2) belongs to the paper "
              f"recipes; the demo recipe keeps its own learning rates")


def note_replaced_counts(given: dict, recipe: str, stages: list[str]):
    """Say which of the recipe's step counts a given --epochs / --warmup-ratio replaces (stage_config)."""
    recipe_stages = RECIPES.get(recipe, {}).get("stages", {})
    for flag, replaced in (("epochs", "max_steps"), ("warmup_ratio", "warmup_steps")):
        counts = {s: recipe_stages[s][replaced] for s in stages
                  if recipe_stages.get(s, {}).get(replaced) and flag in given and replaced not in given}
        if counts:
            recipe_counts = ", ".join(f"stage {s}: {n}" for s, n in counts.items())
            print(f"note: --{flag.replace('_', '-')} {given[flag]} replaces the {recipe} recipe's "
                  f"{replaced} ({recipe_counts})")


# What a stage writes into its out-dir: a stage started anew removes an earlier run's (never anything else)
STAGE_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "metrics.jsonl", "bad_records.json",
               "skipped.json", "truncated.json", "chat_template.jinja", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "curves.png")
STAGE_DIRS = ("snapshots", "checkpoints", "tensorboard")
# settings that do not change what a stage computes: a finished stage is kept whatever they are
NOT_RESULT_SETTINGS = ("resume", "save_every", "report_to", "log_every", "overwrite", "num_workers")
RUNNING = {}  # the stage being trained, for the one line Ctrl-C prints


def finished_settings(out_dir: str) -> dict | None:
    """The settings a finished stage in out_dir was trained with (its checkpoint's train_config, when its
    metrics.jsonl ends with the stage's "done" row); None if there is none."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl"), "rb") as f:
            last = f.read().splitlines()[-1]
        with open(os.path.join(out_dir, "config.json")) as f:
            saved = json.load(f).get("train_config")
        return saved if json.loads(last).get("done") and saved else None
    except (OSError, IndexError, ValueError):
        return None


def result_settings(settings: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in NOT_RESULT_SETTINGS}


def remove_stage_outputs(out_dir: str) -> list[str]:
    """An earlier run's outputs in out_dir (STAGE_FILES, STAGE_DIRS, its evaluations), removed; their names."""
    if not os.path.isdir(out_dir):
        return []
    gone = [n for n in sorted(os.listdir(out_dir)) if n in STAGE_FILES or n in STAGE_DIRS or
            (n.startswith("eval") and n.endswith(".json")) or (n.startswith("pool_") and n.endswith(".png"))]
    for name in gone:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return gone


def continue_or_start(cfg: TrainConfig, stage: str, anew: bool) -> str:
    """The rule for running a stage into an out-dir that may hold an earlier run: 'keep' (it finished with the
    same settings), 'resume' (it saved a state and did not finish), or 'new' (anything else, or `anew`: the
    earlier run's outputs are removed first). Rank 0 says which."""
    master = int(os.environ.get("RANK", 0)) == 0
    done = finished_settings(cfg.out_dir)
    if not anew and done is not None and result_settings(done) == result_settings({**dataclasses.asdict(cfg),
                                                                                      "stage": stage}):
        if master:
            print(f"stage {stage}: kept {cfg.out_dir}: it finished earlier with these settings (--overwrite trains "
                  f"it anew)")
        return "keep"
    if not anew and done is None and (cfg.resume or latest_training_state(os.path.join(cfg.out_dir, "checkpoints"))):
        cfg.resume = cfg.resume or "auto"  # start_stage says from which state
        return "resume"
    barrier()  # every process has read the out-dir before rank 0 clears it
    gone = remove_stage_outputs(cfg.out_dir) if master else []
    barrier()
    if gone and master:
        print(f"stage {stage}: trained anew into {cfg.out_dir}: removed the earlier run's "
              f"{', '.join(gone[:6])}{' ...' if len(gone) > 6 else ''}")
    return "new"


def run(overrides: dict) -> list[str]:
    """Run one stage, or all three in a row (each initialised from the one before). The same command again
    continues: a stage that finished with the same settings is kept, an interrupted one resumes from its
    last saved state (--save-every) or starts again; a stage trained anew makes the ones after it anew too;
    --overwrite trains every stage anew."""
    given = dict(overrides)
    check_ranges(given, RANGES)
    recipe, stage = overrides.pop("recipe", "demo"), overrides.pop("stage", "all")
    out_root = overrides.pop("out_dir", "out/demo" if recipe == "demo" else f"out/{recipe}")
    variant = overrides.get("variant", "")
    # the model settings are checked now, before data and models are built (placeholders for the models)
    try:
        VictorConfig.from_dict({"vision_model": "-", "llm": "-", **variant_preset(variant),
                                **overrides.get("model_overrides", {})}).validate()
    except ValueError as e:
        raise UsageError(f"--model-overrides / --variant: {e}") from None
    stages = stages_to_run(stage, variant)
    check_knobs(given, recipe, stages)
    note_replaced_counts(given, recipe, stages)
    MetricsReporter(overrides.get("report_to", ""))  # a missing optional package fails before data or models
    if len(stages) > 1 and overrides.get("data"):
        raise UsageError(f"--data with --stage {stage} would train every stage on one file; give each stage its "
                         "data, one stage at a time: --stage 1 --data CAPTIONS --out-dir OUT/stage1, then --stage "
                         "1.5 --init OUT/stage1 --data DETAILED_CAPTIONS ..., then --stage 2 --init ... --data QA")
    if overrides.get("data") and not overrides.get("image_folder") and not D.is_parquet(overrides["data"]):
        overrides["image_folder"] = os.path.dirname(os.path.abspath(overrides["data"]))
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: no --image-folder: the records' image paths are read relative to the data file's "
                  f"folder, {overrides['image_folder']}")
    demo_data = (demo_inputs(overrides, out_root, overrides.get("demo_images", TrainConfig.demo_images))
                 if recipe == "demo" else {})
    outs, init = [], overrides.pop("init", "")
    anew = bool(overrides.get("overwrite"))
    for s in stages:
        o = dict(overrides)
        if s in demo_data:
            o.setdefault("data", demo_data[s])
        if init and s != stages[0]:  # the base models come with the previous stage's checkpoint
            o.pop("vision_model", None), o.pop("llm", None)
        cfg = stage_config(recipe, s, o, init)
        cfg.out_dir = os.path.join(out_root, f"stage{s}") if stage == "all" else out_root
        action = continue_or_start(cfg, s, anew)
        if action != "keep":
            if stage == "all" and int(os.environ.get("RANK", 0)) == 0:  # the later stages' earlier outputs are
                for later in stages[stages.index(s) + 1:]:  # stale now: never left for eval.py to score
                    gone = remove_stage_outputs(os.path.join(out_root, f"stage{later}"))
                    if gone:
                        print(f"stage {later}: removed the earlier run's {', '.join(gone[:6])}"
                              f"{' ...' if len(gone) > 6 else ''} (stage {s} is trained anew)")
            RUNNING.update(stage=s, out_dir=cfg.out_dir)
            init = train_stage(cfg, s)
            anew = True  # what comes after a stage trained now is trained now too
        else:
            init = cfg.out_dir
        outs.append(init)
    return outs


def print_plans(args: dict, world: int):
    """--plan: the memory plan of each stage this command line would run; nothing is built or loaded."""
    if world < 1:
        raise UsageError(f"--world-size must be at least 1, got {world}")
    check_ranges(args, RANGES)
    recipe, stage, init = args.get("recipe", "demo"), args.get("stage", "all"), args.get("init", "")
    overrides = {k: v for k, v in args.items() if k not in ("recipe", "stage", "init", "out_dir")}
    if init and not os.path.exists(init):  # planned before the previous stage has run: its models are the recipe's
        print(f"note: --init {init} does not exist yet: planning from the {recipe} recipe's models "
              f"(and --model-overrides / --variant), as the previous stage will build them")
        init = ""
    for s in stages_to_run(stage, overrides.get("variant", "")):
        print(format_plan(memory_plan(stage_config(recipe, s, overrides, init), s, world)))


def parse_args(argv=None) -> dict:
    """Every TrainConfig field becomes a --flag; only the flags given override the recipe."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    add_config_flags(ap, TrainConfig)
    # not TrainConfig fields: they ask for a memory plan instead of a run (a run's world size is torchrun's)
    ap.add_argument("--plan", action="store_true", default=argparse.SUPPRESS,
                    help="print what each GPU will hold for this command line (model configs only) and exit")
    ap.add_argument("--world-size", type=int, default=argparse.SUPPRESS,
                    help="with --plan: the number of processes (GPUs) to plan for (default 1)")
    return vars(ap.parse_args(argv))


def main(argv=None):
    """The command line: a memory plan (--plan) or a run. A mistake the user can fix (a flag, the data, a
    path, a stage that had to stop) ends as one line, `error: ...`, not a traceback."""
    args = parse_args(argv)
    if args.get("stage", "all") not in (*STAGES, "all"):
        sys.exit(f"error: --stage must be one of 1, 1.5, 2, all (got {args['stage']!r})")
    plan, plan_world = args.pop("plan", False), args.pop("world_size", None)
    if plan_world is not None and not plan:
        sys.exit("--world-size applies to --plan only (a run's world size is torchrun's --nproc_per_node x --nnodes)")
    if plan:
        try:
            print_plans(args, 1 if plan_world is None else plan_world)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: --plan: {e}")
        sys.exit(0)
    t = time.time()
    try:
        run(args)
    except (UsageError, FileNotFoundError, MissingDependency, StageStopped) as e:  # the user's to fix: one line
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        where = f" in stage {RUNNING['stage']} ({RUNNING['out_dir']})" if RUNNING else ""
        sys.exit(f"interrupted{where}: the same command continues (finished stages are kept; the interrupted one "
                 f"resumes from its last saved state with --save-every N, else it starts again)")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done in {time.time() - t:.0f}s")
    end_processes()


if __name__ == "__main__":
    main()
