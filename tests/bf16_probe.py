"""bf16 against float32 on one batch, as train.py computes (tests/test_bf16.py): one process, or under
torchrun with 2 processes sharded by FSDP (distributed.shard_with_fsdp, bf16 parameters and fp32 reduction).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/bf16_probe.py OUT_DIR

Each process writes OUT_DIR/rank-N.pt: for every case (variant, stage) and dtype, the loss, the token
pool's gradient (the whole of it) and what matching saw (the selected tokens, the pool) and chose.
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import victor as V  # noqa: E402
from conftest import tiny_model  # noqa: E402
from engineering import distributed as DI  # noqa: E402

IMAGES = 2  # per batch: with the tiny model's 16 tokens each, as many tokens as the pool has rows
CASES = (("victor", "1.5"), ("croc", "1.5"), ("victor", "2"))  # Hungarian, nearest + mixed mask; stage 2


def make_model(variant: str) -> V.VictorModel:
    """The tiny model (sdpa), its pool planted with its own visual tokens of make_batch(0)'s images (shuffled),
    so that matching has a clear answer where two tokens are not alike: each token's own copy."""
    model = tiny_model(seed=0, pool_size=IMAGES * 16, **V.VARIANTS[variant])
    ids, _, _, pixels = make_batch(0)
    with torch.no_grad():
        visual = model.embed_inputs(ids, pixels)[2].reshape(-1, model.token_pool.shape[1])
        model.token_pool.copy_(visual[torch.randperm(len(visual), generator=torch.Generator().manual_seed(0))])
    return model


def make_batch(seed: int):
    """(input_ids, attention_mask, labels, pixel_values): IMAGES samples of prompt, image, prompt, answer."""
    g = torch.Generator().manual_seed(seed)
    n = 16
    ids = torch.cat([torch.randint(3, 60, (IMAGES, 3), generator=g), torch.full((IMAGES, n), V.IMAGE_TOKEN_ID),
                     torch.randint(3, 60, (IMAGES, 8), generator=g)], dim=1)
    labels = ids.clone()
    labels[:, :3 + n + 3] = V.IGNORE_INDEX
    return ids, torch.ones_like(ids), labels, torch.randn(IMAGES, 3, 32, 32, generator=g)


def prepare(model: V.VictorModel, stage: str) -> V.VictorModel:
    """As train.prepare_model does it for a paper recipe: the tower trained, gradient checkpointing."""
    model.param_groups(stage, 1e-5, vision_lr=2e-6, pool_lr=1.5e-4)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.every_part_hook = DI.EveryPartInEveryStep()
    return model.train()


def run_case(model, stage: str, bf16: bool, batch, seeds) -> dict:
    """One forward and backward as train.forward_backward computes it; what matching saw and chose."""
    seen = {}
    match = V.match_tokens_to_pool

    def recording(tokens, pool, matcher):
        seen.update(tokens=tokens.detach().float().clone(), pool=pool.detach().float().clone())
        seen["chosen"] = match(tokens, pool, matcher)
        return seen["chosen"]
    V.match_tokens_to_pool = recording
    try:
        ids, mask, labels, pixels = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(ids, mask, labels, pixels, stage=stage, selection_seeds=seeds)
            out.loss.backward()
    finally:
        V.match_tokens_to_pool = match
    grad = model.token_pool.grad
    if grad is not None and hasattr(grad, "full_tensor"):  # FSDP: a sharded DTensor
        grad = grad.full_tensor()
    return dict(loss=float(out.loss.detach()), lm_loss=float(out.lm_loss.detach()),
                recon_loss=None if out.recon_loss is None else float(out.recon_loss.detach()),
                pool_grad=None if grad is None else grad.detach().float().clone(), **seen)


def compare(variant: str, stage: str, batch_seed: int, shard=None) -> dict:
    """{"fp32": run_case, "bf16": run_case} on the same model and batch; shard(model, use_bf16) wraps
    each copy (FSDP), else both run unsharded in one process with autocast deciding the dtype."""
    model = prepare(make_model(variant), stage)
    batch = make_batch(batch_seed)
    seeds = [batch_seed * 10 + i for i in range(IMAGES)]
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        copy_ = copy.deepcopy(model)
        if shard is not None:
            copy_ = shard(copy_, bf16)
        runs[name] = run_case(copy_, stage, bf16, batch, seeds)
    return runs


if __name__ == "__main__":
    rank, world, device = DI.setup_distributed()
    torch.set_num_threads(1)
    results = {f"{v} {s}": compare(v, s, batch_seed=rank, shard=lambda m, bf16: DI.shard_with_fsdp(m, bf16, device))
               for v, s in CASES}
    torch.save(results, os.path.join(sys.argv[1], f"rank-{rank}.pt"))
    DI.barrier()
    torch.distributed.destroy_process_group()
