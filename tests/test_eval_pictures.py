"""engineering/pictures.py (eval.py --visualize, scripts/plot_curves.py): whether a pool trained, the pool as a
visual vocabulary, one image's replaced and reconstructed tokens, one panel of training curves per stage."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
from conftest import tiny_model
from engineering import pictures as P
from engineering.benchmarks import InputError
from engineering.checkpoints import save_checkpoint
from scripts import plot_curves
from shapes_world import shapes as SH

pytestmark = pytest.mark.usefixtures("one_thread")


def stage_checkpoint(root, name, stage, init="", tokenizer=None, processor=None, **victor):
    """A tiny checkpoint whose config.json records the stage that saved it and its --init."""
    path = root / name
    save_checkpoint(tiny_model(**victor), str(path), tokenizer=tokenizer, image_processor=processor,
                    extra={"train_config": {"stage": stage, "init": init, "template": "chatml",
                                            "out_dir": str(path)}})
    return str(path)


def test_pool_history_walks_the_init_chain(tmp_path):
    s1 = stage_checkpoint(tmp_path, "stage1", "1")
    s15 = stage_checkpoint(tmp_path, "stage1.5", "1.5", init=s1)
    assert P.pool_history(stage_checkpoint(tmp_path, "victor2", "2", init=s15))[0] is True
    llava = stage_checkpoint(tmp_path, "llava2", "2", init=s1)  # --variant llava: no stage 1.5
    trained, why = P.pool_history(llava)
    assert trained is False and "stage 1 never trains the pool" in why
    with pytest.raises(InputError, match=r"llava2: its pool never trained \(.*stage1 \(stage 1\): stage 1 never"):
        P.check_pool_trained(llava)
    broken = stage_checkpoint(tmp_path, "broken2", "2", init=str(tmp_path / "gone"))
    assert P.pool_history(broken) == (None, f"{broken} (stage 2): its --init {tmp_path / 'gone'} is not a local "
                                            "directory here")
    no_pool = stage_checkpoint(tmp_path, "vdep", "1.5", replace_ratio=0.0)
    assert P.pool_history(no_pool)[0] is False


def test_visualize_refuses_an_untrained_pool_in_one_line(tmp_path, tiny_image_processor):
    tok = SH.build_shapes_tokenizer()
    s1 = stage_checkpoint(tmp_path, "stage1", "1", tokenizer=tok, processor=tiny_image_processor)
    llava = stage_checkpoint(tmp_path, "llava2", "2", init=s1, tokenizer=tok, processor=tiny_image_processor)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img.png")
    with pytest.raises(SystemExit) as stop:
        E.main([llava, "--visualize", str(tmp_path / "img.png"), "--device", "cpu"])
    assert str(stop.value.code).startswith(f"error: {llava}: its pool never trained")
    assert "\n" not in str(stop.value.code) and not (tmp_path / "llava2" / "pool_img.png").exists()


def images(folder, n=5):
    folder.mkdir()
    for k in range(n):  # a coloured square on grey, at a different place each time
        im = Image.new("RGB", (32, 32), (128, 128, 128))
        im.paste((200, 30 * k, 30), (4 * k, 4 * k, 4 * k + 12, 4 * k + 12))
        im.save(folder / f"{k:03d}.png")
    return folder


def test_visualize_a_folder_and_an_image_on_a_tiny_trained_checkpoint(tmp_path, tiny_image_processor):
    tok = SH.build_shapes_tokenizer()
    ckpt = stage_checkpoint(tmp_path, "stage1.5", "1.5", tokenizer=tok, processor=tiny_image_processor)
    folder = images(tmp_path / "imgs")
    E.main([ckpt, "--visualize", str(folder), "--limit", "3", "--device", "cpu"])
    with Image.open(tmp_path / "stage1.5" / "pool_vocabulary.png") as pic:
        assert pic.format == "PNG" and pic.size == P.VOCABULARY_SIZE
    with pytest.raises(SystemExit, match=r"^error: --limit: no effect with --visualize IMAGE"):
        E.main([ckpt, "--visualize", str(folder / "001.png"), "--limit", "3"])
    out = tmp_path / "one.png"
    E.main([ckpt, "--visualize", str(folder / "001.png"), "--out-png", str(out), "--device", "cpu"])
    with Image.open(out) as pic:
        assert pic.format == "PNG" and pic.size == P.TOKENS_SIZE


def test_the_vocabulary_counts_are_the_forwards_own(tiny_image_processor):
    """The rows the vocabulary shows for each patch are those the training's stage-1.5 forward matched it to
    (same seed, same generator): counted from VictorOutput's replaced_mask and pool_indices directly."""
    import data as D
    model = tiny_model()
    tok = SH.build_shapes_tokenizer()
    ids, _ = D.tokenize_conversation([{"role": "user", "content": f"{D.IMAGE_PLACEHOLDER}\nhi"}], tok,
                                     D.resolve_template("chatml", tok, stage="1.5"),
                                     model.num_image_tokens, image_token_id=model.cfg.image_token_id)
    input_ids = torch.tensor([ids])
    pixels = torch.randn(6, 3, 32, 32)
    vocab = P.pool_vocabulary(model, input_ids, [pixels[:4], pixels[4:]], tiny_image_processor, seed=3)
    generator = torch.Generator().manual_seed(3)
    model.eval()
    with torch.no_grad():
        outs = [model(input_ids.expand(len(x), -1), labels=torch.full_like(input_ids.expand(len(x), -1), -100),
                      pixel_values=x, stage="1.5", generator=generator) for x in (pixels[:4], pixels[4:])]
    replaced = torch.cat([o.replaced_mask for o in outs])
    rows = torch.cat([o.pool_indices for o in outs])
    assert np.array_equal(vocab["replaced"], replaced.numpy())
    assert np.array_equal(vocab["uses"], np.bincount(rows.flatten().numpy(), minlength=model.cfg.pool_size))
    for image in range(6):  # each replaced patch is listed under the row it got, in position order
        for patch, row in zip(replaced[image].nonzero().flatten().tolist(), rows[image].tolist()):
            assert (image, patch) in vocab["examples"][row]
    assert sum(map(len, vocab["examples"].values())) == int(replaced.sum()) == 6 * 12
    used = vocab["uses"] > 0
    assert np.isfinite(vocab["row_cosine"][used]).all() and np.isnan(vocab["row_cosine"][~used]).all()
    pic = P.draw_vocabulary(vocab, "t")
    assert pic.size == P.VOCABULARY_SIZE


def test_draw_tokens_shows_the_image_and_marks_the_replaced():
    grid = 4
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    replaced = np.zeros(grid * grid, dtype=bool)
    replaced[[0, 5]] = True
    rows = np.where(replaced, 7, -1)
    cosine = np.linspace(0, 1, grid * grid)
    pic = P.draw_tokens(image, replaced, rows, cosine, "t")
    assert pic.size == P.TOKENS_SIZE
    with pytest.raises(InputError, match="not a square grid"):
        P.draw_tokens(image, replaced[:15], rows[:15], cosine[:15], "t")


def write_metrics(stage_dir, stage, recon):
    stage_dir.mkdir(parents=True)
    rows = [{"stage": stage, "step": k, "loss": 3.0 / k + recon / k, "lm_loss": 3.0 / k, "recon_loss": recon / k,
             "lr": 1e-3} for k in range(1, 6)]
    (stage_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows + [{"done": True}])) + "\n")


def test_curves_one_panel_per_stage_beside_the_run(tmp_path):
    run = tmp_path / "demo"
    write_metrics(run / "stage1.5", "1.5", recon=1.0)
    write_metrics(run / "stage2", "2", recon=0.0)
    stages = P.read_curves(P.metrics_files(str(run)))
    lines = P.curve_lines(stages)
    assert list(lines) == ["1.5", "2"]  # one panel per stage, each with its own steps
    assert {key for _, key, _ in lines["1.5"]} == {"loss", "lm_loss", "recon_loss", "lr"}
    assert {key for _, key, _ in lines["2"]} == {"lm_loss", "lr"}  # no flat zero line; loss = LM loss, once
    out = plot_curves.main([str(run)])
    assert out == str(run / "curves.png")  # beside the run, not in a stage's directory a retrain moves aside
    with Image.open(out) as pic:
        assert pic.size == (2 * P.CURVES_PANEL[0], P.CURVES_PANEL[1])
    assert plot_curves.main([str(run / "stage2" / "metrics.jsonl")]) == str(run / "curves.png")


@pytest.mark.parametrize("make, said", [
    ("dir", "no metrics.jsonl in it nor in its stage directories"),
    (None, "no such file or directory"),
    ("empty", "no rows with a 'step' key"),
])
def test_curves_mistakes_are_one_line(tmp_path, make, said):
    path = tmp_path / "x"
    if make == "dir":
        path.mkdir()
    if make == "empty":
        path.write_text('{"done": true}\n')
    with pytest.raises(SystemExit) as stop:
        plot_curves.main([str(path)])
    assert str(stop.value.code).startswith(f"error: {path}: {said}") and "\n" not in str(stop.value.code)
