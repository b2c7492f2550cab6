"""
The VLM data path: a LLaVA-format record -> a training sample. The template renders the conversation,
each <image> becomes the model's N image-token ids (the model scatters the visual tokens into them),
labels cover the assistant's answers alone, images are padded to a square and preprocessed, and the
collator pads a batch. Reading and checking data files (JSON, JSONL, parquet): engineering/records.py;
the built-in shapes world: shapes_world/.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from victor import IGNORE_INDEX, IMAGE_TOKEN_ID, batch_layout

# -----------------------------------------------------------------------------
# A LLaVA-format record's vocabulary: the image placeholder, the roles, and the error of an unusable sample.

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(Exception):
    """A sample that cannot be used as it is (it is skipped and counted, or fails under --strict)."""


def record_id(rec, index: int) -> str:
    return str(rec.get("id", f"#{index}")) if isinstance(rec, dict) else f"#{index}"


def record_images(rec: dict) -> list[str]:
    img = rec.get("image")
    if img is None:
        return []
    return list(img) if isinstance(img, list) else [img]


@contextlib.contextmanager
def image_errors(name: str, source=None):
    """Open an image inside this: a missing, corrupt or truncated file, or a decompression bomb (more than
    PIL's Image.MAX_IMAGE_PIXELS pixels; PIL only warns below twice that), becomes a SampleError naming it.
    source: an in-memory file, whose repr PIL puts in its messages (it says nothing: left out)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise SampleError(f"image not found: {name}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError(f"image too large (decompression bomb): {name}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        message = str(e) if source is None else str(e).replace(repr(source), "").strip()
        raise SampleError(f"image unreadable: {name}: {message}") from None


# -----------------------------------------------------------------------------
# Templates. Every template is a Jinja chat template, so one label-masking routine serves all.


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


TEMPLATE_NAMES = ("auto", "plain", "vicuna_v1", "chatml", "chat")
# stage 1.5's prompt before each detailed caption: LLaVA-ReCap's, which the paper's stage 1.5 trains on
DETAIL_PROMPT = "Please generate detailed descriptions of the given image."


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


def ensure_pad_token(tokenizer):
    """Llama/Vicuna tokenizers have no pad token: pad with unk as LLaVA does (else eos)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def record_lengths(records) -> list[int]:
    """Each record's length for grouping batches by length: its words, plus 1000 per image (LLaVA's
    modality_lengths: the image tokens dominate, and image and text-only records sort apart)."""
    return [sum(len(str(t.get("value", "")).split()) for t in rec.get("conversations", []))
            + 1000 * len(record_images(rec)) for rec in (records[i] for i in range(len(records)))]


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
    """Open and fully decode an image (a path, or a file object named by name) as RGB; SampleError (the
    sample is skipped and counted) for a missing, corrupt or truncated file or a decompression bomb."""
    with image_errors(name or path, None if isinstance(path, str) else path), Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later in a worker
        return to_rgb(im)


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
    image_token_id: int = IMAGE_TOKEN_ID  # the model's (VictorConfig.image_token_id): where batch_layout finds images

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
                     pixel_values=torch.cat(pixels) if pixels else None,
                     layout=batch_layout(ids, labels, self.image_token_id))  # on the host, for the forward
        return batch
