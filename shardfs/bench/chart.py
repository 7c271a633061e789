"""The PNG chart of a ``scripts/bench`` report (matplotlib, headless with Agg).

Top: each shardfs configuration's rate as a multiple of virtiofsd's (pair
by pair medians, whiskers at min and max); without virtiofsd, as a multiple
of shardfs with one queue.  Bottom: the backend's CPU per unit of work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def render(report: dict[str, Any], path: Path) -> None:
    workloads: list[str] = report["workloads"]
    rows = report["rows"]
    queues = sorted({r["queues"] for r in rows if r["backend"] == "shardfs"})
    has_peer = any(r["backend"] == "virtiofsd" for r in rows)
    ratios = {(r["workload"], r["queues"]): r for r in report["ratios"]}
    by = {(r["workload"], r["backend"], r["queues"]): r for r in rows}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8.5), constrained_layout=True)
    n = len(queues) + (1 if has_peer else 0)
    width = 0.8 / max(n, 1)
    x = range(len(workloads))
    colors = plt.get_cmap("viridis")
    for k, q in enumerate(queues):
        med, lo, hi = [], [], []
        for w in workloads:
            if has_peer:
                r = ratios.get((w, q))
                m, a, b = (r["median"], r["min"], r["max"]) if r else (0.0, 0.0, 0.0)
            else:
                base = by.get((w, "shardfs", queues[0]))
                mine = by.get((w, "shardfs", q))
                m = mine["median"] / base["median"] if base and mine else 0.0
                a = b = m
            med.append(m)
            lo.append(m - a)
            hi.append(b - m)
        pos = [i + (k - (len(queues) - 1) / 2) * width for i in x]
        bars = top.bar(pos, med, width, yerr=[lo, hi], capsize=2,
                       color=colors(0.2 + 0.6 * k / max(len(queues) - 1, 1)),
                       label=f"shardfs, {q} queue{'s' if q > 1 else ''}")
        top.bar_label(bars, labels=[f"{m:.2f}" for m in med], fontsize=7, padding=2)
    top.axhline(1.0, color="black", linewidth=0.8)
    top.set_xticks(list(x), [_label(w, rows) for w in workloads], fontsize=8)
    top.set_ylabel("x virtiofsd (1 queue)" if has_peer else "x shardfs 1 queue")
    top.set_title("shardfs / virtiofsd, same frontend, pre-built requests"
                  if has_peer else "shardfs (virtiofsd not measured)")
    top.legend(fontsize=8)
    series = ([("virtiofsd", 1)] if has_peer else []) + [("shardfs", q) for q in queues]
    for k, (backend, q) in enumerate(series):
        vals = [by[(w, backend, q)]["cpu_us_per_unit"] if (w, backend, q) in by else 0.0
                for w in workloads]
        pos = [i + (k - (len(series) - 1) / 2) * width for i in x]
        color = "tab:orange" if backend == "virtiofsd" else colors(
            0.2 + 0.6 * (k - (1 if has_peer else 0)) / max(len(queues) - 1, 1))
        bottom.bar(pos, vals, width, color=color, label=f"{backend} {q}q")
    bottom.set_yscale("log")
    bottom.set_xticks(list(x), [_label(w, rows) for w in workloads], fontsize=8)
    bottom.set_ylabel("backend CPU us per unit (log)")
    bottom.set_title("backend CPU per op / per MB / per directory entry (lower is better)")
    bottom.legend(fontsize=8)
    m = report["meta"]
    fig.suptitle(f"{m['cpus']} CPUs, {m['cpu_model']}; {m.get('virtiofsd') or 'no virtiofsd'};"
                 f" shardfs {m['shardfs_rev']}, poll {m['poll_us']} us, depth {m['depth']}",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(workload: str, rows: list[dict[str, Any]]) -> str:
    unit = next((r["unit"] for r in rows if r["workload"] == workload), "")
    return f"{workload}\n({unit})"
