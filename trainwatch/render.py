"""Matplotlib figures rendered to RGB arrays: the activation-histogram evolution image.

Runs on the sink's thread or in post-training jobs; it reads NumPy arrays, never the live model.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from trainwatch.ops import FILMSTRIP_SNAPSHOTS as MAX_SNAPSHOTS
from trainwatch.ops import MAX_PANELS as MAX_PANELS  # the layout the publisher trims its histories to
from trainwatch.ops import shown_modules


def figure_to_rgb(fig: plt.Figure) -> np.ndarray:
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def histogram_evolution(steps: Sequence[int], counts: np.ndarray, names: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """One heatmap per module (bins × steps, colour = log10 count), at most MAX_PANELS evenly chosen modules.

    `counts` is [S, M, B] with the signed log-magnitude bins of `probes.activations.histogram_counts`.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_modules = counts.shape[1]
    chosen = shown_modules(n_modules)
    finite_bins = len(labels) - 3  # the last three slots are NaN, +Inf, -Inf
    cols = min(3, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False, dpi=100)
    for ax in axes.flat[len(chosen) :]:
        ax.axis("off")
    extent = (steps[0] - 0.5, steps[-1] + 0.5, -0.5, finite_bins - 0.5)
    for ax, m in zip(axes.flat, chosen, strict=False):
        grid = np.log10(1 + counts[:, m, :finite_bins].T)
        ax.imshow(grid, aspect="auto", origin="lower", cmap="inferno", extent=extent, interpolation="nearest")
        nonfinite = counts[:, m, finite_bins:].sum()
        ax.set_title(f"{names[m]}" + (f"  ({int(nonfinite)} non-finite)" if nonfinite else ""), fontsize=8)
        ticks = [0, finite_bins // 4, finite_bins // 2, 3 * finite_bins // 4, finite_bins - 1]
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(f"activation histograms (log10 count), steps {steps[0]}–{steps[-1]}", fontsize=9)
    fig.tight_layout()
    return figure_to_rgb(fig)


TILE = 128  # pixels per tile: the MLflow UI shows small thumbnails, so never smaller


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [H, W] or [H, W, 3] to size × size (align_corners=False sampling)."""
    h, w = img.shape[:2]
    ys = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    xs = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    if img.ndim == 3:
        fy, fx = fy[..., None], fx[..., None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def _rgb(x: np.ndarray) -> np.ndarray:
    """[C, H, W] (or a series [C, L], drawn as a strip) → RGB [H, W, 3] in [0, 1], min-max scaled."""
    img = x[:1] if x.shape[0] != 3 else x
    img = img[:, None, :] if img.ndim == 2 else img
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return np.repeat(img, 3, 0).transpose(1, 2, 0) if img.shape[0] == 1 else img.transpose(1, 2, 0)


def cam_filmstrip(
    method: str, inputs: np.ndarray, targets: np.ndarray, snapshots: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Probes as rows: the input, then the CAM of the last MAX_SNAPSHOTS snapshots blended over it (inferno),
    titled with step, predicted class, confidence and ✓/✗. Tiles are composed in NumPy, so the figure has
    one image and costs tens of milliseconds, not one axes per tile.

    `snapshots` holds (step, maps [K, *S] in [0, 1], predicted [K], confidence [K]).
    """
    shown = list(snapshots)[-MAX_SNAPSHOTS:]
    rows, cols = len(inputs), 1 + len(shown)
    lut = plt.get_cmap("inferno")
    pad = 18  # room for each tile's title
    mosaic = np.ones((rows * (TILE + pad), cols * TILE + (cols - 1) * 4, 3))
    labels: list[tuple[float, float, str]] = []
    for r in range(rows):
        base = _resize(_rgb(inputs[r]), TILE)
        y = r * (TILE + pad) + pad
        tiles = [(base, f"label {int(targets[r])}")]
        for step, maps, predicted, confidence in shown:
            heat = lut(_resize(np.atleast_2d(maps[r]), TILE))[..., :3]
            mark = "ok" if int(predicted[r]) == int(targets[r]) else "x"
            tiles.append((0.45 * base + 0.55 * heat, f"step {step}: {int(predicted[r])} {confidence[r]:.2f} {mark}"))
        for c, (tile, title) in enumerate(tiles):
            x = c * (TILE + 4)
            mosaic[y : y + TILE, x : x + TILE] = tile
            labels.append((x + TILE / 2, y - 4, title))
    return _with_text(mosaic, labels, f"{method}: where the model looks (true class); probes x snapshots")


def _with_text(mosaic: np.ndarray, labels: Sequence[tuple[float, float, str]], title: str) -> np.ndarray:
    """Titles drawn with Pillow (bundled with matplotlib): one raster, no figure layout to compute."""
    from PIL import Image, ImageDraw

    head = 22
    canvas = Image.new("RGB", (mosaic.shape[1], mosaic.shape[0] + head), "white")
    canvas.paste(Image.fromarray((np.clip(mosaic, 0, 1) * 255).astype(np.uint8)), (0, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((mosaic.shape[1] / 2, head / 2), title, fill="black", anchor="mm")
    for x, y, text in labels:
        draw.text((x, y + head), text, fill="black", anchor="ms")
    return np.asarray(canvas)


def cam_tiles(inputs: np.ndarray, maps: np.ndarray | None, size: int = TILE) -> list[np.ndarray]:
    """One uint8 RGB tile per probe: the input, or (with `maps` [K, *S] in [0, 1]) the CAM blended over it."""
    lut = plt.get_cmap("inferno")
    tiles = []
    for k in range(len(inputs)):
        tile = _resize(_rgb(inputs[k]), size)
        if maps is not None:
            tile = 0.45 * tile + 0.55 * lut(_resize(np.atleast_2d(maps[k]), size))[..., :3]
        tiles.append((np.clip(tile, 0, 1) * 255).astype(np.uint8))
    return tiles
