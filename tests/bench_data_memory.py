"""
Benchmark: host memory of the record loader (data.load_records) and of DataLoader workers.

    python tests/bench_data_memory.py --records 200000                  # JSON list, this data.py
    python tests/bench_data_memory.py --records 200000 --format jsonl
    python tests/bench_data_memory.py --module /tmp/data_orig.py        # another version of data.py

It writes an LLaVA-ReCap-like stage-1.5 file (id, image, the detail prompt, a ~110-word caption)
into a temporary folder. Every record points at the same tiny image, so the loader's image check
runs (one stat per record) without a million image files.

(a) peak_rss/file_size: a fresh process imports the module and reads its RSS, runs load_records with
    the image folder, then reads its peak RSS (VmHWM). The figure is (peak - RSS before loading) /
    file size: the loader's own memory, without the ~0.3 GiB that importing torch costs any process.
(b) worker_growth_gib_per_1M: the records go into data.LlavaDataset and a DataLoader with 2 forked,
    persistent workers and a shuffled order. Its __getitem__ reads the record through the store and the
    fields LlavaDataset.__getitem__ reads (record_id, to_messages, record_images), but skips tokenising
    and image decoding: their cost does not depend on how records are held. Each worker's private
    memory (Private_Clean + Private_Dirty in /proc/PID/smaps_rollup) is read after the first batch and
    at the end of the epoch. The figure is the largest growth, in GiB per million records in the file.

The last line reads: peak_rss/file_size=X worker_growth_gib_per_1M=Y
"""
import argparse
import importlib.util
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
    """The data module at path, importable as `data` (it imports victor from the repository)."""
    sys.path.insert(0, MAIN)
    spec = importlib.util.spec_from_file_location("data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data"] = module
    spec.loader.exec_module(module)
    return module


def write_records(path: str, n: int, fmt: str, image: str):
    rng = random.Random(0)
    with open(path, "w") as f:
        f.write("[\n" if fmt == "json" else "")
        for i in range(n):
            caption = " ".join(rng.choices(WORDS, k=rng.randint(90, 130))).capitalize() + "."
            rec = {"id": f"{i:07d}", "image": image, "conversations": [
                {"from": "human", "value": f"<image>\n{DETAIL_PROMPT}"}, {"from": "gpt", "value": caption}]}
            sep = ("," if i < n - 1 else "") if fmt == "json" else ""
            f.write(json.dumps(rec) + sep + "\n")
        f.write("]\n" if fmt == "json" else "")


def proc_kib(pid, key: str, name: str = "status") -> int:
    """A kB figure from /proc/PID/status or smaps_rollup."""
    with open(f"/proc/{pid}/{name}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def private_kib(pid) -> int:
    return proc_kib(pid, "Private_Clean", "smaps_rollup") + proc_kib(pid, "Private_Dirty", "smaps_rollup")


def measure_load(module_path: str, data: str, image_folder: str):
    """In a fresh process: RSS before and peak RSS after load_records, in kB, as JSON on stdout."""
    D = load_module(module_path)
    before = proc_kib("self", "VmRSS")
    t = time.perf_counter()
    records, bad = D.load_records(data, image_folder=image_folder)
    seconds = time.perf_counter() - t
    assert len(records) > 0 and not bad, bad[:3]
    print(json.dumps({"before": before, "peak": proc_kib("self", "VmHWM"), "records": len(records),
                      "seconds": seconds}))


def measure_workers(D, data: str, image_folder: str, batch_size: int = 256):
    """Private memory of each of 2 DataLoader workers after its first batch and after the epoch, in kB."""
    import torch

    class RecordAccess(D.LlavaDataset):
        def __getitem__(self, i):  # LlavaDataset.__getitem__'s reads of the record, nothing else
            rec = self.records[i]
            messages = D.to_messages(rec["conversations"])
            return D.record_id(rec, i), sum(len(m["content"]) for m in messages), len(D.record_images(rec))

    records, _ = D.load_records(data, image_folder=image_folder)
    dataset = RecordAccess(records, image_folder, None, None, "", 1)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--format", choices=("json", "jsonl"), default="json")
    ap.add_argument("--module", default=os.path.join(MAIN, "data.py"), help="the data.py to measure")
    ap.add_argument("--measure-load", nargs=2, metavar=("DATA", "IMAGE_FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_load:
        return measure_load(args.module, *args.measure_load)

    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image
        Image.new("RGB", (4, 4), (128, 64, 32)).save(os.path.join(tmp, "tiny.png"))
        data = os.path.join(tmp, f"recap.{args.format}")
        t = time.perf_counter()
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
        print(f"(a) load_records: {load['seconds']:.1f} s; RSS {load['before'] / 2**20:.3f} GiB before, "
              f"peak {load['peak'] / 2**20:.3f} GiB; the loader's own peak {loader_kib / 2**20:.3f} GiB "
              f"= {loader_kib * 1024 / size:.2f} x the file")

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
