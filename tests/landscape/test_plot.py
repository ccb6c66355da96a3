"""Loss-landscape plots: real PNGs of the right size, the minimum drawn darkest, masks, trajectories, offline HTML."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from trainwatch.landscape.plot import _levels, _scale, _titled, contour_png, curve_png, surface_html, surface_png

WIDTH, HEIGHT = 660, 495  # 6 x 4.5 in at 110 dpi
CENTRE_LOSS = 0.4375  # exact in binary, so it prints the same in the page's JSON


def bowl(steps: int = 41, span: float = 1.0, offset: float = CENTRE_LOSS, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A quadratic bowl with its minimum at the centre; the β axis differs in length so transposes are caught."""
    alphas = np.linspace(-span, span, steps)
    betas = np.linspace(-span, span, steps + 4)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    return alphas, betas, offset + scale * (a**2 + 0.5 * b**2)


def decode(png: bytes) -> np.ndarray:
    """The PNG as an RGB array, after checking its size and that it is not blank."""
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert abs(image.width - WIDTH) <= 4 and abs(image.height - HEIGHT) <= 4, image.size
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert rgb.std() > 0
    return rgb


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def longest_run(mask: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of True."""
    best, start = (0, 0), None
    for i, flag in enumerate([*mask.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
    return best


def plot_area(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the filled contour: the widest block of columns that are coloured top to bottom."""
    coloured = rgb.min(axis=2) < 235
    left, right = longest_run(coloured.mean(axis=0) > 0.5)
    top, bottom = longest_run(coloured[:, left:right].mean(axis=1) > 0.9)
    assert right - left > WIDTH / 3 and bottom - top > HEIGHT / 3, (top, bottom, left, right)
    return top, bottom, left, right


def box(lum: np.ndarray, area: tuple[int, int, int, int], fy: float, fx: float, half: float = 0.08) -> float:
    """Median luminance of a box centred at fractions (fy, fx) of the plot area."""
    top, bottom, left, right = area
    h, w = bottom - top, right - left
    y0, y1 = int(top + (fy - half) * h), int(top + (fy + half) * h)
    x0, x1 = int(left + (fx - half) * w), int(left + (fx + half) * w)
    return float(np.median(lum[y0:y1, x0:x1]))


def red_pixels(rgb: np.ndarray) -> int:
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())


# ---------------------------------------------------------------- PNGs


@pytest.mark.parametrize(("offset", "scale"), [(CENTRE_LOSS, 1.0), (0.05, 100.0)], ids=["linear", "log10"])
def test_contour_draws_the_minimum_darkest_at_the_centre(offset, scale):
    alphas, betas, loss = bowl(offset=offset, scale=scale)
    assert _scale(loss).log == (scale > 1)
    rgb = decode(contour_png(alphas, betas, loss, title="bowl"))
    lum = luminance(rgb)
    area = plot_area(rgb)
    # Just off the starred centre (a ring around the star), against the four corners.
    near = [box(lum, area, 0.5 + dy, 0.5 + dx, half=0.04) for dy, dx in [(-0.12, 0), (0.12, 0), (0, -0.12), (0, 0.12)]]
    corners = [box(lum, area, fy, fx) for fy in (0.12, 0.88) for fx in (0.12, 0.88)]
    assert max(near) < min(corners) - 60, (near, corners)


def test_log_scale_when_losses_span_orders_of_magnitude():
    *_, loss = bowl(offset=1e-3, scale=1e4)
    scaled = _scale(loss)
    assert scaled.log and scaled.label == "log₁₀ loss"
    np.testing.assert_allclose(scaled.finite.min(), -3.0)
    assert not _scale(bowl()[2]).log
    assert not _scale(loss - 1.0).log  # not all positive: no log


def test_skewed_losses_get_quantile_levels():
    spiky = np.concatenate([np.full(990, 1.0) + np.linspace(0, 0.1, 990), np.linspace(10, 1e4, 10)])
    levels, norm = _levels(spiky)
    assert norm is not None
    assert np.all(np.diff(levels) > 0) and levels[0] == spiky.min() and levels[-1] == spiky.max()
    assert np.sum(levels < 2.0) > len(levels) // 2  # most levels resolve the floor, not the spike
    levels, norm = _levels(np.linspace(0.0, 1.0, 50))
    assert norm is None and np.allclose(np.diff(levels), np.diff(levels)[0])
    levels, _ = _levels(np.full(9, 3.0))  # a flat landscape still has two distinct levels
    assert levels[0] < 3.0 < levels[1]


def test_trajectory_is_drawn_with_its_note():
    alphas, betas, loss = bowl()
    plain = decode(contour_png(alphas, betas, loss))
    path = np.column_stack([np.linspace(-0.9, 0.0, 12), np.linspace(0.8, 0.0, 12) ** 2])
    drawn = decode(contour_png(alphas, betas, loss, trajectory=path, trajectory_note="points off the plane are projections"))
    assert red_pixels(plain) == 0
    assert red_pixels(drawn) > 200
    # A path leaving the grid widens the view instead of being clipped; NaN rows are dropped.
    wide = np.array([[-3.0, 2.0], [np.nan, 0.0], [-1.0, 0.5], [0.0, 0.0]])
    assert red_pixels(decode(contour_png(alphas, betas, loss, trajectory=wide))) > 100


def test_curve_with_and_without_accuracy():
    alphas = np.linspace(-1, 1, 21)
    loss = CENTRE_LOSS + alphas**2
    plain = decode(curve_png(alphas, loss, title="1-D"))
    both = decode(curve_png(alphas, loss, accuracy=1 - loss / 2, title="1-D"))
    assert np.abs(plain - both).mean() > 0.5  # the twin axis and its line are there
    decode(curve_png(alphas, 1e-4 + 1e3 * alphas**2))  # log y-axis


def test_surface_png():
    decode(surface_png(*bowl(), title="surface"))


def test_non_finite_losses_render_and_are_counted():
    alphas, betas, loss = bowl(steps=9)
    loss[0, 0], loss[4, 5], loss[8, 1] = np.nan, np.inf, -np.inf
    decode(contour_png(alphas, betas, loss, title="masked"))
    decode(surface_png(alphas, betas, loss))
    decode(curve_png(alphas, loss[:, 0], accuracy=np.full(9, np.nan)))
    assert _scale(loss).n_bad == 3
    assert _titled("masked", 3, loss.size) == f"masked\n3 of {loss.size} points non-finite (masked)"
    assert _titled("clean", 0, loss.size) == "clean"
    html = surface_html(alphas, betas, loss, title="masked")
    assert f"3 of {loss.size} points non-finite" in html


def test_all_non_finite_still_renders():
    alphas, betas, loss = bowl(steps=5)
    loss[:] = np.nan
    decode(contour_png(alphas, betas, loss))
    decode(surface_png(alphas, betas, loss))
    decode(curve_png(alphas, loss[:, 0]))


def test_figures_are_closed():
    before = plt.get_fignums()
    alphas, betas, loss = bowl(steps=7)
    contour_png(alphas, betas, loss)
    surface_png(alphas, betas, loss)
    curve_png(alphas, loss[:, 0], accuracy=loss[:, 1])
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda a, b, z: contour_png(a, b, z.T),
            r"loss must have shape \(len\(alphas\), len\(betas\)\) = \(9, 13\); got \(13, 9\) \(transposed",
        ),
        (lambda a, b, z: surface_png(a, b, z[:, :-1]), r"= \(9, 13\); got \(9, 12\)"),
        (lambda a, b, z: surface_html(a, b, z, accuracy=z[:-1]), r"accuracy must have shape .*\(9, 13\); got \(8, 13\)"),
        (lambda a, b, z: curve_png(a, z), r"loss must have shape \(len\(alphas\),\) = \(9,\); got \(9, 13\)"),
        (lambda a, b, z: curve_png(a, z[:, 0], accuracy=z[0]), r"accuracy must have shape \(len\(alphas\),\) = \(9,\); got \(13,\)"),
        (lambda a, b, z: contour_png(a, b, z, trajectory=np.zeros((5, 3))), r"trajectory must have shape \(T, 2\)"),
        (lambda a, b, z: contour_png(a[::-1], b, z), r"alphas must be strictly increasing"),
        (lambda a, b, z: contour_png(a[:1], b, z[:1]), r"alphas must be a 1-D array of at least 2"),
    ],
)
def test_wrong_shapes_raise_clear_errors(call, message):
    alphas, betas, loss = bowl(steps=9)
    with pytest.raises(ValueError, match=message):
        call(alphas, betas, loss)


# ---------------------------------------------------------------- HTML


class ExternalRefs(HTMLParser):
    """Every script tag, and every src/href that would need the network."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        for name, value in attrs:
            if name in ("src", "href") and value and re.match(r"(https?:)?//", value.strip(), re.I):
                self.external.append(f"<{tag} {name}={value}>")


@pytest.fixture(scope="module")
def page() -> str:
    alphas, betas, loss = bowl(steps=9)
    return surface_html(alphas, betas, loss, title="bowl surface", accuracy=1.0 - loss / loss.max())


def figure_json(html: str) -> list:
    """The data argument of Plotly.newPlot: the traces as the page will draw them."""
    start = html.index("Plotly.newPlot(")
    decoder = json.JSONDecoder()
    rest = html[start + len("Plotly.newPlot(") :]
    _, after_id = decoder.raw_decode(rest.lstrip())  # the div id
    data, _ = decoder.raw_decode(rest.lstrip()[after_id:].lstrip(", \n"))
    return data


def test_html_is_self_contained(page):
    refs = ExternalRefs()
    refs.feed(page)
    assert page.lstrip().lower().startswith("<html") or page.lstrip().lower().startswith("<!doctype html")
    assert refs.scripts and all("src" not in attrs for attrs in refs.scripts), refs.scripts
    assert refs.external == []
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"""<(script|link)[^>]*https://cdn""", page, re.I)
    assert len(page) > 1_000_000  # plotly.js itself is inline
    assert "Plotly.newPlot" in page


def test_html_carries_the_losses_and_hover(page):
    (trace,) = figure_json(page)
    assert trace["type"] == "surface"
    assert trace["colorscale"][0][1].lower() == "#440154"  # viridis
    z = np.array(trace["z"], dtype=float)
    assert z.shape == (13, 9)  # plotly rows follow y (β)
    assert z[6, 4] == CENTRE_LOSS == z.min()
    assert trace["customdata"][6][4] == [CENTRE_LOSS, pytest.approx(1.0 - CENTRE_LOSS / bowl(steps=9)[2].max())]
    for field in ("α", "β", "loss", "accuracy"):
        assert field in trace["hovertemplate"]
    assert str(CENTRE_LOSS) in page


def test_html_hover_without_accuracy_and_log_surface():
    alphas, betas, loss = bowl(steps=5, offset=1e-3, scale=1e4)
    (trace,) = figure_json(surface_html(alphas, betas, loss))
    assert "accuracy" not in trace["hovertemplate"]
    assert np.array(trace["z"], dtype=float).min() == pytest.approx(-3.0)  # log10 heights ...
    assert trace["customdata"][4][2] == [pytest.approx(1e-3)]  # ... but the hover shows the loss itself


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to parse the inline JavaScript")
def test_html_inline_javascript_parses(page, tmp_path):
    for i, code in enumerate(re.findall(r"<script[^>]*>(.*?)</script>", page, re.S)):
        script = tmp_path / f"script{i}.js"
        script.write_text(code, encoding="utf-8")
        result = subprocess.run(["node", "--check", str(script)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
