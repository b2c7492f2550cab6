"""
The memory plan: what each GPU will hold in a stage (weights, gradients, AdamW state, working copies,
activations), from the model configs alone, nothing loaded. train.py prints it (--plan) and refuses a
CUDA run whose plan cannot fit its GPU before anything is loaded. A reader of the method may skip it.

    python train.py --recipe llava15-vicuna7b --plan --world-size 8
    python train.py --recipe siglip-qwen25-0.5b --plan
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from engineering import checkpoints as C
from engineering.config import DEMO_BASE_DIR, RANGES, stage_config, stages_to_run
from engineering.flags import UsageError, check_ranges
from victor import VictorConfig, VictorModel

if TYPE_CHECKING:
    from engineering.config import TrainConfig

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


# Each stage's text per sample, in LLM tokens beside the image's visual tokens: (what the data is, text-only
# share, lognormal median and sigma of the text tokens, share of them that are labels). No internet here: the
# figures are assumed from the datasets as published, not measured on them.
# - stage 1, LLaVA-Pretrain (LCS-558K, BLIP captions): one short caption (~10 words) after the image in the
#   plain template: ~14 tokens, all labels but the image.
# - stage 1.5, LLaVA-ReCap-CC3M (LLaVA-NeXT-34B's detailed captions): the system prompt, the detail prompt and
#   a ~110-word caption (the figure scripts/bench_data_memory.py's ReCap-like records use), ~210 tokens, the
#   caption's ~150 the labels.
# - stage 2, LLaVA-665K (LLaVA-1.5's mix): 40K of its 665K are ShareGPT text-only conversations (6 %, long:
#   median ~700 tokens here); the rest are multi-turn VQA / instruction conversations about one image,
#   median ~180 text tokens with a long tail (sigma 0.8), ~60 % of them the assistant's answers (labels).
STAGE_TEXT = {
    "1": dict(data="LLaVA-558K BLIP captions", text_only=0.0, median=14, sigma=0.35, label_share=0.9),
    "1.5": dict(data="LLaVA-ReCap-CC3M detailed captions", text_only=0.0, median=210, sigma=0.25, label_share=0.7),
    "2": dict(data="LLaVA-665K multi-turn conversations", text_only=0.06, median=180, sigma=0.8, label_share=0.6,
              text_only_median=700),
}


def sample_texts(stage: str, n: int, num_image_tokens: int, max_length: int, rng: np.random.Generator,
                 seq_len: int | None = None) -> list[tuple[int, int, bool]]:
    """n samples' (text tokens, label tokens, has an image) drawn from the stage's assumed distribution
    (STAGE_TEXT), cut to max_length as the dataset cuts; seq_len: every sample that long, with an image."""
    s, out = STAGE_TEXT[stage], []
    for _ in range(n):
        text_only = not seq_len and rng.random() < s["text_only"]
        median = s.get("text_only_median", s["median"]) if text_only else s["median"]
        text = seq_len - num_image_tokens - 1 if seq_len else max(4, int(rng.lognormal(math.log(median), s["sigma"])))
        text = max(1, min(text, max_length - 1 - (0 if text_only else num_image_tokens)))  # the BOS token: 1
        out.append((text, max(1, round(text * s["label_share"])), not text_only))
    return out


def padding_share(stage: str, batch: int, global_batch: int, num_image_tokens: int, max_length: int,
                  grouped: bool, steps: int = 200, seed: int = 0) -> float:
    """The share of a stage's positions that are padding, over `steps` global batches drawn from its assumed
    lengths (STAGE_TEXT): each micro-batch of `batch` padded to its longest sample; grouped: each global
    batch sorted by length first (--group-by-length), as ResumableSampler does."""
    rng, padded, used = np.random.default_rng(seed), 0, 0
    for _ in range(steps):
        lengths = [1 + t + (num_image_tokens if image else 0)
                   for t, _, image in sample_texts(stage, global_batch, num_image_tokens, max_length, rng)]
        if grouped:  # images first and longest first, as the record lengths sort them
            lengths.sort(reverse=True)
        for k in range(0, global_batch, batch):
            micro = lengths[k:k + batch]
            padded, used = padded + batch * max(micro), used + sum(micro)
    return 1 - used / padded


def assumed_batch(stage: str, batch: int, num_image_tokens: int, max_length: int, seq_len: int | None = None):
    """The per-GPU batch the plan assumes (scripts/trace_step.py traces the same one, seed 0): its (padded
    length, label tokens, images)."""
    texts = sample_texts(stage, batch, num_image_tokens, max_length, np.random.default_rng(0), seq_len)
    longest = max(1 + t + (num_image_tokens if image else 0) for t, _, image in texts)
    return longest, sum(a for _, a, _ in texts), sum(image for _, _, image in texts)



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
        raise UsageError(f"no architecture for {name!r} offline: not in memory_plan.PAPER_MODELS, not a local "
                         f"directory, not in the Hugging Face cache") from None
    return (getattr(conf, "vision_config", conf) if vision else conf).to_dict()


def planned_model_settings(cfg: TrainConfig, offline: bool) -> VictorConfig:
    """The VictorConfig this run would build (from --init's config.json, or the base models and
    --model-overrides), with both base models as config dicts: nothing to download or load."""
    if cfg.init:
        meta = C.read_config_json(cfg.init)
        if C.checkpoint_format(meta, cfg.init) == "victor":
            vcfg = C.config_with_overrides(VictorConfig.from_dict({**meta["victor"], "projector_path": ""}),
                                         cfg.model_overrides, meta.get("saved_parts") == "projector", cfg.init)
        else:  # LLaVA's or llava-hf's directory: its reader says what victor builds from it
            source = C.CHECKPOINT_READERS[C.checkpoint_format(meta, cfg.init)](cfg.init, meta)
            vcfg = C.config_with_overrides(source.cfg, cfg.model_overrides, not source.pool_saved, cfg.init)
    else:
        vcfg = VictorConfig.from_dict({"vision_model": cfg.vision_model, "llm": cfg.llm, **cfg.model_overrides})
    # base models named but not described yet: their configs, offline where possible
    for name_key, config_key in (("vision_model", "vision_config"), ("llm", "llm_config")):
        name = getattr(vcfg, name_key)
        if getattr(vcfg, config_key) is not None:
            continue
        if name:
            conf = base_model_config(name, name_key == "vision_model", offline)
        elif cfg.recipe == "demo":  # the committed base models (train.py loads them from there)
            part = "vision" if name_key == "vision_model" else "llm"
            conf = base_model_config(os.path.join(DEMO_BASE_DIR, part), name_key == "vision_model", offline)
        else:
            raise UsageError(f"--{name_key.replace('_', '-')} is not set (recipe {cfg.recipe!r})")
        setattr(vcfg, config_key, conf)
    # configs only; the attention kernel holds no parameters, and SDPA needs no GPU
    return VictorConfig.from_dict({**vcfg.to_dict(), "vision_model": "", "llm": "", "projector_path": "",
                                   "attn_implementation": "sdpa"})


def state_bytes(params: int, trained: int, shards: int) -> tuple[float, float, float]:
    """(weights, gradients, AdamW state) per GPU: fp32 weights of every parameter (the model is kept in
    fp32, frozen parts too), fp32 gradients and AdamW's two fp32 moments of the trained ones: 4 + 4 + 8
    bytes. DDP holds them whole on every GPU (shards=1); FSDP splits all three over the processes (the
    plan's exact figure, memory_plan's state_parts, counts rank 0's padded shard of each tensor)."""
    return 4 * params / shards, 4 * trained / shards, 8 * trained / shards


def working_copy_bytes(mode: str, world: int, trained: int, root: tuple, layer: tuple, compute_bytes: int) -> float:
    """Transient copies beside the states at the step's peak, per GPU. DDP: its gradient buckets (a second
    copy of the gradients, as gradient_as_bucket_view is off; none in one process) and, under bf16 autocast,
    the bf16 copies of the trained weights that autocast caches and backward keeps. FSDP: the gathered root
    unit (embeddings, lm_head, projector, pool, head: kept through the forward and the backward) and the one
    layer being recomputed and differentiated, in the compute dtype; the all-gather buffer of the next layer
    (prefetched) and the reduce-scatter input of the last one (its unsharded fp32 gradients).
    root and layer: (parameters, trained parameters)."""
    if mode == "FSDP":
        return compute_bytes * (root[0] + 2 * layer[0]) + 4 * layer[1]
    return (4 * trained if world > 1 else 0) + (2 * trained if compute_bytes == 2 else 0)


def activation_bytes(model: VictorModel, batch: int, seq: int, labels: int, images: int, vision_trained: bool,
                     checkpointing: bool, compute_bytes: int, residual_bytes: int) -> float:
    """The activations at the step's peak (the start of the backward), per GPU, for `batch` sequences of `seq`
    positions, `labels` of them predicting a label, and `images` images. Per LLM decoder layer and position
    (24 x hidden + 8 x intermediate) x compute_bytes / 2: in bf16, the tensors of width hidden (the two norms'
    inputs with their float32 internals, q, k, v, the attention output, the MLP input) and the four of width
    intermediate (gate, up, act(gate), their product); attention scores are never stored (SDPA /
    flash-attention). With gradient checkpointing a layer keeps only its input (hidden x residual_bytes: the
    residual stream is float32 under autocast, bf16 under FSDP's bf16 parameters) and one layer at a time is
    recomputed in full. The LM loss, once backward starts: (compute_bytes + 8) x vocab per label (the
    log-softmax the loss kept and its gradient in float32, that gradient in the compute dtype); backward's
    first gradients of the hidden states, 2 x float32. A trained
    vision tower likewise over its layers up to the feature layer (4 x intermediate: fc1's output and its
    activation); a frozen one keeps nothing. Checked against scripts/trace_step.py (docs/training.md)."""
    def stack(layers, tokens, hidden, full_per_token):
        full = tokens * full_per_token * compute_bytes / 2
        return layers * tokens * hidden * residual_bytes + full if checkpointing else layers * full
    text = model.llm.config.get_text_config()
    tokens = batch * seq
    total = stack(text.num_hidden_layers, tokens, text.hidden_size, 24 * text.hidden_size + 8 * text.intermediate_size)
    total += labels * text.vocab_size * (compute_bytes + 8) + 2 * tokens * text.hidden_size * 4
    if vision_trained and images:
        v = model.vision_tower.config  # the layers that reach the features, over the tower's positions (CLS too)
        total += stack(model.vision_layers_used, images * model.tower_tokens, v.hidden_size,
                       24 * v.hidden_size + 4 * v.intermediate_size)
    return total


def memory_plan(cfg: TrainConfig, stage: str, world: int, offline: bool = True, model: VictorModel | None = None
                ) -> dict:
    """What each GPU will hold in this run, in bytes, under DDP and under FSDP at this world size, from
    the model built on the meta device (shapes only, no memory; or the given one). Each mode's figures: the
    states (exact, part by part), the working copies, and the step's peak: the larger of the start of the
    backward (no gradient yet but one layer's, the activations at their highest) and its end (every gradient,
    the activations gone), at the batch the stage's data gives (assumed_batch: `assumed`) and at the range of
    lengths from the visual tokens alone to max_length (`total`). format_plan prints it."""
    if model is None:
        with torch.device("meta"):
            model = VictorModel(planned_model_settings(cfg, offline), load_weights=False)
    groups = model.param_groups(stage, cfg.lr, cfg.vision_lr, cfg.pool_lr, cfg.weight_decay)  # what it trains
    trained_ids = {id(p) for g in groups for p in g["params"]}

    def count(params) -> tuple[int, int]:  # (parameters, trained parameters)
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if id(p) in trained_ids)

    parts = {name: count([model.token_pool] if name == "token_pool" else getattr(model, name).parameters())
             for name in PLAN_PARTS}
    params, trained = (sum(c) for c in zip(*parts.values()))
    # rank 0's FSDP2 shard of each parameter: ceil(rows / world) of its rows (dim 0 padded to the world size)
    shard = {key: sum(math.ceil(p.shape[0] / world) * (p.numel() // max(1, p.shape[0])) if p.dim() else p.numel()
                      for p in model.parameters() if key == "params" or id(p) in trained_ids)
             for key in ("params", "trained")}
    trained_tensors = len(trained_ids)  # AdamW keeps a step count (one fp32 scalar) per trained tensor
    layers = [count(layer.parameters())
              for layer in [*model.vision_tower.encoder.layers, *model.llm.get_decoder().layers]]
    root = (params - sum(n for n, _ in layers), trained - sum(t for _, t in layers))  # FSDP's root unit
    compute_bytes = 4 if cfg.bf16 is False else 2  # what a GPU computes in: bf16 unless --no-bf16
    vision_trained = parts["vision_tower"][1] > 0
    n_img, batch = model.num_image_tokens, cfg.batch_size
    accumulation = max(1, cfg.global_batch_size // (batch * world))
    seqs = sorted({n_img, max(n_img, cfg.max_length)})
    assumed_len, assumed_labels, assumed_images = assumed_batch(stage, batch, n_img, cfg.max_length)
    plan = dict(recipe=cfg.recipe, stage=stage, world=world, batch=batch, seqs=seqs,
                checkpointing=cfg.gradient_checkpointing, compute_bytes=compute_bytes, parts=parts,
                params=params, trained=trained, assumed_len=assumed_len, assumed_data=STAGE_TEXT[stage]["data"],
                mode="one process" if world == 1 else "FSDP" if cfg.fsdp else "DDP", model=model,
                vision=model.vision_tower.config.model_type, llm=model.llm.config.model_type)
    plan["activations"] = {ckpt: [activation_bytes(model, batch, s, batch * (s - n_img), batch, vision_trained, ckpt,
                                                   compute_bytes, compute_bytes) for s in seqs]
                           for ckpt in (False, True)}
    for mode, (held, held_trained) in (("DDP", (params, trained)), ("FSDP", (shard["params"], shard["trained"]))):
        state_parts = dict(params=4 * held, grads=4 * held_trained, optimizer=8 * held_trained + 4 * trained_tensors)
        states = sum(state_parts.values())
        working = working_copy_bytes(mode, world, trained, root, max(layers), compute_bytes)
        # at the start of the backward: no gradient yet, but (FSDP) the first layer's shard; with accumulation
        # (a later micro-batch), the gradients so far: whole, or under FSDP unsharded (no reduction until the last)
        if accumulation == 1:
            first = states - state_parts["grads"] + (4 * max(layers)[1] / world if mode == "FSDP" else 0)
        else:
            first = states + (4 * trained - state_parts["grads"] if mode == "FSDP" else 0)
        residual = compute_bytes if mode == "FSDP" or compute_bytes == 4 else 4  # autocast keeps it float32
        acts = [activation_bytes(model, batch, seq, labels, images, vision_trained, cfg.gradient_checkpointing,
                                 compute_bytes, residual)
                for seq, labels, images in [*((s, batch * (s - n_img), batch) for s in seqs),
                                            (assumed_len, assumed_labels, assumed_images)]]
        peaks = [max(first + working + a, states + working) for a in acts]
        plan[mode] = dict(states=states, state_parts=state_parts, working=working, total=peaks[:-1],
                          assumed=peaks[-1])
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
        lines.append(f"  activations, {'with' if ckpt else 'without'} gradient checkpointing, every text token a "
                     f"label: {acts}")
    on = "on" if plan["checkpointing"] else "off"
    lines.append(f"  at the step's peak per GPU, gradient checkpointing {on}, the batch the stage's data gives "
                 f"({plan['assumed_data']}, assumed: {plan['assumed_len']} positions): "
                 + "; ".join(f"{mode} {plan[mode]['assumed'] / size:.2f}" for mode in ("DDP", "FSDP"))
                 + " (held to scripts/trace_step.py's trace: docs/training.md)")
    lines.append(f"  the same at {plan['seqs'][-1]} positions (max_length, every sample): "
                 + "; ".join(f"{mode} {plan[mode]['total'][-1] / size:.2f}" for mode in ("DDP", "FSDP")))
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


def plan_verdict(cfg: TrainConfig, stage: str, plan: dict, gpu_bytes: float) -> str:
    """--plan's last line: whether this run, as configured (at the lengths the stage's data has), fits GPUs of
    gpu_bytes at this world size; if not, what would (each change on its own, re-planned): FSDP, more GPUs, a
    smaller per-GPU batch, gradient checkpointing."""
    w, mode = plan["world"], "FSDP" if plan["mode"] == "FSDP" else "DDP"
    need, gib = plan[mode]["assumed"], gpu_bytes / GIB
    head = (f"verdict for {w} GPU{'s' * (w > 1)} of {gib:.0f} GiB: stage {stage}, {plan['mode']}"
            f"{'' if w == 1 else f' over {w}'}, {need / GIB:.1f} GiB per GPU at {plan['assumed_len']} tokens "
            f"({plan['assumed_data']})")
    if need <= gpu_bytes:
        worst = plan[mode]["total"][-1]
        return (f"{head}: fits" + ("" if worst <= gpu_bytes else
                                   f" (were every sample {plan['seqs'][-1]} tokens, max_length, it would need "
                                   f"{worst / GIB:.1f} GiB)"))
    model = plan["model"]
    fixes = []
    if mode == "DDP" and w > 1 and plan["FSDP"]["assumed"] <= gpu_bytes:
        fixes.append(f"--fsdp ({plan['FSDP']['assumed'] / GIB:.1f} GiB)")
    for more in (2 ** k for k in range(1, 11) if not fixes):
        if more > w and (other := memory_plan(replace(cfg, fsdp=True), stage, more, model=model))["FSDP"][
                "assumed"] <= gpu_bytes:
            fixes.append(f"{more} GPUs with --fsdp ({other['FSDP']['assumed'] / GIB:.1f} GiB)")
            break
    for batch in (b for b in range(cfg.batch_size - 1, 0, -1) if cfg.global_batch_size % (b * w) == 0):
        if (other := memory_plan(replace(cfg, batch_size=batch), stage, w, model=model))[mode]["assumed"] <= gpu_bytes:
            fixes.append(f"--batch-size {batch} ({other[mode]['assumed'] / GIB:.1f} GiB; more accumulation)")
            break
    if not cfg.gradient_checkpointing and (other := memory_plan(replace(cfg, gradient_checkpointing=True), stage, w,
                                                                model=model))[mode]["assumed"] <= gpu_bytes:
        fixes.append(f"--gradient-checkpointing ({other[mode]['assumed'] / GIB:.1f} GiB)")
    return f"{head}: does not fit; what would: " + ("; ".join(fixes) if fixes else
                                                    "no one change does (combine them and --plan again)")


def print_plans(args: dict, world: int, gpu_gib: float = 80.0):
    """--plan: the memory plan of each stage this command line would run, each with its verdict for GPUs of
    gpu_gib GiB at this world size; nothing is built or loaded."""
    if world < 1:
        raise UsageError(f"--world-size must be at least 1, got {world}")
    if gpu_gib <= 0:
        raise UsageError(f"--gpu-memory must be > 0 GiB, got {gpu_gib}")
    check_ranges(args, RANGES)
    recipe, stage, init = args.get("recipe", "demo"), args.get("stage", "all"), args.get("init", "")
    overrides = {k: v for k, v in args.items() if k not in ("recipe", "stage", "init", "out_dir")}
    if init and not os.path.exists(init):  # planned before the previous stage has run: its models are the recipe's
        print(f"note: --init {init} does not exist yet: planning from the {recipe} recipe's models "
              f"(and --model-overrides / --variant), as the previous stage will build them")
        init = ""
    for s in stages_to_run(stage, overrides.get("variant", "")):
        cfg = stage_config(recipe, s, overrides, init)
        plan = memory_plan(cfg, s, world)
        print(format_plan(plan))
        print("  " + plan_verdict(cfg, s, plan, gpu_gib * GIB))
