"""
Benchmark: the method's overhead, stage-1.5 training-step time / stage-2 training-step time,
on the same mid-size model and batch (576 visual tokens, pool 2048, LLM width 1024).

    python scripts/bench_step.py                 # CPU, ~2 minutes
    python scripts/bench_step.py --layers 2 --repeats 2

Stage 1.5 adds token selection, Hungarian matching, the replacement and the reconstruction
head and loss to an otherwise identical step (forward, backward, AdamW). Steps alternate
between the two stages so both see the same machine conditions; medians are reported.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import TrainConfig, trainable_param_groups  # noqa: E402
from victor import IGNORE_INDEX, IMAGE_TOKEN_ID, VictorConfig, VictorModel, hungarian_match, num_replaced  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--text", type=int, default=96, help="caption tokens per sample")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from transformers import CLIPVisionConfig, LlamaConfig
    device = torch.device(args.device)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14)
    llm = LlamaConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=int(2.75 * args.width),
                      num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                      num_key_value_heads=args.width // 64, max_position_embeddings=2048)
    cfg = VictorConfig(vision_config=vision.to_dict(), llm_config=llm.to_dict(), pool_size=2048)
    model = VictorModel(cfg).to(device)
    n = model.num_image_tokens
    ids = torch.randint(0, 32000, (args.images, 1 + n + args.text), device=device)
    ids[:, 1:1 + n] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n] = IGNORE_INDEX
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                 pixel_values=torch.randn(args.images, 3, 336, 336, device=device))
    cfg = TrainConfig(lr=1e-5, vision_lr=0.0, pool_lr=1.5e-4)
    optims = {s: torch.optim.AdamW(trainable_param_groups(model, s, cfg)) for s in ("2", "1.5")}

    def step(stage):
        model.set_trainable(stage)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(**batch, stage=stage)
        out.loss.backward()
        optims[stage].step()
        optims[stage].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step("2"), step("1.5")  # warm-up
    times = {"2": [], "1.5": []}
    for _ in range(args.repeats):
        for s in ("2", "1.5"):
            times[s].append(step(s))
    t2, t15 = statistics.median(times["2"]), statistics.median(times["1.5"])
    # the matching alone, at the same size, for reference
    r = num_replaced(n, model.cfg.replace_ratio)
    tokens = torch.nn.functional.normalize(torch.randn(args.images, r, args.width, device=device), dim=-1)
    t = time.perf_counter()
    hungarian_match(tokens, model.token_pool)
    t_match = time.perf_counter() - t
    params = sum(p.numel() for p in model.llm.parameters()) / 1e6
    print(f"device {device}; LLM {params:.0f}M params (width {args.width}, {args.layers} layers); "
          f"batch {args.images} x {ids.shape[1]} tokens ({n} visual, {r} replaced); pool 2048")
    print(f"stage 2   step: {t2 * 1e3:8.0f} ms (median of {args.repeats})")
    print(f"stage 1.5 step: {t15 * 1e3:8.0f} ms, of which matching ~{t_match * 1e3:.0f} ms")
    print(f"stage 1.5 / stage 2 = {t15 / t2:.3f}")


if __name__ == "__main__":
    main()
