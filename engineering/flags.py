"""
Command-line plumbing shared by train.py and eval.py: each numeric setting's valid range declared once
beside the setting (Range), the check that names the flag and its range in one line, and the flags
generated from a config dataclass. A reader of the method may skip this file.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Range:
    """A numeric setting's valid values, declared once beside the setting (train.TrainConfig's fields,
    eval.py's flags) and checked from the declaration: lo and hi (None: unbounded), each inclusive unless
    open. NaN is in no range."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def out_of_range(values: dict, ranges: dict[str, Range]) -> str:
    """'--flag value: must be RANGE' for the first value outside its declared range ('' if none)."""
    for name, value in values.items():
        if name in ranges and value not in ranges[name]:
            return f"--{name.replace('_', '-')} {value!r}: must be {ranges[name]}"
    return ""


def check_ranges(given: dict, ranges: dict[str, Range]):
    """Every numeric flag given within the range its field declares, before anything is built: one line
    (UsageError) naming the flag and its range."""
    problem = out_of_range(given, ranges)
    if problem:
        raise UsageError(problem)


class UsageError(ValueError):
    """A mistake in the command line, the recipe's settings or the data: train.py prints it as one line."""


# the usual ranges of a config field
POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)


def knob(default, help: str, valid: Range | None = None):
    """A config dataclass field (train.TrainConfig's): its default, its --help text and, for a number, its
    valid range."""
    meta = {"help": help, "range": valid}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def declared_ranges(config_class) -> dict[str, Range]:
    """The ranges a config dataclass's fields declare (knob's valid), by field name."""
    return {f.name: f.metadata["range"] for f in dataclasses.fields(config_class) if f.metadata.get("range")}


def json_object(text: str) -> dict:
    """A dict flag's value: a JSON object, or one line that says so with an example."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; quote the keys, e.g. '{{\"pool_size\": 4}}'")
    return value


def add_config_flags(ap: argparse.ArgumentParser, config_class, recipe_fields: set = frozenset()):
    """Every field of a config dataclass (declared with knob) as a --flag; a flag not given is absent from
    the parsed namespace, so that only the flags given override a recipe. recipe_fields: the fields a recipe
    sets per stage, whose help says so rather than show a default that the recipe replaces."""
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        valid = f"; {f.metadata['range']}" if f.metadata["range"] else ""
        default = (f"default: the recipe's, per stage (--show-settings); without one {f.default!r}"
                   if f.name in recipe_fields else f"default {f.default!r}")
        help_text = f"{f.metadata['help']} ({default}{valid})".replace("%", "%%")
        if f.type in ("bool", "bool | None"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.type == "dict":
            ap.add_argument(flag, type=json_object, default=argparse.SUPPRESS, metavar="JSON",
                            help=f"{f.metadata['help']} (default {{}})")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            ap.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text,
                            metavar=f.type.upper() if kind is not str else "TEXT")


class StageStopped(RuntimeError):
    """A stage that cannot go on (no usable data, non-finite losses): train.py prints it as one line."""


class MissingDependency(ImportError):
    """An optional package that a flag asks for is not installed."""


def import_optional(module: str, package: str, flag: str):
    """An optional package a flag asks for (--report-to wandb), imported now; MissingDependency if absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{flag} needs the {package} package, which is not installed: "
                                f"pip install {package}") from None


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def parse_steps(text: str) -> set[int]:
    """'250,500' -> {250, 500} (--snapshot-steps)."""
    try:
        steps = {int(x) for x in text.replace(" ", "").split(",") if x}
    except ValueError:
        raise UsageError(f"--snapshot-steps: comma-separated step numbers, got {text!r}") from None
    if any(k <= 0 for k in steps):
        raise UsageError(f"--snapshot-steps: steps must be positive, got {text!r}")
    return steps
