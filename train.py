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
import importlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
from demo_base import DEMO_LLM, DEMO_POSITION_SCALE, DEMO_VISION, build_demo_base, demo_base_configs  # noqa: F401
from victor import (
    IGNORE_INDEX,
    STAGES,
    Range,
    VictorConfig,
    VictorModel,
    config_with_overrides,
    load_checkpoint,
    out_of_range,
    read_config_json,
    save_checkpoint,
)


class UsageError(ValueError):
    """A mistake in the command line, the recipe's settings or the data: train.py prints it as one line."""


# Numeric settings' valid ranges (victor.Range): declared with each field below, checked by check_ranges
POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)


def knob(default, help: str, valid: Range | None = None):
    """A TrainConfig field: its default, its --help text and, for a number, its valid range."""
    meta = {"help": help, "range": valid}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


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
    max_bad_steps: int = knob(5, "steps in a row with a non-finite loss or gradient that stop the run "
                                 "(each one is skipped)", AT_LEAST_1)
    out_dir: str = knob("out/demo", "where the checkpoint, metrics and reports go (--stage all: a folder "
                                    "per stage under it)")
    demo_images: int = knob(4000, "demo recipe: how many shapes training images to generate", AT_LEAST_1)


RANGES = {f.name: f.metadata["range"] for f in dataclasses.fields(TrainConfig) if f.metadata["range"]}


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
    # tiny models on the shapes data (demo_base.py: a tower and an LLM pretrained in-project): all three
    # stages in a few CPU minutes. Chosen from the base models and the no-stage-1.5 (llava) arm alone, on
    # a development copy of the world (README, "The demo and its data"): stage 1 until its loss flattens,
    # stage 2 until llava's test curve flattens (1500 steps), stage 1.5 at stage 2's learning rate as in the
    # paper (pool lr 15x, the paper's 1.5e-4 / 1e-5). The tower stays frozen (vision_lr 0).
    "demo": dict(
        model=dict(model_overrides=dict(pool_size=128)),
        stages={"1": dict(lr=1e-3, vision_lr=0.0, max_steps=200, warmup_steps=10, global_batch_size=32,
                          batch_size=32, template="plain", max_length=256, num_workers=0),
                "1.5": dict(lr=5e-4, vision_lr=0.0, pool_lr=7.5e-3, max_steps=200, warmup_steps=20, adam_beta2=0.95,
                            global_batch_size=8, batch_size=8, max_length=256, num_workers=0),
                "2": dict(lr=5e-4, vision_lr=0.0, max_steps=1500, warmup_steps=30, adam_beta2=0.95,
                          global_batch_size=16, batch_size=16, max_length=256, num_workers=0)}),
}
# The paper recipes' base models, by name: their architecture as in each model's published config.json
# on the Hugging Face hub (for CLIP and SigLIP its vision_config), so that --plan works offline.
# Vicuna-7B v1.5 is LLaMA-7B's architecture. Training itself loads the models (and their configs).
PAPER_MODELS = {
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
        layer_norm_eps=1e-5),
    "google/siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "lmsys/vicuna-7b-v1.5": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0),
    # the one-GPU recipe's: google/siglip-base-patch16-224's config.json leaves its vision_config at
    # SiglipVisionConfig's defaults, which are these values (ViT-B/16 at 224 px)
    "google/siglip-base-patch16-224": dict(
        model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    # Qwen/Qwen2.5-0.5B-Instruct's config.json (its embeddings and LM head are tied)
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151645),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151645),
}


# The family as presets of VictorConfig's stage-1.5 fields (README, "The family"). --model-overrides
# still sets any field on its own, and wins over the preset.
VARIANTS = {
    # ViCToR: 75 % of the visual tokens replaced by Hungarian-matched pool rows, causal attention,
    # every image position reconstructs its own token
    "victor": dict(replace_ratio=0.75, matcher="hungarian", stage15_attention="causal", recon_weight=10.0,
                   recon_target_offset=0, recon_image_ratio=1.0),
    # Croc, ViCToR's first version: each replaced token takes its nearest pool row (rows may repeat),
    # and the prefix (system, image, prompt) attends bidirectionally in stage 1.5
    "croc": dict(replace_ratio=0.75, matcher="nearest", stage15_attention="mixed", recon_weight=10.0,
                 recon_target_offset=0, recon_image_ratio=1.0),
    # VDEP (arXiv 2502.09093): nothing replaced; the hidden state at image position i reconstructs the
    # projector's (current) output for token i + 1, on half the images; the other half are ordinary
    # text-supervised samples. Offset 1 because in a causal LLM with nothing replaced, position i's own
    # input reaches its hidden state through the residual stream, so reconstructing it tests little;
    # recon_target_offset=0 is the other reading. α = recon_weight, ViCToR's 10, so that the arms differ
    # only in what defines them (the paper tunes α).
    "vdep": dict(replace_ratio=0.0, stage15_attention="causal", recon_weight=10.0, recon_target_offset=1,
                 recon_image_ratio=0.5),
    # the control: stage 1.5 on the same captions with the LM loss alone (no pool, no reconstruction)
    "captions": dict(replace_ratio=0.0, stage15_attention="causal", recon_weight=0.0),
    # LLaVA-1.5: no stage 1.5 at all, and the projector's output fed to the LLM as it is (no L2
    # normalisation), so that it exports to llava-hf (eval.py --export-llava-hf)
    "llava": dict(normalize_visual_tokens=False),
}
# VictorConfig fields that only stage 1.5 reads: set for a run without stage 1.5, they get a note (check_knobs)
STAGE15_FIELDS = ("pool_size", "replace_ratio", "matcher", "recon_weight", "recon_beta", "recon_target_offset",
                  "recon_image_ratio", "stage15_attention")
CROC_LR = 2e-5  # Croc's learning rate in stages 1.5 and 2 (the paper recipes; ViCToR's is 1e-5)


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
        store, restart = None, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # a group restarted by torchrun --max-restarts: torchrun keeps its store, and the keys the
            # dead group left in it would send the new group's connections to dead processes
            store = dist.PrefixStore(f"victor/restart-{restart}/", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank if store else -1, world_size=world if store else -1)
    return rank, world, device


def uses_fsdp(cfg: TrainConfig, world: int) -> bool:
    """--fsdp shards over the processes; with one process there is nothing to shard."""
    return cfg.fsdp and world > 1


def computes_in_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 (autocast, or FSDP's bf16 parameters) where --bf16 says so, on any device; without the flag on
    CUDA only, so a CPU run (the demo, the tests) trains in float32 unless told otherwise."""
    return cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"


def all_reduce_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


# -----------------------------------------------------------------------------
# What each stage trains (README's stage table)


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


# -----------------------------------------------------------------------------
# The memory plan: what each GPU will hold, from the model configs alone (--plan). A run on CUDA
# whose plan cannot fit its GPU is refused before anything is loaded (check_memory_fits).


PLAN_PARTS = ("projector", "llm", "vision_tower", "token_pool", "recon_head")  # VictorModel's parts
GIB = 2 ** 30


def base_model_config(name: str, vision: bool, offline: bool) -> dict:
    """A base model's architecture as a config dict, by name: PAPER_MODELS, a local directory, or the
    Hugging Face cache (offline) / hub. No weights are read."""
    if name in PAPER_MODELS:
        return dict(PAPER_MODELS[name])
    from transformers import AutoConfig
    try:
        conf = AutoConfig.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError):
        if not offline:
            raise
        raise UsageError(f"no architecture for {name!r} offline: not in train.PAPER_MODELS, not a local "
                         f"directory, not in the Hugging Face cache") from None
    return (getattr(conf, "vision_config", conf) if vision else conf).to_dict()


def planned_model_settings(cfg: TrainConfig, offline: bool) -> VictorConfig:
    """The VictorConfig this run would build (from --init's config.json, or the base models and
    --model-overrides), with both base models as config dicts: nothing to download or load."""
    if cfg.init:
        import victor as V
        meta = V.read_config_json(cfg.init)
        if V.checkpoint_format(meta, cfg.init) == "victor":
            vcfg = config_with_overrides(VictorConfig.from_dict({**meta["victor"], "projector_path": ""}),
                                         cfg.model_overrides, meta.get("saved_parts") == "projector", cfg.init)
        else:  # LLaVA's or llava-hf's directory: its reader says what victor builds from it
            source = V.CHECKPOINT_READERS[V.checkpoint_format(meta, cfg.init)](cfg.init, meta)
            vcfg = config_with_overrides(source.cfg, cfg.model_overrides, not source.pool_saved, cfg.init)
    else:
        vcfg = VictorConfig.from_dict({"vision_model": cfg.vision_model, "llm": cfg.llm, **cfg.model_overrides})
    # base models named but not described yet: their configs, offline where possible
    for name_key, config_key in (("vision_model", "vision_config"), ("llm", "llm_config")):
        name = getattr(vcfg, name_key)
        if getattr(vcfg, config_key) is not None:
            continue
        if name:
            conf = base_model_config(name, name_key == "vision_model", offline)
        elif cfg.recipe == "demo":  # run() builds the demo's tiny base models
            conf = demo_base_configs()[name_key == "llm"].to_dict()
        else:
            raise UsageError(f"--{name_key.replace('_', '-')} is not set (recipe {cfg.recipe!r})")
        setattr(vcfg, config_key, conf)
    # configs only; the attention kernel holds no parameters, and SDPA needs no GPU
    return VictorConfig.from_dict({**vcfg.to_dict(), "vision_model": "", "llm": "", "projector_path": "",
                                   "attn_implementation": "sdpa"})


def state_bytes(params: int, trained: int, shards: int) -> tuple[float, float, float]:
    """(weights, gradients, AdamW state) per GPU: fp32 weights of every parameter (the model is kept in
    fp32, frozen parts too), fp32 gradients and AdamW's two fp32 moments of the trained ones: 4 + 4 + 8
    bytes. DDP holds them whole on every GPU (shards=1); FSDP splits all three over the processes."""
    return 4 * params / shards, 4 * trained / shards, 8 * trained / shards


def working_copy_bytes(mode: str, world: int, trained: int, root: tuple, layer: tuple, compute_bytes: int) -> float:
    """Transient copies beside the states, per GPU. DDP: its gradient buckets (a second copy of the
    gradients, as gradient_as_bucket_view is off; none in one process) and, under bf16 autocast, the bf16
    copies of the trained weights that autocast caches and backward keeps. FSDP: the gathered root unit
    (embeddings, lm_head, projector, pool, head: kept through the forward) and two layers (the one running,
    the one prefetched) in the compute dtype, and their unsharded fp32 gradients before the reduce-scatter.
    root and layer: (parameters, trained parameters)."""
    if mode == "FSDP":
        return compute_bytes * (root[0] + 2 * layer[0]) + 4 * (root[1] + layer[1])
    return (4 * trained if world > 1 else 0) + (2 * trained if compute_bytes == 2 else 0)


def activation_bytes(model: VictorModel, batch: int, seq: int, vision_trained: bool, checkpointing: bool,
                     compute_bytes: int) -> float:
    """A rough figure for the activations backward keeps, per GPU, for `batch` sequences of `seq` tokens.
    Per LLM decoder layer ~ batch x seq x (24 x hidden + 8 x intermediate) x compute_bytes / 2: in bf16, the
    tensors of width hidden (the two norms' inputs with their float32 internals, q, k, v, the attention
    output, the MLP input) and the four of width intermediate (gate, up, act(gate), their product); attention
    scores are never stored (SDPA / flash-attention). A vision layer likewise with 4 x intermediate (fc1's
    output and its activation) over each image's tokens, when the tower is trained (a frozen one keeps
    nothing). With gradient checkpointing a layer keeps only its input (batch x seq x hidden x compute_bytes)
    and one layer at a time is recomputed in full. The LM loss adds (compute_bytes + 8) x vocab bytes per
    label token (the logits, their float32 copy and its gradient); image positions carry no labels. Where the
    LLM is frozen (stage 1) this overestimates: a frozen layer need not keep its linear layers' inputs."""
    def stack(layers, tokens, hidden, full_per_token):
        full, kept = tokens * full_per_token * compute_bytes / 2, tokens * hidden * compute_bytes
        return layers * kept + full if checkpointing else layers * full
    text = model.llm.config.get_text_config()
    total = stack(text.num_hidden_layers, batch * seq, text.hidden_size,
                  24 * text.hidden_size + 8 * text.intermediate_size)
    total += batch * max(0, seq - model.num_image_tokens) * text.vocab_size * (compute_bytes + 8)
    if vision_trained:
        v, k = model.vision_tower.config, model.cfg.vision_feature_layer
        used = k if k >= 0 else len(model.vision_tower.encoder.layers) + 1 + k  # the layers that reach the features
        tokens = (v.image_size // v.patch_size) ** 2 + (1 if v.model_type.startswith("clip") else 0)  # CLIP's CLS
        total += stack(used, batch * tokens, v.hidden_size, 24 * v.hidden_size + 4 * v.intermediate_size)
    return total


def memory_plan(cfg: TrainConfig, stage: str, world: int, offline: bool = True) -> dict:
    """What each GPU will hold in this run, in bytes, under DDP and under FSDP at this world size, from
    the model built on the meta device (shapes only, no memory). format_plan prints it."""
    with torch.device("meta"):
        model = VictorModel(planned_model_settings(cfg, offline), load_weights=False)
    trained_ids = {id(p) for g in trainable_param_groups(model, stage, cfg) for p in g["params"]}

    def count(params) -> tuple[int, int]:  # (parameters, trained parameters)
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if id(p) in trained_ids)

    parts = {name: count([model.token_pool] if name == "token_pool" else getattr(model, name).parameters())
             for name in PLAN_PARTS}
    params, trained = (sum(c) for c in zip(*parts.values()))
    layers = [count(layer.parameters())
              for layer in [*model.vision_tower.encoder.layers, *model.llm.get_decoder().layers]]
    root = (params - sum(n for n, _ in layers), trained - sum(t for _, t in layers))  # FSDP's root unit
    compute_bytes = 4 if cfg.bf16 is False else 2  # what a GPU computes in: bf16 unless --no-bf16
    vision_trained = parts["vision_tower"][1] > 0
    seqs = sorted({model.num_image_tokens, max(model.num_image_tokens, cfg.max_length)})
    activations = {ckpt: [activation_bytes(model, cfg.batch_size, s, vision_trained, ckpt, compute_bytes)
                          for s in seqs] for ckpt in (False, True)}
    plan = dict(recipe=cfg.recipe, stage=stage, world=world, batch=cfg.batch_size, seqs=seqs,
                checkpointing=cfg.gradient_checkpointing, compute_bytes=compute_bytes, parts=parts,
                params=params, trained=trained, activations=activations,
                mode="one process" if world == 1 else "FSDP" if cfg.fsdp else "DDP",
                vision=model.vision_tower.config.model_type, llm=model.llm.config.model_type)
    for mode, shards in (("DDP", 1), ("FSDP", world)):
        states = sum(state_bytes(params, trained, shards))
        working = working_copy_bytes(mode, world, trained, root, max(layers), compute_bytes)
        plan[mode] = dict(states=states, working=working,
                          total=[states + working + a for a in activations[cfg.gradient_checkpointing]])
    return plan


def format_plan(plan: dict) -> str:
    w = plan["world"]
    unit, size = ("GiB", GIB) if plan["DDP"]["total"][-1] >= GIB else ("MiB", 2 ** 20)  # the demo's are MiB

    def num(b):
        return f"{b / size:8.2f}"

    def count(n):
        return f"{n / 1e6:8.1f}M" if n >= 1e5 else f"{n / 1e3:8.1f}k" if n else f"{0:9d}"
    lines = [f"memory plan: recipe {plan['recipe']}, stage {plan['stage']}, world size {w}: {unit} per GPU, "
             f"from the model configs (nothing loaded)",
             f"  {plan['vision']} -> {plan['llm']}; {plan['seqs'][0]} visual tokens per image; per-GPU batch "
             f"{plan['batch']}; computing in {'bf16' if plan['compute_bytes'] == 2 else 'fp32'} on the GPU",
             f"  {'':32}|{'DDP (whole on every GPU)':^37}|{f'FSDP ({w} shard' + 's' * (w > 1) + ')':^37}|",
             f"  {'part':<13}{'params':>9}{'trained':>9} |" + "  weights    grads    AdamW    total |" * 2]
    for name, (params, trained) in [*plan["parts"].items(), ("all", (plan["params"], plan["trained"]))]:
        row = f"  {name:<13}{count(params)}{count(trained)} |"
        for shards in (1, w):
            states = state_bytes(params, trained, shards)
            row += "".join(" " + num(b) for b in (*states, sum(states))) + " |"
        lines.append(row)
    lines.append(f"  {'working copies':<32}|" + f" {num(plan['DDP']['working'])}  (buckets, bf16 copies)".ljust(37)
                 + "|" + f" {num(plan['FSDP']['working'])}  (gathered units)".ljust(37) + "|")
    for ckpt in (False, True):
        acts = ", ".join(f"{a / size:.2f} at {s} tokens" for a, s in zip(plan["activations"][ckpt], plan["seqs"]))
        lines.append(f"  activations (rough), {'with' if ckpt else 'without'} gradient checkpointing: {acts}")
    on = "on" if plan["checkpointing"] else "off"
    lines.append(f"  in all per GPU, gradient checkpointing {on}: "
                 + "; ".join(f"{mode} " + " to ".join(f"{t / size:.2f}" for t in plan[mode]["total"])
                             for mode in ("DDP", "FSDP")))
    how = {"one process": "one process: nothing to shard or replicate",
           "FSDP": f"FSDP over {w} processes (--fsdp)", "DDP": f"DDP over {w} processes (--no-fsdp)"}
    lines.append(f"  this run: {how[plan['mode']]}")
    return "\n".join(lines)


def fit_problem(plan: dict, gpu_bytes: int) -> str:
    """Why this run cannot fit a GPU of gpu_bytes, naming the flag that fixes it; '' if it may fit.
    Only what is sure counts: the states and working copies (exact counts), plus the activations of the
    shortest batch holding an image (its visual tokens alone), the least a step with images needs."""
    mode = "FSDP" if plan["mode"] == "FSDP" else "DDP"
    fixed = {m: plan[m]["states"] + plan[m]["working"] for m in ("DDP", "FSDP")}
    least = {ckpt: plan["activations"][ckpt][0] for ckpt in (False, True)}
    ckpt, w = plan["checkpointing"], plan["world"]
    fsdp_fits = w > 1 and fixed["FSDP"] + least[True] <= gpu_bytes
    if fixed[mode] > gpu_bytes:
        need, what = fixed[mode], "fp32 weights, gradients, AdamW state and working copies"
        fix = ("add --fsdp to shard them over the processes" if mode == "DDP" and fsdp_fits else
               "run on several GPUs with --fsdp" if w == 1 else
               "run on more GPUs with --fsdp" if mode == "DDP" else "run on more GPUs (torchrun --nnodes)")
    elif fixed[mode] + least[ckpt] > gpu_bytes:
        need = fixed[mode] + least[ckpt]
        what = f"the model states and the activations of {plan['batch']} sequences of {plan['seqs'][0]} tokens"
        fix = ("add --gradient-checkpointing" if not ckpt and fixed[mode] + least[True] <= gpu_bytes else
               "add --fsdp" if mode == "DDP" and fsdp_fits else "lower --batch-size")
    else:
        return ""
    return (f"stage {plan['stage']}: each GPU needs at least {need / GIB:.1f} GiB ({what}, {plan['mode']} over "
            f"{w} processes), more than this GPU's {gpu_bytes / GIB:.1f} GiB: {fix} (--plan --world-size {w} "
            f"prints the plan)")


def check_memory_fits(cfg: TrainConfig, stage: str, world: int, device: torch.device):
    """Refuse, before anything is loaded, a run that cannot fit its GPU. On CPU there is no device memory
    limit to check against (host memory is shared with everything else on the machine)."""
    if device.type != "cuda":
        return
    problem = fit_problem(memory_plan(cfg, stage, world, offline=False),
                          torch.cuda.get_device_properties(device).total_memory)
    if problem:
        raise UsageError(problem)


def print_plans(args: dict, world: int):
    """--plan: the memory plan of each stage this command line would run; nothing is built or loaded."""
    if world < 1:
        raise UsageError(f"--world-size must be at least 1, got {world}")
    check_ranges(args)
    recipe, stage, init = args.get("recipe", "demo"), args.get("stage", "all"), args.get("init", "")
    overrides = {k: v for k, v in args.items() if k not in ("recipe", "stage", "init", "out_dir")}
    if init and not os.path.exists(init):  # planned before the previous stage has run: its models are the recipe's
        print(f"note: --init {init} does not exist yet: planning from the {recipe} recipe's models "
              f"(and --model-overrides / --variant), as the previous stage will build them")
        init = ""
    for s in stages_to_run(stage, overrides.get("variant", "")):
        print(format_plan(memory_plan(stage_config(recipe, s, overrides, init), s, world)))


# -----------------------------------------------------------------------------
# Resumable training state: model, optimizer, scheduler, RNG, data position


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start its next epoch part-way through (after a resume)."""
    start = 0  # indices of this process to skip, once

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)


def saved_steps(state_dir: str) -> list[int]:
    """The steps of the complete states in state_dir (its step-N dirs), oldest first; '.tmp' dirs are not."""
    if not os.path.isdir(state_dir):
        return []
    return sorted(int(d[5:]) for d in os.listdir(state_dir) if d.startswith("step-") and d[5:].isdigit())


def latest_training_state(state_dir: str) -> str:
    """The newest complete state in state_dir ('' if none); half-written '.tmp' dirs are ignored."""
    steps = saved_steps(state_dir)
    return os.path.join(state_dir, f"step-{steps[-1]}") if steps else ""


@contextlib.contextmanager
def checkpoint_io():
    """torch.distributed.checkpoint warns when one process uses it without a process group: intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_training_state(state_dir: str, progress: dict, model, optimizer, scheduler, rank: int, keep: int = 2):
    """Write state_dir/step-N atomically: into step-N.tmp, then one rename, so a run killed while
    saving leaves the previous state intact. Model and optimizer go through torch.distributed.checkpoint:
    each process writes its own shard under FSDP, replicated (DDP) state is written once, and a
    state can be loaded by a different number of processes. RNG states are per process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(state_dir, f"step-{progress['step']}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with checkpoint_io():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(tmp, "model_optimizer"))
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng-{rank}.pt"))
    if rank == 0:
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump(progress, f)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in saved_steps(state_dir)[:-keep]:
            shutil.rmtree(os.path.join(state_dir, f"step-{old}"), ignore_errors=True)
    barrier()


def load_training_state(path: str, model, optimizer, scheduler, rank: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.isfile(os.path.join(path, "progress.json")):
        raise FileNotFoundError(f"{path}: not a training state (no progress.json)")
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to load into (sharded or not)
    state = {"model": model_state, "optimizer": optim_state}
    with checkpoint_io():
        dcp.load(state, checkpoint_id=os.path.join(path, "model_optimizer"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming with more processes than saved
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(path, "progress.json")) as f:
        return json.load(f)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# One stage: set up (processes, data, model, loader, optimizer), the loop, the report and the checkpoint


def shard_with_fsdp(model: VictorModel, use_bf16: bool, device: torch.device) -> VictorModel:
    """FSDP2: every vision encoder layer and LLM decoder layer is its own unit, gathered just before
    it runs and freed after. The root unit holds the rest (embeddings, lm_head, projector, recon head
    and the token pool); it stays gathered through the forward, so matching sees the whole pool.
    Rank 0 holds the loaded model, the other ranks the same model on the meta device (build_model_once):
    after sharding, rank 0's weights are broadcast into every rank's shards, one tensor at a time, so no
    other rank ever holds the whole model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    rank = dist.get_rank()
    full_state = model.state_dict() if rank == 0 else {}
    # buffers that a state dict leaves out (rotary inv_freq, the towers' position_ids): rank 0's values,
    # computed from the config as every rank would
    unsaved = [{name: b.detach().cpu() for name, b in model.named_buffers() if name not in full_state}
               if rank == 0 else None]
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16
          else MixedPrecisionPolicy())
    for layer in [*model.vision_tower.encoder.layers, *model.llm.get_decoder().layers]:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if rank != 0:
        model.to_empty(device=device)  # this rank's shards and buffers, uninitialised until the broadcast
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    dist.broadcast_object_list(unsaved, src=0)
    if rank != 0:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in unsaved[0].items():
                buffers[name].copy_(value)
    return model


def build_model(cfg: TrainConfig, stage: str, settings: dict | None = None):
    """The run's model, tokenizer and image processor: loaded from --init, or built from the base models.
    settings: rank 0's model settings (FSDP, the other ranks: build_model_once), from which the same
    model is built on the meta device, without weights."""
    from transformers import AutoImageProcessor, AutoTokenizer
    if settings is not None:
        with torch.device("meta"):  # a LLaVA projector (projector_path) arrives with rank 0's weights
            model = VictorModel(VictorConfig.from_dict({**settings, "projector_path": ""}), load_weights=False)
        tokenizer = AutoTokenizer.from_pretrained(cfg.init or cfg.llm)
        image_processor = AutoImageProcessor.from_pretrained(cfg.init or cfg.vision_model)
    elif cfg.init:
        def moved(why: str) -> UsageError:
            return UsageError(f"--init {cfg.init}: cannot load a base model it refers to (vision_model "
                              f"{saved.get('vision_model')!r}, llm {saved.get('llm')!r}): {why}; put the model "
                              f"back at that path (or name), or train this checkpoint's stage again")
        saved = read_config_json(cfg.init).get("victor", {}) if os.path.isdir(cfg.init) else {}
        for key in ("vision_model", "llm"):  # a local directory that is gone: said now (else the hub is asked)
            if os.path.isabs(saved.get(key) or "") and not os.path.isdir(saved[key]):
                raise moved(f"{saved[key]} does not exist")
        try:
            model, tokenizer, image_processor = load_checkpoint(cfg.init, overrides=cfg.model_overrides)
        except ValueError as e:  # a setting the checkpoint refuses, or not a checkpoint at all
            raise UsageError(f"--init {cfg.init}: {e}") from None
        except OSError as e:  # transformers' way of saying a base model it names cannot be had
            raise moved(first_line(e)) from None
        note_normalisation_change(cfg.init, model.cfg)
        for key in ("vision_model", "llm"):  # named on the command line: must be the checkpoint's own
            given, held = getattr(cfg, key), getattr(model.cfg, key)
            if given and (os.path.abspath(given) if os.path.isdir(given) else given) != held:
                raise UsageError(f"--{key.replace('_', '-')} {given!r}: with --init the base models come from "
                                 f"{cfg.init} ({key} {held!r}); drop the flag")
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
            image_processor = AutoImageProcessor.from_pretrained(cfg.vision_model)
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


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def note_normalisation_change(init: str, new: VictorConfig):
    """Say so when --variant or --model-overrides changes normalize_visual_tokens from what the checkpoint
    was trained with (e.g. --variant llava on a stage-1 checkpoint trained without it): it takes effect,
    but the projector learned the other."""
    saved = read_config_json(init).get("victor", {}).get("normalize_visual_tokens")
    if saved is not None and saved != new.normalize_visual_tokens:
        print(f"note: normalize_visual_tokens={new.normalize_visual_tokens} (--variant / --model-overrides), but "
              f"{init} was trained with {saved}: its projector learned the other")


def build_model_once(cfg: TrainConfig, stage: str, rank: int):
    """FSDP: only rank 0 reads the weights (build_model); every other rank builds the same model from
    rank 0's settings on the meta device. shard_with_fsdp then fills every rank's shards from rank 0's
    weights: a node's host memory holds the whole model once, not once per process."""
    built = build_model(cfg, stage) if rank == 0 else None
    settings = [built[0].cfg.to_dict() if rank == 0 else None]
    dist.broadcast_object_list(settings, src=0)
    return built if rank == 0 else build_model(cfg, stage, settings=settings[0])


def prepare_model(cfg: TrainConfig, stage: str, rank: int, world: int, device: torch.device):
    """This stage's model on its device, wrapped for the processes: (model, train_model, tokenizer,
    image_processor). The loop calls train_model (DDP's wrapper, or the model itself) and reads and saves
    model (under FSDP, sharded in place)."""
    fsdp = uses_fsdp(cfg, world)
    if cfg.fsdp and world == 1 and rank == 0:
        print("note: --fsdp with one process: nothing to shard over, training unsharded")
    model, tokenizer, image_processor = build_model_once(cfg, stage, rank) if fsdp else build_model(cfg, stage)
    trainable_param_groups(model, stage, cfg)  # what this stage trains (requires_grad), before any wrapping
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.vision_lr > 0 and stage != "1":
            model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # a part a batch leaves unused (the vision side of a text-only batch, the pool, the head) runs times zero:
    # needed with several processes, and kept in one so that 1 and N processes update alike (AdamW moves a
    # parameter whose gradient is zero, and skips one that has none)
    model.same_parts_every_step = True
    if fsdp:
        model = shard_with_fsdp(model, computes_in_bf16(cfg, device), device)
        return model, model, tokenizer, image_processor
    model.to(device)
    if world == 1:
        return model, model, tokenizer, image_processor
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp, tokenizer, image_processor


def selection_seeds(image_keys, seed: int, epoch: int) -> list[int]:
    """Stage 1.5's random choice of tokens (step 2) per image, from (seed, epoch, record, k) alone:
    1 or N processes, any batch size, and a resumed run all replace the same tokens."""
    return [((seed * 1_000_003 + epoch) * 1_000_000_007 + index) * 1009 + k for index, k in image_keys]


def validate_data(cfg: TrainConfig, master: bool) -> tuple[D.RecordStore | D.ParquetRecordStore,
                                                           list[tuple[str, str]]]:
    """The validation pass, before any training: every structurally bad record (and every record
    whose image file is missing) is reported with its position and reason, and written to
    out_dir/bad_records.json; --strict fails on any. Every process reads and checks the file itself
    (sending rank 0's records would pickle the whole dataset once per process); rank 0 reports."""
    try:
        records, bad = D.load_data(cfg.data, strict=cfg.strict, image_folder=cfg.image_folder)
    except ValueError as e:  # not JSON at all, or --strict and bad records: the first five named, on one line
        first, *listed = str(e).splitlines()
        named = "; ".join(line.strip() for line in listed[:5]) + (" ..." if len(listed) > 5 else "")
        raise UsageError(f"{first} {named}".strip() +
                         f"{'; without --strict bad records are skipped and listed' if cfg.strict else ''}"
                         ) from None
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
        write_json(os.path.join(cfg.out_dir, "bad_records.json"), [{"record": w, "reason": why} for w, why in bad])
    return records, bad


def write_json(path: str, value):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def make_loader(cfg: TrainConfig, stage: str, records, model: VictorModel, tokenizer, image_processor,
                rank: int, world: int):
    """(loader, sampler): one sampler for 1 or many processes, the same global order either way."""
    template = D.resolve_template(cfg.template, tokenizer, stage)
    dataset = D.LlavaDataset(records, cfg.image_folder, tokenizer, image_processor, template,
                             model.num_image_tokens, cfg.max_length, model.cfg.image_token_id)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=D.Collator(tokenizer.pad_token_id),
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    return loader, sampler


def make_optimizer(cfg: TrainConfig, model: VictorModel, stage: str, device: torch.device, total_steps: int):
    """(AdamW over this stage's parameter groups, its lr schedule)."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    # fused: one kernel over all tensors (CPU too: ~10 % of a demo step)
    optimizer = torch.optim.AdamW(trainable_param_groups(model, stage, cfg), betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))


# Skipped samples (unusable at load time: a corrupt image, too long, ...). A process stops when one full pass
# over its share of the data, or its first STOP_AFTER_SKIPS samples, gave no usable sample; more than
# WARN_SKIP_RATE of the samples tried skipped is a warning, once WARN_AFTER_SAMPLES were tried (or a pass).
STOP_AFTER_SKIPS = 1000
WARN_SKIP_RATE = 0.05
WARN_AFTER_SAMPLES = 100


class StageStopped(RuntimeError):
    """A stage that cannot go on (no usable data, non-finite losses): train.py prints it as one line."""


class Batches:
    """The stage's batches, epoch after epoch, from where progress says (a resumed run). A sample the
    dataset cannot use is passed over and counted (under --strict: an error): each record once by id and
    reason, a record skipped again after the data wrapped around as a repeat. A sample cut to max_length is
    counted too. Each batch gets stage 1.5's selection seeds for its images. When this process has no usable
    sample (a full pass, or its first STOP_AFTER_SKIPS samples, all skipped) it returns None and says why in
    out_of_data: the loop then stops every process (stop_if_out_of_data)."""

    def __init__(self, loader, sampler: ResumableSampler, progress: dict, cfg: TrainConfig):
        self.loader, self.sampler, self.progress, self.cfg = loader, sampler, progress, cfg
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


def skip_rate_summary(tried: int, tried_skipped: int, skipped: list, where: str) -> str:
    """'21 % of the samples tried were skipped (5 of 24, ...): the top reasons' (the report's words)."""
    reasons = ", ".join(f"{n} x {kind}" for kind, n in D.skip_kinds(skipped).most_common(3))
    return (f"{100 * tried_skipped / max(tried, 1):.0f} % of the samples tried were skipped ({tried_skipped} of "
            f"{tried}, {where}): {reasons}")


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


class StageLog:
    """What the master process says while a stage runs: the progress bar, metrics.jsonl (every log_every
    steps, every non-finite step and the last) and --report-to's targets. The other processes say nothing."""

    def __init__(self, r: StageRun, reporter: MetricsReporter):
        self.cfg, self.stage, self.master, self.reporter, self.total = r.cfg, r.stage, r.master, reporter, r.total_steps
        self.metrics = None
        if self.master:
            os.makedirs(r.cfg.out_dir, exist_ok=True)
            self.metrics = open(os.path.join(r.cfg.out_dir, "metrics.jsonl"), "a" if r.first_step else "w")
            reporter.start(r.cfg.out_dir, r.stage, dataclasses.asdict(r.cfg))
        self.bar = tqdm(range(r.first_step, r.total_steps), initial=r.first_step, total=r.total_steps,
                        desc=f"stage {r.stage}", disable=not self.master, dynamic_ncols=True)
        self.t0, self.samples, self.logged_skips = time.time(), 0, len(r.batches.skipped)

    def step(self, row: dict, finite: bool, batches: Batches):
        """One step's numbers (step, losses, lr, grad_norm), with the throughput and skip counts added."""
        self.samples += self.cfg.global_batch_size
        row.update(samples_per_s=self.samples / (time.time() - self.t0), skipped=len(batches.skipped),
                   truncated=len(batches.truncated), **({} if finite else {"nonfinite": True}))
        if not self.master:
            return
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm_loss']:.3f}", rec=f"{row['recon_loss']:.3f}",
                             lr=f"{row['lr']:.1e}", sps=f"{row['samples_per_s']:.0f}")
        if row["step"] % self.cfg.log_every == 0 or row["step"] == self.total or not finite:
            if len(batches.skipped) > self.logged_skips:  # this process's newly skipped records, by id
                row["skipped_ids"] = [rid for rid, _ in batches.skipped[self.logged_skips:]]
                self.logged_skips = len(batches.skipped)
            self.write(row)
            self.reporter.log(row)

    def write(self, row: dict):
        self.metrics.write(json.dumps({"stage": self.stage, **row}) + "\n")
        self.metrics.flush()

    def close(self, final_row: dict):
        self.write(final_row)
        self.metrics.close()
        self.reporter.close()


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


def gathered_counts(r: StageRun) -> dict:
    """Every process's skipped and truncated records and sample counts, together (a collective)."""
    b = r.batches
    mine = dict(skipped=b.skipped, truncated=b.truncated, tried=b.tried, tried_skipped=b.tried_skipped,
                skip_repeats=b.skip_repeats, out_of_data=[f"process {r.rank}: {b.out_of_data}"] * bool(b.out_of_data))
    if r.world == 1:
        return mine
    parts = [None] * r.world
    dist.all_gather_object(parts, mine)
    return {key: sum((p[key] for p in parts), type(mine[key])()) for key in mine}


def write_skipped(r: StageRun, skipped: list) -> list:
    """skipped.json: the validation pass's bad records and the samples skipped at load time (master only)."""
    all_skipped = [(rid, why) for rid, why in r.bad_records] + skipped
    write_json(os.path.join(r.cfg.out_dir, "skipped.json"), [{"id": rid, "reason": why} for rid, why in all_skipped])
    return all_skipped


def stop_if_out_of_data(r: StageRun):
    """Stop every process together, with the counts and the top reasons, when one has no usable sample left
    (Batches.out_of_data): a process that stopped alone would leave the others waiting in a collective."""
    if all_reduce_sum(1.0 if r.batches.out_of_data else 0.0, r.device) == 0:
        return
    counts = gathered_counts(r)
    if r.master:
        write_skipped(r, counts["skipped"])
    why = counts["out_of_data"][0].split(": ", 1)[1] if r.world == 1 else "; ".join(counts["out_of_data"])
    reasons = ", ".join(f"{n} x {kind}" for kind, n in D.skip_kinds(counts["skipped"]).most_common(3))
    raise StageStopped(f"stage {r.stage}: stopped, {why}: {counts['tried']} samples tried, {counts['tried_skipped']} "
                       f"skipped ({len(counts['skipped'])} records: {reasons}); every skipped record is listed in "
                       f"{os.path.join(r.cfg.out_dir, 'skipped.json')}")


def finish_stage(r: StageRun, log: StageLog):
    """The end-of-run report (every skipped and truncated record, from every process) and the checkpoint."""
    counts = gathered_counts(r)
    skipped, truncated = counts["skipped"], counts["truncated"]
    if r.master:
        all_skipped = write_skipped(r, skipped)
        print(D.skip_report(all_skipped))
        if counts["skip_repeats"]:
            print(f"  (each record counted once; {counts['skip_repeats']} more skips of records already listed, "
                  f"after the data wrapped around)")
        if counts["tried_skipped"] > WARN_SKIP_RATE * counts["tried"]:
            print("warning: " + skip_rate_summary(counts["tried"], counts["tried_skipped"], skipped,
                                                  "every process"))
        if truncated:  # kept, but cut to max_length (never through image tokens): said, not silent
            print(f"truncated to max_length={r.cfg.max_length}: {len(truncated)} samples, "
                  f"{sum(n for _, n in truncated)} tokens cut (listed in truncated.json)")
        write_json(os.path.join(r.cfg.out_dir, "truncated.json"),
                   [{"id": rid, "tokens_cut": n} for rid, n in truncated])
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


def parse_steps(text: str) -> set[int]:
    """'250,500' -> {250, 500} (--snapshot-steps)."""
    try:
        steps = {int(x) for x in text.replace(" ", "").split(",") if x}
    except ValueError:
        raise UsageError(f"--snapshot-steps: comma-separated step numbers, got {text!r}") from None
    if any(k <= 0 for k in steps):
        raise UsageError(f"--snapshot-steps: steps must be positive, got {text!r}")
    return steps


def save_model(r: StageRun, path: str):
    """Write the model as a checkpoint directory (victor.save_checkpoint): stage 1 its projector, later
    stages everything. Under FSDP every process takes part in gathering the full weights."""
    full_state = None
    if r.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full_state = get_model_state_dict(r.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if r.master:
        save_checkpoint(r.model, path, r.tokenizer, r.image_processor, parts="projector" if r.stage == "1" else "all",
                        extra={"train_config": {**dataclasses.asdict(r.cfg), "stage": r.stage}}, state_dict=full_state)


class MissingDependency(ImportError):
    """An optional package that a flag asks for is not installed."""


def _import_optional(module: str, package: str, flag: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{flag} needs the {package} package, which is not installed: "
                                f"pip install {package}") from None


class MetricsReporter:
    """--report-to: the rows written to metrics.jsonl go to TensorBoard (out_dir/tensorboard) and/or wandb
    as well. Both are optional packages, imported only when asked for: a missing one fails when the
    reporter is made, before any training."""
    TARGETS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}

    def __init__(self, report_to: str):
        targets = [t.strip() for t in report_to.split(",") if t.strip()]
        unknown = [t for t in targets if t not in self.TARGETS]
        if unknown:
            raise UsageError(f"--report-to {report_to!r}: unknown {unknown}; choose from {sorted(self.TARGETS)}, "
                             f"comma-separated")
        self.modules = {t: _import_optional(*self.TARGETS[t], flag=f"--report-to {t}") for t in targets}
        self.writer = self.run = None

    def start(self, out_dir: str, stage: str, config: dict):
        if "tensorboard" in self.modules:
            self.writer = self.modules["tensorboard"].SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
        if "wandb" in self.modules:  # one wandb run per stage; WANDB_PROJECT (default "victor") groups them
            self.run = self.modules["wandb"].init(project=os.environ.get("WANDB_PROJECT", "victor"), dir=out_dir,
                                                  name=f"{os.path.basename(os.path.normpath(out_dir))} (stage {stage})",
                                                  config=config)

    def log(self, row: dict):
        """One metrics.jsonl row: its numbers, at its step."""
        values = {k: v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, row["step"])
        if self.run is not None:
            self.run.log(values, step=row["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


# -----------------------------------------------------------------------------
# Recipes and the command line


def stage_config(recipe: str, stage: str, overrides: dict, init: str = "") -> TrainConfig:
    """Recipe defaults for one stage, then the variant's preset, then the command line's overrides.
    With --init the checkpoint holds the model's settings: only the variant's and the command line's
    model settings apply, and each takes effect or is refused (victor.config_with_overrides)."""
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


def check_ranges(given: dict):
    """Every numeric flag given within the range its TrainConfig field declares (RANGES), before anything
    is built: one line naming the flag and its range."""
    problem = out_of_range(given, RANGES)
    if problem:
        raise UsageError(problem)


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


def demo_inputs(overrides: dict, out_root: str) -> dict:
    """The demo recipe's shapes data and tiny base models, generated on first use unless given; their paths
    go into overrides. Returns the data file of each stage ({} when the data was given)."""
    given = {k for k, v in overrides.items() if v}
    need_data = not ({"data", "image_folder"} <= given or ("data" in given and D.is_parquet(overrides["data"])))
    need_base = not ("init" in given or {"vision_model", "llm"} <= given)
    rank, _, _ = setup_distributed()
    spec = D.ShapesSpec(num_train_images=overrides.get("demo_images", TrainConfig.demo_images))
    if rank == 0:
        if need_data:
            D.shapes_files(os.path.join(out_root, "shapes"), spec)
        if need_base:
            build_demo_base(out_root)
    barrier()
    if need_base:
        overrides.setdefault("vision_model", os.path.join(out_root, "base", "vision"))
        overrides.setdefault("llm", os.path.join(out_root, "base", "llm"))
    if not need_data:
        return {}
    files = D.shapes_files(os.path.join(out_root, "shapes"), spec)
    overrides.setdefault("image_folder", os.path.join(out_root, "shapes"))
    return {"1": files["stage1"], "1.5": files["stage1.5"], "2": files["stage2"]}


def run(overrides: dict) -> list[str]:
    """Run one stage, or all three in a row (each initialised from the one before)."""
    given = dict(overrides)
    check_ranges(given)
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
    if stage == "all" and "data" in overrides and recipe != "demo":
        raise UsageError("--stage all needs different data per stage: run the stages one by one with --data")
    demo_data = demo_inputs(overrides, out_root) if recipe == "demo" else {}
    outs, init = [], overrides.pop("init", "")
    for s in stages:
        o = dict(overrides)
        if s in demo_data:
            o.setdefault("data", demo_data[s])
        if init and s != stages[0]:  # the base models come with the previous stage's checkpoint
            o.pop("vision_model", None), o.pop("llm", None)
        cfg = stage_config(recipe, s, o, init)
        cfg.out_dir = os.path.join(out_root, f"stage{s}") if stage == "all" else out_root
        init = train_stage(cfg, s)
        outs.append(init)
    return outs


def parse_args(argv=None) -> dict:
    """Every TrainConfig field becomes a --flag; only the flags given override the recipe."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        valid = f"; {f.metadata['range']}" if f.metadata["range"] else ""
        help_text = f"{f.metadata['help']} (default {f.default!r}{valid})".replace("%", "%%")
        if f.type in ("bool", "bool | None"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.type == "dict":
            ap.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, metavar="JSON",
                            help=f"{f.metadata['help']} (default {{}})")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            ap.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text,
                            metavar=f.type.upper() if kind is not str else "TEXT")
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
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done in {time.time() - t:.0f}s")
    barrier()  # every rank past its last collective before gloo tears down (a rare abort at exit)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
