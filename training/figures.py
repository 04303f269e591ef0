"""PNG figures of the evaluation report: the paper's Fig. 3 (samples) and Fig. 4 (t-SNE radiogenomic map),
plus gene-control scatter plots and noise-diversity strips.

Built on `matplotlib.figure.Figure` with the Agg canvas (no pyplot, no global state, no display), so the
figures render the same on a headless CI runner. Images are in the network range [-1, 1] and shown with the
full HU window (-1000…500 HU) as grey levels, the same scaling for every row so models compare fairly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CMAP = "tab10"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor="white")
    return path


def _show_image(ax, image: np.ndarray | None) -> None:  # ax: matplotlib Axes
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:        # no image for this cell (fewer examples, model not given): leave it blank
        ax.axis("off")
        return
    ax.imshow(np.asarray(image), cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")


def sample_grid(path: str | Path, rows: Sequence[tuple[str, Sequence[np.ndarray | None]]],
                column_titles: Sequence[str] | None = None, title: str = "") -> Path:
    """A grid of patches: one labelled row per (name, images); `None` leaves a blank cell (the paper's Fig. 3:
    donor image, background, inpainting, baseline, proposed)."""
    n_rows = len(rows)
    n_cols = max((len(images) for _, images in rows), default=1)
    figure = _new_figure(max(1.5 * n_cols + 1.2, 5.0), 1.5 * n_rows + (0.5 if title else 0.2))
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            _show_image(ax, images[c] if c < len(images) else None)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0 and column_titles is not None and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def tsne_figure(path: str | Path, embeddings: Sequence[tuple[str, np.ndarray]],
                colourings: Sequence[tuple[str, np.ndarray]],
                examples: Sequence[tuple[int, Sequence[np.ndarray]]] = (), title: str = "") -> Path:
    """The paper's Fig. 4: one column per representation (raw genes, baseline code, proposed code), one row
    per colouring (k-means clusters of the proposed code; the true module class when known), the same
    colour for a patient in every panel; below, example nodule images of each k-means cluster."""
    n_cols = len(embeddings)
    n_rows = len(colourings)
    max_examples = max((len(images) for _, images in examples), default=0)
    example_rows = len(examples) if max_examples else 0
    figure = _new_figure(max(3.6 * n_cols, 1.3 * max_examples + 1.5), 3.4 * n_rows + 1.2 * example_rows + 0.6)
    grid = figure.add_gridspec(n_rows + example_rows, 1, height_ratios=[3.4] * n_rows + [1.2] * example_rows)
    for r, (colour_name, labels) in enumerate(colourings):
        sub = grid[r].subgridspec(1, n_cols)
        labels = np.asarray(labels)
        for c, (name, points) in enumerate(embeddings):
            ax = figure.add_subplot(sub[0, c])
            points = np.asarray(points)
            ax.scatter(points[:, 0], points[:, 1], c=labels % 10, cmap=_CMAP, vmin=0, vmax=9, s=18,
                       edgecolors="black", linewidths=0.3)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}\ncoloured by {colour_name}", fontsize=8)
    for e, (cluster, images) in enumerate(examples if example_rows else ()):
        sub = grid[n_rows + e].subgridspec(1, max_examples + 1, width_ratios=[0.6] + [1.0] * max_examples)
        label_ax = figure.add_subplot(sub[0, 0])
        label_ax.axis("off")
        label_ax.text(0.5, 0.5, f"cluster {cluster}", ha="center", va="center", fontsize=8,
                      color=_cluster_colour(cluster))
        for i in range(max_examples):
            ax = figure.add_subplot(sub[0, i + 1])
            _show_image(ax, images[i] if i < len(images) else None)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def _cluster_colour(cluster: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps[_CMAP](int(cluster) % 10 / 9.0)


def scatter_panels(path: str | Path, panels: Sequence[dict], title: str = "") -> Path:
    """Scatter plots side by side; each panel a dict with x, y, xlabel, ylabel and a title (e.g. the gene
    control: measured size of the generated nodule against the donor's true diameter, with Spearman ρ)."""
    n = max(1, len(panels))
    figure = _new_figure(3.3 * n, 3.3 + (0.3 if title else 0.0))
    axes = figure.subplots(1, n, squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.scatter(panel["x"], panel["y"], s=14, c=panel.get("colour"), cmap=_CMAP, vmin=0, vmax=9,
                   edgecolors="black", linewidths=0.3)
        ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        ax.set_title(panel.get("title", ""), fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
