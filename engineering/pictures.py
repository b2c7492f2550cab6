"""
Pictures of a checkpoint and of its training (matplotlib, drawn without a display):

    python eval.py out/demo/stage1.5 --visualize IMAGE.png   # pool row per patch + reconstruction error
    python eval.py --curves out/demo/stage1.5/metrics.jsonl out/demo/stage2/metrics.jsonl  # training curves

pool_rows_and_errors and draw_pool_picture (eval.visualize_pool puts them together): for one image, the pool
row step 3's matching gives each visual token, beside each token's reconstruction error in a stage-1.5
forward.
read_curves and draw_curves: the losses and learning rate in train.py's metrics.jsonl files against the
step. A way to look at the method, not part of it: a reader of the method may skip this file.
"""
from __future__ import annotations

import colorsys
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engineering import records as RC
from victor import IGNORE_INDEX, match_tokens_to_pool

# -----------------------------------------------------------------------------
# The pool row step 3 matches to each patch, beside its reconstruction error (--visualize)

GOLDEN = 0.6180339887498949


def pool_colour(row: int) -> tuple[int, int, int]:
    """A deterministic colour per pool row: golden-ratio hue steps, so nearby rows differ."""
    r, g, b = colorsys.hsv_to_rgb((int(row) * GOLDEN) % 1.0, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def pool_picture_layout(grid: int, panel: int = 384) -> dict:
    """Geometry of draw_pool_picture's output in pixels: size, the two panels' top-left corners, cell side."""
    cell = max(1, panel // grid)
    side = cell * grid
    pad, gap, top, bottom, legend = 20, 40, 64, 56, 90
    return {"size": (pad + 2 * side + gap + legend + pad, top + side + bottom), "left": (pad, top),
            "right": (pad + side + gap, top), "cell": cell, "side": side}


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


def draw_pool_picture(image, pool_indices, errors, replaced, panel: int = 384, title: str = "",
                      error_name: str = "SmoothL1") -> Image.Image:
    """The picture, from arrays alone. image: a PIL image (shown square, as the model sees it);
    pool_indices, errors, replaced: grid*grid values in row-major patch order (the pool row matched to
    each patch, its reconstruction error, whether the forward that gave the errors replaced it).
    Returns an RGB PIL image of size pool_picture_layout(grid, panel)["size"]."""
    from matplotlib.patheffects import withStroke
    rows = np.asarray(pool_indices).reshape(-1).astype(int)
    errs = np.asarray(errors, dtype=np.float64).reshape(-1)
    rep = np.asarray(replaced).reshape(-1).astype(bool)
    n, grid = len(rows), int(round(len(rows) ** 0.5))
    if grid * grid != n or len(errs) != n or len(rep) != n:
        raise ValueError(f"pool_indices, errors and replaced must each hold grid*grid values; "
                         f"got {len(rows)}, {len(errs)}, {len(rep)}")
    lay = pool_picture_layout(grid, panel)
    (width, height), cell, side = lay["size"], lay["cell"], lay["side"]
    fig = _figure(width, height)

    def axes(x, y, w):  # a box in pixels from the top left, as matplotlib's figure fractions
        ax = fig.add_axes((x / width, 1 - (y + side) / height, w / width, side / height))
        ax.set(xticks=[], yticks=[])
        return ax

    # left: the image, each patch half its pool row's colour, with the row's number
    base = np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float64)
    tint = np.array([pool_colour(r) for r in rows], dtype=np.float64).reshape(grid, grid, 3)
    left = axes(*lay["left"], side)
    left.imshow(((base + tint.repeat(cell, 0).repeat(cell, 1)) / 2).astype(np.uint8), interpolation="nearest")
    left.set_title(f"pool row matched to each patch ({n} tokens)", fontsize=11)
    left.set_xlabel(f"same colour = same pool row; {len(set(rows.tolist()))} distinct rows", fontsize=10)
    # right: each patch's reconstruction error; a dot marks a token replaced by its pool row
    right = axes(*lay["right"], side)
    heat = right.imshow(errs.reshape(grid, grid), cmap="viridis", interpolation="nearest")
    i, j = np.divmod(np.flatnonzero(rep), grid)
    right.scatter(j - 0.3, i - 0.3, s=30, c="white", edgecolors="black", linewidths=0.8)
    right.set_title(f"reconstruction error per patch ({error_name})", fontsize=11)
    right.set_xlabel(f"dot = replaced by its pool row ({int(rep.sum())} of {n}); mean {errs.mean():.3g}", fontsize=10)
    x1, y1 = lay["right"]
    fig.colorbar(heat, cax=axes(x1 + side + 14, y1, 18))
    outline = [withStroke(linewidth=2, foreground="black")]
    for k in range(n):  # the numbers, where the cells are large enough to hold them
        i, j = divmod(k, grid)
        if cell >= 18:
            left.text((j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5, str(rows[k]), ha="center", va="center",
                      color="white", fontsize=min(14, cell // 5), path_effects=outline)
        if cell >= 44:
            right.text(j, i, f"{errs[k]:.3g}", ha="center", va="center", color="white",
                       fontsize=min(10, cell // 6), path_effects=outline)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 8 / height, va="top")
    return _picture(fig, None)


def token_errors(out, beta: float) -> torch.Tensor:
    """Step 6's loss token by token, [images reconstructed, N - offset], from a forward's output."""
    return F.smooth_l1_loss(out.recon_predicted.float(), out.recon_target.detach().float(), beta=beta,
                            reduction="none").mean(-1)


@torch.no_grad()
def pool_rows_and_errors(model, input_ids, pixel_values, seed: int = 0, assignment: str = "hungarian"):
    """For one image: (the pool row matched to each of its N visual tokens, each token's reconstruction
    error in a stage-1.5 forward, which tokens that forward replaced, the assignment used), arrays of N."""
    was_training, ratio = model.training, model.cfg.recon_image_ratio
    model.eval()
    try:
        _, _, visual = model.embed_inputs(input_ids, pixel_values)
        n = visual.shape[1]
        if model.token_pool.shape[0] < n:  # too few rows to give every token its own: each its nearest
            assignment = "nearest"
        rows = match_tokens_to_pool(visual.float(), model.token_pool, assignment)[0]
        # every token's error, also where training reconstructs only a share of the images (VDEP); the
        # labels (none supervised) give Croc's mixed attention its prefix, as in training
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        model.cfg.recon_image_ratio, ratio = 1.0, model.cfg.recon_image_ratio
        out = model(input_ids, torch.ones_like(input_ids), labels=torch.full_like(input_ids, IGNORE_INDEX),
                    pixel_values=pixel_values, stage="1.5", generator=generator)
    finally:
        model.train(was_training)
        model.cfg.recon_image_ratio = ratio
    errors = torch.zeros(n)
    if out.recon_target is not None:  # shown at the token reconstructed (recon_target_offset: VDEP's next token)
        errors[model.cfg.recon_target_offset:] = token_errors(out, model.cfg.recon_beta)[0].cpu()
    replaced = out.replaced_mask[0] if out.replaced_mask is not None else torch.zeros(n, dtype=torch.bool)
    return rows.cpu().numpy(), errors.numpy(), replaced.cpu().numpy(), assignment


# -----------------------------------------------------------------------------
# Training curves (--curves)

CURVE_METRICS = (("loss", "loss"), ("lm_loss", "LM loss"), ("recon_loss", "reconstruction loss"),
                 ("lr", "learning rate"))


def read_curves(paths: list[str]) -> dict[str, list[dict]]:
    """metrics.jsonl files -> {series label: rows with a "step"}, one series per (file, stage).
    ValueError naming the file when one is not JSON or has no such rows."""
    series: dict[str, list[dict]] = {}
    for path in paths:
        rows = [r for r in RC.read_jsonl(path) if isinstance(r, dict) and "step" in r]  # not e.g. {"done": true}
        if not rows:
            raise ValueError(f"{path}: no rows with a 'step' key (expected a metrics.jsonl written by train.py)")
        for row in rows:
            label = os.path.basename(os.path.dirname(os.path.abspath(path))) if len(paths) > 1 else ""
            if "stage" in row and str(row["stage"]) not in label:
                label = f"{label} stage {row['stage']}".strip()
            series.setdefault(label or os.path.basename(path), []).append(row)
    return series


def draw_curves(series: dict[str, list[dict]], title: str, out_png: str | None = None) -> Image.Image:
    """Four panels (loss, LM loss, reconstruction loss, learning rate) against the step, one line per
    series, with a legend: a 1040x706 PIL image, written to out_png if given."""
    fig = _figure(1040, 706)
    lines = {}
    for ax, (key, name) in zip(fig.subplots(2, 2).flat, CURVE_METRICS):
        for k, (label, rows) in enumerate(series.items()):  # a series keeps its colour in every panel
            points = sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
            if points:
                lines[label] = ax.plot(*zip(*points), color=f"C{k}", marker=".", markersize=4, linewidth=1.5)[0]
        if not ax.lines:
            ax.text(0.5, 0.5, f"no '{key}' values", transform=ax.transAxes, ha="center", color="grey")
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.legend(lines.values(), lines.keys(), loc="lower center", ncol=max(1, len(lines)), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))  # room for the legend below and the title above
    return _picture(fig, out_png)
