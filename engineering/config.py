"""
train.py's settings: TrainConfig (every field a flag: `python train.py --help`), the recipes (the
paper's per-stage settings, a one-GPU recipe, the demo's), the family's presets applied to them, and
the checks that refuse a contradictory command line before anything is built. A reader of the method
may skip this file; a reader of an experiment should read RECIPES.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from engineering.flags import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    UsageError,
    check_ranges,
    declared_ranges,
    knob,
)
from engineering.records import is_parquet
from victor import STAGES, VARIANTS, VictorConfig

# VictorConfig fields that only stage 1.5 reads: set for a run without stage 1.5, they get a note
STAGE15_FIELDS = ("pool_size", "replace_ratio", "matcher", "recon_weight", "recon_beta", "recon_target_offset",
                  "recon_image_ratio", "stage15_attention")
# The method's stage-1.5 fields (VictorConfig), each a train.py flag: its meaning (README's step table) and range.
# Given, each goes into model_overrides; with --variant the flag wins over the preset.
METHOD_FLAGS = {
    "pool_size": ("rows of the visual token pool (step 3 gives each replaced token its own row)", AT_LEAST_1),
    "replace_ratio": ("share of each image's visual tokens replaced by pool rows (step 2); 0: none",
                      Range(0, 1, hi_open=True)),
    "matcher": ("step 3's assignment: hungarian (scipy's linear_sum_assignment, exact) | hungarian_plain (the same, "
                "without the faster exact solver) | nearest (Croc: each token its nearest row, rows may repeat)",
                None),
    "recon_weight": ("weight of the reconstruction loss against the LM loss (step 6); 0: none", NON_NEGATIVE),
    "recon_beta": ("SmoothL1's beta of the reconstruction loss (step 6)", POSITIVE),
    "recon_target_offset": ("image position i reconstructs visual token i + offset: 0 (ViCToR) | 1 (VDEP)", None),
    "recon_image_ratio": ("share of images whose positions are reconstructed (VDEP's hybrid: 0.5)",
                          Range(0, 1, lo_open=True)),
    "stage15_attention": ("causal | mixed (Croc: bidirectional over the image before the first supervised token)",
                          None),
}
METHOD_RANGES = {k: r for k, (_, r) in METHOD_FLAGS.items() if r is not None}


def add_method_flags(ap):
    """METHOD_FLAGS as --flags, typed from VictorConfig; a flag not given is absent from the parsed namespace."""
    import argparse
    declared = {f.name: f for f in dataclasses.fields(VictorConfig)}
    group = ap.add_argument_group("the method (stage 1.5; each goes into --model-overrides)")
    for name, (meaning, valid) in METHOD_FLAGS.items():
        kind = {"int": int, "float": float}.get(declared[name].type, str)
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                           metavar=declared[name].type.upper(),
                           help=f"{meaning} (default: the recipe's or --variant's; without one "
                                f"{declared[name].default!r}{'; ' + str(valid) if valid else ''})".replace("%", "%%"))


def fold_method_flags(overrides: dict):
    """The method's flags given (METHOD_FLAGS), moved into overrides' model_overrides; one given both ways
    with two values is refused."""
    given = {k: overrides.pop(k) for k in list(overrides) if k in METHOD_FLAGS}
    if not given:
        return
    check_ranges(given, METHOD_RANGES)
    model_overrides = dict(overrides.get("model_overrides", {}))
    for key, value in given.items():
        try:
            VictorConfig.from_dict({"vision_model": "-", "llm": "-", key: value}).validate()
        except ValueError as e:
            raise UsageError(f"--{key.replace('_', '-')} {value}: {e}") from None
        if key in model_overrides and model_overrides[key] != value:
            raise UsageError(f"--{key.replace('_', '-')} {value} and --model-overrides {key} "
                             f"{model_overrides[key]!r}: give one")
        model_overrides[key] = value
    overrides["model_overrides"] = model_overrides


# the demo's base models, pretrained once and committed (shapes_world/demo_base.py builds and checks them)
DEMO_BASE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes_world", "base")


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
    group_by_length: bool = knob(False, "order each global batch's records by length (LLaVA's "
                                        "group_by_modality_length): less padding, the same global batches; JSON data")
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
    overwrite: bool = knob(False, "train every stage anew; its earlier outputs are moved into OUT/previous/ when "
                                  "it starts (default: a stage that finished with the same settings is kept, an "
                                  "interrupted one resumes from its saved state; other settings are refused)")
    max_bad_steps: int = knob(5, "steps in a row with a non-finite loss or gradient that stop the run "
                                 "(each one is skipped)", AT_LEAST_1)
    out_dir: str = knob("", "where the checkpoint, metrics and reports go: with one --stage that folder itself, "
                            "else a folder per stage under it, OUT/stageS; not given: out/RECIPE/stageS")
    demo_images: int = knob(4000, "demo recipe: how many shapes training images to generate (a stage whose data "
                                  "is given records 0)", AT_LEAST_1)


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
                "2": dict(PAPER, lr=1e-5, vision_lr=2e-6, global_batch_size=128, template="vicuna_v1", fsdp=True,
                          group_by_length=True)}),
    "siglip-qwen25-7b": dict(
        model=dict(vision_model="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-7B-Instruct",
                   model_overrides=dict(pool_size=2048)),
        stages={"1": dict(PAPER, lr=1e-3, vision_lr=0.0, global_batch_size=256, batch_size=32, template="plain"),
                "1.5": dict(PAPER, lr=1e-5, vision_lr=2e-6, pool_lr=1.5e-4, global_batch_size=128, template="chat",
                            fsdp=True),
                "2": dict(PAPER, lr=1e-5, vision_lr=2e-6, global_batch_size=128, template="chat", fsdp=True,
                          group_by_length=True)}),
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
                "2": dict(PAPER, lr=2e-5, vision_lr=2e-6, global_batch_size=128, batch_size=4, template="chat",
                          group_by_length=True)}),
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


FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict | None": (dict, type(None))}


def check_model_override_types(values: dict):
    """Each --model-overrides value of its VictorConfig field's type: one line naming the field otherwise."""
    declared = {f.name: f.type for f in dataclasses.fields(VictorConfig)}
    for key, value in values.items():
        kinds = FIELD_TYPES.get(declared.get(key), ())
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise UsageError(f"--model-overrides {key}: {json.dumps(value)} is not a{'n' * (declared[key] == 'int')} "
                             f"{declared[key]} (VictorConfig.{key} = {getattr(VictorConfig, key)!r})")


def note_per_stage_values(given: dict, recipe: str, stages: list[str]):
    """Say so when one flag replaces recipe values that differ between the stages it runs."""
    recipe_stages = RECIPES.get(recipe, {}).get("stages", {})
    for key in sorted(given):
        values = {s: recipe_stages[s][key] for s in stages if key in recipe_stages.get(s, {})}
        if len(stages) > 1 and len(set(map(repr, values.values()))) > 1:
            listed = ", ".join(f"stage {s}: {v}" for s, v in values.items())
            print(f"note: --{key.replace('_', '-')} {given[key]} replaces the {recipe} recipe's per-stage "
                  f"{key} ({listed}) in every stage")


def check_command_line(overrides: dict) -> list[str]:
    """train.py's checks that need neither data nor models, before anything is built: ranges, the model
    settings, flags that contradict each other or do nothing here. Fills in --image-folder where the data
    file's folder is meant (said in a note). Returns the stages to run."""
    fold_method_flags(overrides)
    given = dict(overrides)
    check_ranges(given, RANGES)
    recipe, stage, variant = given.get("recipe", "demo"), given.get("stage", "all"), given.get("variant", "")
    check_model_override_types(given.get("model_overrides", {}))
    try:  # the model settings (placeholders for the base models)
        VictorConfig.from_dict({"vision_model": "-", "llm": "-", **variant_preset(variant),
                                **given.get("model_overrides", {})}).validate()
    except ValueError as e:
        raise UsageError(f"--model-overrides / --variant: {e}") from None
    stages = stages_to_run(stage, variant)
    check_knobs(given, recipe, stages)
    note_replaced_counts(given, recipe, stages)
    note_per_stage_values(given, recipe, stages)
    if len(stages) > 1 and given.get("data"):
        raise UsageError(f"--data with --stage {stage} would train every stage on one file; give each stage its "
                         "data, one stage at a time: --stage 1 --data CAPTIONS --out-dir OUT/stage1, then --stage "
                         "1.5 --init OUT/stage1 --data DETAILED_CAPTIONS ..., then --stage 2 --init ... --data QA")
    if given.get("data") and not given.get("image_folder") and not is_parquet(given["data"]):
        overrides["image_folder"] = os.path.dirname(os.path.abspath(given["data"]))
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: no --image-folder: the records' image paths are read relative to the data file's "
                  f"folder, {overrides['image_folder']}")
    return stages


def grad_accumulation(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per process and step: global batch = batch size x accumulation x processes."""
    if cfg.global_batch_size % (cfg.batch_size * world):
        raise UsageError(f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                         f"batch_size {cfg.batch_size} x {world} processes")
    return cfg.global_batch_size // (cfg.batch_size * world)
