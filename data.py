"""
Data for victor: LLaVA-format datasets, image preprocessing, templates, label masking, collation,
and the synthetic "shapes" dataset (with its own offline tokenizer) used by the demo and tests.

LLaVA format, as published (a JSON list or JSONL, plus an image folder):
    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}
"image" may be missing (text-only record) or a list (several images, one <image> each).

Or parquet shards (a .parquet file, a directory of them, or a glob), as LLaVA-ReCap and LLaVA-OneVision
are published: the same fields a row, the image as its bytes (Hugging Face datasets' Image feature,
{bytes, path}, or plain binary; a list for several), read with pyarrow a row group at a time
(load_data, load_parquet_records, ParquetRecordStore).

Make the shapes data by hand (train.py does it on first use):
    python data.py --out data/shapes
"""
from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import os
import random
import re
import warnings
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from victor import IGNORE_INDEX, IMAGE_TOKEN_ID

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# -----------------------------------------------------------------------------
# Templates. Every template is a Jinja chat template, so one label-masking routine serves all.

# stage 1 (LLaVA "plain"): the image tokens, then the caption and eos; the human text is dropped
PLAIN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' and '<image>' in m['content'] -%}{{- '<image>' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA-1.5's conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
VICUNA_V1_TEMPLATE = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + ' ' -}}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{{- \"A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. \" -}}{%- set msgs = messages -%}"
    "{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# ChatML, for the shapes tokenizer (the same layout as Qwen2.5's template, without a default system turn)
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def resolve_template(name: str, tokenizer, stage: str = "2") -> str:
    """Template name -> Jinja text. auto: plain for stage 1, else the tokenizer's own, else vicuna_v1."""
    if name == "auto":
        name = "plain" if stage == "1" else ("chat" if tokenizer.chat_template else "vicuna_v1")
    if name == "plain":
        return PLAIN_TEMPLATE
    if name == "vicuna_v1":
        return VICUNA_V1_TEMPLATE
    if name == "chatml":
        return CHATML_TEMPLATE
    if name == "chat":
        if not tokenizer.chat_template:
            raise ValueError("template 'chat' asked for, but the tokenizer has no chat_template")
        return tokenizer.chat_template
    raise ValueError(f"unknown template {name!r} (auto | plain | vicuna_v1 | chatml | chat)")


# -----------------------------------------------------------------------------
# Records


class SampleError(Exception):
    """A sample that cannot be used as it is (it is skipped and counted, or fails under --strict)."""


def record_id(rec, index: int) -> str:
    return str(rec.get("id", f"#{index}")) if isinstance(rec, dict) else f"#{index}"


def record_images(rec: dict) -> list[str]:
    img = rec.get("image")
    if img is None:
        return []
    return list(img) if isinstance(img, list) else [img]


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


def _image_error(e: Exception, source) -> str:
    """PIL's message without the repr of an in-memory file (which says nothing)."""
    return str(e).replace(repr(source), "").strip() if not isinstance(source, str) else str(e)


def image_header_problem(data: bytes, name: str) -> str | None:
    """Why PIL cannot open these image bytes, from their header (nothing is decoded), or None; the reason
    as load_image words it."""
    source = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source):
                return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"image too large (decompression bomb): {name}: {e}"
    except (OSError, ValueError, SyntaxError) as e:
        return f"image unreadable: {name}: {_image_error(e, source)}"


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


def ensure_pad_token(tokenizer):
    """Llama/Vicuna tokenizers have no pad token: pad with unk as LLaVA does (else eos)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def to_messages(conversations: list[dict]) -> list[dict]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]


# -----------------------------------------------------------------------------
# Tokenisation with label masking


def _render(tokenizer, template: str, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tokenize_conversation(messages: list[dict], tokenizer, template: str, num_image_tokens: int,
                          max_length: int | None = None, image_token_id: int = IMAGE_TOKEN_ID):
    """Render with the template, tokenise, and label only the assistant answers.

    Each <image> becomes exactly num_image_tokens copies of image_token_id. Labels cover each
    assistant answer and its end-of-turn token; everything else is IGNORE_INDEX. If the
    conversation ends with a user turn, a generation prompt is added (inference).
    Returns (input_ids, labels) as lists of ints. Raises SampleError for unusable samples.
    """
    prompt_only = messages[-1]["role"] != "assistant"
    text = _render(tokenizer, template, messages, add_generation_prompt=prompt_only)
    # the character span of each answer: the text the turn adds after the generation prompt
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(before := _render(tokenizer, template, messages[:k], add_generation_prompt=True))
        end = len(upto := _render(tokenizer, template, messages[:k + 1], add_generation_prompt=False))
        if not (text.startswith(before) and text.startswith(upto) and end >= start):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "answer spans cannot be found (use template vicuna_v1 or chatml)")
        while end > start and text[end - 1].isspace():  # the newline after <|im_end|> is not the answer
            end -= 1
        spans.append((start, end))
    input_ids, labels, offset = [], [], 0
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:  # the <image> placeholder: N image-token ids, never labelled
            input_ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            offset += len(IMAGE_PLACEHOLDER)
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            in_answer = any(offset + a < e and offset + b > s for s, e in spans)
            input_ids.append(tok)
            labels.append(tok if in_answer else IGNORE_INDEX)
        offset += len(piece)
    return truncate(input_ids, labels, max_length, image_token_id, need_labels=not prompt_only)


def truncate(input_ids: list[int], labels: list[int], max_length: int | None, image_token_id: int = IMAGE_TOKEN_ID,
             need_labels: bool = True) -> tuple[list[int], list[int]]:
    """Cut a sample to max_length tokens, never through its image tokens (SampleError then), and
    never down to no answer at all (SampleError)."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, labels
    if image_token_id in input_ids[max_length:]:
        raise SampleError(f"{len(input_ids)} tokens with images do not fit max_length={max_length}")
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if need_labels and all(x == IGNORE_INDEX for x in labels):
        raise SampleError(f"no answer tokens left after truncation to max_length={max_length}")
    return input_ids, labels


# -----------------------------------------------------------------------------
# Images


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with the processor's mean colour (LLaVA's pad aspect ratio)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: CMYK and palette convert, transparency is composited on white,
    16/32-bit integer and float greyscale are rescaled (a plain convert would clip them to white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255):
            a = a / 257.0  # 16-bit range -> 8-bit
        elif im.mode == "F":
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(path, name: str | None = None) -> Image.Image:
    """Open and fully decode an image (a path, or a file object named by name) as RGB; SampleError (skip)
    for missing, corrupt or truncated files and for decompression bombs (more than PIL's
    Image.MAX_IMAGE_PIXELS pixels)."""
    name = name or path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below 2x the limit
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not later in a worker
                return to_rgb(im)
    except FileNotFoundError:
        raise SampleError(f"image not found: {name}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError(f"image too large (decompression bomb): {name}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        raise SampleError(f"image unreadable: {name}: {_image_error(e, path)}") from None


def preprocess_images(images: list[Image.Image], image_processor) -> torch.Tensor:
    fill = tuple(int(255 * m) for m in image_processor.image_mean)  # as LLaVA's expand2square
    squares = [expand_to_square(im, fill) for im in images]
    return image_processor(images=squares, return_tensors="pt")["pixel_values"]


# -----------------------------------------------------------------------------
# Dataset and collator


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format records + image folder (or a ParquetRecordStore's rows, their images inside) ->
    tokenised, labelled samples.

    A sample that cannot be used (missing/corrupt image, too long) comes back as
    {"skipped": (id, reason)}: the collator drops it and the training loop counts it.
    """

    def __init__(self, records, image_folder: str, tokenizer, image_processor, template: str,
                 num_image_tokens: int, max_length: int = 2048, image_token_id: int = IMAGE_TOKEN_ID):
        self.records, self.image_folder = records, image_folder
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.num_image_tokens, self.max_length, self.image_token_id = num_image_tokens, max_length, image_token_id

    def __len__(self):
        return len(self.records)

    def load_images(self, rec: dict) -> list[Image.Image]:
        """The record's images, RGB; SampleError when one cannot be used. A subclass may take images
        from elsewhere than image_folder (eval.py: base64 strings from benchmark files)."""
        if "image_bytes" in rec:  # a parquet row's (ParquetRecordStore)
            return [load_image(io.BytesIO(data), f"{rec['source']} image {k}")
                    for k, data in enumerate(rec["image_bytes"])]
        return [load_image(os.path.join(self.image_folder, p)) for p in record_images(rec)]

    def __getitem__(self, i):
        rec = self.records[i]
        rid = record_id(rec, i)
        try:
            full_ids, full_labels = tokenize_conversation(
                to_messages(rec["conversations"]), self.tokenizer, self.template, self.num_image_tokens,
                None, self.image_token_id)
            input_ids, labels = truncate(full_ids, full_labels, self.max_length, self.image_token_id)
            images = self.load_images(rec)
        except SampleError as e:
            return {"skipped": (rid, str(e))}
        pixel_values = preprocess_images(images, self.image_processor) if images else None
        return {"id": rid, "index": i, "input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "pixel_values": pixel_values, "tokens_cut": len(full_ids) - len(input_ids)}


@dataclass
class Collator:
    """Pad a list of samples into a batch; images of all samples are concatenated in order."""
    pad_token_id: int
    padding_side: str = "right"  # "left" for generation

    def __call__(self, samples):
        skipped = [s["skipped"] for s in samples if "skipped" in s]
        samples = [s for s in samples if "skipped" not in s]
        batch = {"skipped": skipped, "ids": [s["id"] for s in samples],
                 "truncated": [(s["id"], s["tokens_cut"]) for s in samples if s.get("tokens_cut")]}
        if not samples:
            return batch
        longest = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            cols = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            ids[row, cols], labels[row, cols], mask[row, cols] = s["input_ids"], s["labels"], 1
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        # (record index, k) for the k-th image of each record: a stable name for each image
        image_keys = [(s.get("index", -1), k) for s in samples if s["pixel_values"] is not None
                      for k in range(len(s["pixel_values"]))]
        batch.update(input_ids=ids, labels=labels, attention_mask=mask, image_keys=image_keys,
                     pixel_values=torch.cat(pixels) if pixels else None)
        return batch


def skip_kind(why: str) -> str:
    """A skip reason without its particulars (the path after ': ', the numbers), so that like reasons count
    together: 'image not found: /x/1.png' -> 'image not found'."""
    return re.sub(r"\d+", "N", why.split(": ")[0])


def skip_kinds(skipped: list[tuple[str, str]]) -> Counter:
    """How many skipped records per kind of reason."""
    return Counter(skip_kind(why) for _, why in skipped)


def skip_report(skipped: list[tuple[str, str]]) -> str:
    """A short human-readable summary of skipped records: count per reason, and some ids."""
    if not skipped:
        return "skipped records: none"
    lines = [f"skipped records: {len(skipped)}"]
    lines += [f"  {n:6d} x {why}" for why, n in skip_kinds(skipped).most_common()]
    lines += [f"  e.g. {rid}: {why}" for rid, why in skipped[:5]]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The synthetic "shapes" dataset (README, "The demo and its data") and its offline tokenizer

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 205, 35)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("1", "2", "3")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
DETAIL_PROMPT = "Please generate detailed descriptions of the given image."
LETTERS = "ABCD"


@dataclass
class ShapesSpec:
    image_size: int = 96
    grid: int = 3
    max_objects: int = 3
    num_train_images: int = 8000
    num_test_images: int = 1000
    questions_per_image: int = 4  # stage 2: one record per question, of distinct kinds
    seed: int = 0


def draw_shapes_image(rng: random.Random, spec: ShapesSpec):
    """One image: 1..max_objects shapes of distinct colours in distinct grid cells over clutter."""
    s, g = spec.image_size, spec.grid
    cell = s // g
    # cluttered background: noisy grey, a few faint lines and dots in muted colours
    noise = np.random.default_rng(rng.getrandbits(63)).normal(128, 14, (s, s, 1))
    im = Image.fromarray(np.repeat(noise.clip(0, 255).astype(np.uint8), 3, axis=2))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 5)):
        grey = tuple(rng.randint(90, 170) for _ in range(3))
        d.line([(rng.randrange(s), rng.randrange(s)), (rng.randrange(s), rng.randrange(s))], fill=grey, width=1)
    objects = random_objects(rng, spec)
    for o in objects:
        c = CELLS.index(o["cell"])
        half = (cell * (0.42 if o["size"] == "large" else 0.27))
        cx = (c % g) * cell + cell / 2 + rng.uniform(-1.5, 1.5)
        cy = (c // g) * cell + cell / 2 + rng.uniform(-1.5, 1.5)
        box = [cx - half, cy - half, cx + half, cy + half]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            d.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return im, objects


def random_objects(rng: random.Random, spec: ShapesSpec) -> list[dict]:
    """1..max_objects objects of distinct colours in distinct cells, in reading order (what an image shows)."""
    n = rng.randint(1, spec.max_objects)
    cells = rng.sample(range(spec.grid ** 2), n)
    colours = rng.sample(sorted(COLOURS), n)
    objects = [{"colour": colour, "shape": rng.choice(SHAPES), "size": rng.choice(SIZES), "cell": CELLS[c]}
               for c, colour in zip(cells, colours)]
    return sorted(objects, key=lambda o: CELLS.index(o["cell"]))


def short_caption(objects) -> str:
    return " , ".join(f"{o['colour']} {o['shape']}" for o in objects) + " ."


def detailed_caption(objects) -> str:
    n = len(objects)
    head = f"There {'is' if n == 1 else 'are'} {n} object{'s' if n > 1 else ''} ."
    return " ".join([head] + [f"A {o['size']} {o['colour']} {o['shape']} at the {o['cell']} ." for o in objects])


def make_question(rng: random.Random, objects, kind: str, multiple_choice: bool):
    """One question about the image: (question text, answer text, options or None).

    Multiple-choice questions list 3-4 options (all of them for shape and count) after the question.
    """
    o = rng.choice(objects)
    if kind == "colour":
        q, a, pool = f"What colour is the object at the {o['cell']} ?", o["colour"], sorted(COLOURS)
    elif kind == "shape":
        q, a, pool = f"What shape is the {o['colour']} object ?", o["shape"], list(SHAPES)
    elif kind == "position":
        q, a, pool = f"Where is the {o['colour']} {o['shape']} ?", o["cell"], list(CELLS)
    elif kind == "count":
        q, a, pool = "How many objects are there ?", str(len(objects)), list(NUMBERS)
    elif kind == "exists":  # POPE-style: half present, half absent (absent ones share colour or shape)
        present = {(x["colour"], x["shape"]) for x in objects}
        if rng.random() < 0.5:
            colour, shape = o["colour"], o["shape"]
        else:
            absent = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) not in present]
            colour, shape = rng.choice(absent)
        q = f"Is there a {colour} {shape} in the image ? Answer yes or no ."
        return q, ("yes" if (colour, shape) in present else "no"), None
    else:
        raise ValueError(kind)
    if not multiple_choice:
        return q, a, None
    options = [a] + rng.sample([p for p in pool if p != a], min(len(pool), 4) - 1)
    rng.shuffle(options)
    # the options are listed, and the answer is the option's text: chance is 1 / len(options)
    return q + "\nOptions : " + " , ".join(options) + " .", a, options


QUESTION_KINDS = ("colour", "shape", "position", "count", "exists")


def text_conversation(rng: random.Random, spec: ShapesSpec, questions: int = 4) -> tuple[list[dict], list[str]]:
    """The world's language without images, for pretraining the demo's LLM: a scene told as its detailed
    caption, then `questions` questions about it (distinct kinds, open or multiple-choice) and their answers.
    Returns (chat messages, the question kinds)."""
    objects = random_objects(rng, spec)
    messages, kinds = [], rng.sample(QUESTION_KINDS, questions)
    for t, kind in enumerate(kinds):
        q, a, _ = make_question(rng, objects, kind, multiple_choice=rng.random() < 0.5)
        prompt = f"{detailed_caption(objects)}\n{q}" if t == 0 else q
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}]
    return messages, kinds


def make_shapes_dataset(root: str, spec: ShapesSpec | None = None) -> dict:
    """Generate the shapes dataset into root (deterministic from spec.seed). Returns the file paths."""
    spec = spec or ShapesSpec()
    if not 1 <= spec.questions_per_image <= len(QUESTION_KINDS):
        raise ValueError(f"questions_per_image must be 1..{len(QUESTION_KINDS)} (one per kind), "
                         f"got {spec.questions_per_image}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(spec.seed)
    stage1, stage15, stage2, test = [], [], [], []
    for i in range(spec.num_train_images + spec.num_test_images):
        name = f"images/{i:06d}.png"
        im, objects = draw_shapes_image(rng, spec)
        im.save(os.path.join(root, name))
        rid = f"shapes-{i:06d}"
        if i >= spec.num_train_images:  # held-out test images: one question each
            kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
            q, a, options = make_question(rng, objects, kind, multiple_choice=kind != "exists")
            test.append({"id": rid, "image": name, "type": kind, "options": options,
                         "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}"},
                                           {"from": "gpt", "value": a}]})
            continue
        stage1.append({"id": rid, "image": name, "conversations": [
            {"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": short_caption(objects)}]})
        stage15.append({"id": rid, "image": name, "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{DETAIL_PROMPT}"},
            {"from": "gpt", "value": detailed_caption(objects)}]})
        # questions_per_image questions of distinct kinds per image, one per record: each question
        # then sits right after its image, as in the test set (as 4-turn conversations the demo
        # learned less in the same minutes: docs/demo_log.md)
        for t, kind in enumerate(rng.sample(QUESTION_KINDS, spec.questions_per_image)):
            q, a, _ = make_question(rng, objects, kind, multiple_choice=rng.random() < 0.5)
            stage2.append({"id": f"{rid}-q{t}", "image": name, "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}"}, {"from": "gpt", "value": a}]})
    files = {"stage1": "stage1.json", "stage1.5": "stage1_5.json", "stage2": "stage2.json", "test": "test.jsonl"}
    for key, recs in (("stage1", stage1), ("stage1.5", stage15), ("stage2", stage2)):
        with open(os.path.join(root, files[key]), "w") as f:
            json.dump(recs, f)
    with open(os.path.join(root, files["test"]), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in test)
    with open(os.path.join(root, "spec.json"), "w") as f:
        json.dump(spec.__dict__, f)
    return {k: os.path.join(root, v) for k, v in files.items()}


def shapes_files(root: str, spec: ShapesSpec | None = None) -> dict:
    """The shapes dataset's files, generated on first use (or when the spec changed)."""
    spec = spec or ShapesSpec()
    spec_file = os.path.join(root, "spec.json")
    if os.path.isfile(spec_file):
        with open(spec_file) as f:
            if json.load(f) == spec.__dict__:
                return {k: os.path.join(root, v) for k, v in
                        (("stage1", "stage1.json"), ("stage1.5", "stage1_5.json"),
                         ("stage2", "stage2.json"), ("test", "test.jsonl"))}
    return make_shapes_dataset(root, spec)


SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_shapes_tokenizer():
    """A word-level tokenizer for the shapes vocabulary, built offline, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = set(("user assistant system " + DETAIL_PROMPT + " " + MC_SUFFIX +
                 " yes no There is are object objects Options "
                 "A at the What colour shape Where How many Is there a in image ? Answer or . , : of").split())
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBERS) | set(LETTERS)
    words |= {w for c in CELLS for w in c.split()}
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = {piece for w in words for piece, _ in pre.pre_tokenize_str(w)}
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=SPECIAL_TOKENS[2:],
                                   chat_template=CHATML_TEMPLATE)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out", default="data/shapes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    paths = make_shapes_dataset(args.out, ShapesSpec(seed=args.seed))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
