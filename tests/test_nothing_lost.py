"""Nothing a user trained is lost (README, "Nothing you trained is lost"): every input checked before anything
is touched, a changed setting refused by name, --overwrite moving the earlier outputs aside, a resume that
continues the same run, Ctrl-C in one line, plain log lines off a terminal, and the smaller one-line refusals.
Each refused command leaves every file of the earlier checkpoint as it was (sha256)."""
import hashlib
import json
import os

import pytest

import eval as E
import train as T
from conftest import cli_flags, read_metrics, train_says
from engineering import batches as BA

pytestmark = pytest.mark.usefixtures("one_thread")


def stage2_values(base, out_dir, **overrides) -> dict:
    values = dict(stage="2", data=base.data["2"], image_folder=base.shapes, init=base.init, lr=1e-3, vision_lr=0.0,
                  warmup_steps=1, max_steps=4, global_batch_size=4, batch_size=4, num_workers=0, log_every=1,
                  max_length=256, bf16=False, seed=0, out_dir=str(out_dir))
    values.update(overrides)
    return values


def hashes(folder) -> dict:
    """Every file under folder by relative path, with its sha256."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A finished stage 2 (4 steps, a saved state at step 2) and its files' hashes."""
    out = tmp_path_factory.mktemp("trained") / "V"
    T.main(cli_flags(stage2_values(base, out, save_every=2)))
    return out, hashes(out)


def refused(argv, capsys, trained) -> str:
    """argv ends in one line, exit 2, and every file of the trained stage is unchanged."""
    code, line = train_says(argv, capsys)
    assert code == 2 and line.startswith("error: "), line
    assert hashes(trained[0]) == trained[1]
    return line


# 1. Everything is checked before anything is touched

def test_a_mistyped_input_is_one_line_and_the_checkpoint_is_untouched(base, trained, tmp_path, capsys):
    out = trained[0]
    not_json = tmp_path / "notes.json"
    not_json.write_text("these are my notes\n")
    not_a_checkpoint = tmp_path / "empty_dir"
    not_a_checkpoint.mkdir()
    cases = [
        (dict(data=base.data["2"][:-2] + "jsn"), "data file", "not found (--data)"),
        (dict(init=base.init + "x"), f"--init {base.init}x: no such directory", ""),
        (dict(init=str(not_a_checkpoint)), f"--init {not_a_checkpoint}: not a checkpoint directory", ""),
        (dict(image_folder=base.shapes + "x"), "no usable record: all 64 are bad (64 x image not found",
         "(--image-folder)"),
        (dict(data=str(not_json)), f"{not_json}: not a JSON list nor JSONL (line 1: invalid JSON", ""),
        (dict(template="foo"), "--template 'foo': choose from auto | plain | vicuna_v1 | chatml | chat", ""),
        (dict(model_overrides={"pool_size": "big"}), "--model-overrides pool_size: \"big\" is not an int", ""),
    ]
    for change, said, end in cases:
        line = refused(cli_flags(stage2_values(base, out, **change)), capsys, trained)
        assert said in line and line.endswith(end), line


# 2. Nothing is removed without --overwrite; the same folder spelled another way is the same folder

def test_the_same_command_keeps_and_a_changed_setting_is_named(base, trained, capsys, monkeypatch):
    out = trained[0]
    monkeypatch.chdir(out.parent)
    for spelling in (f"./{out.name}", f"{out.name}/", str(out)):
        T.main(cli_flags(stage2_values(base, spelling, save_every=7, num_workers=0)))  # not result settings
        assert f"stage 2: kept {spelling}" in capsys.readouterr().out
    assert hashes(out) == trained[1]
    line = refused(cli_flags(stage2_values(base, out, lr=1e-4)), capsys, trained)
    assert line == (f"error: stage 2 in {out} was trained with lr 0.001; this command gives 0.0001: add --overwrite "
                    f"to train it anew (the earlier outputs are moved to {out / 'previous'}), or choose another "
                    "--out-dir")
    line = refused(cli_flags(stage2_values(base, out, lr=1e-4, seed=3)), capsys, trained)
    assert "was trained with lr 0.001, seed 0; this command gives lr 0.0001, seed 3: add --overwrite" in line


def test_the_demo_with_another_seed_is_refused_not_retrained(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(T, "make_demo_data", lambda *a: None)
    monkeypatch.setattr(T, "train_stage", finished_stage(seen))
    T.main(["--out-dir", str(tmp_path), "--max-steps", "2"])
    assert seen == ["1", "1.5", "2"]
    before = hashes(tmp_path)
    code, line = train_says(["--out-dir", str(tmp_path), "--max-steps", "2", "--seed", "1"], capsys)
    assert code == 2 and line.startswith(f"error: stage 1 in {tmp_path / 'stage1'} was trained with seed 0; this "
                                         "command gives 1: add --overwrite")
    assert seen == ["1", "1.5", "2"] and hashes(tmp_path) == before


def finished_stage(seen: list):
    """A stand-in for train_stage that leaves what a finished stage leaves: config.json with its settings,
    a model file, and metrics.jsonl ending with the "done" row."""
    def train_stage(cfg, stage, *_):
        seen.append(stage)
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train_config": T.command_settings(cfg, stage)}, f)
        with open(os.path.join(cfg.out_dir, "model.safetensors"), "w") as f:
            f.write(f"weights of stage {stage}, lr {cfg.lr}")
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1}) + "\n" + json.dumps({"stage": stage, "done": True}) + "\n")
        return cfg.out_dir
    return train_stage


# 3. --overwrite never destroys before it replaces

def test_overwrite_moves_the_earlier_run_aside_and_ctrl_c_leaves_it_there(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(T, "make_demo_data", lambda *a: None)
    monkeypatch.setattr(T, "train_stage", finished_stage(seen))
    args = ["--out-dir", str(tmp_path), "--max-steps", "2"]
    T.main(args)
    first = hashes(tmp_path / "stage1")
    monkeypatch.setattr(T, "train_stage", lambda cfg, stage, *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as stop:
        T.main([*args, "--lr", "1e-4", "--overwrite"])
    assert stop.value.code == 130
    out = capsys.readouterr().out
    assert f"stage 1: the earlier run's outputs in {tmp_path / 'stage1'} were moved to " \
           f"{tmp_path / 'stage1' / 'previous'} (config.json, metrics.jsonl, model.safetensors)" in out
    assert hashes(tmp_path / "stage1" / "previous") == first  # the earlier model, where the user can find it
    assert (tmp_path / "stage1.5" / "model.safetensors").exists()  # not yet reached: untouched
    # the later stages were trained from the stage-1 model being replaced: refused without --overwrite
    monkeypatch.setattr(T, "train_stage", finished_stage(seen))
    code, line = train_says([*args, "--lr", "1e-4"], capsys)
    assert code == 2 and "stage 1.5 in" in line and "trained from the stage before it, which this command " \
                                                     "trains again: add --overwrite" in line
    T.main([*args, "--lr", "1e-4", "--overwrite"])
    assert hashes(tmp_path / "stage1" / "previous") == first  # nothing trained was in stage1: kept as it was
    assert (tmp_path / "stage1.5" / "previous" / "model.safetensors").read_text() == "weights of stage 1.5, lr 0.0005"
    assert (tmp_path / "stage2" / "model.safetensors").read_text() == "weights of stage 2, lr 0.0001"


# 4. A resume continues the same run, or is refused

def test_a_resume_with_other_settings_is_refused_and_the_same_one_continues(base, tmp_path, capsys):
    out = tmp_path / "V"
    T.main(cli_flags(stage2_values(base, out, save_every=2)))
    # as if killed after step 4, before its model was saved: the state at step 2 is the newest
    os.remove(out / "model.safetensors")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    kept = hashes(out)
    code, line = train_says(cli_flags(stage2_values(base, out, save_every=2, lr=1e-5, max_steps=100)), capsys)
    assert code == 2 and line.startswith(f"error: stage 2 in {out} was interrupted (saved state "
                                         f"{out / 'checkpoints' / 'step-2'}), trained with lr 0.001, max_steps 4; "
                                         "this command gives lr 1e-05, max_steps 100: a resume continues the same "
                                         "run: give the same settings to resume it, or add --overwrite"), line
    assert hashes(out) == kept
    T.main(cli_flags(stage2_values(base, out, save_every=3, log_every=2)))  # not result settings may change
    assert f"resuming from {out / 'checkpoints' / 'step-2'} at step 2" in capsys.readouterr().out
    steps, done = read_metrics(out)
    assert [r["step"] for r in steps] == [1, 2, 4] and len(done) == 1  # no step twice
    with open(out / "config.json") as f:
        assert json.load(f)["train_config"]["lr"] == 1e-3


def test_train_stage_called_directly_checks_the_resume_too(base, tmp_path):
    out = tmp_path / "V"
    T.train_stage(T.stage_config("demo", "2", {**stage2_values(base, out, save_every=2, max_steps=3)}, base.init), "2")
    cfg = T.stage_config("demo", "2", {**stage2_values(base, out, max_steps=3, lr=5e-4, resume="auto")}, base.init)
    with pytest.raises(T.UsageError, match="was trained with lr 0.001; this command gives 0.0005: a resume"):
        T.train_stage(cfg, "2")


# 5. Ctrl-C: exit 130, and which step the saved state holds

def test_ctrl_c_says_which_step_the_saved_state_holds(monkeypatch, tmp_path, capsys):
    def interrupted(cfg, stage, *_):
        if stage == "1.5":
            os.makedirs(os.path.join(cfg.out_dir, "checkpoints", "step-60"))
            raise KeyboardInterrupt
        return finished_stage([])(cfg, stage)
    monkeypatch.setattr(T, "make_demo_data", lambda *a: None)
    monkeypatch.setattr(T, "train_stage", interrupted)
    monkeypatch.setattr(T, "latest_training_state", lambda d: os.path.join(d, "step-60") if os.path.isdir(d) else "")
    with pytest.raises(SystemExit) as stop:
        T.main(["--out-dir", str(tmp_path), "--max-steps", "2"])
    assert stop.value.code == 130
    state = tmp_path / "stage1.5" / "checkpoints" / "step-60"
    assert capsys.readouterr().err.strip() == (f"interrupted in stage 1.5 ({tmp_path / 'stage1.5'}): its saved state "
                                               f"holds step 60 ({state}): the same command resumes from it; finished "
                                               "stages are kept")
    T.RUNNING.update(stage="2", out_dir=str(tmp_path / "none"))
    assert "no training state was saved (--save-every N saves one)" in T.interrupted_line()
    T.RUNNING.clear()


def test_ctrl_c_in_eval_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(E.MODES, "shapes test set", (None, lambda args: (_ for _ in ()).throw(KeyboardInterrupt),
                                                     E.MODES["shapes test set"][2]))
    with pytest.raises(SystemExit) as stop:
        E.main([str(tmp_path)])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted (shapes test set): nothing was written for this run"


# 6. Off a terminal: plain lines, no bar redraws

def test_off_a_terminal_a_run_prints_plain_lines(base, tmp_path, capsys):
    T.main(cli_flags(stage2_values(base, tmp_path / "V", log_every=2)))
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("stage 2 step ")]
    assert [ln.split()[3] for ln in lines] == ["2/4", "4/4"], captured.out
    assert "loss" in lines[0] and "lr" in lines[0] and "samples/s" in lines[0] and "to go" in lines[0]
    assert "it/s]" not in captured.err and "\r" not in captured.err  # no progress bar drawn


# 7. --help tells the truth about defaults; --show-settings prints each stage's

def test_help_and_show_settings_tell_the_recipe_values(capsys):
    with pytest.raises(SystemExit):
        T.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr FLOAT peak learning rate of the projector, the LLM and the reconstruction head (default: the " \
           "recipe's, per stage (--show-settings); without one 1e-05; > 0)" in text
    T.main(["--show-settings", "--max-steps", "5"])
    out = capsys.readouterr().out
    assert "note: --max-steps 5 replaces the demo recipe's per-stage max_steps (stage 1: 200, stage 1.5: 200, " \
           "stage 2: 2000) in every stage" in out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln and not ln.startswith("note")}
    assert rows["lr"] == ["0.001", "0.0005", "0.0005"] and rows["batch_size"] == ["32", "8", "16"]
    assert rows["max_steps"] == ["5", "5", "5"] and rows["out_dir"] == [f"out/demo/stage{s}" for s in ("1", "1.5", "2")]


# 8. --ask names the words outside the vocabulary; a follow-up to the demo says it is unreliable

def test_ask_names_words_outside_the_vocabulary(base, tmp_path, capsys):
    image = os.path.join(base.shapes, "images", "000000.png")
    with pytest.raises(SystemExit) as stop:
        E.main([base.init, "--ask", "What is the capital of France, and is there a dog?", "--image", image])
    assert str(stop.value.code) == ("error: words outside this model's vocabulary: 'capital', 'France', 'and', "
                                    "'dog'; ask with the words it was trained on")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "config.json").write_text(json.dumps({"train_config": {"recipe": "demo"}}))
    assert E.single_turn_note(str(demo)).startswith("note: this model's stage 2 saw one question per image")
    assert E.single_turn_note(base.init) == ""


# 9. Without --out-dir, a stage saves into out/RECIPE/stageS

def test_a_single_stage_without_out_dir_saves_into_its_stage_folder(base):
    cfgs, _ = T.stage_configs({"stage": "2", "init": base.init, "data": base.data["2"], "image_folder": base.shapes})
    assert cfgs[0].out_dir == os.path.join("out", "demo", "stage2")
    cfgs, _ = T.stage_configs({"recipe": "llava15-vicuna7b", "stage": "1", "data": "x.json", "image_folder": "."})
    assert cfgs[0].out_dir == os.path.join("out", "llava15-vicuna7b", "stage1")


# 11. Bad records: the validation pass's count in the warning; a file that is not JSON said as such

def test_the_bad_records_warning_counts_the_validation_pass(base, tmp_path, capsys):
    with open(base.data["2"]) as f:
        records = json.load(f)[:45]
    for r in records[:5]:
        r["image"] = "missing.png"
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    cfg = T.stage_config("demo", "2", stage2_values(base, tmp_path / "out", data=str(data)), base.init)
    BA.validate_data(cfg, True)
    assert "warning: 11 % of the records are bad (5 of 45): 5 x image not found" in capsys.readouterr().out


# 12. --demo-images: its range follows from the batch, before any data is made

def test_too_few_demo_images_is_refused_before_any_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "make_demo_data", lambda *a: pytest.fail("data was made"))
    code, line = train_says(["--out-dir", str(tmp_path), "--demo-images", "31"], capsys)
    assert code == 2 and line == ("error: --demo-images 31: stage 1's global batch is 32 samples (1 per image), so "
                                  "at least 32 images are needed")
    assert not os.listdir(tmp_path)


# 14. The export's refusal names the way to an exportable model

def test_export_refusal_names_variant_llava(model, tmp_path):
    from engineering.checkpoints import export_llava_hf
    with pytest.raises(ValueError, match=r"An exportable model trains without it: train.py --variant llava"):
        export_llava_hf(model, None, None, str(tmp_path / "x"))


def test_template_chat_without_one_in_the_tokenizer_is_refused_first(base, trained, tmp_path, capsys):
    import shutil
    init = tmp_path / "init"
    shutil.copytree(base.init, init)
    (init / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((init / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (init / "tokenizer_config.json").write_text(json.dumps(config))
    line = refused(cli_flags(stage2_values(base, trained[0], init=str(init), template="chat")), capsys, trained)
    assert line == f"error: --template chat: the tokenizer in {init} has no chat template; choose plain, vicuna_v1 " \
                   "or chatml"
