"""scripts/bench_gpu.py without a GPU: its refusal, and its whole code path on a tiny model on the CPU
(--device cpu --tiny): the model built, both stages' training steps timed, MFU from --peak-tflops, the
memory plan asked for the same model and batch, matching, generate, one table."""
import forked


def bench(*flags, env=None):
    return forked.run(["scripts/bench_gpu.py", *flags], env=env, timeout=600)


def test_refuses_without_cuda_in_one_line():
    proc = bench("--quick", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert proc.stdout == "" and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "no CUDA device" in proc.stderr


def test_cpu_needs_tiny():
    proc = bench("--device", "cpu")
    assert proc.returncode != 0 and "--tiny" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_run_on_cpu_prints_the_table():
    proc = bench("--device", "cpu", "--tiny", "--batch-size", "2", "--text", "8", "--peak-tflops", "1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    values = {k.strip(): v for k, v in (line.split(" | ", 1) for line in proc.stdout.strip().splitlines())}
    assert {"device", "model", "batch", "peak bf16", "stage 2 step, sdpa", "stage 1.5 step, sdpa",
            "stage 2 peak memory", "stage 1.5 peak memory", "stage 1.5 / stage 2, sdpa",
            "matching 12 x 32 x 32", "generate, sdpa", "trace, demo stage 1.5", "wall time"} == set(values)
    assert "tokens/s" in values["stage 1.5 step, sdpa"] and "MFU" in values["stage 1.5 step, sdpa"]
    assert "MFU n/a" not in values["stage 1.5 step, sdpa"]  # --peak-tflops took effect
    assert "planned" in values["stage 2 peak memory"] and "ms per image" in values["matching 12 x 32 x 32"]
    assert float(values["stage 1.5 / stage 2, sdpa"]) > 0
    assert "new tokens/s" in values["generate, sdpa"]
    assert "on real tensors" in values["trace, demo stage 1.5"] and "n/a on the cpu" in values["trace, demo stage 1.5"]
