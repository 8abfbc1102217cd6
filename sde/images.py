"""Image grids, PNG and JSON outputs, plots of point data, and FID-against-NFE plots."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sde.checkpoint import atomic_write


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images [N, C, H, W] into one [H', W', C] uint8 array (C = 1 or 3)."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    count, channels, height, width = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(count))))
    ncol = int(math.ceil(count / nrow))
    grid = np.zeros((channels, ncol * (height + padding) + padding,
                     nrow * (width + padding) + padding), dtype=np.uint8)
    for k in range(count):
        row, col = divmod(k, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top:top + height, left:left + width] = images[k]
    return grid.transpose(1, 2, 0)


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a [H, W, C] uint8 array as PNG, atomically."""
    from PIL import Image

    array = array[..., 0] if array.shape[-1] == 1 else array
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write(Path(path), lambda handle: handle.write(buffer.getvalue()))


def save_json(data: dict[str, Any], path: Path) -> None:
    payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    atomic_write(Path(path), lambda handle: handle.write(payload))


def points_png(points: np.ndarray, path: Path, title: str = "", reference: np.ndarray | None = None) -> None:
    """Samples of point data against the data set: a scatter plot for 2-D points (the data in
    grey behind), overlaid histograms for 1-D points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4), dpi=100)
    if points.shape[1] == 1:
        values = points[:, 0] if reference is None else np.concatenate([points[:, 0], reference[:, 0]])
        bins = np.linspace(values.min(), values.max(), 81)
        if reference is not None:
            axis.hist(reference[:, 0], bins=bins, density=True, color="0.75", label="data")
        axis.hist(points[:, 0], bins=bins, density=True, histtype="step", color="C0", lw=1.2, label="samples")
        axis.legend(fontsize=8)
    else:
        if reference is not None:
            axis.scatter(reference[:, 0], reference[:, 1], s=1, c="0.8", label="data")
        axis.scatter(points[:, 0], points[:, 1], s=1, c="C0", label="samples")
        axis.set_aspect("equal")
    axis.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write(Path(path), lambda handle: handle.write(buffer.getvalue()))


#: Series whose legend fits beside the plot; more go below it.
LEGEND_BESIDE_MAX = 12


def fid_vs_nfe_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """FID against NFE on log-log axes, one line per sampler (``rows``: dicts with sampler,
    nfe, fid, as ``--mode compare`` writes them); a variant measured at one NFE is a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({row["sampler"] for row in rows})
    crowded = len(series) > LEGEND_BESIDE_MAX  # then the legend goes below, in two columns
    legend_rows = math.ceil(len(series) / 2) if crowded else 0
    figure, axis = plt.subplots(figsize=(7.5, 4 + 0.2 * legend_rows), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, sampler in enumerate(series):
        points = sorted((row["nfe"], row["fid"]) for row in rows if row["sampler"] == sampler)
        # past the colour cycle, the same colours come back with another marker and line style;
        # a variant measured at one NFE is a marker alone, so that lines stay for ladders
        lap = index // len(colors)
        single = len(points) == 1
        axis.plot([p[0] for p in points], [p[1] for p in points], label=sampler,
                  color=colors[index % len(colors)], marker="osD^v"[lap % 5],
                  markersize=7 if single else 5,
                  linestyle="none" if single else ["-", "--", ":", "-."][lap % 4])
    axis.set_xscale("log")
    axis.set_yscale("log")  # FIDs span 10 to several hundred
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(plain)
    # ticks at the NFEs measured, written plainly (a log axis over less than a decade would
    # otherwise label its minor ticks as 1.02x10^1)
    axis.set_xticks(sorted({row["nfe"] for row in rows}))
    axis.xaxis.set_major_formatter(plain)
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("network evaluations per sample (NFE)")
    axis.set_ylabel("FID")
    axis.grid(True, which="both", alpha=0.3)
    if crowded:
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    else:
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
