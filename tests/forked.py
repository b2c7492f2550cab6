"""Run train.py (or a test script) as its own process, without paying for the imports again.

A fresh `python train.py` spends ~5 s of CPU importing torch and transformers before it does anything;
the test suite's ~100 such runs spent most of its 7 minutes there (3 minutes with this). Here each run
is forked from one server process that imported torch, transformers and the project once
(multiprocessing's forkserver). The run is still a process of its own, as `python SCRIPT ARGS` makes it:
its own environment, working directory, argv, stdout/stderr and exit status (`sys.exit("error: ...")`
prints the line and exits 1; an uncaught exception prints its traceback and exits 1). With procs=N it is
N processes with the variables that `torchrun --standalone --nproc_per_node N` gives its workers (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), connecting to a rendezvous store the
launcher holds (TORCHELASTIC_USE_AGENT_STORE, as torchrun's agent does); as under torchrun, once one fails
the others are stopped (after STOP_GRACE seconds in which they may end by themselves, so that a test
sees whether they would).

    from forked import run, start
    proc = run(["train.py", "--stage", "1.5", ...], procs=2)   # a subprocess.CompletedProcess
    job = start(["train.py", ...]); job.poll(); job.kill()      # for the kill-and-resume tests

What it does not stand in for: torchrun itself (its restarts), and a fresh interpreter (what a shell
user sees); those tests start `python` as a subprocess.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

MAIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a run of train.py, eval.py or a test script imports; the server imports it once. (A module left
# out is imported by the run that needs it, as it would be anyway.) pytest: a forked process imports the
# main module of the process that asked for it, which under `python -m pytest` is pytest's.
PRELOAD = [
    "torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.checkpoint", "numpy", "PIL.Image",
    "safetensors.torch", "tokenizers", "scipy.optimize", "pyarrow.parquet", "tqdm",
    "transformers", "transformers.image_processing_utils", "transformers.modeling_utils",
    "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.clip.modeling_clip", "transformers.models.siglip.modeling_siglip",
    "transformers.models.clip.image_processing_clip", "transformers.models.siglip.image_processing_siglip",
    "data", "victor", "engineering.checkpoints", "engineering.distributed", "engineering.batches", "engineering.config",
    "engineering.records", "engineering.reruns", "shapes_world.shapes",
    "engineering.memory_plan", "engineering.reporting", "engineering.flags", "shapes_world.demo_base",
    "train", "eval", "engineering.benchmarks", "forked", "pytest",
]

# The environment the server imports under: what a test's `python` subprocess gets (one thread, no
# tokenizer threads, nothing fetched from a hub). Variables read when a module is imported cannot differ
# in a run, so run() refuses a run that asks for another value of one of these.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
STOP_GRACE = 10.0  # seconds the other processes of a job get to end by themselves once one has failed
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")

_server_lock = threading.Lock()
_context = None


def _server():
    """The forkserver context, its server started (once) with SERVER_ENV and PRELOAD imported."""
    global _context
    with _server_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            before = dict(os.environ)
            os.environ.update(SERVER_ENV)
            for k in TORCHRUN_VARS:
                os.environ.pop(k, None)
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                os.environ.clear()
                os.environ.update(before)
            _context = ctx
    return _context


def base_env(extra: dict | None = None) -> dict:
    """The environment of a run: this process's, without torchrun's variables, with SERVER_ENV and extra."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(SERVER_ENV)
    for k, v in (extra or {}).items():
        if k in SERVER_ENV and v != SERVER_ENV[k]:
            raise ValueError(f"{k}={v!r}: the fork server imported with {k}={SERVER_ENV[k]!r}; start `python` "
                             f"as a subprocess for a run that needs another value")
        env[k] = v
    return env


def _main(script: str, args: list[str], env: dict, cwd: str, out_path: str, err_path: str):
    """In the forked process: become `python SCRIPT ARGS` and exit as it would."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Job:
    """`procs` processes running one script (ranks 0..procs-1), as subprocess.Popen for one: poll, wait, kill."""

    def __init__(self, cmd: list[str], procs: int = 1, env: dict | None = None, cwd: str = MAIN):
        ctx = _server()
        self.cmd, self.dir = list(cmd), tempfile.mkdtemp(prefix="forked-")
        env = base_env(env)
        self.store = None
        if procs > 1:
            # torchrun's way: the launcher holds the rendezvous store (on a port the OS gives it, held from the
            # start, so that no other job can take it first) and the workers connect to it
            from torch.distributed import TCPStore
            self.store = TCPStore("127.0.0.1", 0, procs, is_master=True, wait_for_workers=False)
            env = dict(env, WORLD_SIZE=str(procs), LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(self.store.port), TORCHELASTIC_USE_AGENT_STORE="True")
        self.processes = []
        for rank in range(procs):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) if procs > 1 else env
            p = ctx.Process(target=_main, args=(cmd[0], cmd[1:], rank_env, cwd, self._path(rank, "out"),
                                                self._path(rank, "err")), daemon=False)
            p.start()
            self.processes.append(p)
        self.pids, self.failed, self.failed_at = [p.pid for p in self.processes], None, None

    def _path(self, rank, stream):
        return os.path.join(self.dir, f"rank-{rank}.{stream}")

    def poll(self) -> int | None:
        """None while any process runs. Once one has failed, the others get STOP_GRACE seconds to end on their
        own (a test can see whether they did), then SIGTERM, as torchrun stops a group whose worker failed."""
        codes = [p.exitcode for p in self.processes]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and self.failed is None:
            self.failed, self.failed_at = failed[0], time.time()  # the job's status: the first failure's
        if None in codes and failed and time.time() - self.failed_at > STOP_GRACE:
            self._stop_the_rest()
            codes = [p.exitcode for p in self.processes]
        if None in codes:
            return None
        self.store = None  # the rendezvous store's port is free again
        return self.failed or 0

    def _stop_the_rest(self, grace=30.0):
        for p in self.processes:
            if p.exitcode is None:
                p.terminate()
        deadline = time.time() + grace
        for p in self.processes:
            p.join(max(0.0, deadline - time.time()))
            if p.exitcode is None:
                p.kill()
                p.join()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.cmd, timeout)
            time.sleep(0.01)
        return code

    def kill(self):
        """SIGKILL every process (a node that loses power)."""
        for p in self.processes:
            if p.exitcode is None:
                p.kill()
        for p in self.processes:
            p.join()
        self.store = None

    def output(self) -> tuple[str, str]:
        """(stdout, stderr), rank 0's then rank 1's..., as torchrun passes its workers' streams through."""
        def read(stream):
            texts = []
            for rank in range(len(self.processes)):
                with open(self._path(rank, stream), errors="backslashreplace") as f:
                    texts.append(f.read())
            return "".join(texts)
        return read("out"), read("err")


def start(cmd: list[str], procs: int = 1, env: dict | None = None, cwd: str = MAIN) -> Job:
    return Job(cmd, procs, env, cwd)


def run(cmd: list[str], procs: int = 1, env: dict | None = None, cwd: str = MAIN,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """As subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout), or torchrun's
    `--nproc_per_node procs` for procs > 1. A run past its timeout is killed and raises TimeoutExpired."""
    job = start(cmd, procs, env, cwd)
    try:
        code = job.wait(timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        raise
    out, err = job.output()
    shutil.rmtree(job.dir, ignore_errors=True)
    return subprocess.CompletedProcess([sys.executable, *cmd], code, out, err)
