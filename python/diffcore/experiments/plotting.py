"""Plotting helpers (matplotlib, Agg backend): image grids, sample/neighbour grids, Figure 1."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from diffcore.experiments.base import atomic_save_figure


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``[K, C, H, W]`` in [-1, 1] -> [0, 1] float CPU."""
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def finish(
    fig,
    path: str | Path,
    axes: Sequence = (),
    legend_fontsize: float | None = 7,
    suptitle: str | None = None,
    suptitle_fontsize: float = 9,
) -> Path:
    """End a line figure: a light grid (alpha 0.3) and, unless ``legend_fontsize`` is None, a legend
    on each of ``axes``; the figure title ``suptitle`` if given; tight layout; atomic save to
    ``path`` (:func:`base.atomic_save_figure`)."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if legend_fontsize is not None:
            ax.legend(fontsize=legend_fontsize)
    if suptitle is not None:
        fig.suptitle(suptitle, fontsize=suptitle_fontsize)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def mosaic(rows: Sequence[torch.Tensor], pad: int = 1, fill: float = 1.0) -> torch.Tensor:
    """Tile image rows ``[K, C, H, W]`` (one tensor per row, K may differ) into one image
    ``[C, R * (H + pad) - pad, Kmax * (W + pad) - pad]`` in [0, 1]."""
    c, h, w = rows[0].shape[1:]
    k_max = max(r.shape[0] for r in rows)
    out = torch.full((c, len(rows) * (h + pad) - pad, k_max * (w + pad) - pad), fill)
    for r, images in enumerate(rows):
        images = to_unit(images)
        for k in range(images.shape[0]):
            out[:, r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = images[k]
    return out


def _imshow(ax, image: torch.Tensor) -> None:
    """Show a ``[C, H, W]`` image in [0, 1] (gray when C = 1)."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def image_rows(
    rows: Sequence[torch.Tensor], row_labels: Sequence[str], path: str | Path, suptitle: str | None = None
) -> Path:
    """A figure with one row of images per tensor ``[K, C, H, W]`` and a label per row."""
    grid = mosaic(rows)
    h = rows[0].shape[2] + 1
    k_max = max(r.shape[0] for r in rows)
    fig, ax = plt.subplots(figsize=(max(2.0, 0.6 * k_max + 1.2), 0.6 * len(rows) + 0.5))
    _imshow(ax, grid)
    ax.set_yticks([r * h + h / 2 - 1 for r in range(len(rows))])
    ax.set_yticklabels(row_labels, fontsize=7)
    if suptitle:
        ax.set_title(suptitle, fontsize=8)
    fig.tight_layout()  # keeps long row labels inside the figure
    return atomic_save_figure(fig, path)


def samples_with_neighbors(
    samples: torch.Tensor,
    neighbors: torch.Tensor,
    path: str | Path,
    similarities: torch.Tensor | None = None,
    title: str | None = None,
    per_row: int = 8,
) -> Path:
    """Each sample above its nearest training image, ``per_row`` pairs per block.

    samples, neighbors: ``[K, C, H, W]``; similarities: ``[K]``, printed under each pair.
    """
    rows, labels = [], []
    for start in range(0, samples.shape[0], per_row):
        rows += [samples[start : start + per_row], neighbors[start : start + per_row]]
        labels += ["sample", "nearest train"]
    grid = mosaic(rows)
    h, w = samples.shape[2] + 1, samples.shape[3] + 1
    cols = min(per_row, samples.shape[0])
    fig, ax = plt.subplots(figsize=(0.75 * cols + 1.4, 0.75 * len(rows) + 0.5))
    _imshow(ax, grid)
    ax.set_yticks([r * h + h / 2 - 1 for r in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=7)
    if similarities is not None:
        for i, value in enumerate(similarities.tolist()):
            block, col = divmod(i, per_row)
            ax.text(
                col * w + (w - 1) / 2,
                (2 * block + 2) * h - 1.2,
                f"{value:.3f}",
                ha="center",
                va="top",
                fontsize=5,
                color="tab:red",
            )
    if title:
        ax.set_title(title, fontsize=8)
    return atomic_save_figure(fig, path)


def figure1(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    cross_width: Mapping[str, Sequence[float]] | None = None,
    threshold: float | None = None,
    similarity: str = "",
    title: str | None = None,
) -> Path:
    """Figure-1-style plot: RP and GL against N (log scale), one colour per width in every panel.

    ``curves[width]`` has ``n``, ``gl``, ``rp_seeds`` (may hold NaN), ``rp_empirical``,
    ``memorized_ratio``; ``cross_width`` has ``n`` and ``rp`` (mean RP between different widths).
    """
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    band = _band
    ax_rp, ax_gl, ax_emp = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({n for curve in curves.values() for n in curve["n"]})
    for index, (width, curve) in enumerate(curves.items()):
        color, n = colors[index % len(colors)], list(curve["n"])
        if any(not math.isnan(v) for v in curve["rp_seeds"]):
            ax_rp.plot(n, curve["rp_seeds"], "o-", color=color, label=f"UNet-{width}: between training seeds")
            band(ax_rp, n, curve, "rp_seeds", color)
        ax_gl.plot(n, curve["gl"], "o-", color=color, label=f"UNet-{width}: GL")
        band(ax_gl, n, curve, "gl", color)
        ax_gl.plot(
            n,
            [1 - v for v in curve["memorized_ratio"]],
            "x:",
            color=color,
            alpha=0.8,
            label=f"UNet-{width}: 1 - memorized (ratio < 1/3)",
        )
        ax_emp.plot(n, curve["rp_empirical"], "o-", color=color, label=f"UNet-{width}")
        band(ax_emp, n, curve, "rp_empirical", color)
    if cross_width and len(cross_width.get("n", [])):
        ax_rp.plot(list(cross_width["n"]), cross_width["rp"], "s--k", label="across widths")
        band(ax_rp, list(cross_width["n"]), cross_width, "rp", "k")
    ax_rp.set_title("Reproducibility: RP between models", fontsize=10)
    ax_gl.set_title("Generalization: GL against the training set", fontsize=10)
    ax_emp.set_title("RP against the empirical optimal denoiser", fontsize=10)
    ax_rp.set_ylabel("RP score (fraction of seeds)")
    ax_gl.set_ylabel("GL score (fraction of samples)")
    ax_emp.set_ylabel("RP score (fraction of seeds)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.minorticks_off()
        ax.set_xlabel("N (training images, log scale)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
        else:  # one width and one seed: no pair of models to compare
            ax.text(
                0.5,
                0.5,
                "no model pairs\n(one width, one seed)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
                color="gray",
            )
    if any(f"{key}_low" in c for c in curves.values() for key in ("gl",)):
        fig.text(
            0.5,
            0.005,
            "bands: 95% intervals (Wilson over the samples for one training seed, seeds-t for three or more)",
            ha="center",
            fontsize=7,
            color="0.3",
        )
    sim_note = f"{similarity} similarity, threshold {threshold:.3f}" if threshold is not None else similarity
    fig.suptitle(
        (title or "Reproducibility and generalization against training-set size")
        + (f"  ({sim_note})" if sim_note else ""),
        fontsize=11,
    )
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def _band(ax, n: Sequence[float], curve: Mapping, key: str, color) -> None:
    """Shade ``curve[key_low] .. curve[key_high]`` (a 95% interval per point) when the curve has them."""
    low, high = curve.get(f"{key}_low"), curve.get(f"{key}_high")
    if low is None or high is None:
        return
    nan = float("nan")
    ax.fill_between(
        list(n),
        [nan if v is None else v for v in low],
        [nan if v is None else v for v in high],
        color=color,
        alpha=0.15,
        linewidth=0,
    )
