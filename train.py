"""
Train victor: stage 1 (projector), stage 1.5 (ViCToR), stage 2 (instruction tuning).

The built-in demo (no arguments): generates the shapes data, loads the committed tiny base models
(shapes_world/base), runs stages 1 -> 1.5 -> 2 on the CPU in a few minutes and saves out/demo/stage{1,1.5,2}:
    python train.py
One stage of a paper recipe, on 8 GPUs:
    torchrun --nproc_per_node 8 train.py --recipe llava15-vicuna7b --stage 1.5 \\
        --init out/llava15/stage1 --data recap_cc3m.json --image-folder images/ --out-dir out/llava15/stage1.5
Every TrainConfig field is a flag (--lr, --max-steps, --batch-size, ...) and overrides the recipe
(both in engineering/config.py); each stage's values come from the recipe: --show-settings prints them.
A stage saves into OUT/stageS (OUT: --out-dir, else out/RECIPE; one --stage with --out-dir: that folder).
The same command again keeps a finished stage and resumes an interrupted one; other settings are refused
by name; nothing is removed without --overwrite, which moves the earlier outputs into OUT/stageS/previous/
(README, "Nothing you trained is lost").
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
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data as D
from engineering.batches import Batches, validate_data
from engineering.checkpoints import build_model, save_checkpoint
from engineering.config import (
    RECIPES,
    TrainConfig,
    add_method_flags,
    check_command_line,
    grad_accumulation,
    stage_config,
)
from engineering.distributed import (
    ResumableSampler,
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
    parse_steps,
)
from engineering.memory_plan import check_memory_fits, print_plans
from engineering.reporting import MetricsReporter, StageLog, bars_wanted
from engineering.reruns import check_before_training, check_resume, command_settings, start_anew
from shapes_world.demo_base import demo_inputs, demo_records_per_image, make_demo_data
from victor import IGNORE_INDEX, STAGES, VictorModel, check_stage

# -----------------------------------------------------------------------------
# One stage, top to bottom: build (the model, what it trains, the loader), the optimizer and its schedule,
# the loop, the save. The settings come from engineering/config.py (TrainConfig, RECIPES).


def prepare_model(cfg: TrainConfig, stage: str, rank: int, world: int, device: torch.device):
    """This stage's model on its device, wrapped for the processes: (model, train_model, tokenizer,
    image_processor). The loop calls train_model (DDP's wrapper, or the model itself) and reads and saves
    model (under FSDP, sharded in place)."""
    fsdp = uses_fsdp(cfg, world)
    if cfg.fsdp and world == 1 and rank == 0:
        print("note: --fsdp with one process: nothing to shard over, training unsharded")
    build = functools.partial(build_model, cfg, stage)  # build(settings=...): the same model on the meta device
    model, tokenizer, image_processor = build_model_once(build, rank) if fsdp else build()
    D.ensure_pad_token(tokenizer)
    return (*ready_for_training(model, cfg, stage, world, device), tokenizer, image_processor)


def ready_for_training(model: VictorModel, cfg: TrainConfig, stage: str, world: int, device: torch.device,
                       **fsdp_options):
    """What this stage trains, gradient checkpointing, and the wrapping for the processes: (model, train_model).
    scripts/trace_step.py readies its model (fake tensors, a fake process group: fsdp_options) with this too."""
    model.set_trainable(stage, train_vision=cfg.vision_lr > 0)  # what this stage trains, before any wrapping
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.vision_lr > 0 and stage != "1":
            model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fsdp, bf16 = uses_fsdp(cfg, world), computes_in_bf16(cfg, device)
    return wrap_for_processes(model, fsdp, bf16, world, device, **fsdp_options)


def make_loader(cfg: TrainConfig, stage: str, records, model: VictorModel, tokenizer, image_processor,
                rank: int, world: int):
    """(loader, sampler): one sampler for 1 or many processes, the same global order either way."""
    template = D.resolve_template(cfg.template, tokenizer, stage)
    dataset = D.LlavaDataset(records, cfg.image_folder, tokenizer, image_processor, template,
                             model.num_image_tokens, cfg.max_length, model.cfg.image_token_id)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    if cfg.group_by_length:  # each global batch by length: less padding (LLaVA's group_by_modality_length)
        sampler.lengths, sampler.group, sampler.micro = D.record_lengths(records), cfg.global_batch_size, cfg.batch_size
    collate = D.Collator(tokenizer.pad_token_id, image_token_id=model.cfg.image_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=collate,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    return loader, sampler


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
    grad_accum = grad_accumulation(cfg, world)
    check_memory_fits(cfg, stage, world, device)
    records, bad_records = validate_data(cfg, rank == 0)
    resume_from = (latest_training_state(os.path.join(cfg.out_dir, "checkpoints")) if cfg.resume == "auto"
                   else cfg.resume)
    if resume_from:
        check_resume(cfg, stage, resume_from)  # a resume continues the same run
    torch.manual_seed(cfg.seed + rank)
    model, train_model, tokenizer, image_processor = prepare_model(cfg, stage, rank, world, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    loader, sampler = make_loader(cfg, stage, records, model, tokenizer, image_processor, rank, world)
    if len(loader) < grad_accum:
        raise UsageError(f"{cfg.data}: {len(loader.dataset)} records are fewer than one global batch "
                         f"({cfg.global_batch_size})")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * (len(loader) // grad_accum))
    snapshots = parse_steps(cfg.snapshot_steps)
    if snapshots and max(snapshots) > total_steps:
        raise UsageError(f"--snapshot-steps {cfg.snapshot_steps}: this run has only {total_steps} steps")
    optimizer, scheduler = make_optimizer(cfg, model, stage, device, total_steps)
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "skipped": [], "truncated": []}
    if resume_from:
        progress = load_training_state(resume_from, model, optimizer, scheduler, rank)
        if rank == 0:
            print(f"stage {stage}: resuming from {resume_from} at step {progress['step']}")
    batches = Batches(loader, sampler, progress, cfg, rank, world, device, bad_records)
    return StageRun(cfg, stage, rank, world, device, model, train_model, tokenizer, image_processor, optimizer,
                    scheduler, batches, progress["step"], total_steps, grad_accum, snapshots)


def global_target_counts(r: StageRun, micro: list[dict]) -> tuple[float, float]:
    """This step's label tokens and reconstruction targets over every process: the losses' denominators."""
    n_label = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    n_recon = (sum(r.model.num_reconstruction_targets(len(b["seeds"]), b["seeds"]) for b in micro)
               if r.stage == "1.5" else 0)
    return all_reduce_sum(n_label, r.device), all_reduce_sum(n_recon, r.device)


def forward_backward(r: StageRun, b: dict, n_label: float, n_recon: float, sync: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch forward and backward; returns its share of the step's (LM, reconstruction) loss, detached
    (read by the loop: no device->host sync here). The processes reduce their gradients only on the step's last
    micro-batch (sync)."""
    if r.fsdp:
        r.model.set_requires_gradient_sync(sync)
    context = r.train_model.no_sync() if (r.world > 1 and not r.fsdp and not sync) else contextlib.nullcontext()
    with context, torch.autocast(r.device.type, dtype=torch.bfloat16, enabled=computes_in_bf16(r.cfg, r.device)):
        out = r.train_model(input_ids=b["input_ids"].to(r.device), attention_mask=b["attention_mask"].to(r.device),
                            labels=b["labels"].to(r.device), stage=r.stage, selection_seeds=b["seeds"],
                            pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(r.device),
                            layout={k: v.to(r.device) for k, v in b["layout"].items()})
        # normalise by the whole global batch, so that 1 or N processes and any accumulation
        # give the same loss and gradient: sum over tokens / global token count
        lm = out.lm_loss * (out.num_label_tokens / max(n_label, 1))
        recon = (out.recon_loss * (out.num_recon_tokens / max(n_recon, 1))
                 if out.recon_loss is not None else torch.zeros((), device=r.device))
        (r.world * (lm + recon)).backward()  # DDP / FSDP average gradients over processes
    return lm.detach(), recon.detach()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the trained parameters' gradients to a total norm of max_norm; returns the norm before (a tensor)."""
    norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor


def step_compute(r: StageRun, micro: list[dict], n_label: float, n_recon: float) -> tuple[list, torch.Tensor]:
    """One step's computation, the update aside: each micro-batch's forward and backward, then the clip.
    Returns (each micro-batch's (LM, reconstruction) loss share, the gradient norm), as tensors: the loop reads
    them, scripts/trace_step.py runs this very step on fake tensors (which hold no values to read)."""
    losses = [forward_backward(r, b, n_label, n_recon, sync=i == r.grad_accum - 1) for i, b in enumerate(micro)]
    return losses, clip_gradients(r.optimizer, r.cfg.grad_clip)


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
        r.batches.stop_if_out_of_data(r.stage)
        if r.master and (warning := r.batches.high_skip_rate()):
            tqdm.write(f"{warning} (every one listed at the end and in skipped.json)")
        n_label, n_recon = global_target_counts(r, micro)
        losses, grad_norm = step_compute(r, micro, n_label, n_recon)
        grad_norm = float(grad_norm)
        lm, recon = (all_reduce_sum(sum(x.item() for x in part), r.device) for part in zip(*losses))  # every process
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
            save_state(r, done)
            raise StageStopped(f"stage {r.stage}: {bad_in_a_row} steps in a row had a non-finite loss or gradient "
                               f"(last: step {done}); stopped. The state before them is saved in "
                               f"{latest_training_state(r.state_dir)}: look at the data, then the same command "
                               f"resumes from it (a lower learning rate is a new run: --overwrite)")
        if done < r.total_steps and done in r.snapshots:  # a model checkpoint part-way, e.g. for learning curves
            save_model(r, os.path.join(cfg.out_dir, "snapshots", f"step-{done}"))
        if done < r.total_steps and cfg.save_every and done % cfg.save_every == 0:
            save_state(r, done)


def save_state(r: StageRun, done: int):
    """A resumable training state after step `done`, with the settings it was made with (a resume is checked
    against them)."""
    save_training_state(r.state_dir, r.batches.state(done), r.model, r.optimizer, r.scheduler, r.rank,
                        settings=command_settings(r.cfg, r.stage))


def finish_stage(r: StageRun, log: StageLog):
    """The end-of-run report (every skipped and truncated record, from every process) and the checkpoint."""
    all_skipped, truncated = r.batches.report_unused()  # a collective; rank 0 says it and writes the lists
    if r.master:
        log.close({"done": True, "skipped": len(all_skipped), "truncated": len(truncated),
                   "skipped_ids": [rid for rid, _ in all_skipped]})
    save_model(r, r.cfg.out_dir)
    if r.master:
        print(f"stage {r.stage}: saved {r.cfg.out_dir} ({r.total_steps} steps, {time.time() - log.t0:.0f}s)")
    barrier()


def save_model(r: StageRun, path: str):
    """Write the model as a checkpoint directory (engineering.checkpoints.save_checkpoint): stage 1 its projector, later
    stages everything. Under FSDP every process takes part in gathering the full weights."""
    full_state = gathered_state_dict(r.model, r.fsdp)  # FSDP: every process takes part
    if r.master:
        save_checkpoint(r.model, path, r.tokenizer, r.image_processor, parts="projector" if r.stage == "1" else "all",
                        extra={"train_config": {**dataclasses.asdict(r.cfg), "stage": r.stage}}, state_dict=full_state)


def train_stage(cfg: TrainConfig, stage: str, reporter: MetricsReporter | None = None) -> str:
    """Train one stage and save its checkpoint to cfg.out_dir; returns cfg.out_dir."""
    check_stage(stage)
    reporter = reporter or MetricsReporter(cfg.report_to)
    r = start_stage(cfg, stage)
    log = StageLog(cfg, stage, r.first_step, r.total_steps, r.master, reporter, len(r.batches.skipped))
    train_loop(r, log)
    finish_stage(r, log)
    return cfg.out_dir


# -----------------------------------------------------------------------------
# The command line: one stage, or all three in a row (each from the one before)


RUNNING = {}  # the stage being trained, for the one line Ctrl-C prints


def stage_configs(overrides: dict) -> tuple[list[TrainConfig], str]:
    """Each stage's settings for this command line (the recipe's, the variant's, the flags given), and where
    each stage saves: --out-dir itself for one stage, else OUT/stageS (OUT: --out-dir, or out/RECIPE).
    Also OUT, when the demo's data is to be made there ('' else)."""
    stages = check_command_line(overrides)  # every check that needs no data and no model, first
    recipe, stage = overrides.pop("recipe", "demo"), overrides.pop("stage", "all")
    given_out = overrides.pop("out_dir", "")
    out_root = given_out or f"out/{recipe}"
    demo_data = (demo_inputs(overrides, out_root, overrides.get("demo_images", TrainConfig.demo_images))
                 if recipe == "demo" else {})
    cfgs, init = [], overrides.pop("init", "")
    for s in stages:
        o = dict(overrides)
        if s in demo_data:
            o.setdefault("data", demo_data[s])
        if init and s != stages[0]:  # the base models come with the previous stage's checkpoint
            o.pop("vision_model", None), o.pop("llm", None)
        cfg = stage_config(recipe, s, o, init)
        cfg.out_dir = given_out if given_out and stage != "all" else os.path.join(out_root, f"stage{s}")
        if s not in demo_data:
            cfg.demo_images = 0  # (recorded as 0: this stage's data was given, not generated)
        cfgs.append(cfg)
        init = cfg.out_dir
    return cfgs, out_root if demo_data else ""


def run(overrides: dict) -> list[str]:
    """Run one stage, or all three in a row (each initialised from the one before), by the rerun rule
    (README, "Nothing you trained is lost"): every input checked first; the same command again keeps a
    finished stage and resumes an interrupted one; other settings are refused, naming each, unless
    --overwrite, which moves the earlier outputs aside. Returns each stage's out-dir."""
    cfgs, demo_root = stage_configs(overrides)
    reporter = MetricsReporter(cfgs[0].report_to)  # a missing optional package fails before data or models
    actions = check_before_training(cfgs, demo_records_per_image() if demo_root else None)
    if demo_root:
        make_demo_data(demo_root, cfgs[0].demo_images)
    for cfg, action in zip(cfgs, actions):
        if action == "keep":
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"stage {cfg.stage}: kept {cfg.out_dir}: it finished earlier with these settings "
                      f"(--overwrite trains it anew)")
            continue
        if action == "new":
            start_anew(cfg.out_dir, cfg.stage)
        RUNNING.update(stage=cfg.stage, out_dir=cfg.out_dir)
        train_stage(cfg, cfg.stage, reporter)
    RUNNING.clear()
    return [cfg.out_dir for cfg in cfgs]


def show_settings(overrides: dict):
    """--show-settings: each stage's settings as this command would run them (nothing is checked on disk)."""
    cfgs, _ = stage_configs(overrides)
    rows = [dataclasses.asdict(c) for c in cfgs]
    width = max(len(k) for k in rows[0])
    print(f"{'':{width}}  " + "  ".join(f"stage {c.stage}" for c in cfgs))
    for key in rows[0]:
        print(f"{key:{width}}  " + "  ".join(json.dumps(r[key]) if isinstance(r[key], dict) else str(r[key])
                                              for r in rows))


def parse_args(argv=None) -> dict:
    """Every TrainConfig field becomes a --flag; only the flags given override the recipe."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    add_config_flags(ap, TrainConfig, recipe_fields={k for r in RECIPES.values() for st in r["stages"].values()
                                                     for k in st} | {"vision_model", "llm", "model_overrides"})
    add_method_flags(ap)
    ap.add_argument("--show-settings", action="store_true", default=argparse.SUPPRESS,
                    help="print each stage's settings as this command line would run them (the recipe's "
                         "values per stage, then the flags given) and exit")
    # not TrainConfig fields: they ask for a memory plan instead of a run (a run's world size is torchrun's)
    ap.add_argument("--plan", action="store_true", default=argparse.SUPPRESS,
                    help="print what each GPU will hold for this command line (model configs only) and exit")
    ap.add_argument("--world-size", type=int, default=argparse.SUPPRESS,
                    help="with --plan: the number of processes (GPUs) to plan for (default 1)")
    ap.add_argument("--gpu-memory", type=float, default=argparse.SUPPRESS,
                    help="with --plan: each GPU's memory in GiB, for the verdict (default 80)")
    return vars(ap.parse_args(argv))


def refuse(message: str):
    """A mistake on the command line or in its inputs: one line on stderr, exit 2, nothing on disk changed."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def interrupted_line() -> str:
    """Ctrl-C's one line: where it stopped, and what the same command will do."""
    if not RUNNING:
        return "interrupted before any stage started training: the same command starts again"
    state = latest_training_state(os.path.join(RUNNING["out_dir"], "checkpoints"))
    then = (f"its saved state holds step {state.rsplit('step-', 1)[1]} ({state}): the same command resumes from it"
            if state else "no training state was saved (--save-every N saves one): the same command starts this "
            "stage again")
    return f"interrupted in stage {RUNNING['stage']} ({RUNNING['out_dir']}): {then}; finished stages are kept"


def main(argv=None):
    """The command line: a memory plan (--plan) or a run. A mistake the user can fix (a flag, the data, a
    path, a stage that had to stop) ends as one line, `error: ...`, not a traceback."""
    args = parse_args(argv)
    if args.get("stage", "all") not in (*STAGES, "all"):
        refuse(f"--stage must be one of 1, 1.5, 2, all (got {args['stage']!r})")
    plan, plan_world, gpu_gib = args.pop("plan", False), args.pop("world_size", None), args.pop("gpu_memory", None)
    if plan_world is not None and not plan:
        refuse("--world-size applies to --plan only (a run's world size is torchrun's --nproc_per_node x --nnodes)")
    if gpu_gib is not None and not plan:
        refuse("--gpu-memory applies to --plan only (a run checks the memory of the GPU it runs on)")
    if plan:
        try:
            print_plans(args, 1 if plan_world is None else plan_world, 80.0 if gpu_gib is None else gpu_gib)
        except (ValueError, FileNotFoundError) as e:
            refuse(f"--plan: {e}")
        sys.exit(0)
    if not bars_wanted():  # transformers' loading bars too: a log gets lines, not redraws
        import transformers
        transformers.utils.logging.disable_progress_bar()
    t = time.time()
    try:
        if args.pop("show_settings", False):
            return show_settings(args)
        run(args)
    except (UsageError, FileNotFoundError, MissingDependency) as e:  # the user's to fix: one line, exit 2
        refuse(str(e))
    except StageStopped as e:  # a stage that could not go on: one line, exit 1
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(interrupted_line(), file=sys.stderr)
        sys.exit(130)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done in {time.time() - t:.0f}s")
    end_processes()


if __name__ == "__main__":
    main()
