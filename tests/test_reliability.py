"""Full-scale training that survives, on CPU with gloo and 2 processes (what CI has).

What is checked: FSDP2 (--fsdp) reproduces the single-process losses and weights of stage 1.5 and
writes the same checkpoint format; its sharded training state (torch.distributed.checkpoint)
resumes exactly, also in a different number of processes; a 2-process DDP job killed with SIGKILL
and resumed ends with bitwise the weights of an uninterrupted job; under torchrun --max-restarts, a
worker killed mid-run makes torchrun restart the group, which resumes and ends with bitwise the same
weights.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

import forked
from conftest import MAIN, cli_flags, read_metrics, subprocess_env, together
from engineering.checkpoints import load_checkpoint

LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-5  # float32 sums in another order (2 shards / 2 processes vs 1)


def stage15(base, out_dir, **overrides):
    """Stage 1.5 of the tiny model; the vision tower trained too, so that FSDP shards every part."""
    values = dict(recipe="demo", stage="1.5", data=base.data["1.5"], image_folder=base.shapes, init=base.init,
                  model_overrides={"pool_size": 32}, lr=1e-3, vision_lr=1e-4, pool_lr=1e-2, max_steps=3,
                  warmup_steps=1, global_batch_size=8, batch_size=8, num_workers=0, log_every=1, max_length=256,
                  seed=0, bf16=False, out_dir=str(out_dir))
    values.update(overrides)
    return values


def train(values: dict, procs: int = 1, timeout: int = 240):
    """Run train.py as `procs` processes (as torchrun starts them when procs > 1); returns stdout + stderr."""
    proc = forked.run(["train.py", *cli_flags(values)], procs=procs, timeout=timeout)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    return text


def weights(out_dir):
    return load_file(os.path.join(str(out_dir), "model.safetensors"))


def max_diffs(ref_dir, other_dir):
    """(max |loss difference| over steps and loss kinds, max |weight difference|)."""
    ref_rows, rows = read_metrics(str(ref_dir))[0], read_metrics(str(other_dir))[0]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    loss = max(abs(a[k] - b[k]) for a, b in zip(ref_rows, rows) for k in ("loss", "lm_loss", "recon_loss"))
    a, b = weights(ref_dir), weights(other_dir)
    assert set(a) == set(b)
    return loss, max(float((a[k] - b[k]).abs().max()) for k in a)


# -----------------------------------------------------------------------------
# FSDP


# One 2-process FSDP run serves two tests: its result against one process (6 steps), and its sharded
# training state at step 3 for the resume test (saving a state does not change the training).
FSDP_RUN = dict(batch_size=4, fsdp=True, max_steps=6, save_every=3)  # 2 shards x 4 = global batch 8


@pytest.fixture(scope="module")
def stage15_runs(base, tmp_path_factory):
    """(one process, 6 steps; 2-process FSDP, 6 steps, the sharded training state saved at step 3), run at once."""
    single, fsdp = tmp_path_factory.mktemp("stage15_single"), tmp_path_factory.mktemp("fsdp_full")
    together(lambda: train(stage15(base, single, max_steps=FSDP_RUN["max_steps"])),
             lambda: train(stage15(base, fsdp, **FSDP_RUN), procs=2))
    return single, fsdp


@pytest.fixture(scope="module")
def stage15_single(stage15_runs):
    return stage15_runs[0]


@pytest.fixture(scope="module")
def fsdp_full(stage15_runs):
    return stage15_runs[1]


def test_fsdp_two_processes_match_one(base, stage15_single, fsdp_full):
    out = fsdp_full
    loss_diff, weight_diff = max_diffs(stage15_single, out)
    print(f"FSDP (2 x 4) vs 1 process (1 x 8), stage 1.5: max loss diff {loss_diff:.2e}, "
          f"max weight diff {weight_diff:.2e}")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL
    # the pool and the reconstruction head were trained (and gathered into the checkpoint)
    init = load_file(os.path.join(base.init, "model.safetensors"))
    final = weights(out)
    for key in ("token_pool", "recon_head.weight", "projector.0.weight"):
        assert float((final[key] - init[key]).abs().max()) > 100 * WEIGHT_TOL, key
    # the checkpoint is the usual directory: it loads in one process without FSDP
    model, _, _ = load_checkpoint(str(out))
    assert torch.equal(model.token_pool.detach(), final["token_pool"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["train_config"]["fsdp"] is True


def test_fsdp_text_only_batches_match_one(base, tmp_path):
    """Stage 2 with text-only records mixed in: under FSDP a process whose batch has no image still
    runs the vision layers (blank image, weight 0) so the shards' collectives stay in step."""
    with open(base.data["2"]) as f:
        records = json.load(f)[:12]
    for r in records[1::3]:  # a third of the records lose their image
        r.pop("image")
        for turn in r["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    values = dict(stage15(base, tmp_path / "ref", data=str(data)), stage="2", global_batch_size=4, batch_size=4)
    together(lambda: train(values),
             lambda: train({**values, "out_dir": str(tmp_path / "fsdp"), "batch_size": 2, "fsdp": True}, procs=2))
    loss_diff, weight_diff = max_diffs(tmp_path / "ref", tmp_path / "fsdp")
    print(f"FSDP stage 2 with text-only records: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL


def test_fsdp_sharded_state_resumes_exactly(base, fsdp_full, tmp_path):
    """The sharded training state (one file set per process, torch.distributed.checkpoint) resumes
    bitwise under FSDP, and also loads into one process without FSDP."""
    full = fsdp_full
    values = stage15(base, full, **FSDP_RUN)
    state = full / "checkpoints" / "step-3"
    assert (state / "progress.json").is_file()
    assert any(f.endswith(".distcp") for f in os.listdir(state / "model_optimizer"))
    resumes = {"fsdp_resumed": (2, True), "single_resumed": (1, False)}  # name: (processes, --fsdp)

    def resume(name):
        procs, fsdp = resumes[name]
        out = tmp_path / name
        shutil.copytree(state, out / "checkpoints" / "step-3")
        return train({**values, "out_dir": str(out), "resume": "auto", "fsdp": fsdp,
                      "batch_size": 4 if procs == 2 else 8}, procs=procs)
    texts = together(*(lambda name=name: resume(name) for name in resumes))  # the two resumes at once
    for (name, (procs, _)), text in zip(resumes.items(), texts):
        out = tmp_path / name
        assert re.search(r"resuming from \S+step-3 at step 3", text), text[-2000:]
        a, b = weights(full), weights(out)
        if procs == 2:
            assert all(torch.equal(a[k], b[k]) for k in a), "FSDP resume differs from the uninterrupted run"
        else:
            assert max(float((a[k] - b[k]).abs().max()) for k in a) < WEIGHT_TOL


# -----------------------------------------------------------------------------
# Kill and resume, restart under torchrun


def descendants(pid: int) -> list[int]:
    """All processes below pid (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def worker_pid(launcher_pid: int, local_rank: int) -> int | None:
    for pid in descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return pid
    return None


def kill_all(launcher: subprocess.Popen):
    """SIGKILL a launcher and every process below it."""
    for pid in [*descendants(launcher.pid), launcher.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()


def wait_for(path, proc, seconds=180):
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert path.exists(), "no training state was written"


RUN = dict(max_steps=30, save_every=5, batch_size=2, global_batch_size=4, vision_lr=0.0)


@pytest.fixture(scope="module")
def ddp_uninterrupted(base, tmp_path_factory):
    """2-process DDP, stage 1.5, 30 steps over two epochs of the 64-image set, never interrupted. It runs in the
    background while the tests make their own runs: calling the fixture's value waits for it, returns its dir."""
    out = tmp_path_factory.mktemp("ddp_ref")
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(train, stage15(base, out, **RUN), procs=2)

        def finished():
            run.result()
            return out
        yield finished


def test_ddp_killed_and_resumed_equals_uninterrupted(base, ddp_uninterrupted, tmp_path):
    """The whole job (both processes) is SIGKILLed right after the first saved state."""
    out = tmp_path / "killed"
    job = forked.start(["train.py", *cli_flags(stage15(base, out, **RUN))], procs=2)
    try:
        wait_for(out / "checkpoints" / "step-5", job)
    finally:
        job.kill()  # both processes at once, like a node that loses power
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    text = train(stage15(base, out, **RUN, resume="auto"), procs=2)
    m = re.search(r"resuming from \S+step-(\d+) at step (\d+)", text)
    assert m and 5 <= int(m.group(2)) < 30, text[-2000:]
    a, b = weights(ddp_uninterrupted()), weights(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "resumed DDP weights differ"
    rows, ref_rows = read_metrics(str(out))[0], read_metrics(str(ddp_uninterrupted()))[0]
    assert rows[-1]["step"] == ref_rows[-1]["step"] == 30 and rows[-1]["loss"] == ref_rows[-1]["loss"]


def test_torchrun_restarts_a_dead_worker_and_resumes(base, ddp_uninterrupted, tmp_path):
    """torchrun --max-restarts 1: worker 1 is SIGKILLed mid-run; torchrun restarts the group, which
    resumes from the newest state (--resume auto) and finishes with the uninterrupted weights."""
    out = tmp_path / "restarted"
    flags = cli_flags(stage15(base, out, **RUN, resume="auto"))
    log = open(tmp_path / "torchrun.log", "w+")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "--max-restarts", "1", "train.py", *flags], cwd=MAIN, env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(out / "checkpoints" / "step-5", launcher)
        victim = worker_pid(launcher.pid, local_rank=1)
        assert victim is not None, "worker 1 not found"
        os.kill(victim, signal.SIGKILL)
        assert launcher.wait(timeout=240) == 0
    finally:
        kill_all(launcher)
        log.seek(0)
        text = log.read()
    m = re.search(r"resuming from \S+step-(\d+) at step (\d+)", text)
    assert m and 5 <= int(m.group(2)) < 30, "the restarted group did not resume: " + text[-3000:]
    a, b = weights(ddp_uninterrupted()), weights(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "restarted job's weights differ"
