"""tests/forked.py: a forked run behaves as `python SCRIPT ARGS` (or torchrun's workers) would, so the tests that
use it check what a user's process does."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import forked
from conftest import subprocess_env

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    what = sys.argv[1]
    print("argv", json.dumps(sys.argv[1:]), "cwd", os.getcwd(), flush=True)
    print("env", json.dumps({k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT",
                                                          "OMP_NUM_THREADS", "VICTOR_TEST")}))
    rank = int(os.environ.get("RANK", 0))
    if what == "error":
        sys.exit("error: one line")
    if what == "raise":
        raise ValueError("boom")
    if what == "code":
        sys.exit(3)
    if what == "rank1-fails":
        if rank == 1:
            sys.exit("error: rank 1")
        time.sleep(float(sys.argv[2]))
        print("rank 0 ended by itself")
    if what == "sleep":
        time.sleep(60)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return str(path)


def python(script, *args):
    return subprocess.run([sys.executable, script, *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60, cwd=forked.MAIN)


@pytest.mark.parametrize("what", ["ok", "error", "raise", "code"])
def test_exit_status_and_streams_as_python_gives_them(script, what):
    fork, fresh = forked.run([script, what, "x y"]), python(script, what, "x y")
    assert fork.returncode == fresh.returncode == {"ok": 0, "error": 1, "raise": 1, "code": 3}[what]
    assert fork.stdout.splitlines()[0] == fresh.stdout.splitlines()[0] == f'argv ["{what}", "x y"] cwd {forked.MAIN}'
    if what == "raise":  # the traceback's last line; the fork's has runpy's frames above the script's
        assert "Traceback" in fork.stderr and fork.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    else:
        assert fork.stderr == fresh.stderr


def test_environment_and_torchrun_variables(script):
    proc = forked.run([script, "ok"], procs=2, env={"VICTOR_TEST": "1"})
    envs = [line for line in proc.stdout.splitlines() if line.startswith("env")]
    assert len(envs) == 2 and proc.returncode == 0
    assert {(e.split('"RANK": ')[1][:3], e.count('"WORLD_SIZE": "2"'), e.count('"VICTOR_TEST": "1"'),
             e.count('"OMP_NUM_THREADS": "1"')) for e in envs} == {('"0"', 1, 1, 1), ('"1"', 1, 1, 1)}
    assert "VICTOR_TEST" not in os.environ  # the run's environment, not this process's
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='2': the fork server imported with OMP_NUM_THREADS='1'"):
        forked.run([script, "ok"], env={"OMP_NUM_THREADS": "2"})


def test_a_failed_rank_lets_the_others_end_then_stops_them(script, monkeypatch):
    proc = forked.run([script, "rank1-fails", "0.5"], procs=2)  # rank 0 ends by itself within the grace
    assert proc.returncode == 1 and "rank 0 ended by itself" in proc.stdout and "error: rank 1" in proc.stderr
    monkeypatch.setattr(forked, "STOP_GRACE", 0.5)
    proc = forked.run([script, "rank1-fails", "60"], procs=2, timeout=30)  # rank 0 would wait: stopped
    assert proc.returncode == 1 and "rank 0 ended by itself" not in proc.stdout


def test_timeout_and_kill(script):
    with pytest.raises(subprocess.TimeoutExpired):
        forked.run([script, "sleep"], timeout=0.5)
    job = forked.start([script, "sleep"], procs=2)
    assert job.poll() is None
    job.kill()
    assert job.wait() == -signal.SIGKILL and all(p.exitcode == -signal.SIGKILL for p in job.processes)
