"""Read a HeadProfile: a short text summary and one layers x heads heatmap per score."""

from __future__ import annotations

from pathlib import Path

from ..plotting import require_pyplot
from .profile import LEARNED_SINK, SCORES, HeadProfile


def summary(profile: HeadProfile, top: int = 10) -> list[str]:
    """Lines for a terminal: score ranges, how rare retrieval heads are, and the strongest ones."""
    lines = [f"{profile.model or 'model'}: {profile.layers} layers x {profile.heads} heads "
             f"({profile.kv_heads} KV), probes {profile.probe.get('lengths')} tokens, longreach {profile.version}"]
    for name in profile.scores:
        t = profile.tensor(name)
        lines.append(f"  {name:<12} mean {t.mean():.3f}  min {t.min():.3f}  max {t.max():.3f}")
    ret = profile.tensor("retrieval").flatten()
    n = ret.numel()
    for cut in (0.1, 0.3, 0.5):
        lines.append(f"  heads with retrieval >= {cut}: {int((ret >= cut).sum())} of {n} "
                     f"({100 * float((ret >= cut).float().mean()):.1f}%)")
    best = ret.argsort(descending=True)[:top].tolist()
    lines.append("  top retrieval heads (layer.head=score): "
                 + ", ".join(f"{i // profile.heads}.{i % profile.heads}={float(ret[i]):.2f}" for i in best))
    if LEARNED_SINK in profile.scores and "sink" in profile.scores:
        lines.extend(sink_lines(profile, top))
    return lines


def sink_lines(profile: HeadProfile, top: int = 10) -> list[str]:
    """Where a head's attention rests when no key needs it: its learned sink logit, or the first tokens."""
    learned, first = profile.tensor(LEARNED_SINK).flatten(), profile.tensor("sink").flatten()
    n = learned.numel()
    best = learned.argsort(descending=True)[:top].tolist()
    return [f"  learned sink vs first tokens: mean {learned.mean():.3f} vs {first.mean():.3f}; heads resting more "
            f"on the learned sink: {int((learned > first).sum())} of {n}",
            "  top learned-sink heads (layer.head=learned/first): "
            + ", ".join(f"{i // profile.heads}.{i % profile.heads}={float(learned[i]):.2f}/{float(first[i]):.2f}"
                        for i in best)]


def heatmaps(profile: HeadProfile, out: str | Path) -> list[Path]:
    """One PNG per score (layers down, query heads across), written to ``out``."""
    plt = require_pyplot("heatmaps of a head profile")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in [s for s in (*SCORES, LEARNED_SINK) if s in profile.scores]:
        fig, ax = plt.subplots(figsize=(0.35 * profile.heads + 2.2, 0.16 * profile.layers + 1.4))
        im = ax.imshow(profile.tensor(name).numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                       vmin=0, vmax=1)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"{name} ({profile.model or 'model'})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
