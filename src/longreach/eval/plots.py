"""The report's figures as base64 PNGs: depth x length heatmaps, accuracy-vs-density Pareto,
accuracy vs position (``kvret``), loss vs position (``ppl``). matplotlib is the ``plots`` extra;
without it the report keeps its tables and says how to get the figures."""

from __future__ import annotations

import base64
import io
from collections import defaultdict

from ..plotting import pyplot


def figures(rows: list[dict], methods: list[str]) -> list[tuple[str, str]]:
    plt = pyplot()
    if plt is None:
        return []
    out = []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        sub = [r for r in rows if r["task"] == task]
        if sub[0].get("metric") == "ppl":
            out.append((f"{task}: loss vs position", _png(plt, _loss_curve(plt, sub, methods))))
            continue
        if any(r.get("depth") is not None for r in sub):
            out.append((f"{task}: score by depth x length", _png(plt, _heatmaps(plt, sub, methods))))
        if task.startswith("kvret"):
            out.append((f"{task}: accuracy vs position of the gold pair", _png(plt, _position(plt, sub, methods))))
    scored = [r for r in rows if r.get("metric") != "ppl"]
    if scored:
        out.append(("score vs attention density (Pareto)", _png(plt, _pareto(plt, scored, methods))))
    return out


def _png(plt, fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _heatmaps(plt, rows, methods):
    depths = sorted({r["depth"] for r in rows if r.get("depth") is not None})
    lengths = sorted({r["length"] for r in rows})
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(present), figsize=(2.2 + 2.2 * len(present), 2.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], present, strict=True):
        grid = defaultdict(list)
        for r in rows:
            if r["method"] == method and r.get("depth") is not None:
                grid[(depths.index(r["depth"]), lengths.index(r["length"]))].append(r["score"])
        data = [[_mean(grid[(d, n)]) if grid[(d, n)] else float("nan") for n in range(len(lengths))]
                for d in range(len(depths))]
        image = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for d, line in enumerate(data):
            for n, value in enumerate(line):
                if value == value:  # not NaN
                    ax.text(n, d, f"{value:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.tick_params(axis="y", labelleft=ax is axes[0][0])
        ax.set_title(method, fontsize=8)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    return fig


def _pareto(plt, rows, methods):
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = sorted({r["length"] for r in rows})
    markers = "osD^vP*X"
    for method in methods:
        for i, length in enumerate(lengths):
            sub = [r for r in rows if r["method"] == method and r["length"] == length and r.get("density") is not None]
            if sub:
                ax.scatter(_mean([r["density"] for r in sub]), _mean([r["score"] for r in sub]),
                           marker=markers[i % len(markers)], color=f"C{methods.index(method) % 10}",
                           label=f"{method} @ {length}")
    ax.set_xlabel("attention density (prefill)")
    ax.set_ylabel("mean score (all generation tasks)")
    ax.set_ylim(-0.05, 1.05)
    if ax.get_legend_handles_labels()[0]:  # rows without a density draw nothing to label
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def _position(plt, rows, methods):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method in methods:
        by_depth = defaultdict(list)
        for r in rows:
            if r["method"] == method and r.get("depth") is not None:
                by_depth[r["depth"]].append(r["score"])
        if by_depth:
            xs = sorted(by_depth)
            ax.plot(xs, [_mean(by_depth[x]) for x in xs], marker="o", label=method)
    ax.set_xlabel("position of the gold pair (0 = first, 1 = last)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    return fig


def _loss_curve(plt, rows, methods):
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.2), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for method in methods:
            buckets = defaultdict(list)
            for r in rows:
                if r["method"] == method and r["length"] == length:
                    for lo, hi, loss in r.get("loss_buckets", []):
                        buckets[(lo + hi) / 2].append(loss)
            if buckets:
                xs = sorted(buckets)
                ax.plot(xs, [_mean(buckets[x]) for x in xs], marker=".", label=method)
        ax.set_title(f"{length} tokens", fontsize=9)
        ax.set_xlabel("token position")
    axes[0][0].set_ylabel("mean next-token loss (nats)")
    axes[0][-1].legend(fontsize=7)
    return fig
