"""Heat map of a position-importance matrix (PNG via matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_position_importance(importance: torch.Tensor, path: str | Path | None = None, *, title: str | None = None,
                             annotate: bool = True, cmap: str = "viridis", dpi: int = 120):
    """Draw a ``(kh, kw)`` importance matrix (e.g. from :func:`position_importance`) as a heat map.

    Args:
        importance: 2-D tensor (or array-like).
        path: where to save the PNG; None only returns the figure.
        title: figure title.
        annotate: write each value in its cell (the largest in bold, as in the paper's Fig. 2).
    Returns:
        The ``matplotlib.figure.Figure`` (created without pyplot, so no GUI backend is touched).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a test/bench dependency
        raise ImportError("plot_position_importance needs matplotlib (pip install matplotlib)") from exc
    m = torch.as_tensor(importance).detach().double().cpu()
    if m.dim() != 2:
        raise ValueError(f"plot_position_importance: `importance` must be 2-D (kh, kw), got shape {tuple(m.shape)}")
    kh, kw = m.shape
    fig = Figure(figsize=(1.0 + 0.7 * kw, 0.8 + 0.7 * kh))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(m.numpy(), cmap=cmap, vmin=0.0, vmax=max(1.0, float(m.max())))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(kw))
    ax.set_yticks(range(kh))
    if annotate:
        peak = float(m.max())
        for i in range(kh):
            for j in range(kw):
                v = float(m[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        fontweight="bold" if v == peak else "normal", color="white" if v < 0.6 * peak else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), format="png", dpi=dpi)
    return fig
