"""
On a GPU machine, run this first: the GPU path measured in one run (under 8 minutes on one GPU), one table.

    python scripts/bench_gpu.py             # SDPA, and flash-attention 2 if it imports
    python scripts/bench_gpu.py --quick     # ~2 minutes: SDPA only, fewer steps, smaller matching and generate runs
    python scripts/bench_gpu.py --peak-tflops 989   # the GPU's peak dense bf16 TFLOP/s, where PEAK_TFLOPS lacks it

A random-init model with the paper's shapes: a CLIP-L/336-style tower (24 layers, width 1024, 576 visual
tokens) and a Llama-style LLM of about 1.1B parameters (TinyLlama's shape: 22 layers, width 2048, GQA 32/4),
pool 2048. Training steps as train.py takes them: fp32 master weights, bf16 autocast, gradient checkpointing
(LLM and tower), the paper's stage-1.5/2 trained parts (tower at vision_lr 2e-6), fused AdamW. It prints:
- stage-1.5 and stage-2 step time (median) and their ratio, per attention kernel;
- tokens/s and MFU: model FLOPs (6 x parameters per token trained through, 2 x where frozen, plus PaLM's
  12 x layers x width x sequence per token for attention; recomputation not counted) over the GPU's peak;
- peak GPU memory of each stage against train.py --plan's figure (memory_plan.memory_plan) for this model and batch;
- Hungarian matching in ms per image at 432 tokens x 2048 rows x width 4096 (the 7B recipe's sizes), and how
  many synchronising device->host copies one batch makes (torch.cuda.set_sync_debug_mode: expected 1);
- generate throughput (bf16 weights, KV cache, greedy);
- the one-GPU recipe's stage-1.5 step traced (scripts/trace_step.py) with real CUDA tensors: the tracker's peak
  against torch.cuda.max_memory_allocated(), and the fake trace of the same run that --plan is held to.
Without CUDA it refuses with one line. (--device cpu --tiny runs the same code on a tiny model: the test.)
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as T  # noqa: E402
from engineering import distributed as DI  # noqa: E402
from engineering import memory_plan as MP  # noqa: E402
from victor import IGNORE_INDEX, IMAGE_TOKEN_ID, VictorConfig, VictorModel, hungarian_match, num_replaced  # noqa: E402

# peak dense bf16 tensor TFLOP/s by device name (the vendors' data sheets); the first key the name contains wins
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "H800": 989, "H20": 148, "GH200": 989,
               "B200": 2250, "B100": 1750, "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121,
               "A10G": 70, "A10": 125, "RTX 4090": 165, "RTX 6000 Ada": 364, "A6000": 155}
TOWER = MP.PAPER_MODELS["openai/clip-vit-large-patch14-336"]
LLM_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
              num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0)
TINY_TOWER = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
TINY_LLM = dict(LLM_1B, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64, max_position_embeddings=512)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~2-minute subset")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's peak dense bf16 TFLOP/s (for MFU)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (one image each)")
    ap.add_argument("--text", type=int, default=128, help="caption tokens per sequence")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the test's run of this code
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a tiny model (the CPU test)
    return ap.parse_args(argv)


def model_settings(tiny: bool, attn: str) -> VictorConfig:
    return VictorConfig(vision_config=TINY_TOWER if tiny else TOWER, llm_config=TINY_LLM if tiny else LLM_1B,
                        pool_size=32 if tiny else 2048, attn_implementation=attn)


def train_config(settings: VictorConfig, batch: int, seq: int) -> T.TrainConfig:
    """The paper's stage-1.5/2 settings for this model and batch: what --plan is asked about."""
    return T.TrainConfig(recipe="bench_gpu", model_overrides=settings.to_dict(), batch_size=batch, max_length=seq,
                         bf16=True, gradient_checkpointing=True, lr=1e-5, vision_lr=2e-6, pool_lr=1.5e-4)


def make_batch(model: VictorModel, batch: int, text: int, device) -> dict:
    n = model.num_image_tokens
    vocab = model.llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, 1 + n + text), generator=g)
    ids[:, 1:1 + n] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n] = IGNORE_INDEX
    size = model.vision_tower.config.image_size
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), labels=labels.to(device),
                pixel_values=torch.randn(batch, 3, size, size, generator=g).to(device),
                seeds=list(range(batch)))


def step_flops(model: VictorModel, batch: dict, stage: str) -> float:
    """Model FLOPs of one training step (forward + backward): 6 x parameters per token through trained
    parameters, 2 x through frozen ones (their inputs' gradients are still needed, except the tower's when it
    is frozen, ignored here); attention 12 x layers x width x sequence per token (PaLM's formula, fwd+bwd)."""
    b, seq = batch["input_ids"].shape
    labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    text = model.llm.config
    body = sum(p.numel() for p in model.llm.get_decoder().layers.parameters())
    flops = 6 * body * b * seq + 12 * text.num_hidden_layers * text.hidden_size * seq * b * seq
    flops += 6 * text.vocab_size * text.hidden_size * labels  # lm_head, at the label positions only
    v = model.vision_tower.config
    used = len(model.vision_tower.encoder.layers) + 1 + model.cfg.vision_feature_layer
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    per_layer = sum(p.numel() for p in model.vision_tower.encoder.layers[0].parameters())
    trained = next(model.vision_tower.encoder.layers[0].parameters()).requires_grad
    flops += (6 if trained else 2) * (used * per_layer * tokens + 2 * used * v.hidden_size * tokens * tokens) * b
    flops += 6 * sum(p.numel() for p in model.projector.parameters()) * b * model.num_image_tokens
    if stage == "1.5":  # the reconstruction head at every image position
        flops += 6 * model.recon_head.weight.numel() * b * model.num_image_tokens
    return flops


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage(model: VictorModel, batch: dict, stage: str, repeats: int, device) -> tuple[float, float | None]:
    """(median step seconds, peak GPU bytes) of `repeats` training steps after two warm-up steps, with this
    stage's own AdamW (freed afterwards, so that the peak is this stage's alone)."""
    model.train()
    groups = model.param_groups(stage, 1e-5, vision_lr=2e-6, pool_lr=1.5e-4)
    optimizer = torch.optim.AdamW(groups, fused=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    inputs = {k: v for k, v in batch.items() if k != "seeds"}
    times = []
    for i in range(2 + repeats):
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**inputs, stage=stage, selection_seeds=batch["seeds"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del optimizer
    return statistics.median(times), peak


def time_matching(images: int, tokens: int, rows: int, width: int, device) -> tuple[float, int | None]:
    """(ms per image, synchronising device->host copies in one batch) of Hungarian matching: normalised
    tokens against an N(0, 1) pool, as at the start of stage 1.5."""
    g = torch.Generator().manual_seed(0)
    selected = torch.nn.functional.normalize(torch.randn(images, tokens, width, generator=g), dim=-1).to(device)
    pool = torch.randn(rows, width, generator=g).to(device)
    hungarian_match(selected[:1], pool)  # warm-up (cdist's kernels, the thread pool)
    syncs = None
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hungarian_match(selected, pool)
        torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    sync(device)
    t = time.perf_counter()
    hungarian_match(selected, pool)
    sync(device)
    return (time.perf_counter() - t) * 1e3 / images, syncs


def time_generate(model: VictorModel, batch: dict, prompt_text: int, new_tokens: int, device) -> float:
    """New tokens per second of greedy generation with bf16 weights (the model is converted in place)."""
    model.to(torch.bfloat16).eval()
    length = 1 + model.num_image_tokens + prompt_text
    ids, mask = batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
    pixels = batch["pixel_values"].to(torch.bfloat16)
    model.generate(ids, mask, pixels, max_new_tokens=2, pad_token_id=0)  # warm-up
    sync(device)
    t = time.perf_counter()
    new = model.generate(ids, mask, pixels, max_new_tokens=new_tokens, pad_token_id=0)
    sync(device)
    return new.numel() / (time.perf_counter() - t)


def peak_flops(args, device) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure came from)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    key = next((k for k in PEAK_TFLOPS if k in name), None)
    if key is None:
        return None, f"{name!r} is not in PEAK_TFLOPS: give --peak-tflops"
    return PEAK_TFLOPS[key] * 1e12, f"{key} data sheet"


def attention_kernels(device) -> list[str]:
    kernels = ["sdpa"]
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            kernels.append("flash_attention_2")
        except ImportError:
            pass
    return kernels


def run(args) -> list[tuple[str, str]]:
    """The measurements, as (row, value) pairs of the table."""
    device = torch.device(args.device)
    repeats = 1 if args.tiny else 3 if args.quick else 10
    settings = model_settings(args.tiny, "sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = VictorModel(settings)
    model.every_part_hook = DI.EveryPartInEveryStep()
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = make_batch(model, args.batch_size, args.text, device)
    b, seq = batch["input_ids"].shape
    peak, peak_from = peak_flops(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    params = sum(p.numel() for p in model.llm.parameters()) / 1e9
    rows = [("device", f"{name}; torch {torch.__version__}"),
            ("model", f"tower {model.vision_tower.config.num_hidden_layers} layers x "
                      f"{model.vision_tower.config.hidden_size} ({model.num_image_tokens} visual tokens), LLM "
                      f"{params:.2f}B params; pool {model.token_pool.shape[0]}"),
            ("batch", f"{b} x {seq} tokens ({model.num_image_tokens} visual, "
                      f"{num_replaced(model.num_image_tokens, model.cfg.replace_ratio)} replaced); bf16 autocast, "
                      f"gradient checkpointing"),
            ("peak bf16", f"{peak / 1e12:.0f} TFLOP/s ({peak_from})" if peak else f"unknown ({peak_from})")]
    kernels = attention_kernels(device)[:1 if args.quick else None]
    for kernel in kernels:
        model.llm.set_attn_implementation(kernel)
        times = {}
        for stage in ("2", "1.5"):
            seconds, used = time_stage(model, batch, stage, repeats, device)
            times[stage] = seconds
            flops = step_flops(model, batch, stage)
            mfu = f"MFU {flops / seconds / peak:.1%}" if peak else "MFU n/a"
            rows.append((f"stage {stage} step, {kernel}",
                         f"{seconds * 1e3:.0f} ms; {b * seq / seconds:,.0f} tokens/s; {mfu}"))
            if kernel == kernels[0]:
                plan = MP.memory_plan(train_config(settings, b, seq), stage, 1)
                planned = plan["DDP"]["total"][-1]  # one process: nothing sharded, the longest sequence
                said = (f"{used / MP.GIB:.2f} GiB measured vs {planned / MP.GIB:.2f} GiB planned "
                        f"({used / planned:.2f}x)" if used is not None else
                        f"n/a on {device.type} (planned {planned / MP.GIB:.3f} GiB)")
                rows.append((f"stage {stage} peak memory", said))
        rows.append((f"stage 1.5 / stage 2, {kernel}", f"{times['1.5'] / times['2']:.3f}"))
    images = 2 if args.tiny else 4 if args.quick else 16
    tokens, pool_rows, width = (12, 32, 32) if args.tiny else (432, 2048, 4096)
    ms, syncs = time_matching(images, tokens, pool_rows, width, device)
    rows.append((f"matching {tokens} x {pool_rows} x {width}",
                 f"{ms:.1f} ms per image ({images} images); synchronising copies per batch: "
                 f"{syncs if syncs is not None else 'n/a'}"))
    new_tokens = 4 if args.tiny else 16 if args.quick else 64
    model.llm.set_attn_implementation(kernels[-1])
    rate = time_generate(model, batch, 16, new_tokens, device)
    rows.append((f"generate, {kernels[-1]}", f"{rate:,.0f} new tokens/s ({b} sequences, {new_tokens} new tokens, "
                                             f"bf16 weights)"))
    del model, batch  # the allocator's peak below is the traced step's alone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows.append(trace_against_allocator(args.tiny))
    return rows


def trace_against_allocator(tiny: bool) -> tuple[str, str]:
    """scripts/trace_step.py on this device: the one-GPU recipe's stage 1.5 step (the demo's models with --tiny)
    on real tensors, its tracker's peak against torch.cuda.max_memory_allocated, and the fake trace of the same
    run (what --plan is held to on a CPU)."""
    import trace_step
    recipe = "demo" if tiny else "siglip-qwen25-0.5b"
    real, fake = trace_step.trace(recipe, "1.5", 1, real=True), trace_step.trace(recipe, "1.5", 1)
    cuda = real["cuda_max_memory_allocated"]
    said = (f"tracker {real['peak'] / MP.GIB:.3f} GiB on real tensors, {fake['peak'] / MP.GIB:.3f} GiB traced on "
            f"fake ones")
    return (f"trace, {recipe} stage 1.5", said + (f"; torch.cuda.max_memory_allocated {cuda / MP.GIB:.2f} GiB "
                                                  f"(tracker / allocator {real['peak'] / cuda:.2f})" if cuda else
                                                  "; max_memory_allocated n/a on the cpu"))


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} | {v}" for k, v in rows)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
    if args.device != "cuda" and not args.tiny:
        sys.exit("bench_gpu.py: --device cpu runs the tiny model only (add --tiny); the benchmark itself needs CUDA")
    t = time.time()
    rows = run(args)
    rows.append(("wall time", f"{time.time() - t:.0f} s"))
    print(format_rows(rows))


if __name__ == "__main__":
    main()
