"""``eval compare``: the scores of several runs side by side, beside the published LLaVA-1.5 figures, as a table
and a bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError
from ..files import read_json, write_atomic
from .benchmarks import PUBLISHED, PUBLISHED_SOURCE

__all__ = ["compare", "find_scores", "format_compare", "plot_compare"]

# POPE's scorer reports fractions (as the reference prints them); the published table gives percent.
_SCALE = {"pope": 100.0}


def find_scores(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{benchmark folder name: scores}`` of a run folder (``eval/*/scores.json``) or one eval output folder."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"'{folder}' is not a folder")
    files = [root / "scores.json"] if (root / "scores.json").is_file() else sorted(root.glob("eval/*/scores.json"))
    if not files:
        raise DataError(f"'{folder}' holds no scores.json and no eval/*/scores.json (run 'lora-llava eval run' first)")
    found = {}
    for f in files:
        scores = read_json(f, dict, "a scores.json object")
        found[f.parent.name if f.parent != root else str(scores.get("benchmark", root.name))] = scores
    return found


def compare(folders: list[str | Path]) -> dict[str, Any]:
    """``{"runs": [names], "rows": [(benchmark, metric, [our values], {published model: figure})]}``."""
    names, per_run = [], []
    for folder in folders:
        names.append(Path(folder).resolve().name)
        per_run.append(find_scores(folder))
    rows = []
    entries = sorted({(s.get("benchmark", key), key) for run in per_run for key, s in run.items()})
    for benchmark, key in entries:
        metric, published = PUBLISHED.get(benchmark, (None, {}))
        if metric is None:  # custom and unknown: the first metric after "benchmark"
            sample = next(run[key] for run in per_run if key in run)
            metric = next((k for k, v in sample.items() if k != "benchmark" and isinstance(v, (int, float))), "n")
        scale = _SCALE.get(benchmark, 1.0)
        values = [run[key][metric] * scale if key in run and isinstance(run[key].get(metric), (int, float)) else None
                  for run in per_run]
        rows.append((key, metric, values, published))
    return {"runs": names, "rows": rows}


def format_compare(table: dict[str, Any]) -> str:
    """The comparison as a text table (published figures on the right, their source below)."""
    models = ["7B full", "13B full", "7B LoRA", "13B LoRA"]
    head = ["benchmark", "metric", *table["runs"], *(f"LLaVA-1.5 {m}" for m in models)]
    lines = [head]
    for key, metric, values, published in table["rows"]:
        lines.append([key, metric, *("-" if v is None else f"{v:.2f}" for v in values),
                      *(f"{published[m]}" if m in published else "" for m in models)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    text.append(f"published: {PUBLISHED_SOURCE}; benchmark protocol must match for a fair comparison "
                "(LLaVA's question files, greedy decoding; no QLoRA figures are published)")
    return "\n".join(text)


def plot_compare(table: dict[str, Any], path: str | Path) -> Path:
    """A bar chart: one group per benchmark, one bar per run, and the published 7B / 13B LoRA figures beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r[1] != "perception"]  # MME's 0..2000 scale would flatten the rest
    mme = [r for r in table["rows"] if r[1] == "perception"]
    series = [(name, [r[2][i] for r in rows]) for i, name in enumerate(table["runs"])]
    series += [(f"LLaVA-1.5 {m}", [r[3].get(m) for r in rows]) for m in ("7B LoRA", "13B LoRA")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.5), dpi=100)
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name,
               hatch="//" if name.startswith("LLaVA-1.5") else None, alpha=0.6 if name.startswith("LLaVA") else 1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r[0]}\n{r[1]}" for r in rows], fontsize=8)
    ax.set_ylabel("score")
    title = "eval scores" + (f" (MME perception: {', '.join(f'{v:.1f}' for v in mme[0][2] if v is not None)})"
                             if mme else "")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
