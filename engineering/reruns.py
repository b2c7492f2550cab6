"""
The rerun rule (README, "Nothing you trained is lost"): the same train.py command again continues, and
nothing a user trained is removed unless they ask (--overwrite).

  * A stage that finished with the same settings is kept; one interrupted after a saved state
    (--save-every) resumes from it; an out-dir with nothing trained in it is (re)started.
  * A command whose settings differ from a finished or interrupted stage's record is refused, naming each
    differing setting with both values. A resume continues the same run: only NOT_RESULT_SETTINGS may
    change.
  * --overwrite trains anew, and moves the earlier outputs aside into OUT/previous/ (one generation kept)
    when the stage starts, after every check has passed.

check_before_training checks every input and plan_stage decides, before anything on disk is touched;
start_anew acts. A reader of the method may skip this file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import TYPE_CHECKING

import data as D
from engineering.batches import read_data
from engineering.checkpoints import check_init, has_chat_template, is_hub_name
from engineering.config import grad_accumulation
from engineering.distributed import barrier, latest_training_state, setup_distributed
from engineering.flags import UsageError
from engineering.memory_plan import check_memory_fits
from engineering.records import is_parquet

if TYPE_CHECKING:
    from engineering.config import TrainConfig


STAGE_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "metrics.jsonl", "bad_records.json",
               "skipped.json", "truncated.json", "chat_template.jinja", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "curves.png")
STAGE_DIRS = ("snapshots", "checkpoints", "tensorboard")
TRAINED = ("model.safetensors", "model.safetensors.index.json", "checkpoints", "snapshots")  # a model's weights
PREVIOUS = "previous"  # OUT/previous: the outputs --overwrite moved aside
# settings that do not change what a stage computes: they may differ for a kept stage and for a resume. out_dir: a
# run moved to another folder is the same run; batch_size, fsdp, gradient_checkpointing: how the same global batch
# is computed (1 or N processes, any accumulation: the same loss and gradient, tests/test_reliability.py)
NOT_RESULT_SETTINGS = ("resume", "save_every", "report_to", "log_every", "overwrite", "num_workers", "out_dir",
                       "batch_size", "fsdp", "gradient_checkpointing")
PATH_SETTINGS = ("out_dir", "data", "image_folder", "init", "vision_model", "llm")  # compared as real paths


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


def state_settings(state: str) -> dict | None:
    """The settings a saved training state was made with (its settings.json); None if not recorded."""
    try:
        with open(os.path.join(state, "settings.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def command_settings(cfg: TrainConfig, stage: str) -> dict:
    return {**dataclasses.asdict(cfg), "stage": stage}


def _comparable(key: str, value):
    if key in PATH_SETTINGS and isinstance(value, str) and value:
        return os.path.realpath(value) if os.path.exists(value) or key == "out_dir" else value
    return json.loads(json.dumps(value))  # tuples as lists, as a JSON record holds them


def differing_settings(recorded: dict, now: dict) -> list[tuple[str, object, object]]:
    """(name, recorded value, this command's value) for each setting that changes what the stage computes."""
    keys = sorted((set(recorded) | set(now)) - set(NOT_RESULT_SETTINGS))
    if not (recorded.get("demo_images") and now.get("demo_images")):  # data given (0): its path tells
        keys = [k for k in keys if k != "demo_images"]
    return [(k, recorded.get(k), now.get(k)) for k in keys
            if _comparable(k, recorded.get(k)) != _comparable(k, now.get(k))]


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value) if value == "" else str(value)


def settings_refusal(where: str, diffs: list[tuple[str, object, object]], what: str) -> str:
    """'stage 2 in out/V was trained with lr 0.0005; this command gives 0.0001: ...' (what: the advice)."""
    then = ", ".join(f"{k} {_shown(a)}" for k, a, _ in diffs)
    now = ", ".join(f"{k} {_shown(b)}" for k, _, b in diffs) if len(diffs) > 1 else _shown(diffs[0][2])
    return f"{where} with {then}; this command gives {now}: {what}"


def holds_trained(out_dir: str) -> list[str]:
    """The names in out_dir that hold trained weights (a model, saved states, snapshots)."""
    return [n for n in TRAINED if os.path.exists(os.path.join(out_dir, n))]


def plan_stage(cfg: TrainConfig, stage: str, overwrite: bool, earlier_trained_now: bool) -> str:
    """What to do with this stage's out-dir, decided before anything is touched: 'keep', 'resume' or 'new'
    (UsageError when the rule refuses the command). earlier_trained_now: a stage before this one in the
    command trains now, so an earlier run's model here was made from another starting point."""
    out, now = cfg.out_dir, command_settings(cfg, stage)
    anew = f"add --overwrite to train it anew (the earlier outputs are moved to {os.path.join(out, PREVIOUS)}), " \
           f"or choose another --out-dir"
    if overwrite:
        return "new"
    done = finished_settings(out)
    if done is not None:
        if earlier_trained_now:
            raise UsageError(f"stage {stage} in {out} was trained from the stage before it, which this command "
                             f"trains again: {anew}")
        diffs = differing_settings(done, now)
        if diffs:
            raise UsageError(settings_refusal(f"stage {stage} in {out} was trained", diffs, anew))
        return "keep"
    saved = latest_training_state(os.path.join(out, "checkpoints"))
    state = cfg.resume if cfg.resume and cfg.resume != "auto" else saved
    if state:
        if earlier_trained_now:
            raise UsageError(f"stage {stage} in {out} holds a saved state trained from the stage before it, which "
                             f"this command trains again: {anew}")
        recorded = state_settings(state)
        if recorded is None:
            raise UsageError(f"stage {stage}: the saved state {state} does not record its settings, so a resume "
                             f"cannot be checked to continue the same run: {anew}")
        diffs = differing_settings(recorded, now)
        if diffs:
            raise UsageError(settings_refusal(f"stage {stage} in {out} was interrupted (saved state {state}), "
                                              "trained", diffs, "a resume continues the same run: give the same "
                                              f"settings to resume it, or {anew}"))
        cfg.resume = state  # start_stage resumes from it and says so
        return "resume"
    trained = holds_trained(out)
    if trained:
        raise UsageError(f"stage {stage} in {out} holds an unfinished run with no state to resume from "
                         f"({', '.join(trained)}): {anew}")
    return "new"


def check_before_training(cfgs: list[TrainConfig], demo_records: dict | None) -> list[str]:
    """Every input of every stage train.py runs (cfgs), then what the rerun rule does with each out-dir:
    'keep', 'resume' or 'new'. All of it before anything on disk is touched: a mistake is one line
    (UsageError). demo_records: the demo data's records per image and stage, when it is to be generated."""
    rank, world, device = setup_distributed()
    for i, cfg in enumerate(cfgs):
        if cfg.group_by_length and is_parquet(cfg.data):
            raise UsageError(f"--group-by-length (stage {cfg.stage}) needs JSON / JSONL data: parquet shards would be "
                             f"read whole for the lengths; add --no-group-by-length")
        if cfg.template not in D.TEMPLATE_NAMES:
            raise UsageError(f"--template {cfg.template!r}: choose from {' | '.join(D.TEMPLATE_NAMES)}")
        tokenizer_dir = cfg.init if i == 0 else cfgs[0].init or cfgs[0].llm
        if cfg.template == "chat" and os.path.isdir(tokenizer_dir) and not has_chat_template(tokenizer_dir):
            raise UsageError(f"--template chat: the tokenizer in {tokenizer_dir} has no chat template; choose "
                             f"plain, vicuna_v1 or chatml")
        grad_accumulation(cfg, world)
        check_memory_fits(cfg, cfg.stage, world, device)
        if i == 0 and cfg.init:
            check_init(cfg.init, cfg.model_overrides)
        for key in ("vision_model", "llm"):
            if not cfg.init and not os.path.isdir(getattr(cfg, key)) and not is_hub_name(getattr(cfg, key)):
                raise UsageError(f"--{key.replace('_', '-')} {getattr(cfg, key)!r}: no such directory (nor a "
                                 f"hub name, org/name)")
        if demo_records:
            per_image = demo_records[cfg.stage]
            if cfg.demo_images * per_image < cfg.global_batch_size:
                raise UsageError(f"--demo-images {cfg.demo_images}: stage {cfg.stage}'s global batch is "
                                 f"{cfg.global_batch_size} samples ({per_image} per image), so at least "
                                 f"{math.ceil(cfg.global_batch_size / per_image)} images are needed")
        else:
            records, _ = read_data(cfg)
            if len(records) < cfg.global_batch_size:
                raise UsageError(f"{cfg.data}: {len(records)} usable records are fewer than one global batch "
                                 f"({cfg.global_batch_size})")
    actions, earlier_trained_now = [], False
    for cfg in cfgs:
        actions.append(plan_stage(cfg, cfg.stage, cfg.overwrite, earlier_trained_now))
        earlier_trained_now = earlier_trained_now or actions[-1] != "keep"
    return actions


def check_resume(cfg: TrainConfig, stage: str, state: str):
    """A resume continues the same run: refused (UsageError) when a setting that changes what is computed
    differs from the saved state's. For train_stage called directly, as run() checks before it starts."""
    recorded = state_settings(state)
    diffs = differing_settings(recorded, command_settings(cfg, stage)) if recorded is not None else []
    if recorded is None or diffs:
        why = (settings_refusal(f"stage {stage}: the saved state {state} was trained", diffs,
                                "a resume continues the same run: give the same settings")
               if diffs else f"stage {stage}: the saved state {state} does not record its settings")
        raise UsageError(why)


def stage_outputs(out_dir: str) -> list[str]:
    """An earlier run's outputs in out_dir (STAGE_FILES, STAGE_DIRS, its evaluations and pictures)."""
    if not os.path.isdir(out_dir):
        return []
    return [n for n in sorted(os.listdir(out_dir)) if n in STAGE_FILES or n in STAGE_DIRS or
            (n.startswith("eval") and n.endswith(".json")) or (n.startswith("pool_") and n.endswith(".png"))]


def start_anew(out_dir: str, stage: str):
    """Clear out_dir for a stage trained anew, destroying nothing trained: an earlier run's outputs are moved
    into out_dir/previous/ (the generation before is dropped) when they hold a model; logs of a run that
    trained nothing are removed. Rank 0 says what it did in one line."""
    master = int(os.environ.get("RANK", 0)) == 0
    barrier()  # every process has read the out-dir before rank 0 changes it
    names = stage_outputs(out_dir) if master else []
    if names and holds_trained(out_dir):
        previous = os.path.join(out_dir, PREVIOUS)
        dropped = os.path.isdir(previous)
        shutil.rmtree(previous, ignore_errors=True)
        os.makedirs(previous)
        for name in names:
            os.replace(os.path.join(out_dir, name), os.path.join(previous, name))
        print(f"stage {stage}: the earlier run's outputs in {out_dir} were moved to {previous} "
              f"({', '.join(names[:6])}{' ...' if len(names) > 6 else ''})" +
              ("; the outputs moved there before were dropped" if dropped else ""))
    elif names:
        for name in names:
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    barrier()
