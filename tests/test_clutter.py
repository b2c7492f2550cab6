"""The clutter levels (shapes_world/shapes.py CLUTTER_LEVELS): level 0 is the world as it was, bitwise; the
heavier levels draw deterministically, never touch an object, and change only the images; the ablation
bench runs a cluttered world."""
import hashlib
import json
import os
import random
import sys

import numpy as np
import pytest

import forked
from conftest import MAIN
from shapes_world import shapes as SH

# sha256 over the files (names and bytes) of ShapesSpec(num_train_images=12, num_test_images=6, seed=3),
# computed with the generator before clutter levels existed
LEVEL0_SHA256 = "8f25359ff02b6f2494b218399e01342d06c3b86f51cb26ee1c6eb3f77da43643"
HEAVIEST = max(SH.CLUTTER_LEVELS)


def tree_sha256(root) -> str:
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def small_world(root, clutter: int):
    SH.make_shapes_dataset(str(root), SH.ShapesSpec(num_train_images=12, num_test_images=6, seed=3, clutter=clutter))
    return root


def test_the_default_world_is_bitwise_the_one_before_clutter_levels(tmp_path):
    assert SH.ShapesSpec().clutter == 0
    assert tree_sha256(small_world(tmp_path / "w", 0)) == LEVEL0_SHA256
    assert "clutter" not in json.loads((tmp_path / "w" / "spec.json").read_text())


def test_a_clutter_level_changes_the_images_and_nothing_else(tmp_path):
    light, heavy = small_world(tmp_path / "light", 0), small_world(tmp_path / "heavy", HEAVIEST)
    for name in ("stage1.json", "stage1_5.json", "stage2.json", "test.jsonl"):  # same objects, questions, answers
        assert (light / name).read_bytes() == (heavy / name).read_bytes()
    assert json.loads((heavy / "spec.json").read_text())["clutter"] == HEAVIEST
    for i in range(18):
        a = np.asarray(SH.Image.open(light / "images" / f"{i:06d}.png"))
        b = np.asarray(SH.Image.open(heavy / "images" / f"{i:06d}.png"))
        assert (a != b).any(axis=2).mean() > 0.5  # the texture moves most background pixels


@pytest.mark.parametrize("clutter", sorted(SH.CLUTTER_LEVELS))
def test_each_level_draws_deterministically_from_its_seed(clutter):
    spec = SH.ShapesSpec(clutter=clutter)
    draw = lambda seed: np.asarray(SH.draw_shapes_image(random.Random(seed), spec)[0])  # noqa: E731
    assert (draw(11) == draw(11)).all()
    assert (draw(11) != draw(12)).any()


def test_heavy_clutter_keeps_every_object_pixel():
    rng, spec = random.Random(5), SH.ShapesSpec(clutter=HEAVIEST)
    touched = 0
    for _ in range(60):
        im, objects, masks = SH.draw_scene(rng, spec)
        pixels = np.asarray(im)
        clutter = masks["clutter"]
        assert clutter.sum() > 200  # the level drew its distractors and lines
        for o, m in zip(objects, masks["objects"]):
            assert m.sum() > 50
            assert not (clutter & m).any()  # no distractor or line pixel on the object
            assert (pixels[m] == SH.COLOURS[o["colour"]]).all()  # the object whole, in its own colour
            # nor within the margin around it
            ys, xs = np.nonzero(clutter)
            oy, ox = np.nonzero(m)
            gap = np.min(np.maximum(np.abs(ys[:, None] - oy[None]), np.abs(xs[:, None] - ox[None])))
            assert gap > SH.CLUTTER_MARGIN
            touched += gap <= SH.CLUTTER_MARGIN + 3
    assert touched > 0  # clutter does pass close to objects: the margin is what keeps them apart


def test_an_unknown_clutter_level_is_refused_by_name():
    with pytest.raises(ValueError, match="clutter must be one of"):
        SH.ShapesSpec(clutter=9)
    proc = forked.run(["shapes_world/shapes.py", "--out", "unused", "--clutter", "9"])
    assert proc.returncode != 0 and "--clutter" in proc.stderr


def test_bench_quick_runs_the_clutter_arms(tmp_path):
    sys.path.insert(0, os.path.join(MAIN, "scripts"))
    out = tmp_path / "ablation"
    arms = ["llava", "captions", "victor"]
    proc = forked.run(["scripts/bench_ablation.py", "--quick", "--arms", *arms, "--clutter", str(HEAVIEST),
                       "--out-dir", str(out)], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "ablation.json").read_text())
    assert set(report["arms"]) == set(arms) and report["config"]["world_opts"] == {"clutter": HEAVIEST}
    for arm in report["arms"].values():
        assert arm["settings"]["world"]["shapes"]["clutter"] == HEAVIEST
        assert 0.0 <= arm["accuracy"]["mean"] <= 1.0
    assert set(report["paired"]["vs_llava"]) == {"captions", "victor"}
    assert json.loads((out / "shapes" / "spec.json").read_text())["clutter"] == HEAVIEST
    # the grid's images are the cluttered ones: the same scenes as level 0's, other pixels
    light = tmp_path / "light"
    SH.make_shapes_dataset(str(light), SH.ShapesSpec(num_train_images=160, num_test_images=40))
    assert (light / "test.jsonl").read_bytes() == (out / "shapes" / "test.jsonl").read_bytes()
    a = np.asarray(SH.Image.open(light / "images" / "000000.png"))
    assert (a != np.asarray(SH.Image.open(out / "shapes" / "images" / "000000.png"))).any()


def test_the_clutter_report_pairs_seeds_across_levels(tmp_path):
    """report_clutter with the fourth world's records as both levels, one heavy victor run moved by +0.05
    overall and +0.25 on colour: the interaction is exactly that move on that seed, 0 on the others."""
    sys.path.insert(0, os.path.join(MAIN, "scripts"))
    import report_clutter as R
    fourth = os.path.join(MAIN, "docs", "ablation-fourth-world")
    heavy = tmp_path / "heavy"
    for arm in R.ARMS:
        for s in (0, 1, 2):
            src = os.path.join(fourth, "runs", arm, f"seed-{s}", "result.json")
            dst = heavy / "runs" / arm / f"seed-{s}" / "result.json"
            dst.parent.mkdir(parents=True)
            r = json.loads(open(src).read())
            if (arm, s) == ("victor", 1):
                r["accuracy"] += 0.05
                r["per_type"]["colour"] += 0.25
            dst.write_text(json.dumps(r))
    os.remove(heavy / "runs" / "captions" / "seed-2" / "result.json")  # seed 2 incomplete: left out
    report_dir = tmp_path / "report"
    R.main(["--out", str(report_dir), "--collect-heavy", str(heavy), "--collect-light", fourth])
    assert (report_dir / "heavy" / "runs" / "victor" / "seed-1" / "result.json").is_file()
    report = json.loads((report_dir / "ablation.json").read_text())
    assert report["seeds"] == [0, 1]
    inter = report["interaction"]
    assert inter["victor-llava"]["overall"]["per_seed"] == pytest.approx([0.0, 0.05])
    assert inter["victor-captions"]["per_type"]["colour"]["per_seed"] == pytest.approx([0.0, 0.25])
    assert inter["captions-llava"]["overall"]["per_seed"] == pytest.approx([0.0, 0.0])
    assert inter["victor-llava"]["overall"]["ci95"][0] < 0.025 < inter["victor-llava"]["overall"]["ci95"][1]
    for level in ("light", "heavy"):
        acc = report["arms"][level]["victor"]["accuracy"]
        assert set(acc) >= {"mean", "ci95", "per_seed"} and len(acc["per_seed"]) == 2
        assert report["paired"][level]["vs_llava"]["victor"]["seeds"] == [0, 1]
    assert "| victor - llava |" in (report_dir / "ablation.md").read_text()
    assert (report_dir / "ablation.png").stat().st_size > 10_000
