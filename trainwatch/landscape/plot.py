"""Render loss landscapes (1-D curves, 2-D contours, 3-D surfaces) from NumPy grids to PNG bytes or an HTML page.

The interactive surface uses plotly because it writes one self-contained HTML page that opens offline inside the MLflow UI artifact viewer.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import plotly.graph_objects as go
from matplotlib.colorbar import Colorbar
from matplotlib.colors import BoundaryNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FIGSIZE = (6.0, 4.5)
DPI = 110
CMAP = "viridis"
LOG_SPAN = 100.0  # max/min above which losses are drawn on a log10 scale
N_LEVELS = 20
ALPHA_LABEL = "α (direction 1)"
BETA_LABEL = "β (direction 2)"
LOSS_COLOUR = "#3b0f70"  # dark end of the perceptually uniform maps
ACCURACY_COLOUR = "#21918c"  # viridis mid-green
TRAJECTORY_COLOUR = "#ff2020"  # red is absent from viridis, so the path stands out on any band


@dataclass(frozen=True)
class Scaled:
    """Losses ready to colour: non-finite values are NaN, `log` says whether `values` holds log10 of the loss."""

    values: np.ndarray
    log: bool
    n_bad: int

    @property
    def label(self) -> str:
        return "log₁₀ loss" if self.log else "loss"

    @property
    def finite(self) -> np.ndarray:
        return self.values[np.isfinite(self.values)]


# ---------------------------------------------------------------- validation


def _axis(name: str, values: np.ndarray) -> np.ndarray:
    """A 1-D, finite, strictly increasing coordinate axis with at least two points."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 coordinates; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if not np.all(np.diff(arr) > 0):
        raise ValueError(f"{name} must be strictly increasing")
    return arr


def _grid(name: str, values: np.ndarray, shape: tuple[int, ...], expected: str) -> np.ndarray:
    """`values` as float64, or a ValueError naming the expected shape (and a hint when it is the transpose)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != shape:
        hint = " (transposed? loss[i, j] is at alphas[i], betas[j])" if arr.shape == shape[::-1] else ""
        raise ValueError(f"{name} must have shape {expected} = {shape}; got {arr.shape}{hint}")
    return arr


def _trajectory(points: np.ndarray) -> np.ndarray:
    """A [T, 2] path in (α, β), without its non-finite rows."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
        raise ValueError(f"trajectory must have shape (T, 2) with T >= 1 (α, β per point); got {arr.shape}")
    return arr[np.all(np.isfinite(arr), axis=1)]


# ---------------------------------------------------------------- scaling


def _scale(loss: np.ndarray) -> Scaled:
    """Mask non-finite losses and switch to log10 when the finite losses are positive and span more than LOG_SPAN."""
    ok = np.isfinite(loss)
    values = np.where(ok, loss, np.nan)
    finite = values[ok]
    log = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > LOG_SPAN
    if log:
        values = np.log10(values)
    return Scaled(values=values, log=bool(log), n_bad=int((~ok).sum()))


def _levels(finite: np.ndarray) -> tuple[np.ndarray, Normalize | None]:
    """Contour levels: linear, or quantiles (with a norm that gives every band its own colour) when most points sit in the bottom band."""
    lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        pad = abs(lo) * 0.01 or 0.5
        return np.array([lo - pad, lo + pad]), None
    if np.median(finite) < lo + (hi - lo) / N_LEVELS:
        quantiles = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, N_LEVELS + 1)))
        if quantiles.size >= 4:
            return quantiles, BoundaryNorm(quantiles, plt.get_cmap(CMAP).N)
    return np.linspace(lo, hi, N_LEVELS + 1), None


def _titled(title: str, n_bad: int, n_total: int) -> str:
    """The title, with a second line counting the masked points when there are any."""
    if not n_bad:
        return title
    note = f"{n_bad} of {n_total} points non-finite (masked)"
    return f"{title}\n{note}" if title else note


# ---------------------------------------------------------------- figures


@contextmanager
def _figure() -> Iterator[Figure]:
    """A pyplot figure of the standard size, closed whatever happens."""
    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    try:
        yield fig
    finally:
        plt.close(fig)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _no_data(ax: plt.Axes) -> None:
    text = getattr(ax, "text2D", ax.text)  # 3-D axes place axes-fraction text with text2D
    text(0.5, 0.5, "no finite loss values", ha="center", va="center", transform=ax.transAxes)


# ---------------------------------------------------------------- 1-D


def _accuracy_axis(ax: plt.Axes, alphas: np.ndarray, accuracy: np.ndarray) -> None:
    """Accuracy as a dashed line on a twin y-axis, its label and ticks in the line's colour."""
    twin = ax.twinx()
    twin.plot(alphas, np.where(np.isfinite(accuracy), accuracy, np.nan), color=ACCURACY_COLOUR, lw=1.6, ls="--", label="accuracy")
    twin.set_ylabel("accuracy", color=ACCURACY_COLOUR)
    twin.tick_params(axis="y", colors=ACCURACY_COLOUR)


def curve_png(alphas: np.ndarray, loss: np.ndarray, accuracy: np.ndarray | None = None, title: str = "") -> bytes:
    """Loss against α along one direction, the trained model (α = 0) marked; accuracy on a twin axis when given."""
    alphas = _axis("alphas", alphas)
    loss = _grid("loss", loss, alphas.shape, "(len(alphas),)")
    acc = None if accuracy is None else _grid("accuracy", accuracy, alphas.shape, "(len(alphas),)")
    ok = np.isfinite(loss)
    shown = np.where(ok, loss, np.nan)
    with _figure() as fig:
        ax = fig.add_subplot()
        ax.plot(alphas, shown, color=LOSS_COLOUR, lw=1.8, marker="o", ms=3, label="loss")
        ax.axvline(0.0, color="0.5", lw=0.8, ls=":")
        if ok.any():
            _mark_centre_1d(ax, alphas, shown)
            finite = shown[ok]
            if finite.min() > 0 and finite.max() / finite.min() > LOG_SPAN:
                ax.set_yscale("log")
        else:
            _no_data(ax)
        if acc is not None:
            _accuracy_axis(ax, alphas, acc)
        ax.set_xlabel(ALPHA_LABEL)
        ax.set_ylabel("loss", color=LOSS_COLOUR)
        ax.tick_params(axis="y", colors=LOSS_COLOUR)
        ax.set_title(_titled(title, int((~ok).sum()), loss.size), fontsize=10)
        fig.tight_layout()
        return _png(fig)


def _mark_centre_1d(ax: plt.Axes, alphas: np.ndarray, loss: np.ndarray) -> None:
    """A star on the curve at the grid point nearest α = 0, when its loss is finite."""
    i = int(np.argmin(np.abs(alphas)))
    if np.isfinite(loss[i]):
        ax.plot(alphas[i], loss[i], marker="*", ms=14, color="white", mec="black", zorder=5)


# ---------------------------------------------------------------- 2-D


def _checked_2d(alphas: np.ndarray, betas: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = _axis("alphas", alphas)
    b = _axis("betas", betas)
    return a, b, _grid("loss", loss, (a.size, b.size), "(len(alphas), len(betas))")


def _draw_contours(fig: Figure, ax: plt.Axes, alphas: np.ndarray, betas: np.ndarray, scaled: Scaled) -> None:
    """Filled bands, thin level lines and a colorbar; x is α, y is β."""
    z = np.ma.masked_invalid(scaled.values.T)  # rows of z follow y (β)
    levels, norm = _levels(scaled.finite)
    filled = ax.contourf(alphas, betas, z, levels=levels, cmap=CMAP, norm=norm)
    if levels.size >= 3:
        ax.contour(alphas, betas, z, levels=levels[::2], colors="black", linewidths=0.5, alpha=0.45)
    bar = fig.colorbar(filled, ax=ax, label=scaled.label, format="%.3g")
    if scaled.log:
        _decade_ticks(bar, scaled.finite)


def _decade_ticks(bar: Colorbar, finite_log10: np.ndarray) -> None:
    """Label a log10 colorbar at whole decades, as 10ᵏ, so it reads in loss units."""
    decades = np.arange(np.ceil(finite_log10.min()), np.floor(finite_log10.max()) + 1)
    bar.set_ticks(decades, labels=[f"$10^{{{int(k)}}}$" for k in decades])
    bar.set_label("loss (log scale)")


def _draw_trajectory(ax: plt.Axes, points: np.ndarray, note: str | None) -> None:
    """The path as a line with dots, its start ringed, and `note` in the lower left."""
    if points.size:
        ax.plot(points[:, 0], points[:, 1], "-o", color=TRAJECTORY_COLOUR, lw=1.4, ms=3.5, zorder=4, label="trajectory")
        ax.plot(points[0, 0], points[0, 1], "o", ms=8, mfc="none", mec=TRAJECTORY_COLOUR, mew=1.5, zorder=4)
    if note:
        ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=7.5, va="bottom", bbox={"fc": "white", "alpha": 0.75, "lw": 0})


def _fit_limits(ax: plt.Axes, alphas: np.ndarray, betas: np.ndarray, points: np.ndarray | None) -> None:
    """The grid's extent, widened to keep a trajectory that leaves it fully in view."""
    xs = np.concatenate([alphas[[0, -1]], points[:, 0]]) if points is not None and points.size else alphas[[0, -1]]
    ys = np.concatenate([betas[[0, -1]], points[:, 1]]) if points is not None and points.size else betas[[0, -1]]
    ax.set_xlim(xs.min(), xs.max())
    ax.set_ylim(ys.min(), ys.max())


def contour_png(
    alphas: np.ndarray,
    betas: np.ndarray,
    loss: np.ndarray,
    title: str = "",
    trajectory: np.ndarray | None = None,
    trajectory_note: str | None = None,
) -> bytes:
    """Filled contour of loss[i, j] at (alphas[i], betas[j]), log10 when it spans orders of magnitude, the trained model starred."""
    alphas, betas, loss = _checked_2d(alphas, betas, loss)
    points = None if trajectory is None else _trajectory(trajectory)
    scaled = _scale(loss)
    with _figure() as fig:
        ax = fig.add_subplot()
        if scaled.finite.size:
            _draw_contours(fig, ax, alphas, betas, scaled)
        else:
            _no_data(ax)
        if points is not None or trajectory_note:
            _draw_trajectory(ax, np.empty((0, 2)) if points is None else points, trajectory_note)
        ax.plot(0.0, 0.0, marker="*", ms=15, color="white", mec="black", mew=1.0, zorder=5, label="trained model")
        _fit_limits(ax, alphas, betas, points)
        ax.set_xlabel(ALPHA_LABEL)
        ax.set_ylabel(BETA_LABEL)
        ax.set_title(_titled(title, scaled.n_bad, loss.size), fontsize=10)
        fig.tight_layout()
        return _png(fig)


# ---------------------------------------------------------------- 3-D


def surface_png(alphas: np.ndarray, betas: np.ndarray, loss: np.ndarray, title: str = "") -> bytes:
    """A static 3-D surface of the loss (log10 when it spans orders of magnitude); masked points leave holes."""
    alphas, betas, loss = _checked_2d(alphas, betas, loss)
    scaled = _scale(loss)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    with _figure() as fig:
        ax = fig.add_subplot(projection="3d")
        if scaled.finite.size:
            lo, hi = float(scaled.finite.min()), float(scaled.finite.max())
            ax.plot_surface(a, b, scaled.values, cmap=CMAP, vmin=lo, vmax=hi, rstride=1, cstride=1, linewidth=0, antialiased=False)
        else:
            _no_data(ax)
        ax.set_xlabel(ALPHA_LABEL)
        ax.set_ylabel(BETA_LABEL)
        ax.set_zlabel(scaled.label)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(MaxNLocator(5))
        ax.tick_params(labelsize=8)
        ax.set_title(_titled(title, scaled.n_bad, loss.size), fontsize=10)
        fig.subplots_adjust(left=0.02, right=0.95, bottom=0.05, top=0.9)
        return _png(fig)


def _nullable(values: np.ndarray) -> list:
    """Nested lists with None for non-finite values: plain JSON numbers in the page (null is a hole in the surface)."""
    return np.where(np.isfinite(values), values, None).tolist()


def _hover(loss: np.ndarray, accuracy: np.ndarray | None) -> tuple[list, str]:
    """customdata ([β][α][k]: the raw loss, then accuracy) and the hover template that reads it."""
    layers = [loss.T] if accuracy is None else [loss.T, accuracy.T]
    template = "α = %{x:.4g}<br>β = %{y:.4g}<br>loss = %{customdata[0]:.6g}"
    if accuracy is not None:
        template += "<br>accuracy = %{customdata[1]:.4g}"
    return _nullable(np.stack(layers, axis=-1)), template + "<extra></extra>"


def surface_html(alphas: np.ndarray, betas: np.ndarray, loss: np.ndarray, title: str = "", accuracy: np.ndarray | None = None) -> str:
    """An interactive 3-D surface as one self-contained HTML page (plotly.js inline, no network); hover shows α, β, loss (and accuracy)."""
    alphas, betas, loss = _checked_2d(alphas, betas, loss)
    acc = None if accuracy is None else _grid("accuracy", accuracy, loss.shape, "(len(alphas), len(betas))")
    scaled = _scale(loss)
    customdata, template = _hover(loss, acc)
    surface = go.Surface(
        x=alphas.tolist(),
        y=betas.tolist(),
        z=_nullable(scaled.values.T),  # plotly: z[row][col] sits at (x[col], y[row])
        customdata=customdata,
        hovertemplate=template,
        colorscale=CMAP.capitalize(),
        colorbar={"title": {"text": scaled.label}},
    )
    fig = go.Figure(surface)
    fig.update_layout(
        title={"text": _titled(title, scaled.n_bad, loss.size).replace("\n", "<br>")},
        scene={"xaxis_title": ALPHA_LABEL, "yaxis_title": BETA_LABEL, "zaxis_title": scaled.label},
        margin={"l": 0, "r": 0, "t": 60, "b": 0},
    )
    return fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})
