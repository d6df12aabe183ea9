"""Plain-text tables, atomic JSON files and rate-distortion plots for evaluation results."""

from __future__ import annotations

import math
import os
import re

import numpy as np

from qinco_jax.files import write_json  # noqa: F401  (re-exported for the CLIs)


def format_value(column: str, value) -> str:
    """One cell: MSE to 4 significant digits, recalls as 0.xxx, microseconds with 1 decimal, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, int, np.integer)):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "nan"
    if re.fullmatch(r"r\d+|recall.*", column):
        return f"{value:.3f}"
    if column.endswith("_us") or column.endswith("_s"):
        return f"{value:.1f}"
    return f"{value:.4g}"


def format_table(rows: list[dict], columns) -> str:
    """Aligned plain-text table of rows (dicts) with the given column keys; missing cells show n/a."""
    columns = list(columns)
    cells = [[format_value(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), sep] + [line(r) for r in cells])


def _is_number(value) -> bool:
    """True for numbers and None (n/a cells align with the numbers of their column)."""
    return value is None or (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool))


def figure(figsize: tuple[float, float]):
    """A matplotlib Figure drawn by the Agg canvas (no display needed); RuntimeError when matplotlib is missing,
    which the CLIs report as "no plot" and carry on."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'qinco-jax[plots]' (or pip install matplotlib)") from None
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_rate_distortion(curves: dict, path, title: str = "") -> None:
    """PNG of MSE (log scale) against bytes per vector; curves = {name: (bytes_list, mse_list)}, None MSEs skipped."""
    fig = figure((6.4, 4.8))
    ax = fig.add_subplot()
    markers = "osD^v<>ph*"
    for i, (name, (nbytes, mses)) in enumerate(curves.items()):
        pts = [(b, m) for b, m in zip(nbytes, mses) if m is not None and m > 0]
        if pts:
            ax.plot(*zip(*pts), marker=markers[i % len(markers)], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("bytes per vector")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(os.fspath(path), dpi=100, format="png")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (recall, qps) points not dominated by another (higher or equal in both), sorted by recall."""
    pts = sorted(set(p for p in points if p[0] is not None and p[1] is not None), key=lambda p: (-p[0], -p[1]))
    front, best_qps = [], -math.inf
    for r, q in pts:
        if q > best_qps:
            front.append((r, q))
            best_qps = q
    return sorted(front)


def _point_label(row: dict) -> str | None:
    """'(nprobe, nshort)' of a search setting (either may be absent)."""
    parts = [row.get("nprobe"), row.get("nshort")]
    if all(p is None for p in parts):
        return None
    return "(" + ", ".join("-" if p is None else str(p) for p in parts) + ")"


def plot_qps_recall(curves: dict, path, ks=(1, 10), title: str = "") -> None:
    """PNG with one panel per k: QPS (log scale) against R@k, the Pareto front of each method as a line and
    every measured setting as a faint dot; curves = {method: [row dicts with 'qps' and 'r{k}']}. Points of
    the fronts are labelled (nprobe, nshort); the legend sits below the panels, off the points."""
    fig = figure((6.5 * len(ks), 6.0))
    markers = "osD^v<>ph*"
    handles = {}
    for j, k in enumerate(ks):
        ax = fig.add_subplot(1, len(ks), j + 1)
        for i, (name, rows) in enumerate(curves.items()):
            labelled = {}
            for r in rows:
                if r.get(f"r{k}") is not None and r.get("qps"):
                    labelled.setdefault((r[f"r{k}"], r["qps"]), _point_label(r))
            pts = [p for p in labelled if p[1] > 0]
            if not pts:
                continue
            color = f"C{i % 10}"
            ax.scatter(*zip(*pts), s=8, alpha=0.3, color=color)
            front = pareto(pts)
            (line,) = ax.plot(*zip(*front), marker=markers[i % len(markers)], color=color, label=name)
            handles.setdefault(name, line)
            for p in front:
                if labelled.get(p):
                    ax.annotate(labelled[p], p, textcoords="offset points", xytext=(3, 3), fontsize=6, color=color)
        ax.set_yscale("log")
        ax.set_xlabel(f"R@{k}")
        ax.set_ylabel("queries per second")
        ax.set_title(f"QPS vs R@{k}")
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize="medium")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)),
                   fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(handles) + 3) // 4), 1, 1))
    fig.savefig(os.fspath(path), dpi=100, format="png")
