"""
Benchmark: host memory of the record loader (engineering/records.py: load_records) and of DataLoader workers.

    python scripts/bench_data_memory.py --records 200000                  # JSON list, this records.py
    python scripts/bench_data_memory.py --records 200000 --format jsonl
    python scripts/bench_data_memory.py --records 200000 --format parquet  # shards, the image bytes in the rows
    python scripts/bench_data_memory.py --module /tmp/records_orig.py     # another version of records.py

It writes an LLaVA-ReCap-like stage-1.5 file (id, image, the detail prompt, a ~110-word caption)
into a temporary folder. Every record points at the same tiny image, so the loader's image check
runs (one stat per record) without a million image files. --format parquet writes the same records as
parquet shards of SHARD_ROWS rows in row groups of GROUP_ROWS (as Hugging Face datasets writes image
data), each row holding the tiny PNG's bytes (--image-kib: that many KiB of random bytes after it, so
that the shards are not mostly text): load_data reads them and checks every image's header.

(a) peak_rss/file_size: a fresh process imports the module and reads its RSS, runs load_records with
    the image folder (parquet: load_data), then reads its peak RSS (VmHWM). The figure is (peak - RSS
    before loading) / the data's size on disk: the loader's own memory, without the ~0.3 GiB that
    importing torch (and pyarrow) costs any process.
(b) worker_growth_gib_per_1M: the records go into a Dataset and a DataLoader with 2 forked,
    persistent workers and a shuffled order. Its __getitem__ reads the record through the store and the
    fields LlavaDataset.__getitem__ reads (record_id, to_messages, record_images; for parquet the row's
    image bytes, which the store reads with their row group), but skips tokenising and image decoding:
    their cost does not depend on how records are held. Each worker's private
    memory (Private_Clean + Private_Dirty in /proc/PID/smaps_rollup) is read after the first batch and
    at the end of the epoch. The figure is the largest growth, in GiB per million records in the file.

(c) --format json only: the library's way for comparison, json.load of the whole list, then each record's
    JSON text packed into one bytes buffer with offsets (what the RecordStore holds); its peak RSS against
    the data's size, as in (a). The hand-written streaming parser (records.py) is kept only while (c) is
    well above (a).

The last line reads: peak_rss/file_size=X worker_growth_gib_per_1M=Y
"""
import argparse
import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time

MAIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3
WORDS = ("the a an of in on with and at near behind under over its their is are was has shows stands sits "
         "lies holds wears looking small large red blue green white black yellow brown wooden metal glass "
         "old young man woman child dog cat table chair window street car tree building sky cloud light "
         "shadow background foreground left right center corner edge surface pattern texture color shape "
         "bright dark soft sharp open closed round square tall short wide narrow several two three many "
         "person people group scene image picture photo view side top bottom front back").split()
DETAIL_PROMPT = "Please generate detailed descriptions of the given image."


def load_module(path: str):
    """The records module at path, importable as `engineering.records`."""
    sys.path.insert(0, MAIN)
    spec = importlib.util.spec_from_file_location("engineering.records", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engineering.records"] = module
    spec.loader.exec_module(module)
    return module


SHARD_ROWS, GROUP_ROWS = 50_000, 100


def recap_records(n: int, image):
    rng = random.Random(0)
    for i in range(n):
        caption = " ".join(rng.choices(WORDS, k=rng.randint(90, 130))).capitalize() + "."
        yield {"id": f"{i:07d}", "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{DETAIL_PROMPT}"}, {"from": "gpt", "value": caption}]}


def write_records(path: str, n: int, fmt: str, image: str):
    with open(path, "w") as f:
        f.write("[\n" if fmt == "json" else "")
        for i, rec in enumerate(recap_records(n, image)):
            sep = ("," if i < n - 1 else "") if fmt == "json" else ""
            f.write(json.dumps(rec) + sep + "\n")
        f.write("]\n" if fmt == "json" else "")


def write_shards(folder: str, n: int, png: bytes, image_kib: int):
    """The records as parquet shards in folder, the image as {bytes, path} (Hugging Face's Image feature)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder)
    rng = random.Random(1)
    records = recap_records(n, None)
    for s in range(0, n, SHARD_ROWS):
        rows = []
        for rec in itertools.islice(records, SHARD_ROWS):
            data = png + (rng.randbytes(image_kib * 1024) if image_kib else b"")  # after IEND: PIL reads the PNG
            rows.append({**rec, "image": {"bytes": data, "path": None}})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"part-{s // SHARD_ROWS:05d}.parquet"),
                       row_group_size=GROUP_ROWS)


def proc_kib(pid, key: str, name: str = "status") -> int:
    """A kB figure from /proc/PID/status or smaps_rollup."""
    with open(f"/proc/{pid}/{name}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def private_kib(pid) -> int:
    return proc_kib(pid, "Private_Clean", "smaps_rollup") + proc_kib(pid, "Private_Dirty", "smaps_rollup")


def load(RC, data: str, image_folder: str):
    """The records: load_records for JSON (any records.py), load_data for parquet shards (a directory)."""
    if os.path.isdir(data):
        return RC.load_data(data)
    return RC.load_records(data, image_folder=image_folder)


def measure_load(module_path: str, data: str, image_folder: str):
    """In a fresh process: RSS before and peak RSS after loading, in kB, as JSON on stdout."""
    RC = load_module(module_path)
    if os.path.isdir(data):
        import pyarrow.parquet  # noqa: F401  (its import, like torch's, is any process's, not the loader's)
    before = proc_kib("self", "VmRSS")
    t = time.perf_counter()
    records, bad = load(RC, data, image_folder)
    seconds = time.perf_counter() - t
    assert len(records) > 0 and not bad, bad[:3]
    print(json.dumps({"before": before, "peak": proc_kib("self", "VmHWM"), "records": len(records),
                      "seconds": seconds}))


def measure_workers(RC, data: str, image_folder: str, batch_size: int = 256):
    """Private memory of each of 2 DataLoader workers after its first batch and after the epoch, in kB."""
    import torch

    class RecordAccess(torch.utils.data.Dataset):
        def __init__(self, records):
            self.records = records

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):  # data.LlavaDataset.__getitem__'s reads of the record, nothing else
            rec = self.records[i]
            text = sum(len(turn["value"]) for turn in rec["conversations"])
            images = len(RC.record_images(rec)) + sum(len(b) for b in rec.get("image_bytes", []))
            return str(rec.get("id", i)), text, images

    records, _ = load(RC, data, image_folder)
    dataset = RecordAccess(records)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2,
                                         persistent_workers=True, collate_fn=list,
                                         multiprocessing_context="fork")
    it = iter(loader)
    seen = len(next(it))
    pids = [w.pid for w in it._workers]
    start = [private_kib(p) for p in pids]
    for batch in it:
        seen += len(batch)
    end = [private_kib(p) for p in pids]
    assert seen == len(records), (seen, len(records))
    return start, end


def measure_library_load(data: str):
    """(c) In a fresh process: json.load of the whole list, then packing; RSS before and peak, kB, as JSON."""
    before = proc_kib("self", "VmRSS")
    t = time.perf_counter()
    with open(data, "rb") as f:
        records = json.load(f)
    texts = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    del records
    ends = list(itertools.accumulate(len(x) for x in texts))
    buffer = b"".join(texts)
    del texts
    seconds = time.perf_counter() - t
    print(json.dumps({"before": before, "peak": proc_kib("self", "VmHWM"), "records": len(ends),
                      "bytes": len(buffer), "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--format", choices=("json", "jsonl", "parquet"), default="json")
    ap.add_argument("--image-kib", type=int, default=0, help="parquet: random KiB after each row's tiny PNG")
    ap.add_argument("--module", default=os.path.join(MAIN, "engineering", "records.py"),
                    help="the records.py to measure")
    ap.add_argument("--measure-load", nargs=2, metavar=("DATA", "IMAGE_FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--measure-library-load", metavar="DATA", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_load:
        return measure_load(args.module, *args.measure_load)
    if args.measure_library_load:
        return measure_library_load(args.measure_library_load)

    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image
        Image.new("RGB", (4, 4), (128, 64, 32)).save(os.path.join(tmp, "tiny.png"))
        data = os.path.join(tmp, f"recap.{args.format}")
        t = time.perf_counter()
        if args.format == "parquet":
            with open(os.path.join(tmp, "tiny.png"), "rb") as f:
                write_shards(data, args.records, f.read(), args.image_kib)
            size = sum(os.path.getsize(os.path.join(data, name)) for name in os.listdir(data))
        else:
            write_records(data, args.records, args.format, "tiny.png")
            size = os.path.getsize(data)
        print(f"{args.records} records, {args.format}: {size / GIB:.3f} GiB "
              f"({size / args.records:.0f} bytes a record), "
              f"written in {time.perf_counter() - t:.0f} s; module {args.module}")

        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--module", args.module,
                              "--measure-load", data, tmp], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        load = json.loads(out.stdout.strip().splitlines()[-1])
        loader_kib = load["peak"] - load["before"]
        loader = "load_data" if args.format == "parquet" else "load_records"
        print(f"(a) {loader}: {load['seconds']:.1f} s; RSS {load['before'] / 2**20:.3f} GiB before, "
              f"peak {load['peak'] / 2**20:.3f} GiB; the loader's own peak {loader_kib / 2**20:.3f} GiB "
              f"= {loader_kib * 1024 / size:.2f} x the data on disk")

        if args.format == "json":
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-library-load", data],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            lib = json.loads(out.stdout.strip().splitlines()[-1])
            lib_kib = lib["peak"] - lib["before"]
            print(f"(c) json.load + packing: {lib['seconds']:.1f} s; its own peak {lib_kib / 2**20:.3f} GiB "
                  f"= {lib_kib * 1024 / size:.2f} x the data on disk (the streaming loader: "
                  f"{loader_kib * 1024 / size:.2f} x)")

        t = time.perf_counter()
        start, end = measure_workers(load_module(args.module), data, tmp)
        growth = max(e - s for s, e in zip(start, end))
        for w, (s, e) in enumerate(zip(start, end)):
            print(f"(b) worker {w}: private {s / 2**20:.3f} GiB after its first batch, {e / 2**20:.3f} GiB "
                  f"after the epoch (+{(e - s) / 2**20:.3f} GiB)")
        print(f"    epoch of {args.records} records in {time.perf_counter() - t:.0f} s")
    print(f"peak_rss/file_size={loader_kib * 1024 / size:.2f} "
          f"worker_growth_gib_per_1M={growth / 2**20 / (args.records / 1e6):.3f}")


if __name__ == "__main__":
    main()
