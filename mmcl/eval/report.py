"""Evaluation reports: JSON with CLIP_benchmark's keys, a Markdown summary, PNG plots, a console table.

results.json:
    {"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
     "task": "zeroshot_classification" | "zeroshot_retrieval",
     "metrics": {"acc1": 0.93, "acc5": 0.99, "mean_per_class_recall": 0.93},   # scalars only
     "num_samples": 10000, "skipped": 0, "options": {...},
     "class_names": [...], "per_class_recall": {...}, "confusion_matrix": [[...]]}   # classification
Tools that read CLIP_benchmark output read "metrics"; the rest is for people.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (headless machines, worker processes)
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = "results.json"
MARKDOWN = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
RECALL_PNG = "per_class_recall.png"
DETAIL_KEYS = ("per_class_recall", "confusion_matrix")
COUNT_KEYS = ("num_samples", "num_items", "num_captions", "skipped")
TICK_LABEL_LIMIT = 40  # more classes than this: the confusion matrix has no class names on its axes
BAR_LIMIT = 60  # more classes than this: the recall plot shows the lowest BAR_LIMIT


def scalar_metrics(results: dict) -> dict[str, float]:
    """The metric values (what CLIP_benchmark puts under "metrics"): no counts, no per-class details."""
    return {k: v for k, v in results.items() if k not in DETAIL_KEYS and k not in COUNT_KEYS}


def format_value(key: str, value: float) -> str:
    """Recalls and accuracies as percentages, ranks as numbers."""
    return f"{value:.2f}" if key.endswith("rank") else f"{100 * value:.2f}%"


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table of `metrics` for the console."""
    width = max(len(k) for k in metrics)
    rule = "-" * (width + 12)
    rows = [f"{key:<{width}}  {format_value(key, value):>9}" for key, value in metrics.items()]
    return "\n".join([rule, f"{'metric':<{width}}  {'value':>9}", rule, *rows, rule])


def headline(task: str, metrics: dict[str, float]) -> str:
    """The few numbers a person looks at first."""
    if task == "zeroshot_classification":
        keys = ["acc1", "acc5", "mean_per_class_recall"]
    else:
        keys = [k for k in metrics if k.endswith(("recall@1", "recall@5"))]
    return "  ".join(f"{k} {format_value(k, metrics[k])}" for k in keys if k in metrics)


def write_report(
    output: Path,
    *,
    dataset: str,
    model: str,
    pretrained: str,
    task: str,
    results: dict,
    class_names: list[str] | None = None,
    options: dict | None = None,
) -> dict[str, Path]:
    """Write results.json and report.md (and for classification the two PNGs) into `output`; returns
    the paths written, by kind."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metrics = scalar_metrics(results)
    record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics}
    record.update({k: results[k] for k in COUNT_KEYS if k in results})
    record["options"] = options or {}
    paths = {"json": output / RESULTS, "markdown": output / MARKDOWN}
    if class_names is not None:
        record["class_names"] = list(class_names)
        record.update({k: results[k] for k in DETAIL_KEYS})
        paths["confusion"] = plot_confusion(results["confusion_matrix"], class_names, output / CONFUSION_PNG)
        paths["recall"] = plot_recall(results["per_class_recall"], output / RECALL_PNG)
    paths["json"].write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", "utf-8")
    paths["markdown"].write_text(_markdown(record, paths), "utf-8")
    return paths


def _markdown(record: dict, paths: dict[str, Path]) -> str:
    counts = ", ".join(f"{k.replace('_', ' ')}: {record[k]}" for k in COUNT_KEYS if k in record)
    lines = [
        f"# {record['task']}: {record['dataset']}",
        "",
        f"Model `{record['model']}`, weights `{record['pretrained']}`. {counts}.",
        "",
        "| metric | value |",
        "| --- | ---: |",
        *(f"| {k} | {format_value(k, v)} |" for k, v in record["metrics"].items()),
    ]
    if record.get("options"):
        lines += ["", "Options: " + ", ".join(f"`{k}={v}`" for k, v in record["options"].items())]
    if "per_class_recall" in record:
        lines += [
            "",
            f"![confusion matrix]({paths['confusion'].name})",
            "",
            f"![per-class recall]({paths['recall'].name})",
            "",
            "| class | recall |",
            "| --- | ---: |",
            *(
                f"| {name} | {'-' if r is None else f'{100 * r:.1f}%'} |"
                for name, r in record["per_class_recall"].items()
            ),
        ]
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix (each row: where the items of one true class went)."""
    counts = [[float(c) for c in row] for row in confusion]
    rows = [[c / max(sum(row), 1.0) for c in row] for row in counts]
    size = min(4 + 0.3 * len(class_names), 30)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if len(class_names) <= TICK_LABEL_LIMIT:
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90)
        ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recall(per_class: dict[str, float | None], path: Path) -> Path:
    """Horizontal bars of per-class recall, lowest first (the lowest BAR_LIMIT when there are more)."""
    scored = sorted(((r, n) for n, r in per_class.items() if r is not None and not math.isnan(r)))
    shown = scored[:BAR_LIMIT]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.25 * max(len(shown), 1)))
    ax.barh(range(len(shown)), [r for r, _ in shown], color="tab:blue")
    ax.set_yticks(range(len(shown)), [n for _, n in shown])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("recall")
    more = f" (lowest {len(shown)} of {len(scored)})" if len(scored) > len(shown) else ""
    ax.set_title("per-class recall" + more)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
