"""
Data files: LLaVA-format records (a JSON list or JSONL) and parquet shards, held compactly, and the
validation pass that checks every record before training (load_data). A reader of the method may skip
this file; data.py turns a record into a training sample.

LLaVA format, as published (a JSON list or JSONL, plus an image folder):
    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}
"image" may be missing (text-only record) or a list (several images, one <image> each).

Or parquet shards (a .parquet file, a directory of them, or a glob), as LLaVA-ReCap and LLaVA-OneVision
are published: the same fields a row, the image as its bytes (Hugging Face datasets' Image feature,
{bytes, path}, or plain binary; a list for several), read with pyarrow a row group at a time
(load_parquet_records, ParquetRecordStore).
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import os
import re
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from data import IMAGE_PLACEHOLDER, ROLES, SampleError, image_errors, record_images


def check_record(rec, n_images: int | None = None) -> str | None:
    """Why a LLaVA record is structurally unusable, or None when it is fine. n_images: how many images
    the record has when they are not its "image" paths (a parquet row's image bytes)."""
    if not isinstance(rec, dict):
        return f"record is a {type(rec).__name__}, not an object"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "missing or empty 'conversations'"
    roles = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"turn {t} lacks 'from'/'value'"
        if not isinstance(turn["from"], str) or turn["from"] not in ROLES:  # a list/dict is unhashable
            return f"turn {t} has unknown role {turn['from']!r} (expected human/gpt/system)"
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            return f"turn {t} is empty"
        roles.append(ROLES[turn["from"]])
    if "system" in roles[1:]:
        return "a 'system' turn that is not the first turn"
    talk = roles[1:] if roles[0] == "system" else roles
    if not talk or talk[0] != "user":
        return "the first turn (after an optional system turn) is not from 'human'"
    if "assistant" not in talk:
        return "no 'gpt' turn to learn from"
    if n_images is None:
        images = rec.get("image")
        if images is not None and not (isinstance(images, str) or
                                       (isinstance(images, list) and all(isinstance(p, str) for p in images))):
            return "'image' is neither a path nor a list of paths"
        n_images = len(record_images(rec))
    n_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conv)
    if n_placeholders != n_images:
        return f"{n_placeholders} <image> placeholders for {n_images} images"
    return None


class Records(Sequence):
    """What both record stores (JSON's, parquet's) share: equal to a list of the same records."""

    def __eq__(self, other):
        if not isinstance(other, (list, Records)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))


class RecordStore(Records):
    """Records held as their JSON text: the file's bytes and the byte span of each record, parsed
    when read. store[i] is a new dict each time; a slice is a store over the same bytes.

    A forked DataLoader worker shares its parent's memory until it writes to a page, and reading a
    Python object writes its reference count: a worker that reads a list of a million dicts ends up
    with its own copy of them all. Here a record is read from one bytes object and two numpy arrays,
    whose data pages are only read, so all workers share them. It also pickles to about the file's size.
    """

    def __init__(self, buffer: bytes, starts, ends):
        self.buffer = buffer
        self.starts, self.ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordStore(self.buffer, self.starts[i], self.ends[i])
        return json.loads(self.buffer[self.starts[i]:self.ends[i]])

    def __repr__(self):
        return f"RecordStore({len(self)} records in {len(self.buffer)} bytes)"


def _parse(text: bytes):
    """One record from its JSON text, or the SampleError that names why it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return SampleError(f"invalid JSON ({e.msg})")
    except UnicodeDecodeError as e:
        return SampleError(f"invalid UTF-8 ({e.reason})")


def _jsonl_items(buf: bytes):
    """(position, byte start, byte end, record or SampleError) for each non-blank line of JSONL."""
    start, line_no = 0, 1
    while start < len(buf):
        end = buf.find(b"\n", start)
        end = len(buf) if end < 0 else end
        line = buf[start:end]
        if line.strip():
            yield f"line {line_no}", start, end, _parse(line)
        start, line_no = end + 1, line_no + 1


def read_jsonl(path: str) -> list:
    """Every non-blank line of a JSONL file, parsed; a line that is not JSON fails naming its number."""
    with open(path, "rb") as f:
        buf = f.read()
    rows = []
    for where, _, _, value in _jsonl_items(buf):
        if isinstance(value, SampleError):
            raise ValueError(f"{path}: {where} is not JSON: {value}")
        rows.append(value)
    return rows


_JSON_SPACE = re.compile(rb"[ \t\n\r]*")
_JSON_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]])")  # after an element of a list


def _json_list_items(buf: bytes, path: str, window: int = 1 << 20):
    """(position, byte start, byte end, record) for each element of the JSON list in buf, decoded
    one at a time, so that the file's records are never all held as Python objects.

    json's raw_decode reads a str. The bytes are decoded a window at a time as latin-1, one character
    per byte, so positions in the window are byte positions: JSON's syntax is ASCII, and UTF-8 never
    has an ASCII byte inside a multi-byte character. In an all-ASCII window latin-1 and UTF-8 agree
    and raw_decode's value is the record; elsewhere the element's bytes are decoded again as UTF-8.
    """
    def invalid(msg: str, at: int) -> ValueError:
        line = buf.count(b"\n", 0, at) + 1
        column = at - buf.rfind(b"\n", 0, at)
        return ValueError(f"{path}: invalid JSON: {msg}: line {line} column {column} (byte {at})")

    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(buf, _JSON_SPACE.match(buf).end() + 1).end()  # the first element, after '['
    if buf[pos:pos + 1] == b"]":  # an empty list
        end = pos + 1
    else:
        base, text = pos, ""  # the window: text is buf[base:base + len(text)] decoded as latin-1
        for index in itertools.count():
            pos = _JSON_SPACE.match(buf, pos).end()
            while True:  # the element at pos and the ',' or ']' after it, from within the window
                try:
                    value, stop = decoder.raw_decode(text, pos - base)
                    separator = _JSON_SEPARATOR.match(text, stop)
                    error = None if separator else ("Expecting ',' delimiter", base + stop)
                except json.JSONDecodeError as e:
                    error = (e.msg, base + e.pos)
                if error is None:
                    break
                if base + len(text) >= len(buf):
                    raise invalid(*error)
                # the window may have cut the element: a new one from the element, larger if it was already
                size = max(window, 2 * len(text)) if base == pos else window
                base, text = pos, str(memoryview(buf)[pos:pos + size], "latin-1")  # no copy of the bytes
            stop += base
            yield f"[{index}]", pos, stop, (value if text.isascii() else _parse(buf[pos:stop]))
            if separator.group(1) == "]":
                end = base + separator.end()
                break
            pos = base + separator.end()
    end = _JSON_SPACE.match(buf, end).end()
    if end < len(buf):
        raise invalid("Extra data", end)


def load_records(path: str, strict: bool = False, image_folder: str | None = None
                 ) -> tuple[RecordStore, list[tuple[str, str]]]:
    """Read a LLaVA JSON list or JSONL file and check every record (the validation pass).

    Returns (good records as a RecordStore, [(where, reason), ...] for every bad one), where names the
    record by its id and position: "000123 (line 7)" in JSONL, "000123 ([6])" in a list, "line 7"
    without id. With image_folder, a record whose image file does not exist is bad too.
    strict=True raises, listing every bad record.
    Memory: the file's bytes, 16 bytes a record, and one batch of parsed records at a time.
    """
    with open(path, "rb") as f:
        buf = f.read()
    first = _JSON_SPACE.match(buf).end()
    items = _json_list_items(buf, path) if buf[first:first + 1] == b"[" else _jsonl_items(buf)
    starts, ends, bad = array("q"), array("q"), []
    with ThreadPoolExecutor(16) as pool:
        while batch := list(itertools.islice(items, 1024)):
            checks = [str(rec) if isinstance(rec, SampleError) else check_record(rec) for *_, rec in batch]
            if image_folder is not None:  # one stat per image; threads, since network file systems are slow
                todo = [(k, p) for k, (*_, rec) in enumerate(batch) if checks[k] is None for p in record_images(rec)]
                found = pool.map(lambda kp: os.path.isfile(os.path.join(image_folder, kp[1])), todo)
                for (k, p), ok in zip(todo, found):
                    if not ok and checks[k] is None:
                        checks[k] = f"image not found: {os.path.join(image_folder, p)}"
            for (where, start, end, rec), why in zip(batch, checks):
                if why is None:
                    starts.append(start)
                    ends.append(end)
                else:
                    has_id = isinstance(rec, dict) and "id" in rec
                    bad.append((f"{rec['id']} ({where})" if has_id else where, why))
    if strict and bad:
        raise strict_error(path, bad)
    return RecordStore(buf, starts, ends), bad


def strict_error(path: str, bad: list[tuple[str, str]]) -> ValueError:
    """--strict's error: how many bad records, then the first 50, one a line."""
    return ValueError(f"{path}: {len(bad)} bad records (strict):\n" +
                      "\n".join(f"  {where}: {why}" for where, why in bad[:50]) + ("\n  ..." if len(bad) > 50 else ""))


def load_data(path: str, strict: bool = False, image_folder: str | None = None):
    """--data: parquet shards (is_parquet: images in the rows) or a JSON / JSONL file with image_folder.
    Returns (a store of the good records, [(where, reason), ...] for the bad ones)."""
    if not is_parquet(path):
        return load_records(path, strict=strict, image_folder=image_folder)
    if image_folder:
        raise ValueError(f"{path}: parquet shards carry their images in their rows; an image folder "
                         f"({image_folder}) would go unused: drop --image-folder")
    return load_parquet_records(path, strict=strict)


# -----------------------------------------------------------------------------
# Parquet shards, as LLaVA-ReCap and LLaVA-OneVision are published: each row's images are its bytes

PARQUET_IMAGE_COLUMNS = ("image", "images")  # a shard's images: the first of these columns it has
OPEN_SHARDS = 16  # shards a process keeps open while reading images (file handles, footers)


def is_parquet(path: str) -> bool:
    """Whether --data names parquet shards: a .parquet file, a directory of them, or a glob (a name with
    glob characters that is no file, and not a .json / .jsonl name)."""
    return (path.endswith(".parquet") or os.path.isdir(path) or
            (glob.has_magic(path) and not os.path.exists(path) and not path.endswith((".json", ".jsonl"))))


def parquet_files(path: str) -> list[str]:
    """The shards path names, sorted: the file, the .parquet files under a directory (at any depth), or the
    files a glob matches."""
    if os.path.isdir(path):
        files = glob.glob(os.path.join(glob.escape(path), "**", "*.parquet"), recursive=True)
    elif glob.has_magic(path) and not os.path.exists(path):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"{path}: no parquet shards there (--data takes a .parquet file, a directory "
                                f"of them, or a glob)")
    return sorted(files)


def open_shard(path: str):
    """A pyarrow ParquetFile (read, not memory-mapped: a mapped shard's pages would count as the reading
    process's own memory); ValueError naming the file when it is not parquet."""
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def _is_image_type(t) -> bool:
    """Binary, or a struct with binary 'bytes' (Hugging Face datasets' Image feature: {bytes, path})."""
    import pyarrow as pa
    if pa.types.is_struct(t):
        index = t.get_field_index("bytes")
        return index >= 0 and _is_image_type(t.field(index).type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def shard_columns(shard, path: str) -> tuple[str | None, str | None]:
    """(the id column or None, the image column or None) of a shard; ValueError naming the file when it has
    no 'conversations' column, or an image column that does not hold image bytes."""
    import pyarrow as pa
    schema = shard.schema_arrow
    if "conversations" not in schema.names:
        raise ValueError(f"{path}: no 'conversations' column (its columns: {', '.join(schema.names)})")
    image = next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
    if image is not None:
        t = schema.field(image).type
        if not _is_image_type(t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else t):
            raise ValueError(f"{path}: column {image!r} is {t}, not image bytes (binary, a struct with "
                             f"'bytes', or a list of them)")
    return ("id" if "id" in schema.names else None), image


def row_images(cell) -> list[bytes]:
    """A row's image cell as a list of image bytes: None (no image), bytes, {"bytes": ..., "path": ...},
    or a list of those. SampleError for an image without bytes."""
    if cell is None:
        return []
    images = []
    for k, item in enumerate(cell if isinstance(cell, list) else [cell]):
        path = item.get("path") if isinstance(item, dict) else None
        data = item.get("bytes") if isinstance(item, dict) else item
        if data is None:
            raise SampleError(f"image {k} has no bytes" + (f" (only a path: {path})" if path else ""))
        images.append(data)
    return images


def image_header_problem(data: bytes, name: str) -> str | None:
    """Why PIL cannot open these image bytes, from their header (nothing is decoded), or None."""
    source = io.BytesIO(data)
    try:
        with image_errors(name, source), Image.open(source):
            return None
    except SampleError as e:
        return str(e)


def row_conversations(cell):
    """A row's conversations: a list of {from, value} (other keys dropped), or its JSON text parsed;
    SampleError when the text is not JSON."""
    if isinstance(cell, str):  # some shards hold the conversations as JSON text
        cell = _parse(cell.encode())
        if isinstance(cell, SampleError):
            raise SampleError(f"conversations: {cell}")
    if isinstance(cell, list) and all(isinstance(t, dict) and "from" in t and "value" in t for t in cell):
        return [{"from": t["from"], "value": t["value"]} for t in cell]
    return cell  # check_record says what is wrong with it


def parquet_row_problem(conversations_cell, image_cell) -> str | None:
    """Why a parquet row is bad, or None: the JSON records' checks, and each image's header."""
    try:
        conversations, images = row_conversations(conversations_cell), row_images(image_cell)
    except SampleError as e:
        return str(e)
    why = check_record({"conversations": conversations}, n_images=len(images))
    for k, data in enumerate(images):
        why = why or image_header_problem(data, f"image {k}")
    return why


def load_parquet_records(path: str, strict: bool = False) -> tuple[ParquetRecordStore, list[tuple[str, str]]]:
    """Read and check every row of the parquet shards path names (parquet_files), a row group at a time:
    the validation pass. Each row needs 'conversations' (a list of {from, value}, or its JSON text); 'id'
    and the images ('image' or 'images': bytes, {bytes, path}, or a list of them) are optional.

    Returns (the good rows as a ParquetRecordStore, [(where, reason), ...] for every bad one), where names
    the row by its id, shard and row in the shard (from 0): "000123 (shards/a.parquet row 6)". A row is bad
    for what a JSON record is (roles, <image> count against the images), and for an image whose header PIL
    cannot read. strict=True raises, listing every bad row.
    Memory: 12 bytes a good row, and one row group.
    """
    import pyarrow as pa
    files = parquet_files(path)
    shards, groups, rows = array("i"), array("i"), array("i")
    columns, group_starts, bad = [], [], []
    for s, file in enumerate(files):
        shard = open_shard(file)
        id_column, image_column = shard_columns(shard, file)
        sizes = [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)]
        columns.append((id_column, image_column))
        group_starts.append(list(itertools.accumulate(sizes, initial=0))[:-1])
        for g in range(shard.num_row_groups):
            table = shard.read_row_group(g, columns=[c for c in (id_column, "conversations", image_column) if c])
            ids = table.column(id_column).to_pylist() if id_column else [None] * table.num_rows
            conversations = table.column("conversations").to_pylist()
            image_cells = table.column(image_column) if image_column else None
            for r, (rid, conv) in enumerate(zip(ids, conversations)):
                why = parquet_row_problem(conv, image_cells[r].as_py() if image_column else None)
                if why is None:
                    shards.append(s), groups.append(g), rows.append(r)
                else:
                    where = f"{file} row {group_starts[s][g] + r}"
                    bad.append((f"{rid} ({where})" if rid is not None else where, why))
            del table, conversations, image_cells
    pa.default_memory_pool().release_unused()  # what pyarrow keeps of the row groups read, not left to workers
    if strict and bad:
        raise strict_error(path, bad)
    return ParquetRecordStore(files, columns, group_starts, shards, groups, rows), bad


class ParquetRecordStore(Records):
    """The good rows of parquet shards, held as where each is: (shard, row group, row in the group) in
    numpy arrays, 12 bytes a row. A row is read from its shard when store[i] is: a new dict of its id (else
    where it is), conversations, "image_bytes" (a list of bytes) and "source" ("shards/a.parquet row 6",
    for error messages).

    The shards' own columns are the compact form of the text (holding it decoded would be ~3x their size
    on disk where the text dominates). A process reads a whole row group (id, conversations, images) and
    keeps it until it reads another: a forked DataLoader worker opens the shards itself and holds only the
    row group it read last, never another process's. The store pickles to its arrays, without open files.
    """

    def __init__(self, files, columns, group_starts, shards, groups, rows):
        self.files, self.columns, self.group_starts = files, columns, group_starts  # columns: (id, image) a shard
        self.shards, self.groups = np.asarray(shards, dtype=np.int32), np.asarray(groups, dtype=np.int32)
        self.rows = np.asarray(rows, dtype=np.int32)
        self._reader = {}  # this process's: pid, its open shards, the row group read last

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ParquetRecordStore(self.files, self.columns, self.group_starts, self.shards[i], self.groups[i],
                                      self.rows[i])
        shard, group, row = int(self.shards[i]), int(self.groups[i]), int(self.rows[i])
        (id_column, image_column), table = self.columns[shard], self._row_group(shard, group)
        source = f"{self.files[shard]} row {self.group_starts[shard][group] + row}"
        rid = table.column(id_column)[row].as_py() if id_column else None
        return {"id": source if rid is None else rid,
                "conversations": row_conversations(table.column("conversations")[row].as_py()),
                "image_bytes": row_images(table.column(image_column)[row].as_py()) if image_column else [],
                "source": source}

    def _row_group(self, shard: int, group: int):
        reader = self._reader
        if reader.get("pid") != os.getpid():  # a new process (a forked worker): its own files and row group
            reader.clear()
            reader.update(pid=os.getpid(), open=OrderedDict(), key=None, table=None)
        if reader["key"] != (shard, group):
            reader["table"] = None  # the previous row group goes before the next is read
            files = reader["open"]
            if shard not in files:
                files[shard] = open_shard(self.files[shard])
                if len(files) > OPEN_SHARDS:
                    files.popitem(last=False)
            files.move_to_end(shard)
            wanted = [c for c in (self.columns[shard][0], "conversations", self.columns[shard][1]) if c]
            # one thread: pyarrow's threads would each keep memory of their own in every worker
            reader["table"] = files[shard].read_row_group(group, columns=wanted, use_threads=False)
            reader["key"] = (shard, group)
        return reader["table"]

    def __getstate__(self):
        return {**self.__dict__, "_reader": {}}

    def __repr__(self):
        return f"ParquetRecordStore({len(self)} records from {len(self.files)} shards)"
