"""
Evaluate a victor checkpoint on the shapes test set (multiple-choice and yes/no questions):
accuracy overall and per question type, each beside its chance level.

    python eval.py                                  # the demo's final checkpoint, out/demo/stage2
    python eval.py out/demo/stage2 --out results.json --limit 200

Benchmarks, offline, on files you already have (greedy, batched; see bench_main):

    python eval.py CKPT --bench MMStar.tsv --out mmstar.json   # VLMEvalKit TSV: multiple choice -> accuracy
    python eval.py CKPT --bench POPE.tsv                       # yes/no answers -> POPE's precision/recall/F1
    python eval.py CKPT --question-file q.jsonl --image-folder imgs --answers-file answers.jsonl  # LLaVA format

Pictures (PIL only):

    python eval.py out/demo/stage1.5 --visualize IMAGE.png     # pool row per patch + reconstruction error
    python eval.py --curves out/demo/stage1.5/metrics.jsonl out/demo/stage2/metrics.jsonl  # training curves

CHECKPOINT may be victor's own, the original LLaVA code's (LLaVA-1.5, Croc) or llava-hf's. Export:

    python eval.py CKPT --export-llava-hf OUT                 # a transformers LlavaForConditionalGeneration dir
"""
from __future__ import annotations

import argparse
import base64
import binascii
import csv
import hashlib
import io
import json
import os
import re
import string
import sys
import uuid
from collections import defaultdict

import torch
from PIL import Image
from tqdm import tqdm

import data as D
from victor import export_llava_hf, load_checkpoint


def extract_answer(text: str, options: list[str] | None) -> str:
    """The model's answer: an option letter for multiple choice, else the first word (yes/no)."""
    text = text.strip()
    if options:
        letters = string.ascii_uppercase[:len(options)]  # benchmarks may have more than D.LETTERS
        m = re.match(rf"^\(?([{letters}])\b", text)  # "B", "(B)", "B. text", "B)"
        if m:
            return m.group(1)
        # "The answer is B", "Answer: (B)", "the correct option is B."
        m = re.search(rf"(?i:answer|option|choice)\W{{0,3}}(?:(?i:is)\W{{1,3}})?\(?([{letters}])\b", text)
        if m:
            return m.group(1)
        for letter, opt in zip(letters, options):  # the option's text alone
            if text.lower().rstrip(" .") == opt.lower():
                return letter
        return ""
    m = re.match(r"^\W*(\w+)", text)
    return m.group(1).lower() if m else ""


def chance_of(rec) -> float:
    return 1.0 / len(rec["options"]) if rec.get("options") else 0.5


@torch.no_grad()
def evaluate(checkpoint: str, test_file: str, image_folder: str, batch_size: int = 32, limit: int = 0,
             max_new_tokens: int = 8, device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, image_processor, template = load_for_eval(checkpoint, device)
    records, _ = D.load_records(test_file, strict=True)
    if limit:
        records = records[:limit]
    # the prompt: every turn but the last answer; the model answers after the generation prompt
    prompts = [{**r, "conversations": r["conversations"][:-1]} for r in records]
    dataset = D.LlavaDataset(prompts, image_folder, tokenizer, image_processor, template, model.num_image_tokens,
                             max_length=None, image_token_id=model.cfg.image_token_id)
    outputs = generate_for_dataset(model, tokenizer, dataset, batch_size, max_new_tokens, device)
    by_id = {D.record_id(r, i): r for i, r in enumerate(records)}
    per_type = defaultdict(lambda: {"correct": 0, "total": 0, "chance_sum": 0.0})
    predictions = []
    for rid, out in outputs.items():
        rec = by_id[rid]
        answer = rec["conversations"][-1]["value"].strip()
        pred = extract_answer(out, rec.get("options"))
        truth = extract_answer(answer, rec.get("options"))  # the answer may be a letter or the option's text
        kind = rec.get("type", "all")
        t = per_type[kind]
        t["total"] += 1
        t["correct"] += int(pred != "" and pred == truth)
        t["chance_sum"] += chance_of(rec)
        predictions.append({"id": rid, "type": kind, "output": out, "prediction": pred, "answer": answer})
    total = sum(t["total"] for t in per_type.values())
    results = {
        "checkpoint": checkpoint, "test_file": test_file, "num_questions": total,
        "accuracy": sum(t["correct"] for t in per_type.values()) / max(total, 1),
        "chance": sum(t["chance_sum"] for t in per_type.values()) / max(total, 1),
        "per_type": {k: {"accuracy": t["correct"] / t["total"], "chance": t["chance_sum"] / t["total"],
                         "n": t["total"]} for k, t in sorted(per_type.items())},
        "predictions": predictions,
    }
    results["pope"] = pope_metrics([p["prediction"] for p in predictions if p["type"] == "exists"],  # benchmarks
                                   [p["answer"].lower() for p in predictions if p["type"] == "exists"])
    return results


def format_table(results: dict) -> str:
    rows = [f"{'type':<10} {'n':>5} {'accuracy':>9} {'chance':>7}"]
    for k, t in results["per_type"].items():
        rows.append(f"{k:<10} {t['n']:>5} {t['accuracy']:>9.3f} {t['chance']:>7.3f}")
    rows.append(f"{'overall':<10} {results['num_questions']:>5} {results['accuracy']:>9.3f} {results['chance']:>7.3f}")
    if results.get("pope", {}).get("n"):  # benchmarks: the exists questions, scored as POPE
        rows.append(format_pope(results["pope"]))
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Pictures (issue 4): which pool row each patch is matched to, the per-patch reconstruction
# error, and training curves. PIL only.

GOLDEN = 0.6180339887498949


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


def _fit_font(draw, text: str, width: int, size: int, smallest: int = 9):
    """The largest font, at most `size`, in which `text` fits `width` pixels."""
    while size > smallest and draw.textlength(text, font=_font(size)) > width:
        size -= 1
    return _font(size)


def pool_colour(row: int) -> tuple[int, int, int]:
    """A deterministic colour per pool row: golden-ratio hue steps, so nearby rows differ."""
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((int(row) * GOLDEN) % 1.0, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


# a perceptually ordered dark-blue -> teal -> yellow scale (viridis' anchors)
_HEAT = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def heat_colour(t: float) -> tuple[int, int, int]:
    t = min(max(float(t), 0.0), 1.0) * (len(_HEAT) - 1)
    i = min(int(t), len(_HEAT) - 2)
    f = t - i
    return tuple(int(round(a + (b - a) * f)) for a, b in zip(_HEAT[i], _HEAT[i + 1]))


def pool_picture_layout(grid: int, panel: int = 384) -> dict:
    """Geometry of draw_pool_picture's output: size, the two panels' top-left corners, cell side."""
    cell = max(1, panel // grid)
    side = cell * grid
    pad, gap, top, bottom, legend = 20, 40, 64, 56, 90
    left = (pad, top)
    right = (pad + side + gap, top)
    return {"size": (right[0] + side + legend + pad, top + side + bottom), "left": left, "right": right,
            "cell": cell, "side": side}


def _text_centered(draw, xy, text, font, fill=(255, 255, 255), stroke=(0, 0, 0)):
    draw.text(xy, text, font=font, fill=fill, anchor="mm", stroke_width=2 if stroke else 0, stroke_fill=stroke)


def draw_pool_picture(image, pool_indices, errors, replaced, panel: int = 384, title: str = "",
                      error_name: str = "SmoothL1"):
    """The picture, from arrays alone.

    image: a PIL image (shown square, as the model sees it); pool_indices, errors, replaced: grid*grid
    values in row-major patch order (the pool row matched to each patch, its reconstruction error,
    whether it was replaced in the forward that produced the errors). Returns an RGB PIL image of
    size pool_picture_layout(grid, panel)["size"].
    """
    from PIL import Image, ImageDraw
    import numpy as np
    rows = np.asarray(pool_indices).reshape(-1).astype(int)
    errs = np.asarray(errors, dtype=np.float64).reshape(-1)
    rep = np.asarray(replaced).reshape(-1).astype(bool)
    n = len(rows)
    grid = int(round(n ** 0.5))
    if grid * grid != n or len(errs) != n or len(rep) != n:
        raise ValueError(f"pool_indices, errors and replaced must each hold grid*grid values; "
                         f"got {len(rows)}, {len(errs)}, {len(rep)}")
    lay = pool_picture_layout(grid, panel)
    cell, side = lay["cell"], lay["side"]
    out = Image.new("RGB", lay["size"], (255, 255, 255))
    draw = ImageDraw.Draw(out)
    f_panel, f_small = _font(15), _font(13)
    f_cell = _font(max(9, min(28, cell // 3)))
    if title:
        draw.text((lay["size"][0] // 2, 16), title, font=_fit_font(draw, title, lay["size"][0] - 16, 18),
                  fill=(0, 0, 0), anchor="mm")

    # left: the image with each patch tinted by its pool row
    x0, y0 = lay["left"]
    base = image.convert("RGB").resize((side, side), Image.BICUBIC)
    tint = Image.new("RGB", (side, side))
    td = ImageDraw.Draw(tint)
    for k in range(n):
        i, j = divmod(k, grid)
        td.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], fill=pool_colour(rows[k]))
    out.paste(Image.blend(base, tint, 0.5), (x0, y0))
    for k in range(n):
        i, j = divmod(k, grid)
        cx, cy = x0 + j * cell + cell // 2, y0 + i * cell + cell // 2
        if cell >= 18:
            _text_centered(draw, (cx, cy), str(rows[k]), f_cell)
    for t in range(grid + 1):  # the patch grid
        draw.line([(x0 + t * cell, y0), (x0 + t * cell, y0 + side)], fill=(255, 255, 255), width=1)
        draw.line([(x0, y0 + t * cell), (x0 + side, y0 + t * cell)], fill=(255, 255, 255), width=1)
    draw.text((x0 + side // 2, y0 - 14), f"pool row matched to each patch ({n} tokens)", font=f_panel,
              fill=(0, 0, 0), anchor="mm")

    # right: the reconstruction error per patch
    x1, y1 = lay["right"]
    lo, hi = float(errs.min()), float(errs.max())
    span = hi - lo if hi > lo else 1.0
    f_val = _font(max(9, min(18, cell // 5)))
    for k in range(n):
        i, j = divmod(k, grid)
        t = (errs[k] - lo) / span
        box = [x1 + j * cell, y1 + i * cell, x1 + (j + 1) * cell - 1, y1 + (i + 1) * cell - 1]
        draw.rectangle(box, fill=heat_colour(t), outline=(255, 255, 255))
        if rep[k]:  # a dot in the top-left corner marks a replaced token
            rad = max(2, min(7, cell // 10))
            cx, cy = box[0] + rad + 3, box[1] + rad + 3
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=(255, 255, 255), outline=(0, 0, 0), width=1)
        if cell >= 44:
            _text_centered(draw, ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), f"{errs[k]:.3g}", f_val)
    draw.text((x1 + side // 2, y1 - 14), f"reconstruction error per patch ({error_name})", font=f_panel,
              fill=(0, 0, 0), anchor="mm")

    # the colour scale: a vertical bar, max at the top
    bx, bw = x1 + side + 14, 18
    for y in range(side):
        draw.line([(bx, y1 + y), (bx + bw, y1 + y)], fill=heat_colour(1 - y / max(side - 1, 1)))
    draw.rectangle([bx, y1, bx + bw, y1 + side - 1], outline=(0, 0, 0))
    draw.text((bx + bw + 4, y1), f"{hi:.3g}", font=f_small, fill=(0, 0, 0), anchor="lt")
    draw.text((bx + bw + 4, y1 + side), f"{lo:.3g}", font=f_small, fill=(0, 0, 0), anchor="lb")
    draw.text((bx + bw + 4, y1 + side // 2), "max" if hi == lo else "", font=f_small, fill=(0, 0, 0), anchor="lm")

    # captions
    distinct = len(set(rows.tolist()))
    draw.text((x0, y0 + side + 10), f"same colour = same pool row; {distinct} distinct rows", font=f_small,
              fill=(0, 0, 0))
    draw.text((x1, y1 + side + 10), f"dot = replaced by its pool row ({int(rep.sum())} of {n}); "
              f"mean {errs.mean():.3g}", font=f_small, fill=(0, 0, 0))
    return out


@torch.no_grad()
def visualize_pool(checkpoint_or_model, image_path: str, out_png: str | None = None, tokenizer=None,
                   image_processor=None, template: str | None = None, seed: int = 0, device: str | None = None,
                   panel: int = 384, assignment: str = "hungarian"):
    """Draw, for one image, the pool row Hungarian matching gives each visual token (all N at once)
    and the per-patch reconstruction error of a stage-1.5 forward (replacement drawn with a fixed
    torch.Generator seeded with `seed`, as in training). Writes out_png if given; returns the PIL image.

    checkpoint_or_model: a checkpoint directory, or a VictorModel (then give tokenizer and
    image_processor; template defaults to "auto" for stage 1.5). assignment: "hungarian" (one-to-one,
    as in training: every patch of the image gets a distinct row) or "nearest" (each token's nearest
    row, so similar regions can share a row and a colour).
    """
    from victor import hungarian_match
    if isinstance(checkpoint_or_model, str):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tok, proc = load_checkpoint(checkpoint_or_model, device)
        tokenizer, image_processor = tokenizer or tok, image_processor or proc
        with open(os.path.join(checkpoint_or_model, "config.json")) as f:
            train_config = json.load(f).get("train_config", {})
        template = template or train_config.get("template", "auto")
        stage = train_config.get("stage", "1.5")
        name = os.path.basename(os.path.normpath(checkpoint_or_model))
    else:
        model, stage, name = checkpoint_or_model, "1.5", "model"
        if tokenizer is None or image_processor is None:
            raise ValueError("visualize_pool(model, ...) needs tokenizer= and image_processor=")
        template = template or "auto"
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    template = D.resolve_template(template, tokenizer, stage="1.5" if stage == "1" else stage)
    image = D.load_image(image_path)
    pixel_values = D.preprocess_images([image], image_processor).to(device)
    messages = [{"role": "user", "content": f"{D.IMAGE_PLACEHOLDER}\n{D.DETAIL_PROMPT}"}]
    ids, _ = D.tokenize_conversation(messages, tokenizer, template, model.num_image_tokens,
                                     image_token_id=model.cfg.image_token_id)
    input_ids = torch.tensor([ids], device=device)
    # every patch's pool row: one-to-one matching of all N normalised projected tokens
    _, _, visual = model.embed_inputs(input_ids, pixel_values)
    n = visual.shape[1]
    if assignment not in ("hungarian", "nearest"):
        raise ValueError(f"assignment must be 'hungarian' or 'nearest', got {assignment!r}")
    if assignment == "hungarian" and model.token_pool.shape[0] >= n:
        rows = hungarian_match(visual.float(), model.token_pool)[0]
    else:  # (a pool smaller than N cannot give every token its own row) each token's nearest row
        assignment = "nearest"
        rows = torch.cdist(visual[0].float(), model.token_pool.float()).argmin(-1)
    # the stage-1.5 forward; it returns each token's reconstruction error (step 6)
    # every token's error is shown, also where training reconstructs a share of the images (VDEP); the
    # labels (none supervised) give Croc's mixed attention its prefix, as in training
    ratio, model.cfg.recon_image_ratio = model.cfg.recon_image_ratio, 1.0
    try:
        gen = torch.Generator(device=visual.device).manual_seed(seed)
        out = model(input_ids, torch.ones_like(input_ids), labels=torch.full_like(input_ids, D.IGNORE_INDEX),
                    pixel_values=pixel_values, stage="1.5", generator=gen, return_token_errors=True)
    finally:
        model.cfg.recon_image_ratio = ratio
        model.train(was_training)
    errors = torch.zeros(n)
    if out.token_errors is not None:  # shown at the token reconstructed (recon_target_offset: VDEP's next token)
        errors[model.cfg.recon_target_offset:] = out.token_errors[0].float().cpu()
    replaced = out.replaced_mask[0] if out.replaced_mask is not None else torch.zeros(n, dtype=torch.bool)
    fill = tuple(int(255 * m) for m in image_processor.image_mean)
    title = (f"checkpoint {name} (stage {stage}): {os.path.basename(image_path)}, "
             f"pool {model.token_pool.shape[0]} rows, {assignment} match, replacement seed {seed}")
    picture = draw_pool_picture(D.expand_to_square(image, fill), rows.cpu().numpy(), errors.cpu().numpy(),
                                replaced.cpu().numpy(), panel=panel, title=title)
    if out_png:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        picture.save(out_png)
    return picture


CURVE_METRICS = (("loss", "loss"), ("lm_loss", "LM loss"), ("recon_loss", "reconstruction loss"),
                 ("lr", "learning rate"))
CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def read_curves(paths: list[str]) -> dict[str, list[dict]]:
    """metrics.jsonl files -> {series label: rows with a "step"}, one series per (file, stage)."""
    series: dict[str, list[dict]] = {}
    for path in paths:
        found = 0
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                row = json.loads(line)
                if "step" not in row:  # e.g. {"done": true}
                    continue
                found += 1
                label = os.path.basename(os.path.dirname(os.path.abspath(path))) if len(paths) > 1 else ""
                if "stage" in row and str(row["stage"]) not in label:
                    label = f"{label} stage {row['stage']}".strip()
                series.setdefault(label or os.path.basename(path), []).append(row)
        if not found:
            raise ValueError(f"{path}: no rows with a 'step' key (expected a metrics.jsonl written by train.py)")
    return series


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    import math
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [first + k * step for k in range(int(round((last - first) / step)) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e") if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4g}"


def plot_curves(paths, out_png: str | None = None, panel=(520, 320)):
    """Four panels (loss, LM loss, reconstruction loss, learning rate) from metrics.jsonl files;
    one coloured line per file and stage, with a legend. Returns the PIL image; writes out_png if given."""
    from PIL import Image, ImageDraw
    if isinstance(paths, str):
        paths = [paths]
    series = read_curves(list(paths))
    pw, ph = panel
    ml, mr, mt, mb = 70, 16, 34, 42  # margins inside each panel around the plot area
    legend_h = 30
    width, height = 2 * pw, 2 * ph + legend_h + 36
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    f_title, f_tick = _font(15), _font(12)
    names = ", ".join(os.path.relpath(p) if not os.path.isabs(p) else p for p in paths)
    head = f"training curves: {names}"
    draw.text((width // 2, 16), head, font=_fit_font(draw, head, width - 16, 18), fill=(0, 0, 0), anchor="mm")
    colours = {label: CURVE_COLOURS[k % len(CURVE_COLOURS)] for k, label in enumerate(series)}
    for p, (key, name) in enumerate(CURVE_METRICS):
        ox, oy = (p % 2) * pw, 36 + (p // 2) * ph
        ax0, ay0, ax1, ay1 = ox + ml, oy + mt, ox + pw - mr, oy + ph - mb
        pts = {lab: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
               for lab, rows in series.items()}
        allp = [q for v in pts.values() for q in v]
        draw.text(((ax0 + ax1) // 2, oy + mt // 2), name, font=f_title, fill=(0, 0, 0), anchor="mm")
        draw.rectangle([ax0, ay0, ax1, ay1], outline=(0, 0, 0))
        if not allp:
            draw.text(((ax0 + ax1) // 2, (ay0 + ay1) // 2), f"no '{key}' values", font=f_tick,
                      fill=(120, 120, 120), anchor="mm")
            continue
        xs, ys = [q[0] for q in allp], [q[1] for q in allp]
        xt, yt = _nice_ticks(min(xs), max(xs)), _nice_ticks(min(ys), max(ys))
        xlo, xhi = min(xt[0], min(xs)), max(xt[-1], max(xs))
        ylo, yhi = min(yt[0], min(ys)), max(yt[-1], max(ys))
        xlo, xhi = (xlo, xhi) if xhi > xlo else (xlo - 1, xhi + 1)
        ylo, yhi = (ylo, yhi) if yhi > ylo else (ylo - 1, yhi + 1)
        sx = lambda x: ax0 + (x - xlo) / (xhi - xlo) * (ax1 - ax0)  # noqa: E731
        sy = lambda y: ay1 - (y - ylo) / (yhi - ylo) * (ay1 - ay0)  # noqa: E731
        for t in xt:
            if xlo <= t <= xhi:
                draw.line([(sx(t), ay0), (sx(t), ay1)], fill=(232, 232, 232))
                draw.line([(sx(t), ay1), (sx(t), ay1 + 4)], fill=(0, 0, 0))
                draw.text((sx(t), ay1 + 6), _fmt(t), font=f_tick, fill=(0, 0, 0), anchor="mt")
        for t in yt:
            if ylo <= t <= yhi:
                draw.line([(ax0, sy(t)), (ax1, sy(t))], fill=(232, 232, 232))
                draw.line([(ax0 - 4, sy(t)), (ax0, sy(t))], fill=(0, 0, 0))
                draw.text((ax0 - 6, sy(t)), _fmt(t), font=f_tick, fill=(0, 0, 0), anchor="rm")
        draw.rectangle([ax0, ay0, ax1, ay1], outline=(0, 0, 0))
        draw.text(((ax0 + ax1) // 2, ay1 + 22), "step", font=f_tick, fill=(0, 0, 0), anchor="mt")
        for lab, v in pts.items():
            xy = [(sx(x), sy(y)) for x, y in sorted(v)]
            if len(xy) > 1:
                draw.line(xy, fill=colours[lab], width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[lab])
    # the legend: one entry per series, along the bottom
    x, y = 20, height - legend_h // 2 - 4
    for lab, c in colours.items():
        draw.line([(x, y), (x + 26, y)], fill=c, width=3)
        draw.text((x + 32, y), lab, font=f_title, fill=(0, 0, 0), anchor="lm")
        x += 32 + int(draw.textlength(lab, font=f_title)) + 28
    if out_png:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        out.save(out_png)
    return out


def pictures_main(args):
    """--curves / --visualize: write a PNG instead of evaluating."""
    if args.curves:
        out = args.out_png or os.path.join(os.path.dirname(os.path.abspath(args.curves[0])), "curves.png")
        try:
            picture = plot_curves(args.curves, out)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--curves: {e}")
    else:
        if not os.path.isdir(args.checkpoint):
            raise SystemExit(f"{args.checkpoint}: no such checkpoint directory")
        stem = os.path.splitext(os.path.basename(args.visualize))[0]
        out = args.out_png or os.path.join(args.checkpoint, f"pool_{stem}.png")
        picture = visualize_pool(args.checkpoint, args.visualize, out, seed=args.seed, device=args.device,
                                 assignment=args.pool_assign)
    print(f"wrote {out} ({picture.size[0]}x{picture.size[1]})")
    return out


# -----------------------------------------------------------------------------
# Benchmark files users already have: VLMEvalKit TSVs (multiple choice, yes/no) and LLaVA question files


BENCH_MC_SUFFIX = "Answer with the option's letter from the given choices directly."
BENCH_YN_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTERS = string.ascii_uppercase


def _is_none(value) -> bool:
    """Empty, NaN or None, as pandas writes them into a TSV (LLaVA's is_none)."""
    return value is None or (isinstance(value, float) and value != value) or \
        str(value).strip().lower() in ("", "nan", "none")


def extract_yes_no(text: str) -> str:
    """yes / no from a free answer ("Yes, there is" -> yes, "There is not" -> no), "" when neither."""
    words = re.findall(r"[a-z]+", text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    if "no" in words or "not" in words:
        return "no"
    return "yes" if "yes" in words else ""


def pope_metrics(predictions: list[str], answers: list[str]) -> dict:
    """POPE's metrics, positive = yes: accuracy, precision, recall, F1 and the ratio of yes answers.
    A prediction that is neither yes nor no counts as wrong (and as not yes)."""
    pairs = [(p.lower(), a.lower()) for p, a in zip(predictions, answers)]
    tp = sum(p == "yes" and a == "yes" for p, a in pairs)
    fp = sum(p == "yes" and a == "no" for p, a in pairs)
    fn = sum(p != "yes" and a == "yes" for p, a in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"n": n, "accuracy": sum(p == a for p, a in pairs) / n if n else 0.0,
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p == "yes" for p, _ in pairs) / n if n else 0.0,
            "unparsed": sum(p not in ("yes", "no") for p, _ in pairs)}


def circular_accuracy(predictions: list[dict]) -> dict | None:
    """MMBench's circular evaluation (as VLMEvalKit): the copies of a question with its options rotated
    share index mod 1e6, and the question counts as right only if every copy is answered right.
    None when the file has no copies (or indices that are not numbers)."""
    try:
        keys = [int(float(p["index"])) % 1_000_000 for p in predictions]
    except ValueError:
        return None
    groups = defaultdict(list)
    for key, p in zip(keys, predictions):
        groups[key].append(p)
    if all(len(g) == 1 for g in groups.values()):
        return None
    right = {key: all(p["correct"] for p in g) for key, g in groups.items()}
    per_category = defaultdict(list)
    for key, g in groups.items():
        per_category[g[0]["category"]].append(right[key])
    return {"accuracy": sum(right.values()) / len(right), "n": len(right),
            "per_category": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(per_category.items())}}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "ocr")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(items: list[dict], predictions: list[dict]) -> dict | None:
    """MME's leaderboard score. Per sub-task (category): accuracy over its questions plus accuracy+ over its
    images (an image counts when every question about it, two in MME, is right), each x100, so at most
    200; perception and cognition are the sums over their sub-tasks. None unless every category is an
    MME sub-task."""
    name = lambda c: c.strip().lower().replace(" ", "_")  # noqa: E731  ("OCR", "code reasoning")
    tasks = {name(p["category"]) for p in predictions}
    if not tasks or not tasks <= set(MME_PERCEPTION + MME_COGNITION):
        return None
    per_task = {}
    for task in sorted(tasks):
        rows = [(it, p) for it, p in zip(items, predictions) if name(p["category"]) == task]
        if any("image_key" not in it for it, _ in rows):
            raise ValueError(f"MME sub-task {task}: every row needs an image (image or image_path) to pair "
                             f"its questions for accuracy+")
        by_image = defaultdict(list)
        for it, p in rows:
            by_image[it["image_key"]].append(p["correct"])
        acc = 100 * sum(p["correct"] for _, p in rows) / len(rows)
        acc_plus = 100 * sum(all(v) for v in by_image.values()) / len(by_image)
        per_task[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus,
                          "questions": len(rows), "images": len(by_image)}
    perception = sum(per_task[t]["score"] for t in MME_PERCEPTION if t in per_task)
    cognition = sum(per_task[t]["score"] for t in MME_COGNITION if t in per_task)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "per_subtask": per_task, "missing": [t for t in MME_PERCEPTION + MME_COGNITION if t not in per_task]}


def short_uuid() -> str:
    """A shortuuid-like id (22 characters of base 57) for LLaVA answer files."""
    alphabet = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    n, out = uuid.uuid4().int, []
    while n:
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out)[:22].ljust(22, alphabet[0])


def _read_bench_rows(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        with open(path) as f:
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not JSON: {e}") from None
        return rows
    csv.field_size_limit(sys.maxsize)  # base64 images are long
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_bench(path: str, image_folder: str = "") -> tuple[str, list[dict]]:
    """A VLMEvalKit TSV (or JSONL with the same fields) -> (kind, items), kind "multiple_choice" or "yes_no".

    Each item: index, question (the full prompt text, without <image>), options, answer (a letter or
    yes/no), category, l2-category, and image_b64 or image_path. Raises ValueError naming the row."""
    rows = _read_bench_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = [c for c in ("index", "question", "answer") if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing} (have {sorted(rows[0])})")
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    b64_by_index = {str(r["index"]): r.get("image") for r in rows if not _is_none(r.get("image"))}
    items, kinds = [], set()
    for n, row in enumerate(rows):
        idx = str(row.get("index"))
        where = f"{path}: row {n + 1} (index {idx})"
        if any(_is_none(row.get(c)) for c in ("index", "question", "answer")):
            raise ValueError(f"{where}: empty index/question/answer")
        options = []
        for letter in OPTION_LETTERS:  # A, B, ... as far as they are present and non-empty
            if _is_none(row.get(letter)):
                break
            options.append(str(row[letter]).strip())
        answer = str(row["answer"]).strip()
        if options:
            if answer not in OPTION_LETTERS[:len(options)]:
                raise ValueError(f"{where}: answer {answer!r} is not one of the option letters "
                                 f"{OPTION_LETTERS[:len(options)]}")
            kinds.add("multiple_choice")
        elif answer.lower() in ("yes", "no"):
            answer = answer.lower()
            kinds.add("yes_no")
        else:
            raise ValueError(f"{where}: no options (columns A, B, ...) and the answer {answer!r} is not yes/no")
        question = str(row["question"]).strip()
        if options:
            hint = row.get("hint")
            if not _is_none(hint):
                question = str(hint).strip() + "\n" + question
            question += "".join(f"\n{letter}. {opt}" for letter, opt in zip(OPTION_LETTERS, options))
            question += "\n" + BENCH_MC_SUFFIX
        else:
            question += "\n" + BENCH_YN_SUFFIX
        item = {"index": idx, "question": question, "options": options, "answer": answer,
                "category": str(row.get("category")) if not _is_none(row.get("category")) else "all"}
        l2 = row.get("l2-category", row.get("l2_category"))  # MMBench writes l2-category, MMStar l2_category
        if not _is_none(l2):
            item["l2-category"] = str(l2)
        image = row.get("image")
        if not _is_none(image):
            image = str(image).strip()
            if len(image) <= 64 and image in b64_by_index and image != idx:  # MMBench: the index of a row with the image
                image = str(b64_by_index[image])
            try:
                base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"{where}: the image is not valid base64 ({e})") from None
            item["image_b64"] = image
        elif not _is_none(row.get("image_path")):
            p = str(row["image_path"]).strip()
            p = p if os.path.isabs(p) else os.path.join(folder, p)
            if not os.path.isfile(p):
                raise ValueError(f"{where}: image_path {p} not found")
            item["image_path"] = p
        if not _is_none(row.get("image_path")):  # which image a row asks about (MME: two questions per image)
            item["image_key"] = str(row["image_path"]).strip()
        elif "image_b64" in item:
            item["image_key"] = hashlib.sha1(item["image_b64"].encode()).hexdigest()[:16]
        items.append(item)
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes multiple-choice rows and yes/no rows")
    return kinds.pop(), items


class BenchDataset(D.LlavaDataset):
    """LlavaDataset whose images come from base64 strings or absolute paths in the records
    ("image_b64" / "image_path"); an undecodable image fails with the record's id."""

    def __getitem__(self, i):
        rec = self.records[i]
        rid = D.record_id(rec, i)
        try:
            input_ids, labels = D.tokenize_conversation(
                D.to_messages(rec["conversations"]), self.tokenizer, self.template, self.num_image_tokens,
                self.max_length, self.image_token_id)
        except D.SampleError as e:
            raise ValueError(f"record {rid}: {e}") from None
        images = []
        if rec.get("image_b64"):
            try:
                with Image.open(io.BytesIO(base64.b64decode(rec["image_b64"]))) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f"record {rid}: the base64 image cannot be decoded: {e}") from None
        elif rec.get("image_path"):
            try:
                images.append(D.load_image(rec["image_path"]))
            except D.SampleError as e:
                raise ValueError(f"record {rid}: {e}") from None
        pixel_values = D.preprocess_images(images, self.image_processor) if images else None
        return {"id": rid, "input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "pixel_values": pixel_values}


def load_for_eval(checkpoint: str, device):
    """(model, tokenizer, image_processor, template) with the checkpoint's chat template, as evaluate()."""
    model, tokenizer, image_processor = load_checkpoint(checkpoint, device)
    model.eval()
    with open(os.path.join(checkpoint, "config.json")) as f:
        template_name = json.load(f).get("train_config", {}).get("template", "auto")
    template = D.resolve_template(template_name, tokenizer, stage="2")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer, image_processor, template


@torch.no_grad()
def generate_for_dataset(model, tokenizer, dataset, batch_size: int, max_new_tokens: int, device) -> dict:
    """Greedy answers to a dataset of prompt-only records, batched with left padding: {record id: text}.

    A record the dataset cannot use (missing or unreadable image) is an error: an evaluation
    must not shrink silently.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=D.Collator(tokenizer.pad_token_id, padding_side="left"))
    outputs, skipped = {}, []
    for batch in tqdm(loader, desc="eval"):
        skipped += batch["skipped"]
        if "input_ids" not in batch:
            continue
        new = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        outputs.update(zip(batch["ids"], (t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))))
    if skipped:
        raise RuntimeError(f"{len(skipped)} records could not be used: {skipped[:5]}")
    return outputs


def generate_answers(model, tokenizer, image_processor, template, records, batch_size: int, max_new_tokens: int,
                     device) -> dict:
    """Greedy answers to one-human-turn LLaVA records (with image_b64/image_path): {record id: text}."""
    dataset = BenchDataset(records, "", tokenizer, image_processor, template, model.num_image_tokens,
                           max_length=None, image_token_id=model.cfg.image_token_id)
    return generate_for_dataset(model, tokenizer, dataset, batch_size, max_new_tokens, device)


def _prompt_record(rid: str, text: str, item: dict) -> dict:
    has_image = bool(item.get("image_b64") or item.get("image_path"))
    rec = {"id": rid, "conversations": [{"from": "human", "value": ("<image>\n" if has_image else "") + text}]}
    for k in ("image_b64", "image_path"):
        if item.get(k):
            rec[k] = item[k]
    return rec


def evaluate_bench(checkpoint: str, bench_file: str, image_folder: str = "", batch_size: int = 32, limit: int = 0,
                   max_new_tokens: int = 16, device: str | None = None) -> dict:
    """Accuracy (overall, per category and per l2-category) on a multiple-choice benchmark TSV, or
    POPE's metrics on a yes/no one; with the leaderboards' own scores where the file calls for them:
    MMBench's circular accuracy (circular copies present) and MME's score (MME's sub-tasks)."""
    kind, items = load_bench(bench_file, image_folder)
    if limit:
        items = items[:limit]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model, tokenizer, image_processor, template = load_for_eval(checkpoint, device)
    records = [_prompt_record(f"#{i}", it["question"], it) for i, it in enumerate(items)]
    outputs = generate_answers(model, tokenizer, image_processor, template, records, batch_size, max_new_tokens,
                               device)
    predictions = []
    for i, it in enumerate(items):
        out = outputs[f"#{i}"]
        pred = extract_answer(out, it["options"]) if kind == "multiple_choice" else extract_yes_no(out)
        p = {"index": it["index"], "category": it["category"], "output": out, "prediction": pred,
             "answer": it["answer"], "correct": pred == it["answer"]}
        if "l2-category" in it:
            p["l2-category"] = it["l2-category"]
        predictions.append(p)

    def grouped(key):
        groups = defaultdict(list)
        for p in predictions:
            if key in p:
                groups[p[key]].append(p["correct"])
        return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}

    n = len(predictions)
    results = {"checkpoint": checkpoint, "bench": bench_file, "kind": kind, "num_questions": n,
               "accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0,
               "per_category": grouped("category")}
    if any("l2-category" in p for p in predictions):
        results["per_l2_category"] = grouped("l2-category")
    if kind == "yes_no":
        results["pope"] = pope_metrics([p["prediction"] for p in predictions], [p["answer"] for p in predictions])
    circular = circular_accuracy(predictions)
    if circular:
        results["circular"] = circular
    mme = mme_scores(items, predictions) if kind == "yes_no" else None
    if mme:
        results["mme"] = mme
    results["predictions"] = predictions
    return results


def format_bench_table(results: dict) -> str:
    rows = [f"{'category':<28} {'n':>6} {'accuracy':>9}"]
    for title, key in (("", "per_category"), ("l2: ", "per_l2_category")):
        for k, t in results.get(key, {}).items():
            rows.append(f"{(title + k)[:28]:<28} {t['n']:>6} {t['accuracy']:>9.3f}")
    rows.append(f"{'overall':<28} {results['num_questions']:>6} {results['accuracy']:>9.3f}")
    if "circular" in results:
        c = results["circular"]
        rows.append(f"{'circular (MMBench)':<28} {c['n']:>6} {c['accuracy']:>9.3f}")
    if "pope" in results:
        rows.append(format_pope(results["pope"]))
    if "mme" in results:
        m = results["mme"]
        rows.append(f"MME score: perception {m['perception']:.2f}  cognition {m['cognition']:.2f}  "
                    f"total {m['total']:.2f}" + (f"  (sub-tasks missing: {', '.join(m['missing'])})"
                                                 if m["missing"] else ""))
    return "\n".join(rows)


def format_pope(m: dict) -> str:
    return (f"yes/no (n={m['n']}): accuracy {m['accuracy']:.3f}  precision {m['precision']:.3f}  "
            f"recall {m['recall']:.3f}  F1 {m['f1']:.3f}  yes-ratio {m['yes_ratio']:.3f}")


def answer_question_file(checkpoint: str, question_file: str, image_folder: str, answers_file: str,
                         batch_size: int = 32, limit: int = 0, max_new_tokens: int = 128,
                         device: str | None = None) -> list[dict]:
    """LLaVA's model_vqa: question lines {question_id, image, text} -> answer lines
    {question_id, prompt, text, answer_id, model_id}, so LLaVA's scoring scripts read them unchanged."""
    questions = []
    with open(question_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{question_file}: line {n} is not JSON: {e}") from None
            if not isinstance(q, dict) or "question_id" not in q or _is_none(q.get("text")):
                raise ValueError(f"{question_file}: line {n}: needs 'question_id' and 'text'")
            item = {}
            if not _is_none(q.get("image")):
                p = os.path.join(image_folder, q["image"])
                if not os.path.isfile(p):
                    raise ValueError(f"{question_file}: line {n} (question_id {q['question_id']}): image {p} not found")
                item["image_path"] = p
            questions.append((q, item))
    if limit:
        questions = questions[:limit]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model, tokenizer, image_processor, template = load_for_eval(checkpoint, device)
    records = [_prompt_record(f"#{i}", q["text"], item) for i, (q, item) in enumerate(questions)]
    outputs = generate_answers(model, tokenizer, image_processor, template, records, batch_size, max_new_tokens,
                               device)
    model_id = os.path.basename(os.path.normpath(checkpoint))
    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": outputs[f"#{i}"],
                "answer_id": short_uuid(), "model_id": model_id, "metadata": {}}
               for i, (q, _) in enumerate(questions)]
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    with open(answers_file, "w") as f:
        for a in answers:
            f.write(json.dumps(a) + "\n")
    return answers


def bench_main(args) -> dict | list:
    """--bench / --question-file: evaluate args.checkpoint on a benchmark file."""
    if args.question_file:
        if not args.answers_file:
            raise SystemExit("--question-file needs --answers-file")
        answers = answer_question_file(args.checkpoint, args.question_file, args.image_folder, args.answers_file,
                                       args.batch_size, args.limit, args.max_new_tokens or 128, args.device)
        print(f"wrote {len(answers)} answers to {args.answers_file}")
        return answers
    results = evaluate_bench(args.checkpoint, args.bench, args.image_folder, args.batch_size, args.limit,
                             args.max_new_tokens or 16, args.device)
    print(format_bench_table(results))
    name = os.path.splitext(os.path.basename(args.bench))[0]
    out = args.out or os.path.join(args.checkpoint, f"eval_{name}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return results


def export_main(args) -> str:
    """--export-llava-hf OUT: the checkpoint (any format load_checkpoint reads) as a llava-hf directory."""
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"{args.checkpoint}: no such checkpoint directory")
    model, tokenizer, image_processor = load_checkpoint(args.checkpoint)
    try:
        out = export_llava_hf(model, tokenizer, image_processor, args.export_llava_hf)
    except ValueError as e:  # where llava-hf would compute something else: the reason, no directory
        raise SystemExit(f"{args.checkpoint}: {e}") from None
    print(f"wrote a LlavaForConditionalGeneration directory to {out} (transformers, vLLM and lmms-eval load it)")
    return out


# which flags each of eval.py's modes reads; any other flag given is refused, never ignored
COMMON_FLAGS = {"checkpoint", "device"}
MODE_FLAGS = {
    "export": {"export_llava_hf"},
    "visualize": {"visualize", "out_png", "seed", "pool_assign"},
    "curves": {"curves", "out_png"},
    "question file": {"question_file", "answers_file", "image_folder", "batch_size", "limit", "max_new_tokens"},
    "bench": {"bench", "image_folder", "out", "batch_size", "limit", "max_new_tokens"},
    "shapes test set": {"test_file", "image_folder", "out", "batch_size", "limit", "max_new_tokens"},
}


def refuse_unused_flags(ap: argparse.ArgumentParser, args):
    """One clear line when a flag given has no effect in the mode the other flags select."""
    mode = next((m for m, key in (("export", "export_llava_hf"), ("visualize", "visualize"), ("curves", "curves"),
                                  ("question file", "question_file"), ("bench", "bench")) if getattr(args, key, None)),
                "shapes test set")
    given = {k for k, v in vars(args).items() if v != ap.get_default(k)}
    unused = sorted(given - MODE_FLAGS[mode] - COMMON_FLAGS)
    if unused:
        ap.error(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: no effect when evaluating the {mode}"
                 if mode == "shapes test set" else
                 f"{', '.join('--' + k.replace('_', '-') for k in unused)}: no effect with --{mode.replace(' ', '-')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default="out/demo/stage2")
    ap.add_argument("--test-file", default="", help="LLaVA-format test records (default: the shapes test set)")
    ap.add_argument("--image-folder", default="")
    ap.add_argument("--out", default="", help="results JSON (default: CHECKPOINT/eval.json)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--device", default=None)
    # pictures (issue 4): --visualize IMAGE (pool matching + reconstruction error), --curves METRICS_JSONL
    ap.add_argument("--visualize", default="", metavar="IMAGE", help="draw pool rows and reconstruction error for IMAGE")
    ap.add_argument("--curves", nargs="+", default=None, metavar="METRICS_JSONL", help="plot training curves")
    ap.add_argument("--out-png", default="", help="PNG path for --visualize / --curves")
    ap.add_argument("--seed", type=int, default=0, help="replacement seed for --visualize")
    ap.add_argument("--pool-assign", choices=("hungarian", "nearest"), default="hungarian",
                    help="--visualize: one-to-one matching of all tokens, or each token's nearest pool row")
    # --- benchmarks: VLMEvalKit TSV files and LLaVA question files (see bench_main) ---
    ap.add_argument("--bench", default="", help="a VLMEvalKit TSV (multiple choice or yes/no): MMStar, MMBench, POPE...")
    ap.add_argument("--question-file", default="", help="LLaVA question JSONL {question_id, image, text}")
    ap.add_argument("--answers-file", default="", help="with --question-file: the LLaVA answers JSONL to write")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: 16 (TSV) / 128 (question file) / 8 (shapes test set)")
    # --- end benchmarks ---
    ap.add_argument("--export-llava-hf", default="", metavar="OUT",
                    help="write CHECKPOINT as a transformers LlavaForConditionalGeneration directory, no evaluation")
    args = ap.parse_args(argv)
    refuse_unused_flags(ap, args)
    if args.export_llava_hf:
        return export_main(args)
    if args.visualize or args.curves:  # pictures (issue 4): write a PNG, no evaluation
        return pictures_main(args)
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"{args.checkpoint}: no such checkpoint directory (run `python train.py` first)")
    if args.bench or args.question_file:  # benchmarks
        return bench_main(args)
    test_file, folder = args.test_file, args.image_folder
    if not test_file:  # the shapes test set beside the demo run that made the checkpoint
        folder = folder or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "shapes")
        test_file = os.path.join(folder, "test.jsonl")
        if not os.path.isfile(test_file):
            raise SystemExit(f"{test_file} not found: give --test-file and --image-folder")
    torch.manual_seed(0)
    results = evaluate(args.checkpoint, test_file, folder, args.batch_size, args.limit,
                       max_new_tokens=args.max_new_tokens or 8, device=args.device)
    print(format_table(results))
    out = args.out or os.path.join(args.checkpoint, "eval.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
