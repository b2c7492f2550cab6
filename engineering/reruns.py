"""
The rerun rule: the same train.py command again continues. A stage that finished with the same settings
is kept, an interrupted one resumes from its last saved state (--save-every), anything else starts anew,
its earlier outputs removed first (never anything else in the folder). A reader of the method may skip
this file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import TYPE_CHECKING

from engineering.distributed import barrier, latest_training_state

if TYPE_CHECKING:
    from engineering.config import TrainConfig


STAGE_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "metrics.jsonl", "bad_records.json",
               "skipped.json", "truncated.json", "chat_template.jinja", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "curves.png")
STAGE_DIRS = ("snapshots", "checkpoints", "tensorboard")
# settings that do not change what a stage computes: a finished stage is kept whatever they are
NOT_RESULT_SETTINGS = ("resume", "save_every", "report_to", "log_every", "overwrite", "num_workers")


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


def remove_later_stages(out_root: str, stage: str, later: list[str]):
    """--stage all, a stage trained anew: the later stages' outputs from an earlier run are stale (rank 0)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    for s in later:
        gone = remove_stage_outputs(os.path.join(out_root, f"stage{s}"))
        if gone:
            print(f"stage {s}: removed the earlier run's {', '.join(gone[:6])}{' ...' if len(gone) > 6 else ''} "
                  f"(stage {stage} is trained anew)")
