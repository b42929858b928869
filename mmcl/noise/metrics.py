"""How well the weights find the mismatched pairs, measured against the sharder's ground-truth `noisy`
flags (read for metrics only, never for training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards_tools.scores import auroc


def detection_metrics(weights: np.ndarray, noisy: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC of (1 - weight) for noisy pairs, and precision/recall of flagging pairs with weight <
    threshold."""
    weights = np.asarray(weights, dtype=np.float64)
    noisy = np.asarray(noisy, dtype=bool)
    flagged = weights < threshold
    true_pos = int((flagged & noisy).sum())
    return {
        "auroc": auroc(1.0 - weights, noisy),
        "precision": true_pos / int(flagged.sum()) if flagged.any() else float("nan"),
        "recall": true_pos / int(noisy.sum()) if noisy.any() else float("nan"),
        "mean_weight_clean": float(weights[~noisy].mean()) if (~noisy).any() else float("nan"),
        "mean_weight_noisy": float(weights[noisy].mean()) if noisy.any() else float("nan"),
    }


def plot_weights(weights: np.ndarray, noisy: np.ndarray | None, path: Path, title: str = "") -> None:
    """Histogram of pair weights, split into clean and noisy pairs when the truth is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    if noisy is None:
        ax.hist(weights, bins=bins, color="#4477aa", label="all pairs")
    else:
        noisy = np.asarray(noisy, dtype=bool)
        ax.hist(
            weights[~noisy], bins=bins, alpha=0.7, color="#228833", label=f"clean ({int((~noisy).sum())})"
        )
        ax.hist(weights[noisy], bins=bins, alpha=0.7, color="#cc3311", label=f"noisy ({int(noisy.sum())})")
    ax.set_xlabel("pair weight")
    ax.set_ylabel("pairs")
    ax.set_title(title or "pair weights (recent window)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
