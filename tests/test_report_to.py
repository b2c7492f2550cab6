"""--report-to tensorboard / wandb: the rows of metrics.jsonl go to TensorBoard and wandb too.

Both packages are optional and need not be installed: the missing-package error is tested with the
import made to fail, the writing path with stand-in modules put in sys.modules that record each call.
"""
import json
import os
import subprocess
import sys
import types

import pytest

import train as T
from conftest import MAIN, read_metrics, subprocess_env
from engineering import flags as FL
from engineering import reporting as RP


def stage2_config(base, out_dir, **overrides):
    values = dict(stage="2", data=base.data["2"], image_folder=base.shapes, init=base.init, lr=1e-3, vision_lr=0.0,
                  warmup_steps=1, max_steps=3, global_batch_size=4, batch_size=4, num_workers=0, log_every=1,
                  max_length=256, bf16=False, out_dir=str(out_dir))
    values.update(overrides)
    return T.TrainConfig(**values)


def fake_tensorboard(calls):
    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def close(self):
            calls.append(("close",))
    return types.SimpleNamespace(SummaryWriter=SummaryWriter)


def fake_wandb(calls):
    class Run:
        def log(self, values, step):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()
    return types.SimpleNamespace(init=init)


@pytest.mark.parametrize("target, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_package_fails_before_training(base, tmp_path, monkeypatch, target, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    out = tmp_path / "run"
    with pytest.raises(FL.MissingDependency, match=rf"^--report-to {target} needs the {target} package, which is "
                                                  rf"not installed: pip install {target}$"):
        T.train_stage(stage2_config(base, out, report_to=target), "2")
    assert not out.exists()  # nothing read, built or written
    with pytest.raises(FL.MissingDependency, match=target):  # run() checks before generating data or models
        T.run({"recipe": "demo", "stage": "all", "out_dir": str(tmp_path / "demo"), "report_to": target})
    assert not (tmp_path / "demo").exists()


def test_missing_package_is_one_line_on_the_command_line(tmp_path):
    stub = tmp_path / "stub" / "wandb"  # a wandb that cannot be imported, whether or not the real one is installed
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('stand-in: not installed')\n")
    env = dict(subprocess_env(), PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"), MAIN]))
    proc = subprocess.run([sys.executable, "train.py", "--report-to", "wandb", "--out-dir", str(tmp_path / "x")],
                          cwd=MAIN, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: --report-to wandb needs the wandb package, which is not "
                                                    "installed: pip install wandb")
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match=r"--report-to 'tensorboard,mlflow': unknown \['mlflow'\]"):
        RP.MetricsReporter("tensorboard,mlflow")
    assert RP.MetricsReporter("").modules == {}  # the default: nothing imported
    assert T.parse_args(["--report-to", "tensorboard,wandb"]) == {"report_to": "tensorboard,wandb"}


def test_every_metrics_row_reaches_tensorboard_and_wandb(base, tmp_path, monkeypatch):
    tb_calls, wandb_calls = [], []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tensorboard(tb_calls))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(wandb_calls))
    monkeypatch.setenv("WANDB_PROJECT", "victor-test")
    out = tmp_path / "run"
    T.train_stage(stage2_config(base, out, report_to="tensorboard,wandb"), "2")
    rows, _ = read_metrics(str(out))
    assert [r["step"] for r in rows] == [1, 2, 3]
    numbers = [{k: v for k, v in r.items() if k not in ("step", "stage") and isinstance(v, (int, float))
                and not isinstance(v, bool)} for r in rows]
    assert {"loss", "lm_loss", "lr", "grad_norm", "samples_per_s"} <= set(numbers[0])
    # TensorBoard: one scalar per number per row, at the row's step, in out_dir/tensorboard, closed at the end
    assert tb_calls[0] == ("init", os.path.join(str(out), "tensorboard")) and tb_calls[-1] == ("close",)
    scalars = [c[1:] for c in tb_calls if c[0] == "scalar"]
    assert scalars == [(k, v, r["step"]) for r, nums in zip(rows, numbers) for k, v in nums.items()]
    # wandb: one run for the stage with the run's config, one log call per row, finished at the end
    kind, kwargs = wandb_calls[0]
    assert kind == "init" and kwargs["project"] == "victor-test" and kwargs["dir"] == str(out)
    assert kwargs["config"]["report_to"] == "tensorboard,wandb" and kwargs["config"]["max_steps"] == 3
    assert [c[1:] for c in wandb_calls if c[0] == "log"] == [(nums, r["step"]) for r, nums in zip(rows, numbers)]
    assert wandb_calls[-1] == ("finish",)
    with open(out / "metrics.jsonl") as f:  # metrics.jsonl itself is unchanged: every row, then the done row
        assert json.loads(f.read().splitlines()[-1])["done"] is True
