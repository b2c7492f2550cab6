"""
Pictures of what a checkpoint's pool learned, and of its training (matplotlib, drawn without a display):

    python eval.py out/demo/stage2 --visualize out/demo/shapes/images     # the pool as a visual vocabulary
    python eval.py out/demo/stage2 --visualize IMAGE.png                  # one image: replaced, reconstructed
    python scripts/plot_curves.py out/demo                                # out/demo/curves.png

Both pictures of a checkpoint run the training's own stage-1.5 forward (stage15_forward): step 2 picks the
tokens to replace, step 3 matches them one-to-one to pool rows, step 6 reconstructs every token. With
one-to-one matching every patch of one image gets a distinct row, so one image's rows say little; over many
images, the patches each row replaced show what it stands for (draw_vocabulary). pool_history walks a
checkpoint's --init chain to tell whether its pool was ever trained. A way to look at the method, not part
of it: a reader of the method may skip this file.
"""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engineering import records as RC
from engineering.benchmarks import InputError
from victor import IGNORE_INDEX

# -----------------------------------------------------------------------------
# Was the pool ever trained? The checkpoint's config.json, and its --init chain


def _init_dir(checkpoint: str, trained: dict) -> str | None:
    """The directory a stage started from (train_config's init), as given or relative to the run's own root."""
    init = trained.get("init") or ""
    if os.path.isabs(init):
        return init if os.path.isdir(init) else None
    here, out_dir = os.path.abspath(checkpoint), os.path.normpath(trained.get("out_dir") or "")
    roots = [os.getcwd()] + ([here[:-len(out_dir)]] if out_dir != "." and here.endswith(out_dir) else [])
    return next((os.path.join(r, init) for r in roots if init and os.path.isdir(os.path.join(r, init))), None)


def pool_history(checkpoint: str) -> tuple[bool | None, str]:
    """(True, where) when the pool was trained in stage 1.5, at the checkpoint or up its --init chain;
    (False, why) when it never was (stage 1, a stage 2 without stage 1.5: --variant llava, pool_lr 0);
    (None, why) when the chain cannot be followed."""
    path, seen = checkpoint, []
    while True:
        try:
            with open(os.path.join(path, "config.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None, f"{path} has no readable config.json"
        trained = meta.get("train_config") if isinstance(meta, dict) else None
        if not isinstance(trained, dict) or "stage" not in trained:
            return None, f"{path} records no training stage (no train_config)"
        stage, seen = str(trained["stage"]), seen + [f"{path} (stage {trained['stage']})"]
        if stage == "1.5":
            if (meta.get("victor") or {}).get("replace_ratio", 1) == 0 or trained.get("pool_lr") == 0:
                return False, " <- ".join(seen) + ": its stage 1.5 did not train the pool (replace_ratio or pool_lr 0)"
            return True, " <- ".join(seen)
        if stage == "1" or not trained.get("init"):
            return False, " <- ".join(seen) + (": stage 1 never trains the pool" if stage == "1" else
                                               ": stage 2 from the base models")
        init = _init_dir(path, trained)
        if init is None:
            return None, " <- ".join(seen) + f": its --init {trained['init']} is not a local directory here"
        if os.path.abspath(init) in map(os.path.abspath, seen):
            return None, " <- ".join(seen) + ": the --init chain loops"
        path = init


def check_pool_trained(checkpoint: str):
    """InputError (one line) for a checkpoint whose pool never trained; a note where that cannot be told."""
    trained, why = pool_history(checkpoint)
    if trained is False:
        raise InputError(f"{checkpoint}: its pool never trained ({why}), so its rows are the random ones it "
                         f"started with; draw a checkpoint trained in stage 1.5 (or a stage 2 from one)")
    if trained is None:
        print(f"note: cannot tell whether {checkpoint}'s pool trained ({why}); drawing it as it is")


# -----------------------------------------------------------------------------
# The training's stage-1.5 forward, token by token


def seen_images(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """The images as the model sees them (squared, resized: data.preprocess_images), uint8 [I, H, W, 3]."""
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    pixels = pixel_values.detach().float().cpu() * std + mean
    return (pixels.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def stage15_forward(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, generator: torch.Generator) -> dict:
    """One stage-1.5 forward as training does it, on I images behind one prompt (input_ids [1, T]):
    replaced [I, N] bool (step 2), rows [I, N] long, the pool row step 3 gave each replaced token (-1 where
    kept), cosine [I, N] of step 6's prediction to its target (NaN where none: VDEP's first token)."""
    was_training, ratio = model.training, model.cfg.recon_image_ratio
    ids = input_ids.expand(len(pixel_values), -1)
    model.eval()
    try:
        model.cfg.recon_image_ratio = 1.0  # every image reconstructed, also where training takes a share (VDEP)
        out = model(ids, torch.ones_like(ids), labels=torch.full_like(ids, IGNORE_INDEX),  # labels: Croc's mask
                    pixel_values=pixel_values, stage="1.5", generator=generator)
    finally:
        model.train(was_training)
        model.cfg.recon_image_ratio = ratio
    n_img, n_tok = len(pixel_values), model.num_image_tokens
    replaced = torch.zeros(n_img, n_tok, dtype=torch.bool) if out.replaced_mask is None else out.replaced_mask.cpu()
    rows = torch.full((n_img, n_tok), -1, dtype=torch.long)
    if out.pool_indices is not None:  # the matched rows, in the replaced tokens' order (ascending positions)
        rows[replaced] = out.pool_indices.cpu().flatten()
    cosine = torch.full((n_img, n_tok), float("nan"))
    if out.recon_target is not None:  # step 6 at position i reconstructs token i + recon_target_offset
        cosine[:, model.cfg.recon_target_offset:] = F.cosine_similarity(
            out.recon_predicted.float(), out.recon_target.float(), dim=-1).cpu()
    return {"replaced": replaced.numpy(), "rows": rows.numpy(), "cosine": cosine.numpy()}


def patch_grid(num_tokens: int) -> int:
    grid = int(round(num_tokens ** 0.5))
    if grid * grid != num_tokens:
        raise InputError(f"{num_tokens} visual tokens are not a square grid of patches: no patch to draw them on")
    return grid


def pool_vocabulary(model, input_ids: torch.Tensor, pixel_batches, image_processor, seed: int = 0) -> dict:
    """Over images (pixel_batches: [b, 3, H, W] tensors), which patches each pool row replaced in the
    training's forward: uses [P] (how often each row was matched), row_cosine [P] (the mean reconstruction
    cosine of the tokens it replaced; NaN where unused or not reconstructed), examples {row: [(image, patch),
    ...]} in image order, images (as seen), and the forward's replaced/rows per image."""
    if not model.replaces_tokens:
        raise InputError("this model replaces no visual tokens in stage 1.5 (VDEP, or replace_ratio 0): its pool "
                         "is never used; give one image to see its reconstruction")
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    seen, rows, replaced, cosine = [], [], [], []
    for pixel_values in pixel_batches:
        out = stage15_forward(model, input_ids, pixel_values, generator)
        seen.append(seen_images(pixel_values, image_processor))
        rows.append(out["rows"])
        replaced.append(out["replaced"])
        cosine.append(out["cosine"])
    rows, replaced, cosine = np.concatenate(rows), np.concatenate(replaced), np.concatenate(cosine)
    n_rows = model.token_pool.shape[0]
    uses = np.bincount(rows[replaced], minlength=n_rows)
    with np.errstate(invalid="ignore", divide="ignore"):  # the mean cosine of the tokens each row replaced
        ok = replaced & np.isfinite(cosine)
        row_cosine = np.bincount(rows[ok], weights=cosine[ok], minlength=n_rows) / np.bincount(rows[ok],
                                                                                               minlength=n_rows)
    examples: dict[int, list[tuple[int, int]]] = {}
    for image, patch in zip(*np.nonzero(replaced)):
        examples.setdefault(int(rows[image, patch]), []).append((int(image), int(patch)))
    return {"uses": uses, "row_cosine": row_cosine, "examples": examples, "images": np.concatenate(seen),
            "rows": rows, "replaced": replaced}


# -----------------------------------------------------------------------------
# Drawing

VOCABULARY_SIZE = (1000, 1150)  # pixels of draw_vocabulary's picture
TOKENS_SIZE = (1100, 560)  # ... and of draw_tokens'
CURVES_PANEL = (520, 420)  # ... and of each stage's panel in draw_curves


def _figure(width: int, height: int):
    """A matplotlib figure of width x height pixels, drawn without a display (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _picture(fig, out_png: str | None) -> Image.Image:
    """The figure as an RGB PIL image, written to out_png if given."""
    fig.canvas.draw()
    picture = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    if out_png:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        picture.save(out_png)
    return picture


def patch_crop(image: np.ndarray, patch: int, grid: int) -> np.ndarray:
    """The pixels of one patch (row-major index) of an image [H, W, 3]."""
    i, j = divmod(patch, grid)
    ys, xs = np.linspace(0, image.shape[0], grid + 1).round().astype(int), np.linspace(
        0, image.shape[1], grid + 1).round().astype(int)
    return image[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]


def draw_vocabulary(vocab: dict, title: str, out_png: str | None = None, rows_shown: int = 16,
                    per_row: int = 8) -> Image.Image:
    """The pool as a visual vocabulary: the rows_shown most-used rows, each with per_row of the patches it
    replaced (the first in image order: a fair sample, not the best matches), its use count and mean
    reconstruction cosine (most used first; among equals, the worst reconstructed first); above, every
    row's use count, most used first. A VOCABULARY_SIZE PIL image, written to out_png if given."""
    uses, examples, images = vocab["uses"], vocab["examples"], vocab["images"]
    grid = patch_grid(vocab["rows"].shape[1])
    cos = np.nan_to_num(vocab["row_cosine"], nan=2.0)  # most used first; among equals, the worst reconstructed
    top = [int(r) for r in np.lexsort((cos, -uses))[:rows_shown] if uses[r] > 0]
    side = 48  # each crop shown at side x side pixels
    sheet = np.full((len(top) * (side + 6), per_row * (side + 6), 3), 255, dtype=np.uint8)
    for k, row in enumerate(top):
        for m, (image, patch) in enumerate(examples[row][:per_row]):
            crop = Image.fromarray(patch_crop(images[image], patch, grid)).resize((side, side), Image.NEAREST)
            sheet[k * (side + 6) + 3:k * (side + 6) + 3 + side, m * (side + 6) + 3:m * (side + 6) + 3 + side] = crop
    width, height = VOCABULARY_SIZE
    fig = _figure(width, height)
    used, total = int((uses > 0).sum()), int(uses.sum())
    fig.suptitle(textwrap.fill(title, 120), fontsize=11, y=0.995, va="top")
    bars = fig.add_axes((0.09, 0.80, 0.86, 0.12))
    bars.bar(np.arange(len(uses)), np.sort(uses)[::-1], width=1.0, color="C0")
    bars.set(xlim=(-0.5, len(uses) - 0.5), xlabel="pool rows, most used first", ylabel="times matched")
    every = sum(len({image for image, _ in patches}) == len(images) for patches in examples.values())
    bars.set_title(f"{used} of {len(uses)} rows used over {len(images)} images ({total} replaced tokens, "
                   f"{total / max(1, len(uses)):.1f} per row if spread evenly)" +
                   (f"; {every} rows were used by every image" if every else ""), fontsize=10)
    sheet_ax = fig.add_axes((0.2, 0.02, 0.6, 0.68))
    sheet_ax.imshow(sheet, interpolation="nearest")
    sheet_ax.set_xticks([])
    sheet_ax.set_yticks([k * (side + 6) + side / 2 + 3 for k in range(len(top))],
                        [f"row {r}: {uses[r]}x" + (f", cos {vocab['row_cosine'][r]:.2f}" if np.isfinite(
                            vocab["row_cosine"][r]) else "") for r in top], fontsize=9)
    share = uses[top].sum() / max(1, total)
    sheet_ax.set_title(f"the {len(top)} most-used rows ({share:.0%} of the replacements), "
                       f"{per_row} of the patches each replaced\n(among rows used equally often, the worst "
                       f"reconstructed first; cos: the mean cosine of step 6 on the tokens it replaced)", fontsize=10)
    for spine in sheet_ax.spines.values():
        spine.set_visible(False)
    return _picture(fig, out_png)


def draw_tokens(image: np.ndarray, replaced: np.ndarray, rows: np.ndarray, cosine: np.ndarray, title: str,
                out_png: str | None = None) -> Image.Image:
    """One image as the model sees it: left, the tokens step 2 replaced (outlined, with the pool row step 3 gave
    each); right, how well step 6 reconstructed each token (cosine of prediction to target, a translucent colour
    over the image, with a colour bar). replaced, rows, cosine: N values in patch order. A TOKENS_SIZE image."""
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke
    grid = patch_grid(len(replaced))
    width, height = TOKENS_SIZE
    fig = _figure(width, height)
    fig.suptitle(textwrap.fill(title, 130), fontsize=11, y=0.99, va="top")
    left, right = fig.add_axes((0.02, 0.07, 0.42, 0.78)), fig.add_axes((0.47, 0.07, 0.42, 0.78))
    extent = (0, grid, grid, 0)  # one unit per patch
    for ax in (left, right):
        ax.imshow(image, extent=extent, interpolation="nearest")
        ax.set(xticks=[], yticks=[], xlim=(0, grid), ylim=(grid, 0))
    cos = np.where(np.isfinite(cosine), cosine, np.nan).reshape(grid, grid)
    heat = right.imshow(cos, extent=extent, cmap="RdYlGn", vmin=min(0.0, float(np.nanmin(cos))) if
                        np.isfinite(cos).any() else 0.0, vmax=1.0, alpha=0.55, interpolation="nearest")
    outline = [withStroke(linewidth=2, foreground="black")]
    for patch in np.flatnonzero(replaced):
        i, j = divmod(int(patch), grid)
        for ax in (left, right):
            ax.add_patch(Rectangle((j + 0.06, i + 0.06), 0.88, 0.88, fill=False, edgecolor="white", linewidth=1.6))
        if grid <= 12:
            left.text(j + 0.5, i + 0.5, str(rows[patch]), ha="center", va="center", color="white",
                      fontsize=9, path_effects=outline)
    n_rep, n = int(replaced.sum()), len(replaced)
    left.set_title(f"replaced tokens (outlined, {n_rep} of {n}) and the pool row each got", fontsize=10)
    mean_rep, mean_kept = (np.nanmean(cosine[m]) if np.isfinite(cosine[m]).any() else float("nan")
                           for m in (replaced, ~replaced))
    right.set_title("reconstruction: cosine of step 6's prediction to its target", fontsize=10)
    right.set_xlabel(f"mean cosine: replaced {mean_rep:.3f}, kept {mean_kept:.3f}" if np.isfinite(cos).any()
                     else "this model does not reconstruct (recon_weight 0)", fontsize=10)
    fig.colorbar(heat, cax=fig.add_axes((0.91, 0.07, 0.02, 0.78)), label="cosine")
    return _picture(fig, out_png)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_paths(path: str, limit: int) -> list[str]:
    """--visualize PATH: one image, or the first `limit` images of a folder (sorted by name)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"--visualize {path}: no such image or folder")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise InputError(f"--visualize {path}: no {'/'.join(IMAGE_SUFFIXES)} image in the folder")
    return [os.path.join(path, n) for n in names[:limit]]


def draw_checkpoint(model, prompt_ids: list[int], paths: list[str], load_pixels, image_processor, seed: int,
                    out_png: str, name: str, vocabulary: bool, batch: int = 16) -> Image.Image:
    """eval.py --visualize: the training's stage-1.5 forward behind stage 1.5's prompt (prompt_ids), on the
    images at paths (load_pixels: paths -> pixel_values, as training prepares them). vocabulary: the pool as a
    visual vocabulary over all of them (draw_vocabulary); else the first image's tokens (draw_tokens)."""
    input_ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    pixels = (load_pixels(paths[k:k + batch]).to(input_ids.device) for k in range(0, len(paths), batch))
    where = os.path.dirname(paths[0]) if vocabulary else os.path.basename(paths[0])
    if vocabulary:
        vocab = pool_vocabulary(model, input_ids, pixels, image_processor, seed)
        return draw_vocabulary(vocab, f"{name}: the pool as a visual vocabulary, steps 2 and 3 as in training "
                               f"(seed {seed}), over the first {len(paths)} images of {where}", out_png)
    pixel_values = next(pixels)
    out = stage15_forward(model, input_ids, pixel_values, torch.Generator(input_ids.device).manual_seed(seed))
    return draw_tokens(seen_images(pixel_values, image_processor)[0], out["replaced"][0], out["rows"][0],
                       out["cosine"][0], f"{name}: {where}, a stage-1.5 forward as in training (seed {seed})", out_png)


# -----------------------------------------------------------------------------
# Training curves (scripts/plot_curves.py): one panel per stage, each on its own step axis

CURVE_METRICS = (("loss", "loss", "C0"), ("lm_loss", "LM loss", "C1"), ("recon_loss", "reconstruction loss", "C2"))


def metrics_files(path: str) -> list[str]:
    """A metrics.jsonl, a stage's directory (its metrics.jsonl) or a run's (each stage*/metrics.jsonl)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return [os.path.join(path, "metrics.jsonl")]
    found = sorted(os.path.join(path, d, "metrics.jsonl") for d in (os.listdir(path) if os.path.isdir(path) else [])
                   if os.path.isfile(os.path.join(path, d, "metrics.jsonl")))
    if not found:
        raise InputError(f"{path}: " + ("no metrics.jsonl in it nor in its stage directories; give a run's "
                         "out-dir, a stage's, or a metrics.jsonl" if os.path.isdir(path) else "no such file or "
                         "directory; give a run's out-dir, a stage's, or a metrics.jsonl"))
    return found


def read_curves(paths: list[str]) -> dict[str, dict[str, list[dict]]]:
    """metrics.jsonl files -> {stage: {run label: rows with a "step"}}. InputError naming a file that is not
    JSON lines or has no such rows."""
    stages: dict[str, dict[str, list[dict]]] = {}
    for path in paths:
        try:
            rows = [r for r in RC.read_jsonl(path) if isinstance(r, dict) and "step" in r]  # not {"done": true}
        except ValueError as e:
            raise InputError(str(e)) from None
        if not rows:
            raise InputError(f"{path}: no rows with a 'step' key (expected a metrics.jsonl written by train.py)")
        stage_dir = os.path.dirname(os.path.abspath(path))
        label = os.path.basename(os.path.dirname(stage_dir)) or stage_dir
        for row in rows:
            stage = str(row.get("stage", os.path.basename(stage_dir)))
            stages.setdefault(stage, {}).setdefault(label, []).append(row)
    return dict(sorted(stages.items()))


def curve_lines(stages: dict[str, dict[str, list[dict]]]) -> dict[str, list[tuple[str, str, list]]]:
    """What draw_curves draws: {stage: [(run label, metric, [(step, value)])]}, a metric left out where it is
    absent or 0 throughout (stage 1 and 2 have no reconstruction), and the loss where it is the LM loss."""
    lines = {}
    for stage, runs in stages.items():
        lines[stage] = []
        for label, rows in runs.items():
            for key, _, _ in CURVE_METRICS + (("lr", "", ""),):
                points = sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
                same_as_lm = key == "loss" and all(r.get("loss") == r.get("lm_loss") for r in rows)
                if points and any(v != 0 for _, v in points) and not same_as_lm:  # loss = LM loss: drawn once
                    lines[stage].append((label, key, points))
    return lines


def draw_curves(stages: dict[str, dict[str, list[dict]]], title: str, out_png: str | None = None) -> Image.Image:
    """One panel per stage, each against its own steps: the losses (left axis), the learning rate (dotted,
    right axis); one line style per run. A PIL image CURVES_PANEL wide per stage, written to out_png if given."""
    lines = curve_lines(stages)
    fig = _figure(CURVES_PANEL[0] * len(lines), CURVES_PANEL[1])
    labels = list(dict.fromkeys(label for runs in stages.values() for label in runs))
    styles, names = ("-", "--", "-.", ":"), {k: (name, colour) for k, name, colour in CURVE_METRICS}
    for ax, (stage, stage_lines) in zip(np.atleast_1d(fig.subplots(1, len(lines))), lines.items()):
        lr_ax = ax.twinx()
        for label, key, points in stage_lines:
            run = f" ({label})" if len(labels) > 1 else ""
            style = styles[labels.index(label) % len(styles)]
            if key == "lr":
                lr_ax.plot(*zip(*points), color="grey", linestyle=":", linewidth=1.2, label=f"learning rate{run}")
            else:
                ax.plot(*zip(*points), color=names[key][1], linestyle=style, marker=".", markersize=3,
                        linewidth=1.5, label=names[key][0] + run)
        ax.set(title=f"stage {stage}", xlabel="step (this stage's)", ylabel="loss")
        lr_ax.set_ylim(bottom=0)
        lr_ax.set_ylabel("learning rate", color="grey")
        lr_ax.tick_params(axis="y", colors="grey", labelsize=8)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right", frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _picture(fig, out_png)
