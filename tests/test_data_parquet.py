"""--data as parquet shards, the images' bytes in the rows (LLaVA-ReCap, LLaVA-OneVision as published).

What is checked: a file, a directory and a glob name the same shards; the validation pass lists every bad
row by shard and row (JSON's checks, and each image's header) and --strict fails on them; the image cell's
forms (Hugging Face's {bytes, path}, plain binary, a list for several images, conversations as JSON text);
an image corrupt past its header is skipped at load time; the store reads a row group at a time, pickles
without rows, and a forked reader of every record holds one row group, not the shards; training
runs from a directory and from a glob (2 workers), resumes bitwise after a crash, and 2 processes match
one; an image folder with parquet data is refused.
"""
import dataclasses
import io
import json
import multiprocessing
import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data as D
import forked
import train as T
from conftest import cli_flags, crash_while_saving_then_resume, read_metrics
from engineering import batches as BA
from engineering import flags as FL
from engineering import records as RC
from shapes_world import demo_base as DB

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle ."}]


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def shapes_rows(shapes_dir: str, stage_file: str = "stage1_5.json") -> list[dict]:
    """The shapes records as parquet rows: the image's bytes inside, JPEG for even rows, PNG for odd ones."""
    with open(os.path.join(shapes_dir, stage_file)) as f:
        records = json.load(f)
    rows = []
    for i, rec in enumerate(records):
        with Image.open(os.path.join(shapes_dir, rec["image"])) as im:
            data = encode(im.convert("RGB"), "JPEG", quality=95) if i % 2 == 0 else encode(im, "PNG")
        rows.append({"id": rec["id"], "image": {"bytes": data, "path": rec["image"]},
                     "conversations": rec["conversations"]})
    return rows


def write_shards(folder, rows: list[dict], shards: int, row_group_size: int, schema=None) -> list[str]:
    """rows split in order over `shards` files part-00000.parquet, ..."""
    os.makedirs(folder, exist_ok=True)
    per = -(-len(rows) // shards)
    paths = []
    for s in range(shards):
        path = os.path.join(str(folder), f"part-{s:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[s * per:(s + 1) * per], schema=schema), path,
                       row_group_size=row_group_size)
        paths.append(path)
    return paths


IMAGE_ROW = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                       ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])


@pytest.fixture(scope="module")
def shards(shapes_dir, tmp_path_factory):
    """The 64 stage-1.5 shapes rows and 5 bad ones in 3 shards of row groups of 8; where the bad ones are."""
    rows = shapes_rows(shapes_dir)
    good_png = rows[1]["image"]["bytes"]
    bad = [
        {"id": "corrupt", "image": {"bytes": b"not an image at all", "path": None}, "conversations": CONV},
        {"id": "two-placeholders", "image": {"bytes": good_png, "path": None},
         "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Two."}]},
        {"id": "path-only", "image": {"bytes": None, "path": "elsewhere/1.png"}, "conversations": CONV},
        {"id": "bad-role", "image": {"bytes": good_png, "path": None},
         "conversations": [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "Hi."}]},
        {"id": None, "image": None, "conversations": []},
    ]
    at = [3, 20, 30, 50, 68]  # positions in the 69 rows: 23 a shard -> shards 0, 0, 1, 2, 2
    for position, row in zip(at, bad):
        rows.insert(position, row)
    folder = tmp_path_factory.mktemp("parquet") / "shards"
    paths = write_shards(folder, rows, shards=3, row_group_size=8, schema=IMAGE_ROW)
    expected_bad = [
        (f"corrupt ({paths[0]} row 3)", "image unreadable: image 0: cannot identify image file"),
        (f"two-placeholders ({paths[0]} row 20)", "2 <image> placeholders for 1 images"),
        (f"path-only ({paths[1]} row 7)", "image 0 has no bytes (only a path: elsewhere/1.png)"),
        (f"bad-role ({paths[2]} row 4)", "turn 0 has unknown role 'robot' (expected human/gpt/system)"),
        (f"{paths[2]} row 22", "missing or empty 'conversations'"),
    ]
    return str(folder), paths, expected_bad


def test_file_directory_and_glob_name_the_shards(shards, tmp_path):
    folder, paths, _ = shards
    assert RC.parquet_files(folder) == paths == RC.parquet_files(os.path.join(folder, "part-*.parquet"))
    assert RC.parquet_files(paths[1]) == [paths[1]]
    assert all(RC.is_parquet(p) for p in (folder, paths[0], os.path.join(folder, "*.parquet")))
    (tmp_path / "data[1].txt").write_text("[]")  # an existing file with glob characters in its name is that file
    assert not any(RC.is_parquet(str(tmp_path / name)) for name in ("data.json", "data[1].txt", "data[2].jsonl"))
    for missing in (str(tmp_path), str(tmp_path / "*.parquet"), str(tmp_path / "none.parquet")):
        with pytest.raises(FileNotFoundError, match="no parquet shards there"):
            RC.load_data(missing)


def test_validation_lists_bad_rows_by_shard_and_row(shards):
    folder, paths, expected_bad = shards
    records, bad = RC.load_data(folder)
    assert isinstance(records, RC.ParquetRecordStore) and bad == expected_bad
    assert len(records) == 64 and [r["id"] for r in records] == [f"shapes-{i:06d}" for i in range(64)]
    assert records[0]["source"] == f"{paths[0]} row 0" and records[3]["source"] == f"{paths[0]} row 4"
    with pytest.raises(ValueError, match=r"5 bad records \(strict\):\n  corrupt \(.*part-00000.parquet row 3\): "
                                         r"image unreadable"):
        RC.load_data(folder, strict=True)


def test_good_rows_load_jpeg_and_png(shards, shapes_dir, shapes_tokenizer, tiny_image_processor):
    folder, _, _ = shards
    records, _ = RC.load_data(folder)
    formats = [Image.open(io.BytesIO(records[i]["image_bytes"][0])).format for i in range(4)]
    assert formats == ["JPEG", "PNG", "JPEG", "PNG"]
    dataset = D.LlavaDataset(records, "", shapes_tokenizer, tiny_image_processor, D.CHATML_TEMPLATE, 4)
    with open(os.path.join(shapes_dir, "stage1_5.json")) as f:
        as_json = json.load(f)
    json_dataset = D.LlavaDataset(as_json, shapes_dir, shapes_tokenizer, tiny_image_processor, D.CHATML_TEMPLATE, 4)
    for i in (0, 1, 63):
        sample, same = dataset[i], json_dataset[i]
        assert sample["id"] == same["id"] and torch.equal(sample["input_ids"], same["input_ids"])
        assert sample["pixel_values"].shape == (1, 3, 32, 32)
    # the PNG row has the image file's pixels; the JPEG row, its own bytes' (JPEG is lossy)
    assert torch.equal(dataset[1]["pixel_values"], json_dataset[1]["pixel_values"])
    jpeg = Image.open(io.BytesIO(records[0]["image_bytes"][0])).convert("RGB")
    assert torch.equal(dataset[0]["pixel_values"], D.preprocess_images([jpeg], tiny_image_processor))


def test_image_cell_forms(tmp_path, shapes_dir):
    """Plain binary images; several images a row (a list, one <image> each); no image (null); conversations
    as JSON text; a column that holds paths is refused naming the shard."""
    png = encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")
    jpeg = encode(Image.new("RGB", (8, 6), (30, 30, 200)), "JPEG")
    two = [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "Same."}]
    text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"image": [png, None], "conversations": [CONV, text_only]}), plain)
    records, bad = RC.load_data(str(plain))
    assert bad == [] and [r["image_bytes"] for r in records] == [[png], []]
    assert records[0]["id"] == f"{plain} row 0"  # no id column: the row's place is its name
    several = tmp_path / "several.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "images": [[png, jpeg], [png]],
                             "conversations": [json.dumps(two), json.dumps(two)]}), several)
    records, bad = RC.load_data(str(several))
    assert [r["image_bytes"] for r in records] == [[png, jpeg]] and records[0]["conversations"] == two
    assert bad == [(f"b ({several} row 1)", "2 <image> placeholders for 1 images")]
    images = D.LlavaDataset(records, "", None, None, "", 1).load_images(records[0])
    assert [im.size for im in images] == [(8, 8), (8, 6)]
    paths = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"image": ["a.png"], "conversations": [CONV]}), paths)
    with pytest.raises(ValueError, match=rf"{re.escape(str(paths))}: column 'image' is string, not image bytes"):
        RC.load_data(str(paths))
    no_conversations = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["hi"]}), no_conversations)
    with pytest.raises(ValueError, match=rf"{re.escape(str(no_conversations))}: no 'conversations' column "
                                         r"\(its columns: id, text\)"):
        RC.load_data(str(no_conversations))
    (tmp_path / "json").mkdir()
    not_parquet = tmp_path / "json" / "x.parquet"
    not_parquet.write_text("[]")
    with pytest.raises(ValueError, match=rf"{re.escape(str(not_parquet))}: not a readable parquet file"):
        RC.load_data(str(tmp_path / "j*" / "*.parquet"))


def test_an_image_corrupt_past_its_header_is_skipped_at_load_time(tmp_path, shapes_tokenizer, tiny_image_processor):
    """The validation pass reads headers only: a truncated JPEG passes it and is skipped, named, when loaded."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = encode(Image.fromarray(noise), "JPEG")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "cut", "image": {"bytes": whole[:len(whole) // 2], "path": None},
                                          "conversations": CONV}], schema=IMAGE_ROW), path)
    records, bad = RC.load_data(str(path))
    assert bad == [] and len(records) == 1
    dataset = D.LlavaDataset(records, "", shapes_tokenizer, tiny_image_processor, D.CHATML_TEMPLATE, 4)
    rid, why = dataset[0]["skipped"]
    assert rid == "cut" and why.startswith(f"image unreadable: {path} row 0 image 0: image file is truncated")
    assert BA.skip_kind(why) == "image unreadable"


def noise_rows(n: int, side: int = 220) -> list[dict]:
    """Rows with distinct noise PNGs (~145 KB each: parquet cannot shrink them)."""
    rng = np.random.default_rng(1)
    images = (encode(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)), "PNG", compress_level=0)
              for _ in range(n))
    return [{"id": f"{i:05d}", "image": {"bytes": data, "path": None}, "conversations": CONV}
            for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory):
    rows = noise_rows(240)
    folder = tmp_path_factory.mktemp("noise")
    write_shards(folder, rows, shards=2, row_group_size=10, schema=IMAGE_ROW)  # 24 row groups of ~1.5 MB
    return str(folder), sum(len(r["image"]["bytes"]) for r in rows)


def test_store_reads_a_row_group_at_a_time_and_pickles_without_rows(noise_shards, monkeypatch):
    folder, image_bytes = noise_shards
    reads = []
    real_read = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, **kw: reads.append(kw.get("columns")) or real_read(self, g, **kw))
    records, _ = RC.load_data(folder)
    assert len(reads) == 24 and len(records) == 240  # the validation pass: each row group once
    reads.clear()
    assert [len(records[i]["image_bytes"][0]) for i in range(240)]  # in order: each row group once
    assert reads == [["id", "conversations", "image"]] * 24
    reads.clear()
    records[0], records[239], records[1]  # another group between: read again (one is kept per process)
    assert len(reads) == 3
    pickled = pickle.dumps(records)
    assert len(pickled) < 2000 + 12 * len(records)  # the arrays and shard names: no rows, no open files
    copy = pickle.loads(pickled)
    assert copy[5] == records[5] and copy[-3:] == records[-3:]
    assert isinstance(records[10:20], RC.ParquetRecordStore) and records[10:20] == [records[i] for i in range(10, 20)]


def _private_kib():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))


def _read_every_image(records, conn):
    """In a forked process: private memory (KiB) after reading the first record, and after reading every
    record and its images, twice."""
    records[0]  # the first read starts pyarrow's allocator in the worker (~10 MB, once)
    first = _private_kib()
    total = sum(len(b) for i in range(len(records)) for b in records[i]["image_bytes"])
    total += sum(len(b) for i in range(len(records)) for b in records[i]["image_bytes"])
    conn.send((first, _private_kib(), total))


def test_a_forked_reader_of_every_image_holds_one_row_group(noise_shards):
    """A worker that reads all ~35 MB of images (24 row groups of ~1.5 MB) twice grows by far less than they are."""
    folder, image_bytes = noise_shards
    records, _ = RC.load_data(folder)
    ctx = multiprocessing.get_context("fork")  # as DataLoader workers start on Linux
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_read_every_image, args=(records, child))
    p.start()
    first_kib, end_kib, total = parent.recv()
    p.join()
    assert total == 2 * image_bytes
    assert (end_kib - first_kib) * 1024 < 0.25 * image_bytes, (first_kib, end_kib, image_bytes)


# -----------------------------------------------------------------------------
# Training from parquet shards


def stage15(base, out_dir, data, **overrides) -> dict:
    values = dict(recipe="demo", stage="1.5", data=data, init=base.init, model_overrides={"pool_size": 32},
                  lr=1e-3, vision_lr=0.0, pool_lr=1e-2, max_steps=3, warmup_steps=1, global_batch_size=8,
                  batch_size=8, num_workers=0, log_every=1, max_length=256, seed=0, bf16=False, out_dir=str(out_dir))
    values.update(overrides)
    return values


def test_training_from_a_directory_lists_the_bad_rows(base, shards, tmp_path, capsys):
    folder, _, expected_bad = shards
    out = tmp_path / "dir"
    T.train_stage(T.TrainConfig(**stage15(base, out, folder)), "1.5")
    text = "".join(capsys.readouterr())
    assert f"{folder}: 5 bad records will be skipped" in text and f"  {expected_bad[0][0]}: image unreadable" in text
    with open(out / "bad_records.json") as f:
        assert [(r["record"], r["reason"]) for r in json.load(f)] == expected_bad
    rows, done = read_metrics(str(out))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.isfile(out / "model.safetensors")


def test_training_from_a_glob_with_two_workers_matches_the_directory(base, shards, tmp_path):
    """2 DataLoader workers, each reading its own shards, give the same run as 0 workers."""
    folder, _, _ = shards
    runs = {}
    for name, data, workers in (("glob", os.path.join(folder, "part-*.parquet"), 2), ("dir", folder, 0)):
        T.train_stage(T.TrainConfig(**stage15(base, tmp_path / name, data, num_workers=workers)), "1.5")
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert all(torch.equal(runs["glob"][k], runs["dir"][k]) for k in runs["dir"])


def test_a_crash_resumes_bitwise_on_parquet(base, shards, tmp_path, monkeypatch):
    """As tests/test_train.py's crash while saving, on parquet data: the process dies writing step-4's state;
    resumed from step-2 it ends bitwise where an uninterrupted run does (20 steps of 4: into the 2nd epoch)."""
    folder, _, _ = shards

    def cfg(out, **kw):
        return T.TrainConfig(**stage15(base, out, folder, max_steps=20, save_every=2, global_batch_size=4,
                                       batch_size=4, **kw))
    ref, run = crash_while_saving_then_resume(cfg, tmp_path, monkeypatch)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(str(run))[0][-1]["loss"] == read_metrics(str(ref))[0][-1]["loss"]


def test_two_processes_match_one_on_parquet(base, shards, tmp_path):
    """2 processes x 4 (as torchrun starts them) against 1 x 8: the sampler splits the parquet store's records
    as a JSON's."""
    folder, _, _ = shards
    T.run(stage15(base, tmp_path / "one", folder))
    flags = cli_flags(stage15(base, tmp_path / "two", folder, batch_size=4))
    proc = forked.run(["train.py", *flags], procs=2, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    one, two = read_metrics(str(tmp_path / "one"))[0], read_metrics(str(tmp_path / "two"))[0]
    assert [r["step"] for r in two] == [1, 2, 3]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-5
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_an_image_folder_with_parquet_is_refused_in_one_line(base, shards, tmp_path):
    folder, _, _ = shards
    cfg = T.TrainConfig(**stage15(base, tmp_path / "out", folder, image_folder=base.shapes))
    with pytest.raises(FL.UsageError, match=rf"^{re.escape(folder)}: parquet shards carry their images in their rows; "
                                           r"an image folder \(.*\) would go unused: drop --image-folder$"):
        T.train_stage(cfg, "1.5")
    proc = forked.run(["train.py", *cli_flags(stage15(base, tmp_path / "cli", folder, image_folder=base.shapes))],
                      timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {folder}: parquet shards carry their images in their rows; an image folder ({base.shapes}) "
        "would go unused: drop --image-folder")


def test_the_demo_recipe_gives_parquet_data_no_image_folder(base, shards, tmp_path):
    folder, _, _ = shards
    overrides = {"data": folder, "vision_model": base.vision, "llm": base.llm}
    assert DB.demo_inputs(overrides, str(tmp_path), T.TrainConfig.demo_images) == {} and "image_folder" not in overrides
    assert not (tmp_path / "shapes").exists()


def test_strict_names_the_first_bad_rows_in_one_line(base, shards, tmp_path):
    folder, paths, _ = shards
    cfg = dataclasses.replace(T.TrainConfig(**stage15(base, tmp_path / "out", folder)), strict=True)
    with pytest.raises(FL.UsageError, match=rf"^{re.escape(folder)}: 5 bad records \(strict\): corrupt "
                                           rf"\({re.escape(paths[0])} row 3\): image unreadable.*; "
                                           r"without --strict bad records are skipped and listed$"):
        T.train_stage(cfg, "1.5")
