"""Every bad input handled: what each kind gets (converted, skipped and listed, or a clear failure).

Structural problems are found by the validation pass before training (listed by line and reason);
per-sample problems are found when the sample is loaded: convertible images (CMYK, RGBA, LA, palette
with transparency, greyscale, 16-bit, float) are converted, the rest (corrupt, truncated, decompression
bomb, too long) are skipped, counted and listed by id in the report, skipped.json and the metrics
log; --strict fails on the first. A non-finite loss skips the optimizer step; K in a row stop the run
with a saved state.
"""
import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import forked
import train as T
from conftest import read_metrics, train_says
from engineering import batches as BA
from engineering import distributed as DI
from engineering import flags as FL

pytestmark = pytest.mark.usefixtures("one_thread")

# -----------------------------------------------------------------------------
# Image files of every awkward kind


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (no pixel data): enough for PIL's size check."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noisy_rgb(size=(40, 32), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def awkward_images(tmp_path_factory):
    """name -> path of an image file with one awkward property each."""
    root = tmp_path_factory.mktemp("awkward")
    files = {}

    def put(name, payload: bytes):
        (root / name).write_bytes(payload)
        files[name.split(".")[0].replace("_", "-")] = str(root / name)

    put("corrupt.png", b"this is not an image at all")
    full_jpeg = encoded(noisy_rgb(), "JPEG", quality=90)
    put("truncated_jpeg.jpg", full_jpeg[: len(full_jpeg) // 2])
    full_png = encoded(noisy_rgb(), "PNG")
    put("truncated_png.png", full_png[: len(full_png) // 2])
    put("bomb.png", png_header_only(20000, 20000))  # 400 M pixels: over twice PIL's limit
    put("cmyk.jpg", encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95))  # red
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent
    put("rgba.png", encoded(rgba, "PNG"))
    put("la.png", encoded(Image.new("LA", (32, 32), (50, 0)), "PNG"))  # fully transparent grey
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 32, 16))  # top half: index 0, the transparent one
    put("palette.png", encoded(palette, "PNG", transparency=0))
    put("grey.png", encoded(Image.new("L", (32, 32), 77), "PNG"))
    sixteen = np.zeros((32, 32), dtype=np.uint16)
    sixteen[:, 8:16], sixteen[:, 16:] = 128 * 257, 65535
    put("sixteen.png", encoded(Image.fromarray(sixteen), "PNG"))
    put("float.tif", encoded(Image.fromarray(np.linspace(-1.0, 3.0, 32 * 32, dtype=np.float32).reshape(32, 32)),
                             "TIFF"))
    put("wide.png", encoded(noisy_rgb((64, 16)), "PNG"))
    return files


# -----------------------------------------------------------------------------
# load_image: each kind on its own


@pytest.mark.parametrize("name,why", [
    ("corrupt", "image unreadable"), ("truncated-jpeg", "image unreadable"), ("truncated-png", "image unreadable"),
    ("bomb", "decompression bomb")])
def test_unusable_images_raise_sample_error(awkward_images, name, why):
    with pytest.raises(D.SampleError, match=why):
        D.load_image(awkward_images[name])


def test_missing_image_raises_sample_error(tmp_path):
    with pytest.raises(D.SampleError, match="image not found"):
        D.load_image(str(tmp_path / "nope.png"))


def test_image_just_over_the_pixel_limit_is_a_bomb_too(awkward_images, monkeypatch):
    """Between 1x and 2x Image.MAX_IMAGE_PIXELS PIL only warns; we treat it as the bomb it may be."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 40 x 32 image is 1280 pixels
    root = os.path.dirname(awkward_images["wide"])
    path = os.path.join(root, "rgb.png")
    noisy_rgb((40, 32)).save(path)
    with pytest.raises(D.SampleError, match="decompression bomb"):
        D.load_image(path)


def pixel(image, xy):
    return image.getpixel(xy)


def test_convertible_images_become_rgb(awkward_images):
    images = {k: D.load_image(p) for k, p in awkward_images.items()
              if k in ("cmyk", "rgba", "la", "palette", "grey", "sixteen", "float", "wide")}
    assert all(im.mode == "RGB" for im in images.values())
    r, g, b = pixel(images["cmyk"], (16, 16))
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    assert pixel(images["rgba"], (4, 4)) == (255, 255, 255)  # transparent: composited on white
    assert pixel(images["rgba"], (28, 4)) == (0, 0, 255)  # opaque: unchanged
    assert pixel(images["la"], (4, 4)) == (255, 255, 255)
    assert pixel(images["palette"], (4, 4)) == (255, 255, 255) and pixel(images["palette"], (4, 28)) == (0, 255, 0)
    assert pixel(images["grey"], (4, 4)) == (77, 77, 77)
    # 16-bit: scaled to 8 bits (a plain convert("RGB") clips everything above 255 to white)
    assert [pixel(images["sixteen"], (x, 0)) for x in (0, 8, 20)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    # float: the image's range mapped onto 0..255
    assert pixel(images["float"], (0, 0)) == (0, 0, 0) and pixel(images["float"], (31, 31)) == (255, 255, 255)
    assert images["wide"].size == (64, 16)


def test_plain_convert_would_have_lost_the_16_bit_image(awkward_images):
    """Why to_rgb exists: PIL's own convert clips 16-bit values."""
    with Image.open(awkward_images["sixteen"]) as im:
        assert im.mode.startswith("I")
        assert im.convert("RGB").getpixel((8, 0)) == (255, 255, 255)  # 128 * 257 clipped to white


# -----------------------------------------------------------------------------
# Training on a dataset with every kind


def record(rid, image, answer="red", question="What colour is the object at the top left ?"):
    conv = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": conv}


SKIPPED = {"corrupt": "image unreadable", "truncated-jpeg": "image unreadable", "truncated-png": "image unreadable",
           "bomb": "decompression bomb", "too-long": "do not fit max_length"}
CONVERTED = ("cmyk", "rgba", "la", "palette", "grey", "sixteen", "float", "wide")


@pytest.fixture
def messy_data(base, awkward_images, tmp_path):
    """10 good shapes records, 8 with convertible images, 4 with unusable images, 2 over-long."""
    with open(base.data["2"]) as f:
        good = json.load(f)[:10]
    recs = list(good)
    recs += [record(k, awkward_images[k]) for k in CONVERTED]
    recs += [record(k, awkward_images[k]) for k in ("corrupt", "truncated-jpeg", "truncated-png", "bomb")]
    # too long: its image tokens would be cut (the question comes first) -> skipped
    too_long = record("too-long", good[0]["image"])
    too_long["conversations"][0]["value"] = " ".join(["red"] * 300) + "\n<image>"
    # long, but its image fits: kept, cut to max_length, and counted as truncated
    long_answer = record("long-answer", good[1]["image"], answer=" ".join(["red"] * 300))
    recs += [too_long, long_answer]
    # paths: shapes records are relative to the shapes folder; the awkward ones are absolute
    for r in recs:
        if not os.path.isabs(r["image"]):
            r["image"] = os.path.join(base.shapes, r["image"])
    path = tmp_path / "messy.json"
    path.write_text(json.dumps(recs))
    return str(path), recs


def stage2(base, out_dir, data, **overrides):
    values = dict(stage="2", data=data, image_folder="/", init=base.init, model_overrides={"pool_size": 32},
                  lr=1e-3, vision_lr=0.0, warmup_steps=1, max_steps=4, global_batch_size=4, batch_size=4,
                  num_workers=0, log_every=1, max_length=256, bf16=False, seed=0, out_dir=str(out_dir))
    values.update(overrides)
    return T.TrainConfig(**values)


def test_training_converts_skips_and_lists_every_runtime_kind(base, messy_data, tmp_path, capsys):
    path, recs = messy_data
    cfg = stage2(base, tmp_path / "out", path, max_steps=6)  # 24 records: one epoch, every record seen once
    T.train_stage(cfg, "2")
    text = "".join(capsys.readouterr())
    with open(os.path.join(cfg.out_dir, "skipped.json")) as f:
        listed = json.load(f)
    skipped = {s["id"]: s["reason"] for s in listed}
    assert len(listed) == len(skipped) == len(SKIPPED) and set(skipped) == set(SKIPPED), listed
    for rid, why in SKIPPED.items():
        assert why in skipped[rid], (rid, skipped[rid])
    assert f"skipped records: {len(SKIPPED)}" in text
    rows, done = read_metrics(cfg.out_dir)
    logged = {rid for r in rows for rid in r.get("skipped_ids", [])}
    assert logged == set(SKIPPED)  # each listed in the metrics log when it happened
    assert set(SKIPPED) <= set(done[0]["skipped_ids"])
    assert all(np.isfinite(r["loss"]) for r in rows)
    # the long answer was used, cut to max_length, and said so
    assert "truncated to max_length=256: 1 samples" in text
    with open(os.path.join(cfg.out_dir, "truncated.json")) as f:
        cut = json.load(f)
    assert {c["id"] for c in cut} == {"long-answer"} and all(c["tokens_cut"] > 0 for c in cut)
    assert done[0]["truncated"] == len(cut)


def test_strict_fails_on_the_first_unusable_sample(base, messy_data, tmp_path):
    path, recs = messy_data
    with pytest.raises(ValueError, match=r"record (corrupt|truncated-jpeg|truncated-png|bomb|too-long): .*strict"):
        T.train_stage(stage2(base, tmp_path / "out", path, strict=True, max_steps=6), "2")


def test_validation_pass_lists_every_structural_problem(base, tmp_path, capsys):
    with open(base.data["2"]) as f:
        good = json.load(f)[:8]
    conv = good[0]["conversations"]
    lines = [json.dumps(r) for r in good[:4]]
    lines += ["{this is not json",
              json.dumps({"id": "no-conv", "image": good[0]["image"]}),
              json.dumps({"id": "bad-role", "image": good[0]["image"],
                          "conversations": [{"from": "robot", "value": conv[0]["value"]}, conv[1]]}),
              json.dumps({"id": "empty-turn", "image": good[0]["image"],
                          "conversations": [conv[0], {"from": "gpt", "value": ""}]}),
              json.dumps({"id": "two-placeholders", "image": good[0]["image"],
                          "conversations": [{"from": "human", "value": "<image> <image>"}, conv[1]]}),
              json.dumps({"id": "no-file", "image": "images/never_made.png", "conversations": conv})]
    lines += [json.dumps(r) for r in good[4:]]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = stage2(base, tmp_path / "out", str(path), image_folder=base.shapes, max_steps=2)
    T.train_stage(cfg, "2")
    text = "".join(capsys.readouterr())
    want = [("line 5", "invalid JSON"), ("no-conv (line 6)", "missing or empty 'conversations'"),
            ("bad-role (line 7)", "turn 0 has unknown role 'robot'"), ("empty-turn (line 8)", "turn 1 is empty"),
            ("two-placeholders (line 9)", "2 <image> placeholders for 1 images"),
            ("no-file (line 10)", "image not found")]
    assert "6 bad records will be skipped" in text
    for where, why in want:
        assert f"{where}: {why}" in text, (where, text[-3000:])
    with open(os.path.join(cfg.out_dir, "bad_records.json")) as f:
        listed = json.load(f)
    assert [r["record"] for r in listed] == [w for w, _ in want]
    assert all(why in r["reason"] for r, (_, why) in zip(listed, want))
    rows, done = read_metrics(cfg.out_dir)
    assert len(rows) == 2 and done[0]["skipped"] == 6


# -----------------------------------------------------------------------------
# Non-finite losses


def poison(monkeypatch, ids):
    """Records whose id is in ids get NaN pixels (as a broken decoder might produce)."""
    real = D.LlavaDataset.__getitem__

    def getitem(self, i):
        item = real(self, i)
        if item.get("id") in ids or ids == "all":
            item["pixel_values"] = torch.full_like(item["pixel_values"], float("nan"))
        return item
    monkeypatch.setattr(D.LlavaDataset, "__getitem__", getitem)


def test_a_non_finite_step_is_skipped(base, tmp_path, monkeypatch, capsys):
    with open(base.data["2"]) as f:
        poisoned_id = json.load(f)[5]["id"]
    poison(monkeypatch, {poisoned_id})
    cfg = stage2(base, tmp_path / "out", base.data["2"], image_folder=base.shapes, max_steps=16)  # one epoch
    T.train_stage(cfg, "2")
    text = "".join(capsys.readouterr())
    rows, _ = read_metrics(cfg.out_dir)
    bad = [r for r in rows if r.get("nonfinite")]
    assert len(bad) == 1 and not np.isfinite(bad[0]["loss"])  # the one batch holding the poisoned record
    assert f"step {bad[0]['step']}: non-finite loss" in text and "optimizer step skipped" in text
    assert all(np.isfinite(r["loss"]) for r in rows if not r.get("nonfinite"))
    from safetensors.torch import load_file
    weights = load_file(os.path.join(cfg.out_dir, "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN never reached the weights


def test_k_non_finite_steps_in_a_row_stop_with_a_saved_state(base, tmp_path, monkeypatch):
    poison(monkeypatch, "all")
    cfg = stage2(base, tmp_path / "out", base.data["2"], image_folder=base.shapes, max_steps=10, max_bad_steps=3)
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss or gradient"):
        T.train_stage(cfg, "2")
    state = DI.latest_training_state(os.path.join(cfg.out_dir, "checkpoints"))
    assert state.endswith("step-3")
    with open(os.path.join(state, "progress.json")) as f:
        assert json.load(f)["step"] == 3
    assert not os.path.exists(os.path.join(cfg.out_dir, "model.safetensors"))
    # the saved state holds the weights from before the bad steps: resuming without the poison works
    monkeypatch.undo()
    T.train_stage(stage2(base, tmp_path / "out", base.data["2"], image_folder=base.shapes, max_steps=10,
                         max_bad_steps=3, resume="auto"), "2")
    rows, _ = read_metrics(cfg.out_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))  # each step once: the log cut back to the state's
    assert [r["step"] for r in rows if r.get("nonfinite")] == [1, 2, 3]


# -----------------------------------------------------------------------------
# All-bad data: the run stops with counts and reasons (never waits forever), every process together


def lfs_pointer_copy(base, tmp_path, bad_ids=None) -> str:
    """The stage-2 records with their images replaced by git-lfs pointer files named .png (all of them, or the
    records whose index is in bad_ids); returns the data file (image paths absolute)."""
    with open(base.data["2"]) as f:
        recs = json.load(f)
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1234\n"
    for i, r in enumerate(recs):
        r["image"] = os.path.join(base.shapes, r["image"])
        if bad_ids is None or i in bad_ids:
            path = tmp_path / f"pointer-{i}.png"
            path.write_bytes(pointer)
            r["image"] = str(path)
    path = tmp_path / "pointers.json"
    path.write_text(json.dumps(recs))
    return str(path)


def stage2_flags(base, out_dir, data, **overrides) -> list[str]:
    from conftest import cli_flags
    values = dict(stage="2", data=data, image_folder="/", init=base.init, lr=1e-3, vision_lr=0.0, warmup_steps=1,
                  max_steps=4, global_batch_size=4, batch_size=4, num_workers=0, log_every=1, max_length=256,
                  bf16=False, seed=0, out_dir=str(out_dir))
    values.update(overrides)
    return cli_flags(values)


def run_train(flags, timeout=300, procs=1):
    """train.py as `procs` processes of its own (as torchrun starts them), bounded by a timeout: a run that hangs
    fails the test with TimeoutExpired."""
    return forked.run(["train.py", *flags], procs=procs, timeout=timeout)


@pytest.mark.parametrize("case", ["corrupt", "too-long"])
def test_all_bad_data_stops_after_one_pass_in_one_line(base, tmp_path, case):
    """Every image a git-lfs pointer, or every sample too long for its image tokens (--max-length 5): the run
    stops after one pass over the 64 records, naming the counts, the reason and skipped.json."""
    out = tmp_path / "out"
    if case == "corrupt":
        flags, kind = stage2_flags(base, out, lfs_pointer_copy(base, tmp_path)), "image unreadable"
    else:
        flags = stage2_flags(base, out, base.data["2"], image_folder=base.shapes, max_length=5)
        kind = "N tokens with images do not fit max_length=5"
    proc = run_train(flags)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: stage 2: stopped, no usable sample in one full pass over the data: 64 samples tried, "
                    f"64 skipped (64 records: 64 x {kind}); every skipped record is listed in "
                    f"{out / 'skipped.json'}"), last
    with open(out / "skipped.json") as f:
        assert len(json.load(f)) == 64
    assert not (out / "model.safetensors").exists()


def test_the_first_n_samples_all_skipped_stop_before_a_full_pass(base, tmp_path, monkeypatch):
    monkeypatch.setattr(BA, "STOP_AFTER_SKIPS", 8)
    cfg = stage2(base, tmp_path / "out", lfs_pointer_copy(base, tmp_path))
    with pytest.raises(FL.StageStopped, match=r"stopped, the first 8 samples tried were all skipped: 8 samples tried, "
                                             r"8 skipped \(8 records: 8 x image unreadable\)"):
        T.train_stage(cfg, "2")


def test_two_processes_stop_together_when_one_has_only_bad_data(base, tmp_path):
    """2 processes on gloo, as torchrun starts them: process 1's share of the records (DistributedSampler's, epoch
    0) is all bad, process 0's all good. Both stop at the first step; neither is left waiting in a collective."""
    sampler = torch.utils.data.DistributedSampler(range(64), num_replicas=2, rank=1, shuffle=True, seed=0,
                                                  drop_last=True)
    out = tmp_path / "out"
    flags = stage2_flags(base, out, lfs_pointer_copy(base, tmp_path, bad_ids=set(sampler)), global_batch_size=8)
    proc = run_train(flags, procs=2)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    # process 0 tried its first batch of 4 (all usable) before they stopped
    want = ("error: stage 2: stopped, process 1: no usable sample in one full pass over the data: 36 samples tried, "
            "32 skipped (32 records: 32 x image unreadable)")
    assert text.count(want) == 2, text[-3000:]  # both processes said it, and exited
    with open(out / "skipped.json") as f:
        assert len(json.load(f)) == 32


def test_high_skip_rate_warns_at_once_and_at_the_end_and_counts_each_record_once(base, messy_data, tmp_path,
                                                                                 capsys):
    path, recs = messy_data
    cfg = stage2(base, tmp_path / "out", path, max_steps=12)  # 24 records: two passes, every bad one seen twice
    T.train_stage(cfg, "2")
    text = "".join(capsys.readouterr())
    assert "warning: 21 % of the samples tried were skipped (5 of 24, so far, this process)" in text, text[-2000:]
    assert "warning: 21 % of the samples tried were skipped (10 of 48, every process)" in text
    assert "(each record counted once; 5 more skips of records already listed, after the data wrapped around)" in text
    with open(os.path.join(cfg.out_dir, "skipped.json")) as f:
        assert sorted(s["id"] for s in json.load(f)) == sorted(SKIPPED)
    _, done = read_metrics(cfg.out_dir)
    assert done[0]["skipped"] == len(SKIPPED)


# -----------------------------------------------------------------------------
# A user's situation, not a bug: one line from train.py, naming the record, step or path and what to do


def main_says(flags, capsys) -> str:
    code, said = train_says(flags, capsys)
    assert code in (1, 2) and said.startswith("error: "), said
    return said


def test_strict_on_a_bad_record_is_one_line(base, tmp_path, capsys):
    with open(base.data["2"]) as f:
        good = json.load(f)[:8]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), "{this is not json", *map(json.dumps, good[1:])]) + "\n")
    said = main_says(stage2_flags(base, tmp_path / "out", str(path), image_folder=base.shapes, strict=True), capsys)
    assert "1 bad records (strict): line 2: invalid JSON" in said and "without --strict" in said, said
    # a record that fails when it loads (a corrupt image) is named too
    said = main_says(stage2_flags(base, tmp_path / "out", lfs_pointer_copy(base, tmp_path), strict=True), capsys)
    assert re.search(r"record shapes-\d+(-q\d)?: image unreadable: .*strict: not skipping it", said), said


def test_the_non_finite_stop_is_one_line(base, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "all")
    said = main_says(stage2_flags(base, tmp_path / "out", base.data["2"], image_folder=base.shapes,
                                  max_bad_steps=2), capsys)
    assert "stage 2: 2 steps in a row had a non-finite loss or gradient (last: step 2); stopped" in said, said
    assert "the same command resumes from it" in said


def test_a_stage1_checkpoint_whose_base_model_moved_is_one_line(base, tmp_path, shapes_tokenizer,
                                                                tiny_image_processor, capsys):
    import shutil

    from engineering.checkpoints import save_checkpoint
    from victor import VictorConfig, VictorModel
    moved_llm = str(tmp_path / "llm")
    shutil.copytree(base.llm, moved_llm)
    stage1 = str(tmp_path / "stage1")
    model = VictorModel(VictorConfig(vision_model=base.vision, llm=moved_llm, pool_size=32))
    save_checkpoint(model, stage1, shapes_tokenizer, tiny_image_processor, parts="projector")
    shutil.rmtree(moved_llm)
    said = main_says(stage2_flags(base, tmp_path / "out", base.data["2"], image_folder=base.shapes, init=stage1),
                     capsys)
    assert said.startswith(f"error: --init {stage1}: cannot load a base model it refers to") and moved_llm in said
    assert "put the model back at that path" in said
