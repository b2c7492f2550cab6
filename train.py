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
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data as D
from engineering import records as RC
from engineering.batches import Batches, make_loader, report_unused_data, stop_if_out_of_data, validate_data
from engineering.checkpoints import load_init_checkpoint
from engineering.config import (
    RANGES,
    TrainConfig,
    check_knobs,
    note_replaced_counts,
    stage_config,
    stages_to_run,
    variant_preset,
)
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
    MissingDependency,
    StageStopped,
    UsageError,
    add_config_flags,
    check_ranges,
    first_line,
    parse_steps,
)
from engineering.memory_plan import check_memory_fits, print_plans
from engineering.reporting import MetricsReporter, StageLog
from engineering.reruns import continue_or_start, remove_stage_outputs
from shapes_world.demo_base import demo_inputs
from victor import (
    IGNORE_INDEX,
    STAGES,
    VictorConfig,
    VictorModel,
    save_checkpoint,
)

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
    if not cfg.data or not (os.path.isfile(cfg.data) or RC.is_parquet(cfg.data)):  # parquet_files names a miss
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


RUNNING = {}  # the stage being trained, for the one line Ctrl-C prints



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
    if overrides.get("data") and not overrides.get("image_folder") and not RC.is_parquet(overrides["data"]):
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
