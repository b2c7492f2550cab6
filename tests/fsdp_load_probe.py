"""torchrun entry for tests/test_memory.py: train.py's command line, with each process's memory recorded
around the FSDP model loading.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_load_probe.py {once|every-rank} TRAIN_FLAGS...

`once` is train.py as it is (rank 0 reads the weights, the other ranks build on the meta device);
`every-rank` is the reference it replaced: every rank reads the whole model, then shards its own copy.
Each process writes $PROBE_DIR/rank-N.json: its RSS just before the model is built, its peak RSS from then
until its shards are filled, and to the end of the run; any tensor left on the meta device; its buffers.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train as T  # noqa: E402
from engineering import distributed as DI  # noqa: E402
from engineering import memory_plan as MP  # noqa: E402

record = {}


def status_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset), KiB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def every_rank_loads(build, rank):
    return build()


def shard_own_copy(model, use_bf16, device):
    """Sharding as it was before the weights were loaded once: each rank keeps its chunk of its own copy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    for layer in [*model.vision_tower.encoder.layers, *model.llm.get_decoder().layers]:
        fully_shard(layer, mp_policy=MixedPrecisionPolicy())
    fully_shard(model, mp_policy=MixedPrecisionPolicy())
    return model


def recording(build_once, shard):
    def build_recorded(build, rank):
        cfg = build.args[0]  # train.prepare_model's build: partial(build_model, cfg, stage)
        # the first build imports the model's transformers modules (~110 MiB, whatever the model's size):
        # a build on the meta device first puts them in the baseline, so that the growth is the model's
        with torch.device("meta"):
            T.VictorModel(MP.planned_model_settings(cfg, offline=True), load_weights=False)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the peak from here on
        record["rss_before_build_kib"] = status_kib("VmRSS")
        return build_once(build, rank)

    def shard_recorded(model, use_bf16, device):
        model = shard(model, use_bf16, device)
        record["peak_loading_kib"] = status_kib("VmHWM")
        tensors = [*model.named_parameters(), *model.named_buffers()]
        record["meta_tensors"] = [n for n, t in tensors if getattr(t, "_local_tensor", t).is_meta]
        record["buffers"] = {n: b.tolist() for n, b in model.named_buffers()}
        return model
    return build_recorded, shard_recorded


if __name__ == "__main__":
    loader, argv = sys.argv[1], sys.argv[2:]
    if loader == "every-rank":
        T.build_model_once, DI.shard_with_fsdp = every_rank_loads, shard_own_copy
    elif loader != "once":
        sys.exit(f"loader must be 'once' or 'every-rank', got {loader!r}")
    T.build_model_once, DI.shard_with_fsdp = recording(T.build_model_once, DI.shard_with_fsdp)
    T.run(T.parse_args(argv))
    record["peak_run_kib"] = status_kib("VmHWM")
    with open(os.path.join(os.environ["PROBE_DIR"], f"rank-{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()
