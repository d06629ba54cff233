"""PNG charts for runs: training curves (RL), the KL frontier (tune_kl) and metric bars (eval)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; these machines have no display
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(log_history: list[dict], keys: Sequence[str], path: str | Path, title: str) -> Path:
    """One panel per key over training steps, from a Trainer's `state.log_history`."""
    keys = [k for k in keys if any(k in entry and entry[k] is not None for entry in log_history)]
    fig, axes = plt.subplots(len(keys) or 1, 1, figsize=(6, 2.2 * max(len(keys), 1)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(e["step"], e[key]) for e in log_history if e.get(key) is not None and "step" in e]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def kl_frontier(points: list[dict], objective: str, path: str | Path, budget: float | None, chosen=None) -> Path:
    """KL to the reference (x) against the objective (y), one labelled point per coefficient, with the
    95% intervals of both as error bars (`point["kl"]`, `point[objective]`: interval dicts)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for point in points:
        color = "tab:red" if chosen is not None and point["beta"] == chosen else "tab:blue"
        x, y = point["kl"], point[objective]
        ax.errorbar(x["value"], y["value"], xerr=_err(x), yerr=_err(y), fmt="o", color=color, capsize=3)
        ax.annotate(f"beta={point['beta']:g}", (x["value"], y["value"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    if budget is not None:
        ax.axvline(budget, linestyle="--", color="gray", label=f"KL budget {budget:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _err(interval: dict) -> list[list[float]] | None:
    """matplotlib's asymmetric error of an interval dict, or None without bounds."""
    if interval.get("low") is None or interval.get("high") is None:
        return None
    return [[interval["value"] - interval["low"]], [interval["high"] - interval["value"]]]


def metric_bars(rows: dict[str, dict[str, dict]], metrics: Sequence[str], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per model, with its 95% interval as an error bar.

    `rows[model][metric]` is an interval dict (value, low, high), as clinalign.stats.Interval.as_dict().
    """
    names = list(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        cells = [rows[n].get(metric) or {} for n in names]
        values = [c.get("value") if c.get("value") is not None else 0 for c in cells]
        below = [v - c["low"] if c.get("low") is not None else 0 for v, c in zip(values, cells)]
        above = [c["high"] - v if c.get("high") is not None else 0 for v, c in zip(values, cells)]
        ax.bar(range(len(names)), values, color="tab:blue", yerr=[below, above], capsize=3, ecolor="black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
