"""
The real training step at full size on a CPU: what one GPU holds at its peak, by kind, and the FLOPs it runs.

    python scripts/trace_step.py --recipe llava15-vicuna7b --stage 1.5 --world-size 8 --json out/trace.json
    python scripts/trace_step.py --recipe siglip-qwen25-0.5b --stage 2 --world-size 1
    python scripts/trace_step.py --recipe llava15-vicuna7b --stage 1.5 --world-size 8 --mode DDP
    torchrun --nproc_per_node 2 scripts/trace_step.py --recipe demo --stage 1.5 --fsdp --real   # real tensors

The model is the recipe's VictorModel built from its configs (no weights), readied by train.py's own code
(ready_for_training: what the stage trains, gradient checkpointing, engineering/distributed.py's FSDP2 or
DDP and its bf16 mixed precision) and trained for two steps by train.py's step (step_compute: forward and
backward of each micro-batch, the clip; optimizer_step: fused AdamW), the second measured. It runs as rank
0 of a fake process group of --world-size processes (collectives move nothing) under FakeTensorMode
(tensors with shapes and no storage), so a 7B model's step takes a minute and no memory. What is measured:
torch.distributed._tools' FSDPMemTracker (FSDP) or MemTracker (one process, DDP): every tensor alive at the
peak, by kind; torch.utils.flop_counter.FlopCounterMode: the FLOPs of one step (recomputation included).
Only step 3's assignment differs (scipy needs values): a fixed one-to-one assignment of the same shape
(the same index tensor); its cost matrix is computed as in training. The batches are drawn from the
stage's length distribution (memory_plan.STAGE_TEXT: what it assumes and why), or --seq-len tokens each.

With --real (for the tests): real tensors and, under torchrun, a real gloo process group, the same tracker
on the same step (and the real assignment), to hold the fake trace to what is measured.
The projection (--mfu, --gpu-tflops): step time and images/s at the assumed MFU on an H100, and step 3's
matching measured on this CPU against it. What a trace cannot see: docs/training.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import train as T  # noqa: E402
import victor  # noqa: E402
from engineering import memory_plan as MP  # noqa: E402
from engineering.config import stage_config  # noqa: E402
from engineering.distributed import setup_distributed, uses_fsdp  # noqa: E402
from victor import IGNORE_INDEX, IMAGE_TOKEN_ID, VictorModel  # noqa: E402

GIB = 2 ** 30
H100 = ("H100 SXM, bf16 dense 989 TFLOP/s", 989e12)

def make_micro_batches(model: VictorModel, cfg, stage: str, count: int, seq_len: int | None, seed: int = 0):
    """count micro-batches of cfg.batch_size samples as train.py's loader gives them (data.Collator, with its
    layout and the selection seeds): random token ids, labels on the answer's share, blank images."""
    rng = np.random.default_rng(seed)
    vocab, n_img = model.llm.config.get_text_config().vocab_size, model.num_image_tokens
    size = model.vision_tower.config.image_size
    collate = D.Collator(0, image_token_id=model.cfg.image_token_id)
    batches = []
    for k in range(count):
        samples = []
        for i, (text, answer, image) in enumerate(MP.sample_texts(stage, cfg.batch_size, n_img, cfg.max_length,
                                                                  rng, seq_len)):
            ids = [1] + [IMAGE_TOKEN_ID] * (n_img if image else 0) + rng.integers(5, vocab, text).tolist()
            labels = [IGNORE_INDEX] * (len(ids) - answer) + ids[len(ids) - answer:]
            samples.append(dict(id=f"{k}-{i}", index=k * cfg.batch_size + i, input_ids=torch.tensor(ids),
                                labels=torch.tensor(labels),
                                pixel_values=torch.zeros(1, 3, size, size) if image else None))
        b = collate(samples)
        b["seeds"] = [1000 * k + i for i in range(len(b["image_keys"]))]
        batches.append(b)
    return batches


def fixed_assignment(cost: torch.Tensor, solver=None) -> torch.Tensor:
    """Under fake tensors: step 3's assignment as a fixed one-to-one one of the same shape (pool row r for the
    r-th token of every image); the same index tensor as scipy's, so the same memory."""
    return torch.arange(cost.shape[1], device=cost.device).expand(cost.shape[0], -1).contiguous()


def device_peak_only(tracker, peak_state):
    """MemTracker._update_peak_stats without its per-module peaks (not read here), which it updates by walking
    every module on every operation: minutes for a 7B model. The device's peak, as it keeps it."""
    for dev, snap in tracker._curr_mem_snap.items():
        if tracker._peak_mem.get(dev, 0) < snap["Total"]:
            tracker._peak_mem[dev], tracker._peak_mem_snap[dev] = snap["Total"], copy.deepcopy(snap)


class NoHook:
    def remove(self):
        pass


def as_fake(value, mode):
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, dict):
        return {k: as_fake(v, mode) for k, v in value.items()}
    return value


def parts_of(snapshot: dict, fsdp: bool) -> dict:
    """A tracker snapshot (one device's) as the JSON's parts, in bytes."""
    by = {str(getattr(k, "value", k)): v for k, v in snapshot.items()}
    get = lambda *names: sum(by.get(n, 0) for n in names)  # noqa: E731
    return dict(params=get("Sharded Param", "Unsharded Param", "Parameter", "Buffer"),
                grads=get("Sharded Grad", "Unsharded Grad", "Gradient"),
                optimizer=get("OptState", "Optstate"), activations=get("Activation", "Inputs", "Other"),
                temporaries=get("Temp"), communication=get("All Gather", "Reduce Scatter"),
                total=by.get("Total", 0))


def on(device: torch.device, snapshot: dict) -> dict:
    """A tracker snapshot's entry for this device (cuda and cuda:0 alike)."""
    return next(v for k, v in snapshot.items() if k.type == device.type and (k.index or 0) == (device.index or 0))


def held_states(before_update: dict, after_update: dict) -> dict:
    """What the step keeps, in bytes: the weights (sharded ones under FSDP, buffers apart), the gradients as
    the update reads them, the optimizer's state after it."""
    by = lambda snap: {str(getattr(k, "value", k)): v for k, v in snap.items()}  # noqa: E731
    before, after = by(before_update), by(after_update)
    return dict(params=after.get("Sharded Param", after.get("Parameter", 0)), buffers=after.get("Buffer", 0),
                grads=before.get("Sharded Grad", before.get("Gradient", 0)),
                optimizer=after.get("OptState", after.get("Optstate", 0)))


def trace(recipe: str, stage: str, world: int, mode: str | None = None, seq_len: int | None = None,
          real: bool = False, overrides: dict | None = None, max_micro: int = 2, steps: int = 2) -> dict:
    """Run the stage's real step for `steps` steps as rank 0 of `world` processes (fake ones unless real), the
    last one measured; returns the figures per GPU (bytes and FLOPs; main() prints them in GiB)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode
    t0 = time.time()
    values = dict(overrides or {})
    if mode:
        values["fsdp"] = mode == "FSDP"
    values.setdefault("bf16", True)  # what a GPU computes in (train.py's default on CUDA)
    cfg = stage_config(recipe, stage, values)
    device = torch.device("cpu")
    if real:
        rank, world, device = setup_distributed()  # torchrun's processes (gloo; NCCL on GPUs), or one
    else:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        rank = 0
    fsdp = uses_fsdp(cfg, world)
    # DDP's reducer (C++) needs real storage for its gradient buckets: on fake tensors the step runs as one
    # process, and the buckets (one fp32 copy of the trained gradients) are counted beside it
    ddp_counted = not real and not fsdp and world > 1
    mesh = None
    if fsdp:  # before any fake tensor: making a mesh under FakeTensorMode fails on a data-dependent op
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
    vcfg = MP.planned_model_settings(cfg, offline=True)
    fake = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    in_mode = fake if fake else contextlib.nullcontext()
    if real:
        torch.manual_seed(0)
        model = VictorModel(vcfg, load_weights=False)
    else:  # built on the meta device (no weights: none exist here), then given fake storage
        with torch.device("meta"):
            model = VictorModel(vcfg, load_weights=False)
        with fake:
            model.to_empty(device=device)
            model.llm.tie_weights()  # to_empty gives each use of a tied weight its own tensor: one again
        # already on its device: wrap_for_processes' model.to(device) would do nothing, but on fake tensors
        # it tries to swap each parameter for itself, which fails
        model.to = lambda *args, **kwargs: model
    if cfg.global_batch_size % (cfg.batch_size * world):
        raise SystemExit(f"error: global_batch_size {cfg.global_batch_size} is not a multiple of batch_size "
                         f"{cfg.batch_size} x {world} processes (--overrides)")
    grad_accum = cfg.global_batch_size // (cfg.batch_size * world)
    micro_count = min(grad_accum, max_micro)
    micro = make_micro_batches(model, cfg, stage, micro_count, seq_len)
    saved_assign, forward_backward = victor.assign_on_host, T.forward_backward
    if not real:  # the one part of the step that needs values; also DTensor's sharding propagation keeps to its
        # own fake mode (else it runs global-shape ops in ours, which the tracker counts as if allocated)
        import torch.distributed.tensor._sharding_prop as sharding_prop
        victor.assign_on_host, saved_detect = fixed_assignment, sharding_prop.detect_fake_mode
        sharding_prop.detect_fake_mode = lambda *args: None
    try:
        with in_mode:
            model, train_model = T.ready_for_training(model, cfg, stage, 1 if ddp_counted else world, device,
                                                      **(dict(mesh=mesh, broadcast_weights=real) if fsdp else {}))
            optimizer, scheduler = T.make_optimizer(cfg, model, stage, device, total_steps=100)
        r = T.StageRun(cfg, stage, rank, 1 if ddp_counted else world, device, model, train_model, None, None,
                       optimizer, scheduler, None, 0, 100, micro_count, set())
        n_label, n_recon = T.global_target_counts(r, micro)  # on the host, as the loop does
        with in_mode:
            inputs = [as_fake(b, fake) for b in micro] if fake else micro
            if fsdp:
                tracker = FSDPMemTracker(model, optimizer)
            else:
                tracker = MemTracker()
                tracker.track_external(model, optimizer)
            if fsdp:
                tracker.track_inputs(tuple(b["input_ids"] for b in inputs))
            tracker._update_peak_stats = functools.partial(device_peak_only, tracker)
            flops = FlopCounterMode(display=False)
            model.train()

            def tracked_forward_backward(*args, **kwargs):  # the tracker's module figures are per forward
                tracker.reset_mod_stats()
                return forward_backward(*args, **kwargs)
            forward_backward, T.forward_backward = T.forward_backward, tracked_forward_backward
            for step in range(steps):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with tracker:  # entering starts the peak from what is alive: this step's peak alone
                    if not fsdp:  # MemTracker hooks every parameter's gradient, which fails on a frozen one
                        tracker._param_to_grad_hook_handles.update(
                            {p: (NoHook(), NoHook()) for p in model.parameters() if not p.requires_grad})
                    with flops if step == 0 else contextlib.nullcontext():
                        T.step_compute(r, inputs, n_label, n_recon)
                    before_update = on(device, tracker.get_tracker_snapshot("current"))
                    T.optimizer_step(optimizer, scheduler, update=True)
                    peak = on(device, tracker.get_tracker_snapshot("peak"))
                    after_update = on(device, tracker.get_tracker_snapshot("current"))
                cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        T.forward_backward = forward_backward
        victor.assign_on_host = saved_assign
        if not real:
            sharding_prop.detect_fake_mode = saved_detect
            torch.distributed.destroy_process_group()
    parts = parts_of(peak, fsdp)
    if ddp_counted:
        buckets = 4 * sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        parts["communication"] += buckets
        parts["total"] += buckets
    plan = MP.memory_plan(cfg, stage, world)
    positions = sum(b["input_ids"].numel() for b in micro)
    padded = sum(int((b["attention_mask"] == 0).sum()) for b in micro)
    images = sum(len(b["image_keys"]) for b in micro)
    scale = grad_accum / micro_count  # the step's other micro-batches: the same work again
    return dict(recipe=recipe, stage=stage, world=world, mode="FSDP" if fsdp else "DDP" if world > 1 else "one process",
                real=real, batch=cfg.batch_size, grad_accum=grad_accum, micro_batches_traced=micro_count,
                seq_lens=[int(b["input_ids"].shape[1]) for b in micro],
                lengths=f"--seq-len {seq_len}" if seq_len else MP.STAGE_TEXT[stage]["data"] + " (assumed distribution)",
                assignment="scipy (real)" if real else "fixed one-to-one assignment of the same shape (fake tensors)",
                gradient_checkpointing=cfg.gradient_checkpointing, bf16=cfg.bf16,
                ddp_buckets="counted (fp32 copy of the trained gradients), not traced" if ddp_counted else "",
                peak=parts["total"], parts=parts,
                states=held_states(before_update, after_update),
                plan_total=plan["FSDP" if fsdp else "DDP"]["assumed"] if not seq_len else
                plan["FSDP" if fsdp else "DDP"]["total"][-1] if seq_len == cfg.max_length else None,
                flops_per_step=flops.get_total_flops() * scale, tokens_per_step=positions * scale,
                images_per_step=images * scale, padding_share=padded / positions, seconds=time.time() - t0,
                cuda_max_memory_allocated=cuda_peak)


def matching_ms(images: int, dim: int, pool_size: int = 2048, tokens: int = 576, repeats: int = 2) -> dict:
    """Step 3 for `images` images of `tokens` visual tokens (75 % replaced) against a pool of pool_size rows, as
    the forward runs it (victor.hungarian_match: the cost matrix, one copy to the host, the default exact solver
    per image over torch's threads), measured on this CPU in ms: the cost matrix (a GEMM, on the GPU in
    training) and the host part (victor.assign_on_host, the GPU waiting for it), for an N(0, 1) pool (as
    initialised) and a pool near the tokens (as trained), as scripts/bench_matching.py makes them."""
    import torch.nn.functional as F
    from bench_matching import make_pool
    gen = torch.Generator().manual_seed(0)
    selected = F.normalize(torch.randn(images, victor.num_replaced(tokens, 0.75), dim, generator=gen), dim=-1)
    out = {"threads": torch.get_num_threads()}
    for kind in ("randn", "near"):
        pool = make_pool(kind, selected, pool_size, gen)
        victor.hungarian_match(selected[:1], pool)  # warm-up
        best = {"cost": float("inf"), "host": float("inf")}
        for _ in range(repeats):
            t = time.perf_counter()
            cost = torch.cdist(selected.flatten(0, 1), pool).view(images, selected.shape[1], -1)
            t2 = time.perf_counter()
            victor.assign_on_host(cost, victor.solve_assignment_reduced)
            t3 = time.perf_counter()
            best = {"cost": min(best["cost"], 1e3 * (t2 - t)), "host": min(best["host"], 1e3 * (t3 - t2))}
        out[kind] = best
    return out


def loader_samples_per_s(image_px: int = 336, count: int = 48) -> float:
    """train.py's data path in one worker (data.LlavaDataset: the JPEG read, padded to a square, CLIP-336's
    preprocessing, the template and the tokenizer) on LLaVA-ReCap-like records with 448 x 336 JPEGs, samples/s
    measured on this CPU. The shapes tokenizer stands in for Vicuna's (both fast tokenizers; a caption is ~1 %
    of the time)."""
    import tempfile

    from PIL import Image
    from transformers import CLIPImageProcessor

    from shapes_world.shapes import DETAIL_PROMPT, build_shapes_tokenizer
    rng = np.random.default_rng(0)
    processor = CLIPImageProcessor(size={"shortest_edge": image_px}, crop_size={"height": image_px, "width": image_px})
    tokenizer = build_shapes_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        records = []
        for i in range(8):  # photo-like: smooth shapes and noise, ~40-60 KB each at quality 90
            base = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((56, 56, 1))).astype(np.float32)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
        for i in range(count):
            caption = " ".join(rng.choice(["a", "red", "circle", "is", "at", "the", "top", "large"], 110))
            records.append({"id": str(i), "image": f"{i % 8}.jpg", "conversations": [
                {"from": "human", "value": f"<image>\n{DETAIL_PROMPT}"}, {"from": "gpt", "value": caption}]})
        dataset = D.LlavaDataset(records, folder, tokenizer, processor, D.CHATML_TEMPLATE, 576)
        dataset[0]  # warm-up
        t = time.perf_counter()
        for i in range(count):
            dataset[i]
        return count / (time.perf_counter() - t)


def project(result: dict, mfu: float, gpu: tuple[str, float], matching: dict | None) -> dict:
    """Step time and images/s per GPU from the counted FLOPs at an assumed MFU (a projection, not a measurement)."""
    step_s = result["flops_per_step"] / (mfu * gpu[1])
    out = dict(step_s=step_s, images_per_s=result["images_per_step"] / step_s, mfu_assumed=mfu, gpu=gpu[0])
    if matching:  # the host part, per micro-batch: the GPU waits for it (the cost matrix is a GEMM on the GPU)
        ms = max(matching[kind]["host"] for kind in ("randn", "near"))
        out.update(matching_ms=matching, matching_share=ms / 1e3 * result["grad_accum"] / step_s)
    return out


def table(folder: str) -> str:
    """The markdown table of docs/training.md from the JSON files in folder (one per trace): each row's plan
    (memory_plan, for the same batch) against its traced peak, and the parts of the peak."""
    rows = ["| recipe | stage | mode | per-GPU batch x positions (padding) | plan GiB | traced peak GiB | plan - trace "
            "| traced parts: weights / grads / AdamW / activations / temporaries / communication GiB | TFLOP per step "
            "| trace s |", "|" + "---|" * 10]
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            r = json.load(f)
        cfg = stage_config(r["recipe"], r["stage"], {"fsdp": r["mode"] == "FSDP", "bf16": True})
        plan = MP.memory_plan(cfg, r["stage"], r["world"])["FSDP" if r["mode"] == "FSDP" else "DDP"]["assumed"]
        parts = " / ".join(f"{r['parts'][k] / GIB:.2f}" for k in ("params", "grads", "optimizer", "activations",
                                                                   "temporaries", "communication"))
        mode = r["mode"] + (f" x {r['world']}" if r["world"] > 1 else "")
        rows.append(f"| {r['recipe']} | {r['stage']} | {mode} | {r['batch']} x {r['seq_lens'][0]} "
                    f"({100 * r['padding_share']:.0f} %) | {plan / GIB:.2f} | {r['peak'] / GIB:.2f} | "
                    f"{100 * (plan / r['peak'] - 1):+.1f} % | {parts} | {r['flops_per_step'] / 1e12:.0f} | "
                    f"{r['seconds']:.0f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="llava15-vicuna7b")
    ap.add_argument("--stage", default="1.5", choices=("1", "1.5", "2"))
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--mode", choices=("FSDP", "DDP"), help="default: the recipe's (--fsdp or not)")
    ap.add_argument("--fsdp", action="store_true", help="shard (as --mode FSDP)")
    ap.add_argument("--seq-len", type=int, help="every sample this many tokens (default: the stage's distribution)")
    ap.add_argument("--real", action="store_true", help="real tensors (small models), under torchrun a gloo group")
    ap.add_argument("--mfu", type=float, default=0.4, help="the MFU the projection assumes")
    ap.add_argument("--matching", action="store_true", help="also time step 3 on this CPU for the per-GPU batch")
    ap.add_argument("--overrides", type=json.loads, default={}, help="TrainConfig fields as JSON, e.g. "
                    "'{\"global_batch_size\": 16}'")
    ap.add_argument("--json", help="write the figures there")
    ap.add_argument("--table", metavar="DIR", help="print docs/training.md's table from the JSON files in DIR")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.table:
        print(table(args.table))
        return
    mode = "FSDP" if args.fsdp else args.mode
    result = trace(args.recipe, args.stage, args.world_size, mode, args.seq_len, args.real, args.overrides)
    if args.real and result["world"] > 1 and int(os.environ.get("RANK", 0)) != 0:
        return
    vision = MP.PAPER_MODELS.get(stage_config(args.recipe, args.stage, {}).vision_model or "", {})
    dim_images = (MP.PAPER_MODELS.get(stage_config(args.recipe, args.stage, {}).llm, {}).get("hidden_size"),
                  result["images_per_step"] / result["grad_accum"])
    matching = (matching_ms(int(dim_images[1]), dim_images[0],
                            tokens=(vision["image_size"] // vision["patch_size"]) ** 2)
                if args.matching and args.stage == "1.5" and vision and dim_images[0] else None)
    result["projected"] = project(result, args.mfu, H100, matching)
    gib = {"peak_gib": result["peak"] / GIB, "parts_gib": {k: v / GIB for k, v in result["parts"].items()},
           "plan_gib": None if result["plan_total"] is None else result["plan_total"] / GIB}
    result.update(gib)
    print(f"{args.recipe} stage {args.stage}, {result['mode']} x {result['world']}: peak {gib['peak_gib']:.2f} GiB "
          f"per GPU (plan {gib['plan_gib'] or float('nan'):.2f}); "
          + ", ".join(f"{k} {v:.2f}" for k, v in gib["parts_gib"].items())
          + f"; {result['flops_per_step'] / 1e12:.1f} TFLOP and {result['tokens_per_step']:.0f} positions per step "
          f"(padding {100 * result['padding_share']:.1f} %), traced in {result['seconds']:.1f} s; "
          f"{result['assignment']}")
    p = result["projected"]
    print(f"projected ({p['gpu']}, MFU {p['mfu_assumed']:.0%} assumed): {p['step_s']:.2f} s per step, "
          f"{p['images_per_s']:.1f} images/s per GPU" + (f"; step 3 measured on this CPU {p['matching_ms']} ms per "
                                                         f"micro-batch: {100 * p['matching_share']:.1f} % of the step"
                                                         if matching else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
