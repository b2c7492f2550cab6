"""What a new user trips on: data that one command would silently misuse, an export that would overwrite a
checkpoint, partial evaluations that would replace a full one, and messages that must name the real mistake."""
import json
import os

import pytest

import eval as E
import train as T
from scripts import export_llava_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def eval_error(argv) -> str:
    """eval.py's one line for a mistake: what its SystemExit carries."""
    with pytest.raises(SystemExit) as stop:
        E.main(argv)
    return str(stop.value.code)


def test_one_data_file_for_every_stage_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(T, "train_stage", lambda cfg, stage, *_: pytest.fail("a stage started"))
    for stage in ("all", "1.5"):  # the demo recipe's all three, and victor's default is all
        args = {"out_dir": str(tmp_path), "data": "qa.json", "image_folder": str(tmp_path)}
        if stage != "all":
            args["stage"] = "all"
        with pytest.raises(T.UsageError, match=r"^--data with --stage all would train every stage on one file; "
                                               r"give each stage its data, one stage at a time: --stage 1 --data"):
            T.run(args)


def test_json_data_without_image_folder_reads_images_beside_the_data_file(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(T, "train_stage", lambda cfg, stage, *_: seen.append(cfg) or cfg.out_dir)
    monkeypatch.setattr(T, "check_before_training", lambda cfgs, demo_records: ["new"] * len(cfgs))
    data = tmp_path / "mine" / "qa.json"
    data.parent.mkdir()
    data.write_text("[]")
    T.run({"stage": "2", "out_dir": str(tmp_path / "out"), "data": str(data), "vision_model": "v", "llm": "l"})
    assert seen[0].image_folder == str(data.parent)
    assert not (tmp_path / "out" / "shapes").exists()  # the demo's data is never generated for given data
    assert f"note: no --image-folder: the records' image paths are read relative to the data file's folder, " \
           f"{data.parent}" in capsys.readouterr().out


def test_flags_are_matched_exactly():
    with pytest.raises(SystemExit):
        T.parse_args(["--max-step", "3"])  # argparse would take it for --max-steps
    assert T.parse_args(["--max-steps", "3"])["max_steps"] == 3


def test_a_dict_flag_that_is_not_json_says_so(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--model-overrides", "{pool_size: 4}"])
    assert "'{pool_size: 4}' is not a JSON object; quote the keys, e.g. '{\"pool_size\": 4}'" in error_line(capsys)


def test_an_empty_data_file_says_it_has_no_records(base, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(T.UsageError, match=rf"^{empty}: the file has no records$"):
        T.run({"stage": "2", "init": base.init, "data": str(empty), "image_folder": base.shapes,
               "out_dir": str(tmp_path / "out"), "max_steps": 1, "batch_size": 1, "global_batch_size": 1})


def test_a_mistyped_init_is_named(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(T.UsageError, match=r"^--init out/demo/stag1: no such directory"):
        T.run({"stage": "2", "init": "out/demo/stag1", "data": str(tmp_path / "d.json"),
               "out_dir": str(tmp_path / "out")})


def export_error(argv) -> str:
    """scripts/export_llava_hf.py's one line for a mistake."""
    with pytest.raises(SystemExit) as stop:
        export_llava_hf.main(argv)
    return str(stop.value.code)


def test_export_never_writes_into_the_checkpoint_nor_a_full_directory(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert export_error([str(ckpt), str(ckpt)]) == (
        f"error: {ckpt}: that is the checkpoint being read; give another directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert export_error([str(ckpt), str(full)]) == (
        f"error: {full}: the directory is not empty; give a new or empty one, or add --overwrite to write into it")
    assert (full / "keep.txt").read_text() == "mine" and (ckpt / "config.json").read_text() == "{}"
    # --overwrite goes on to read the checkpoint (here not a real one): still one line
    said = export_error([str(ckpt), str(full), "--overwrite"])
    assert said.startswith("error: ") and "not empty" not in said and "\n" not in said
    assert export_error([str(tmp_path / "nowhere"), str(full)]) == (
        f"error: {tmp_path / 'nowhere'}: no such checkpoint directory (run `python train.py` first)")
    assert export_error([str(ckpt)]) == "2"  # a usage mistake (no OUT): argparse's exit 2
    assert "the following arguments are required: out" in capsys.readouterr().err


def test_an_out_dir_is_not_a_checkpoint_and_the_ones_under_it_are_named(tmp_path):
    for stage in ("stage1", "stage2"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text("{}")
        (tmp_path / stage / "model.safetensors").write_text("")
    assert eval_error([str(tmp_path)]) == (f"error: {tmp_path} is not a checkpoint (no config.json); checkpoints "
                                           "under it: stage1, stage2")


def test_a_partial_evaluation_never_replaces_the_full_ones_file(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: {"per_type": {}, "accuracy": 0.5, "predictions": []})
    monkeypatch.setattr(E, "format_table", lambda r: "")
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "eval.json").write_text('{"full": true}')
    (tmp_path / "t.jsonl").write_text("")
    E.main([str(ckpt), "--test-file", str(tmp_path / "t.jsonl"), "--image-folder", str(tmp_path), "--limit", "20"])
    assert json.loads((ckpt / "eval.json").read_text()) == {"full": True}
    assert os.path.isfile(ckpt / "eval_limit20.json")


@pytest.mark.parametrize("flag, make, said", [
    ("--bench", None, "no such file; give a VLMEvalKit TSV"),
    ("--visualize", None, "no such image or folder"),
])
def test_a_missing_or_wrong_input_file_is_one_line(flag, make, said, tmp_path):
    path = tmp_path / "x"
    if make == "dir":
        path.mkdir()
    assert eval_error([str(tmp_path), flag, str(path)]).startswith(f"error: {flag} {path}: {said}")
