"""
Many processes for train.py: torchrun's setup, the model wrapped for the processes (DDP, or FSDP2
with only rank 0 reading the weights), every part run in every step, and the resumable training
state (model, optimizer, scheduler, RNG, data position). A reader of the method may skip this file;
with one process most of it does nothing.

    torchrun --nproc_per_node 8 train.py --recipe llava15-vicuna7b --stage 1.5 --fsdp ...
    python train.py --save-every 500 --resume auto ...     # a killed run continues bitwise
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from victor import VictorModel, VictorOutput, project_visual_tokens

if TYPE_CHECKING:
    from engineering.config import TrainConfig

# -----------------------------------------------------------------------------
# Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK


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
# Resumable training state: model, optimizer, scheduler, RNG, data position


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start its next epoch part-way through (after a resume), and with lengths
    (one per record) and group (the global batch) orders each global batch's records by length, longest
    first, as LLaVA's group_by_modality_length does: each process's micro-batches then hold samples of
    like length, so less of a step is padding. The same global batches as without it, for 1 or N processes,
    from (seed, epoch) alone."""
    start = 0  # indices of this process to skip, once
    lengths, group, micro = None, 0, 1  # with lengths: group = the global batch, micro = the per-process batch

    def __iter__(self):
        if self.lengths is None:
            indices = list(super().__iter__())
        else:  # DistributedSampler's shuffled order (drop_last), each global batch sorted, then this rank's share
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order[:self.total_size].tolist()
            for k in range(0, len(order) - self.group + 1, self.group):
                order[k:k + self.group] = self.by_length(order[k:k + self.group])
            indices = order[self.rank:self.total_size:self.num_replicas]
        indices = indices[self.start:]
        self.start = 0
        return iter(indices)

    def by_length(self, batch: list[int]) -> list[int]:
        """One global batch sorted by length, laid out so that each process's every micro-batch (indices
        rank::num_replicas) is a run of like lengths: sorted micro-batch g goes to process g % W."""
        ranked, out, world = sorted(batch, key=lambda i: -self.lengths[i]), [0] * len(batch), self.num_replicas
        for q, index in enumerate(ranked):
            g, within = divmod(q, self.micro)
            m, rank = divmod(g, world)
            out[(m * self.micro + within) * world + rank] = index
        return out


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


def save_training_state(state_dir: str, progress: dict, model, optimizer, scheduler, rank: int, keep: int = 2,
                        settings: dict | None = None):
    """Write state_dir/step-N atomically: into step-N.tmp, then one rename, so a run killed while
    saving leaves the previous state intact. Model and optimizer go through torch.distributed.checkpoint:
    each process writes its own shard under FSDP, replicated (DDP) state is written once, and a
    state can be loaded by a different number of processes. RNG states are per process. settings: the
    run's, in settings.json (a resume is checked against them)."""
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
        if settings is not None:
            with open(os.path.join(tmp, "settings.json"), "w") as f:
                json.dump(settings, f, indent=1)
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


def end_processes():
    """At the end of a run: every rank past its last collective before gloo tears down (a rare abort at exit)."""
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# The model for the processes: DDP, or FSDP2 with rank 0's weights broadcast into every shard


def shard_with_fsdp(model: VictorModel, use_bf16: bool, device: torch.device, mesh=None,
                    broadcast_weights: bool = True) -> VictorModel:
    """FSDP2: every vision encoder layer and LLM decoder layer is its own unit, gathered just before
    it runs and freed after. The root unit holds the rest (embeddings, lm_head, projector, recon head
    and the token pool); it stays gathered through the forward, so matching sees the whole pool.
    Rank 0 holds the loaded model, the other ranks the same model on the meta device (build_model_once):
    after sharding, rank 0's weights are broadcast into every rank's shards, one tensor at a time, so no
    other rank ever holds the whole model. mesh: fully_shard's (None: one over every process, made here; a fake
    process group's must be made before fake tensors are); broadcast_weights False: there are none to share
    (scripts/trace_step.py: fake tensors on every rank)."""
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
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if not broadcast_weights:
        return model
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


def build_model_once(build, rank: int):
    """FSDP: only rank 0 reads the weights (build(), train.build_model); every other rank builds the same
    model from rank 0's settings on the meta device (build(settings=...)). shard_with_fsdp then fills every
    rank's shards from rank 0's weights: a node's host memory holds the whole model once, not once per process."""
    built = build() if rank == 0 else None
    settings = [built[0].cfg.to_dict() if rank == 0 else None]
    dist.broadcast_object_list(settings, src=0)
    return built if rank == 0 else build(settings=settings[0])


def wrap_for_processes(model: VictorModel, fsdp: bool, use_bf16: bool, world: int, device: torch.device,
                       **fsdp_options):
    """(model, train_model): the model on its device, sharded in place under FSDP (fsdp_options: shard_with_fsdp's
    mesh and broadcast_weights), or wrapped by DDP with several processes. The loop calls train_model and reads
    and saves model. Every part runs in every step (EveryPartInEveryStep): needed with several processes, and
    kept in one so that 1 and N processes update alike (AdamW moves a parameter whose gradient is zero, and
    skips one that has none)."""
    model.every_part_hook = EveryPartInEveryStep()
    if fsdp:
        model = shard_with_fsdp(model, use_bf16, device, **fsdp_options)
        return model, model
    model.to(device)
    if world == 1:
        return model, model
    return model, torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def gathered_state_dict(model: VictorModel, fsdp: bool) -> dict | None:
    """Under FSDP the full weights, gathered by every process onto the CPU (None otherwise: the model holds them)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -----------------------------------------------------------------------------
# Every part in every step. Under FSDP a layer's weights are gathered from every process when it runs, so a
# process that skips a layer leaves the others waiting; under DDP every trained parameter needs a gradient in
# every process. A batch that does not use a part (the vision side in a text-only batch, the pool where nothing
# was replaced, the head where no image was reconstructed) runs it and adds it times zero.


class EveryPartInEveryStep:
    """VictorModel.every_part_hook while training: forward calls before_llm and after_loss."""

    def before_llm(self, model: VictorModel, embeds: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """A batch without images: plus zero from the vision tower and projector run on one blank image,
        before the LLM runs (the order in which every process gathers the layers)."""
        if visual is not None:
            return embeds
        embeddings = next(model.vision_tower.parameters())  # its dtype is the one the tower computes in
        size = model.vision_tower.config.image_size
        blank = torch.zeros(1, 3, size, size, device=embeddings.device, dtype=embeddings.dtype)
        visual = project_visual_tokens(model.projector, model.encode_images(blank), model.cfg.normalize_visual_tokens)
        return embeds + 0.0 * visual.sum()

    def after_loss(self, model: VictorModel, out: VictorOutput) -> torch.Tensor:
        """The loss plus zero from the trained stage-1.5 parts this batch did not use."""
        unused = []
        if model.token_pool.requires_grad and out.pool_indices is None:
            unused.append(model.token_pool)
        if model.recon_head.weight.requires_grad and out.recon_loss is None:
            unused.extend(model.recon_head.parameters())
        return out.loss + (0.0 * sum(p.sum() for p in unused) if unused else 0.0)
