"""pictures.py (eval.py --visualize, --curves): each patch's pool row and reconstruction error, training curves."""
import json

import numpy as np
import pytest
from PIL import Image

import eval as E
from conftest import tiny_model
from engineering import pictures as P
from engineering.checkpoints import save_checkpoint
from shapes_world import shapes as SH


def test_draw_pool_picture_size_and_tints():
    grid, panel = 3, 300
    image = Image.new("RGB", (96, 96), (128, 128, 128))  # uniform, so a cell's pixel is the tint alone
    rows = np.array([5, 5, 7, 1, 2, 3, 4, 6, 8])
    errors = np.linspace(0.0, 1.0, 9)
    replaced = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=bool)
    pic = P.draw_pool_picture(image, rows, errors, replaced, panel=panel, title="t")
    lay = P.pool_picture_layout(grid, panel)
    assert pic.size == lay["size"]
    x0, y0, c = *lay["left"], lay["cell"]

    def tint(k):  # a pixel a quarter into patch k, away from the grid lines and the centred label
        i, j = divmod(k, grid)
        return pic.getpixel((x0 + j * c + c // 4, y0 + i * c + c // 4))

    assert tint(0) == tint(1)  # both matched to row 5
    assert tint(0) != tint(2) and tint(2) != tint(3)
    assert P.pool_colour(5) != P.pool_colour(6)
    with pytest.raises(ValueError):
        P.draw_pool_picture(image, rows[:8], errors[:8], replaced[:8])


def test_visualize_pool_on_tiny_checkpoint(tmp_path, tiny_image_processor):
    model = tiny_model()
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(model, ckpt, tokenizer=SH.build_shapes_tokenizer(), image_processor=tiny_image_processor,
                    extra={"train_config": {"template": "chatml"}})
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(img)
    out = tmp_path / "pool.png"
    E.main([ckpt, "--visualize", str(img), "--out-png", str(out), "--device", "cpu"])
    with Image.open(out) as pic:
        pic.load()
        assert pic.format == "PNG"
        assert pic.size == P.pool_picture_layout(model.grid)["size"]
    # the nearest-row variant and the model form of the call
    pic = E.visualize_pool(model, str(img), None, tokenizer=SH.build_shapes_tokenizer(),
                           image_processor=tiny_image_processor, template="chatml", assignment="nearest")
    assert pic.size == P.pool_picture_layout(model.grid)["size"]


def test_curves_png_and_rejects_file_without_steps(tmp_path):
    rows = [{"stage": s, "step": k, "loss": 3.0 / k, "lm_loss": 2.0 / k, "recon_loss": 1.0 / k, "lr": 1e-3 * k / 5}
            for s in ("1.5", "2") for k in range(1, 6)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows + [{"done": True}]) + "\n")
    out = tmp_path / "curves.png"
    E.main(["--curves", str(metrics), "--out-png", str(out)])
    with Image.open(out) as pic:
        pic.load()
        assert pic.format == "PNG" and pic.size == (1040, 706)
    assert set(P.read_curves([str(metrics)])) == {"stage 1.5", "stage 2"}
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"done": true}\n')
    with pytest.raises(SystemExit, match="no rows with a 'step' key"):
        E.main(["--curves", str(empty), "--out-png", str(tmp_path / "x.png")])
