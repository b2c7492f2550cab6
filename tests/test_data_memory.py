"""data.RecordStore and load_records' memory: records held as their JSON text, read exactly; bad records
still listed in file order; workers that read every record copy no memory; each process of a
distributed run reads the file itself. scripts/bench_data_memory.py measures the same at scale."""
import dataclasses
import json
import multiprocessing
import os
import pickle
import random

import pytest
import torch

import data as D
import train as T
from engineering import batches as BA
from engineering import records as RC
from shapes_world import shapes as SH

RECORDS = [  # non-ASCII text, escapes, U+2028 (a line break to str.splitlines, not to JSONL), several images
    {"id": "é-1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQu'est-ce que c'est ?"},
                                                     {"from": "gpt", "value": "Un chat 🐱, \"noir\"\\blanc\n."}]},
    {"id": 2, "conversations": [{"from": "system", "value": "中文\u2028ok"}, {"from": "human", "value": "Hi\ttab"},
                                {"from": "gpt", "value": "Hello."}], "extra": [1.5, None, True, {"k": []}]},
    {"id": "3", "image": ["1.png", "2.png"], "conversations": [{"from": "human", "value": "<image> vs <image>"},
                                                               {"from": "gpt", "value": "Same."}]},
]


def write(path, records, fmt):
    """records as a JSON list ("json", "json-indent") or JSONL ("jsonl"; "jsonl-crlf" with \\r\\n endings),
    raw UTF-8 (not \\u escapes), so that byte and character positions differ."""
    if fmt.startswith("json-") or fmt == "json":
        text = json.dumps(records, ensure_ascii=False, indent=1 if fmt == "json-indent" else None)
    else:
        end = "\r\n" if fmt == "jsonl-crlf" else "\n"
        text = end.join(json.dumps(r, ensure_ascii=False) for r in records) + end
    path.write_bytes(text.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "json-indent", "jsonl", "jsonl-crlf"])
def test_store_reads_records_exactly(tmp_path, fmt):
    records, bad = RC.load_records(write(tmp_path / "r", RECORDS, fmt))
    assert isinstance(records, RC.RecordStore) and bad == [] and len(records) == len(RECORDS)
    assert [records[i] for i in range(len(records))] == list(records) == RECORDS
    assert records == RECORDS and records != RECORDS[:2] and records[-1] == RECORDS[-1]
    assert isinstance(records[1:], RC.RecordStore) and records[1:] == RECORDS[1:] and records[:0] == []
    assert [D.record_images(r) for r in records] == [["a.png"], [], ["1.png", "2.png"]]
    with pytest.raises(IndexError):
        records[len(RECORDS)]
    records[0]["id"] = "changed"  # each read is a fresh record, as parsed from the file
    assert records[0] == RECORDS[0]


def test_json_list_elements_cut_by_any_window(tmp_path):
    """The list scanner decodes a window of the file at a time: an element cut by the window's edge,
    at any byte (inside a string, a number, a multi-byte character), is read whole all the same."""
    elements = RECORDS + [123456789, -0.25e-3, "long ‖ string " * 5, [], {}, None, [[1, [2]], {"a": "]"}]]
    buf = json.dumps(elements, ensure_ascii=False, indent=2).encode()
    for window in range(1, 60):
        items = list(RC._json_list_items(buf, "f.json", window=window))
        assert [v for *_, v in items] == elements, window
        assert [where for where, *_ in items] == [f"[{i}]" for i in range(len(elements))]
        assert [json.loads(buf[start:end]) for _, start, end, _ in items] == elements  # the spans the store keeps
    comma = buf.index(b"\n  },\n") + 4  # after the first element
    for broken, at in ((buf[:-1], len(buf[:-1].rstrip())), (buf[:-2] + b",]", len(buf) - 1),  # (file, error's byte)
                       (buf + b"\n]", len(buf) + 1), (buf[:comma] + buf[comma + 1:], comma)):
        line = broken.count(b"\n", 0, at) + 1
        for window in (3, 1 << 20):
            with pytest.raises(ValueError, match=rf"f\.json: invalid JSON: .*: line {line} column \d+ \(byte {at}\)"):
                list(RC._json_list_items(broken, "f.json", window=window))
    assert list(RC._json_list_items(b" [ ] ", "f")) == []


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_bad_records_listed_in_file_order_across_batches(tmp_path, fmt):
    """load_records checks records a batch at a time (1024); bad ones are still listed in file order
    with their positions, and the store keeps exactly the good ones."""
    (tmp_path / "there.png").write_bytes(b"")
    good = {"conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A cat."}]}
    records = [{"id": f"{i:05d}", "image": "there.png", **good} for i in range(2500)]
    records[3] = {"id": "00003", "conversations": good["conversations"][:1]}  # no answer
    records[1023]["image"] = records[2499]["image"] = "missing.png"  # last of a batch, last of the file
    records[1024] = {"conversations": []}  # first of a batch, no id
    path = write(tmp_path / "r", records, fmt)
    if fmt == "jsonl":  # and a line that is not UTF-8
        lines = open(path, "rb").read().split(b"\n")
        lines[2000] = b'{"id": "\xff"}'
        with open(path, "wb") as f:
            f.write(b"\n".join(lines))
    store, bad = RC.load_records(path, image_folder=str(tmp_path))
    pos = (lambda i: f"line {i + 1}") if fmt == "jsonl" else (lambda i: f"[{i}]")
    want = [(f"00003 ({pos(3)})", "no 'gpt' turn"),
            (f"01023 ({pos(1023)})", f"image not found: {tmp_path / 'missing.png'}"),
            (pos(1024), "missing or empty 'conversations'")]
    want += [(pos(2000), "invalid UTF-8")] if fmt == "jsonl" else []
    want += [(f"02499 ({pos(2499)})", "image not found")]
    assert [where for where, _ in bad] == [where for where, _ in want]
    assert all(reason in why for (_, why), (_, reason) in zip(bad, want)), bad
    bad_index = {3, 1023, 1024, 2499} | ({2000} if fmt == "jsonl" else set())
    assert store == [r for i, r in enumerate(records) if i not in bad_index]


def test_store_works_in_a_dataloader_with_2_workers(shapes_dir, shapes_tokenizer, tiny_image_processor):
    records, _ = RC.load_records(os.path.join(shapes_dir, "stage2.json"), strict=True, image_folder=shapes_dir)
    dataset = D.LlavaDataset(records, shapes_dir, shapes_tokenizer, tiny_image_processor, D.CHATML_TEMPLATE, 4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, shuffle=True,
                                         collate_fn=D.Collator(shapes_tokenizer.pad_token_id))
    seen = [rid for batch in loader for rid in batch["ids"]]
    assert sorted(seen) == sorted(r["id"] for r in records) and len(records) == 64
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                                  collate_fn=D.Collator(shapes_tokenizer.pad_token_id))))
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert torch.equal(first, dataset[0]["input_ids"])  # a worker's sample is the parent's
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def recap_like(n, seed=0):
    """LLaVA-ReCap-like stage-1.5 records: the detail prompt and a ~110-word caption."""
    rng = random.Random(seed)
    words = "a the small large red blue cat dog on in near table street light window shows with".split()
    return [{"id": f"{i:07d}", "image": "tiny.png", "conversations": [
        {"from": "human", "value": f"<image>\n{SH.DETAIL_PROMPT}"},
        {"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(90, 130)))}]} for i in range(n)]


def test_store_pickles_to_about_the_file_size(tmp_path):
    """What a spawned worker or another process receives is the file's text, not its parsed objects
    (a list of these dicts pickles smaller than Python holds them, but the store is about the text)."""
    path = write(tmp_path / "r.jsonl", recap_like(2000), "jsonl")
    size = os.path.getsize(path)
    store, _ = RC.load_records(path)
    pickled = pickle.dumps(store)
    assert size <= len(pickled) < 1.03 * size  # the bytes, plus 16 bytes a record of ~800
    assert pickle.loads(pickled) == store
    assert pickle.loads(pickle.dumps(store[:10])) == store[:10]


def _private_kib():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))


def _read_all(records, conn):
    """In a forked process: private memory growth (KiB) while reading every record's fields."""
    before = _private_kib()
    for i in range(len(records)):
        rec = records[i]
        D.record_id(rec, i), D.to_messages(rec["conversations"]), D.record_images(rec)
    conn.send(_private_kib() - before)


def growth_in_a_forked_reader(records) -> int:
    ctx = multiprocessing.get_context("fork")  # as DataLoader workers start on Linux
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_read_all, args=(records, child))
    p.start()
    growth = parent.recv()
    p.join()
    return growth


def test_a_forked_reader_of_every_record_copies_no_memory(tmp_path):
    """The goal: a worker's private memory grows < 0.1 GiB per million records it reads. A list of the
    same records, read the same way, copies them into the worker (the measure can tell)."""
    n = 20_000
    store, _ = RC.load_records(write(tmp_path / "r.jsonl", recap_like(n), "jsonl"))
    limit_kib = 0.1 * 2**20 * n / 1e6  # 2 MiB for 20k records
    as_list = list(store)
    assert growth_in_a_forked_reader(as_list) > 2 * limit_kib
    del as_list
    assert growth_in_a_forked_reader(store) < limit_kib


class FakeDist:
    """torch.distributed as a 2-process run shows it to one process; the other found other_counts."""

    def __init__(self, other_counts=None):
        self.other_counts, self.gathered = other_counts, []

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_gather_object(self, out, obj):
        self.gathered.append(obj)
        out[:] = [obj, self.other_counts or obj]

    def broadcast_object_list(self, *args, **kwargs):
        raise AssertionError("the records are not sent between processes")


def test_every_process_reads_the_data_itself(tmp_path, monkeypatch, capsys):
    lines = [json.dumps(r) for r in RECORDS] + ['{"id": "x", "conversations": []}']
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    calls = []
    real_load = RC.load_records
    monkeypatch.setattr(RC, "load_records", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    fake = FakeDist()
    monkeypatch.setattr(BA, "dist", fake)
    for name in ("a.png", "1.png", "2.png"):
        (tmp_path / name).write_bytes(b"")
    out = tmp_path / "out"
    cfg = T.TrainConfig(data=str(data), out_dir=str(out), image_folder=str(tmp_path))
    records, bad = BA.validate_data(cfg, master=False)  # rank 1: reads the file; rank 0 reports
    assert calls == [(str(data),)] and records == RECORDS
    assert bad == [("x (line 4)", "missing or empty 'conversations'")]
    assert fake.gathered == [(3, 1)] and not out.exists() and capsys.readouterr().out == ""
    assert BA.validate_data(cfg, master=True) == (RECORDS, bad)
    assert "x (line 4): missing or empty" in capsys.readouterr().out
    assert json.loads((out / "bad_records.json").read_text()) == [{"record": "x (line 4)",
                                                                  "reason": "missing or empty 'conversations'"}]
    monkeypatch.setattr(BA, "dist", FakeDist(other_counts=(4, 0)))  # the other process found other records
    with pytest.raises(RuntimeError, match=r"different \(good, bad\) record counts \[\(3, 1\), \(4, 0\)\]"):
        BA.validate_data(cfg, master=False)
    with pytest.raises(ValueError, match=r"1 bad records \(strict\): x \(line 4\): missing"):  # strict: every rank
        BA.validate_data(dataclasses.replace(cfg, strict=True), master=False)
