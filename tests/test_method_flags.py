"""The method's stage-1.5 fields as train.py flags (--pool-size, --replace-ratio, --recon-weight, --matcher, ...):
each takes effect (the saved config shows it) or is refused in one line."""
import json

import pytest

import train as T
from conftest import cli_flags, train_says
from engineering import config as CF

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage1_checkpoint(base, tmp_path_factory, shapes_tokenizer, tiny_image_processor):
    """A projector-only stage-1 checkpoint: stage 1.5 from it gets a fresh pool of any size."""
    from engineering.checkpoints import save_checkpoint
    from victor import VictorConfig, VictorModel
    path = str(tmp_path_factory.mktemp("stage1") / "stage1")
    save_checkpoint(VictorModel(VictorConfig(vision_model=base.vision, llm=base.llm, pool_size=32)), path,
                    shapes_tokenizer, tiny_image_processor, parts="projector")
    return path


def stage15_flags(base, init, out, *extra) -> list[str]:
    return [*cli_flags(dict(stage="1.5", data=base.data["1.5"], image_folder=base.shapes, init=init, max_steps=2,
                            global_batch_size=4, batch_size=4, num_workers=0, bf16=False, out_dir=str(out))), *extra]


def test_every_method_field_is_a_flag_with_its_meaning_and_range(capsys):
    with pytest.raises(SystemExit):
        T.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in CF.METHOD_FLAGS:
        assert f"--{name.replace('_', '-')} " in text
    assert "--replace-ratio FLOAT share of each image's visual tokens replaced by pool rows (step 2)" in text


def test_the_method_flags_take_effect(base, stage1_checkpoint, tmp_path):
    out = tmp_path / "s15"
    T.main(stage15_flags(base, stage1_checkpoint, out, "--pool-size", "16", "--replace-ratio", "0.5",
                         "--recon-weight", "2", "--matcher", "hungarian_plain", "--recon-beta", "0.1"))
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved["victor"][k] for k in ("pool_size", "replace_ratio", "recon_weight", "matcher", "recon_beta")} \
        == {"pool_size": 16, "replace_ratio": 0.5, "recon_weight": 2.0, "matcher": "hungarian_plain", "recon_beta": 0.1}
    assert saved["train_config"]["model_overrides"]["pool_size"] == 16
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("token_pool").get_shape()[0] == 16  # a pool of 16 rows was trained


@pytest.mark.parametrize("extra, said", [
    (["--pool-size", "8"], "error: --init {init}: pool_size 8 (--pool-size) cannot apply to {init}: its token pool "
                           "has 32 trained rows"),
    (["--replace-ratio", "1"], "error: --replace-ratio 1.0: must be in [0, 1)"),
    (["--pool-size", "8", "--model-overrides", '{"pool_size": 4}'], "error: --pool-size 8 and --model-overrides "
                                                                    "pool_size 4: give one"),
    (["--matcher", "greedy"], "error: --matcher greedy: matcher must be one of"),
])
def test_a_method_flag_that_cannot_take_effect_is_refused(base, tmp_path, capsys, extra, said):
    code, line = train_says(stage15_flags(base, base.init, tmp_path / "out", *extra), capsys)
    assert code == 2 and line.startswith(said.format(init=base.init)), line
    assert not (tmp_path / "out").exists()
