"""
A stage's batches, and the data it cannot use accounted for: the loader (one sampler for 1 or many
processes), the validation pass's bad records, then the batches epoch after epoch with every sample the
dataset passes over (a corrupt image, a sample too long) counted, listed by id and reason, and reported
at the end; a process with no usable sample left stops every process together. A reader of the method
may skip this file; train.py's loop calls next(batches).

    python train.py --data recap.json --image-folder imgs/ ...   # OUT/bad_records.json, OUT/skipped.json
    python train.py ... --strict                                 # the first bad record is an error
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engineering import records as RC
from engineering.distributed import ResumableSampler, all_reduce_sum
from engineering.flags import StageStopped, UsageError

if TYPE_CHECKING:
    from engineering.config import TrainConfig


def skip_kind(why: str) -> str:
    """A skip reason without its particulars (the path after ': ', the numbers), so that like reasons count
    together: 'image not found: /x/1.png' -> 'image not found'."""
    why = re.sub(r": [^()]*\)", ")", why)  # "(only a path: /x/1.png)" -> "(only a path)"
    return re.sub(r"(?<!max_length=)\b\d+", "N", why.split(": ")[0])


def skip_kinds(skipped: list[tuple[str, str]]) -> Counter:
    """How many skipped records per kind of reason."""
    return Counter(skip_kind(why) for _, why in skipped)


def top_reasons(skipped: list[tuple[str, str]], k: int = 3) -> str:
    """'5 x image not found, 2 x image unreadable': the k commonest kinds of reason."""
    return ", ".join(f"{n} x {kind}" for kind, n in skip_kinds(skipped).most_common(k))


def skip_report(skipped: list[tuple[str, str]]) -> str:
    """A short human-readable summary of skipped records: count per reason, and some ids."""
    if not skipped:
        return "skipped records: none"
    lines = [f"skipped records: {len(skipped)}"]
    lines += [f"  {n:6d} x {why}" for why, n in skip_kinds(skipped).most_common()]
    lines += [f"  e.g. {rid}: {why}" for rid, why in skipped[:5]]
    return "\n".join(lines)


def selection_seeds(image_keys, seed: int, epoch: int) -> list[int]:
    """Stage 1.5's random choice of tokens (step 2) per image, from (seed, epoch, record, k) alone:
    1 or N processes, any batch size, and a resumed run all replace the same tokens."""
    return [((seed * 1_000_003 + epoch) * 1_000_000_007 + index) * 1009 + k for index, k in image_keys]


_READ = {}  # (data, image_folder, strict) -> (records, bad): read once, by the checks before a run and its stage


def read_data(cfg: TrainConfig) -> tuple[RC.RecordStore | RC.ParquetRecordStore, list[tuple[str, str]]]:
    """--data read and checked (the validation pass), with one line (UsageError) when it cannot be used: no
    such file, not JSON / JSONL, no records, no usable record (the commonest reasons and the first one
    named), --strict and a bad record. Writes nothing: the checks before a run call it first."""
    key = (cfg.data, cfg.image_folder, cfg.strict)
    if key in _READ:
        return _READ[key]
    if not cfg.data or not (os.path.isfile(cfg.data) or RC.is_parquet(cfg.data)):  # parquet_files names a miss
        raise UsageError(f"stage {cfg.stage}: data file {cfg.data!r} not found (--data)")
    try:
        records, bad = RC.load_data(cfg.data, strict=cfg.strict, image_folder=cfg.image_folder)
    except ValueError as e:  # not JSON at all, or --strict and bad records: the first five named, on one line
        first, *listed = str(e).splitlines()
        named = "; ".join(line.strip() for line in listed[:5]) + (" ..." if len(listed) > 5 else "")
        raise UsageError(f"{first} {named}".strip() +
                         f"{'; without --strict bad records are skipped and listed' if cfg.strict else ''}"
                         ) from None
    if not records and not bad:
        raise UsageError(f"{cfg.data}: the file has no records")
    if not records and all(why.startswith(("invalid JSON", "invalid UTF-8")) for _, why in bad):
        raise UsageError(f"{cfg.data}: not a JSON list nor JSONL ({bad[0][0]}: {bad[0][1]})")
    if not records:
        raise UsageError(f"{cfg.data}: no usable record: all {len(bad)} are bad ({top_reasons(bad)}; e.g. "
                         f"{bad[0][0]}: {bad[0][1]})" + (" (--image-folder)" if bad[0][1].startswith(
                             "image not found") else ""))
    _READ.clear()  # one data set held at a time
    _READ[key] = records, bad
    return records, bad


def validate_data(cfg: TrainConfig, master: bool) -> tuple[RC.RecordStore | RC.ParquetRecordStore,
                                                           list[tuple[str, str]]]:
    """The validation pass, before any training (read_data): every structurally bad record (and every record
    whose image file is missing) is reported with its position and reason, and written to
    out_dir/bad_records.json; more than WARN_SKIP_RATE of them is a warning. Every process reads and checks
    the file itself (sending rank 0's records would pickle the whole dataset once per process); rank 0
    reports."""
    records, bad = read_data(cfg)
    if dist.is_initialized():  # the samplers split the same records only if every process found the same
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, (len(records), len(bad)))
        if len(set(counts)) > 1:
            raise RuntimeError(f"{cfg.data}: the processes found different (good, bad) record counts "
                               f"{counts}: did the file or the image folder change while they read it?")
    if master:
        if bad:
            print(f"{cfg.data}: {len(bad)} bad records will be skipped (all listed in "
                  f"{os.path.join(cfg.out_dir, 'bad_records.json')}):")
            for where, why in bad[:20]:
                print(f"  {where}: {why}")
            if len(bad) > 20:
                print(f"  ... and {len(bad) - 20} more")
        if len(bad) > WARN_SKIP_RATE * (len(records) + len(bad)):
            print(f"warning: {100 * len(bad) / (len(records) + len(bad)):.0f} % of the records are bad ({len(bad)} "
                  f"of {len(records) + len(bad)}): {top_reasons(bad)}")
        write_json(os.path.join(cfg.out_dir, "bad_records.json"), [{"record": w, "reason": why} for w, why in bad])
    return records, bad


def write_json(path: str, value):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


# Skipped samples (unusable at load time: a corrupt image, too long, ...). A process stops when one full pass
# over its share of the data, or its first STOP_AFTER_SKIPS samples, gave no usable sample; more than
# WARN_SKIP_RATE of the samples tried skipped is a warning, once WARN_AFTER_SAMPLES were tried (or a pass).
STOP_AFTER_SKIPS = 1000


WARN_SKIP_RATE = 0.05


WARN_AFTER_SAMPLES = 100


class Batches:
    """The stage's batches, epoch after epoch, from where progress says (a resumed run). A sample the
    dataset cannot use is passed over and counted (under --strict: an error): each record once by id and
    reason, a record skipped again after the data wrapped around as a repeat. A sample cut to max_length is
    counted too. Each batch gets stage 1.5's selection seeds for its images. When this process has no usable
    sample (a full pass, or its first STOP_AFTER_SKIPS samples, all skipped) it returns None and says why in
    out_of_data: the loop then stops every process (stop_if_out_of_data)."""

    def __init__(self, loader, sampler: ResumableSampler, progress: dict, cfg: TrainConfig, rank: int = 0,
                 world: int = 1, device: torch.device | None = None, bad_records: list | None = None):
        self.loader, self.sampler, self.progress, self.cfg = loader, sampler, progress, cfg
        self.rank, self.world, self.device = rank, world, device or torch.device("cpu")
        self.bad_records = bad_records or []  # the validation pass's, listed with the skipped ones at the end
        self.skipped = [tuple(x) for x in progress["skipped"]]  # (id, reason), each record once
        self.truncated = [tuple(x) for x in progress.get("truncated", [])]  # (id, tokens cut), each record once
        self.seen_skips, self.seen_cuts = set(self.skipped), {rid for rid, _ in self.truncated}
        # samples tried and skipped, repeats included (the skip rate); the skips of records already listed
        self.tried, self.tried_skipped = progress.get("tried", 0), progress.get("tried_skipped", 0)
        self.skip_repeats = progress.get("skip_repeats", 0)
        self.tried_here = self.usable_here = 0  # in this process's run (since it started or resumed)
        self.usable_in_epoch, self.whole_epoch = 0, False
        self.out_of_data, self.warned = "", False
        sampler.start = progress["batches_in_epoch"] * cfg.batch_size
        self.epoch_batches = None

    def __next__(self) -> dict | None:
        while not self.out_of_data:
            if self.epoch_batches is None:
                self.whole_epoch, self.usable_in_epoch = self.sampler.start == 0, 0  # (not a resumed epoch's rest)
                self.sampler.set_epoch(self.progress["epoch"])
                self.epoch_batches = iter(self.loader)
            b = next(self.epoch_batches, None)
            if b is None:  # the epoch is over
                if self.whole_epoch and self.usable_in_epoch == 0:
                    self.out_of_data = "no usable sample in one full pass over the data"
                    break
                self.progress.update(epoch=self.progress["epoch"] + 1, batches_in_epoch=0)
                self.epoch_batches = None
                continue
            self.progress["batches_in_epoch"] += 1
            if self.cfg.strict and b["skipped"]:
                rid, why = b["skipped"][0]
                raise UsageError(f"{self.cfg.data}: record {rid}: {why} (strict: not skipping it; without "
                                 f"--strict it is skipped, counted and listed in skipped.json)")
            self.count(b)
            if "input_ids" in b:  # an all-skipped batch is simply passed over
                b["seeds"] = selection_seeds(b["image_keys"], self.cfg.seed, self.progress["epoch"])
                return b
            if self.usable_here == 0 and self.tried_here >= STOP_AFTER_SKIPS:
                self.out_of_data = f"the first {self.tried_here} samples tried were all skipped"
        return None

    def count(self, b: dict):
        """A batch's samples: tried, skipped (each record listed once, repeats counted), cut."""
        usable = len(b["ids"])
        self.tried += usable + len(b["skipped"])
        self.tried_skipped += len(b["skipped"])
        self.tried_here += usable + len(b["skipped"])
        self.usable_here += usable
        self.usable_in_epoch += usable
        for skip in b["skipped"]:
            if skip in self.seen_skips:
                self.skip_repeats += 1
            else:
                self.seen_skips.add(skip)
                self.skipped.append(skip)
        for rid, cut in b["truncated"]:
            if rid not in self.seen_cuts:
                self.seen_cuts.add(rid)
                self.truncated.append((rid, cut))

    def high_skip_rate(self) -> str:
        """A warning, once, when more than WARN_SKIP_RATE of the samples tried were skipped ('' otherwise)."""
        enough = min(WARN_AFTER_SAMPLES, len(self.loader) * self.cfg.batch_size)
        if self.warned or self.tried < enough or self.tried_skipped <= WARN_SKIP_RATE * self.tried:
            return ""
        self.warned = True
        return "warning: " + skip_rate_summary(self.tried, self.tried_skipped, self.skipped, "so far, this process")

    def state(self, step: int) -> dict:
        """The progress to save with a training state after this step."""
        return {**self.progress, "step": step, "skipped": self.skipped, "truncated": self.truncated,
                "tried": self.tried, "tried_skipped": self.tried_skipped, "skip_repeats": self.skip_repeats}

    def gathered_counts(self) -> dict:
        """Every process's skipped and truncated records and sample counts, together (a collective)."""
        mine = dict(skipped=self.skipped, truncated=self.truncated, tried=self.tried, tried_skipped=self.tried_skipped,
                    skip_repeats=self.skip_repeats,
                    out_of_data=[f"process {self.rank}: {self.out_of_data}"] * bool(self.out_of_data))
        if self.world == 1:
            return mine
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        return {key: sum((p[key] for p in parts), type(mine[key])()) for key in mine}

    def write_skipped(self, skipped: list) -> list:
        """skipped.json: the validation pass's bad records and the samples skipped at load time (master only)."""
        all_skipped = [(rid, why) for rid, why in self.bad_records] + skipped
        write_json(os.path.join(self.cfg.out_dir, "skipped.json"),
                   [{"id": rid, "reason": why} for rid, why in all_skipped])
        return all_skipped

    def stop_if_out_of_data(self, stage: str):
        """Stop every process together, with the counts and the top reasons, when one has no usable sample
        left (out_of_data): a process that stopped alone would leave the others waiting in a collective."""
        if all_reduce_sum(1.0 if self.out_of_data else 0.0, self.device) == 0:
            return
        counts = self.gathered_counts()
        if self.rank == 0:
            self.write_skipped(counts["skipped"])
        why = counts["out_of_data"][0].split(": ", 1)[1] if self.world == 1 else "; ".join(counts["out_of_data"])
        raise StageStopped(f"stage {stage}: stopped, {why}: {counts['tried']} samples tried, "
                           f"{counts['tried_skipped']} skipped ({len(counts['skipped'])} records: "
                           f"{top_reasons(counts['skipped'])}); every skipped record is listed in "
                           f"{os.path.join(self.cfg.out_dir, 'skipped.json')}")

    def report_unused(self) -> tuple[list, list]:
        """The end of a stage: every process's skipped and truncated records together (a collective); rank 0
        prints the report and writes skipped.json and truncated.json. Returns (every skipped, every truncated)."""
        counts = self.gathered_counts()
        skipped, truncated = counts["skipped"], counts["truncated"]
        if self.rank != 0:
            return skipped, truncated
        all_skipped = self.write_skipped(skipped)
        print(skip_report(all_skipped))
        if counts["skip_repeats"]:
            print(f"  (each record counted once; {counts['skip_repeats']} more skips of records already listed, "
                  f"after the data wrapped around)")
        if counts["tried_skipped"] > WARN_SKIP_RATE * counts["tried"]:
            print("warning: " + skip_rate_summary(counts["tried"], counts["tried_skipped"], skipped, "every process"))
        if truncated:  # kept, but cut to max_length (never through image tokens): said, not silent
            print(f"truncated to max_length={self.cfg.max_length}: {len(truncated)} samples, "
                  f"{sum(n for _, n in truncated)} tokens cut (listed in truncated.json)")
        write_json(os.path.join(self.cfg.out_dir, "truncated.json"),
                   [{"id": rid, "tokens_cut": n} for rid, n in truncated])
        return all_skipped, truncated


def skip_rate_summary(tried: int, tried_skipped: int, skipped: list, where: str) -> str:
    """'21 % of the samples tried were skipped (5 of 24, ...): the top reasons' (the report's words)."""
    return (f"{100 * tried_skipped / max(tried, 1):.0f} % of the samples tried were skipped ({tried_skipped} of "
            f"{tried}, {where}): {top_reasons(skipped)}")


