"""The rules of ``longreach tune``, apart from any model: the candidate grid, the screen's cut, the acceptance rule
on paired evidence and the ranking. Plain functions on numbers, so each can be checked by hand (tests/test_tune.py).

Why two thresholds: with n ≈ 50 prompts per task the 95% interval of a paired difference is about ±7 points even
when the candidate agrees with dense on every prompt, so "the interval's lower end is above −2 points" can never
be shown. The rule is therefore the one issue 21 accepts: the *observed* difference is at most ``max_drop`` points
below the baseline, and the interval's lower end is above ``min_lower`` (−10 points by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InputError
from ..spec import parse_spec
from .report import EPS, Paired

KINDS = ("prefill", "press", "position")
PREFILL_METHODS = ("quest", "moba", "hip", "flexprefill", "vslash", "twilight", "anchor", "streaming")
PREFILL_DENSITIES = (0.05, 0.1, 0.2)
PRESS_METHODS = ("snapkv", "snapkv:pool=31", "pyramidkv", "finch", "streamingkv")
PRESS_DENSITIES = (0.1, 0.25, 0.5)


def default_prefill() -> list[str]:
    """Select methods that speed up the prefill, each at 5%, 10% and 20% density. Left out: ``loki`` (its prefill
    selection is O(T² · rank), slower than dense on CPU), ``recycled`` (a decode method: dense prefill), ``hyper``,
    ``squeezed`` and ``longheads`` (lowest mass recall at 8k, docs/sparse-8k.md) and the head policies (they need a
    head profile). ``--candidates`` takes any of them."""
    return [canonical(f"{m}:density={d}") for m in PREFILL_METHODS for d in PREFILL_DENSITIES]


def default_press() -> list[str]:
    """Presses at 10%, 25% and 50% of the prompt's keys; SnapKV with its default pool and with pool=31."""
    return [canonical(f"{m},density={d}" if ":" in m else f"{m}:density={d}") for m in PRESS_METHODS
            for d in PRESS_DENSITIES]


def default_positions(length: int, trained: int) -> list[str]:
    """Position methods for ``length`` past the ``trained`` window: the re-mapping ones with their defaults (they
    size themselves to the length) and the rope rescalings at factor F = ceil(length / trained) (and YaRN at 2F)."""
    factor = float(max(2, math.ceil(length / trained)))
    return [canonical(s) for s in ("selfextend", "selfextend:window=512", "string", "gali", f"yarn:factor={factor}",
                                   f"yarn:factor={2 * factor}", f"dynamic:factor={factor}",
                                   f"linear:factor={factor}")]


def canonical(spec: str) -> str:
    return str(parse_spec(spec))


def kind_of(spec: str) -> str:
    """``prefill`` (one select method), ``press`` or ``position``; a composite or ``dense`` is refused: tune composes
    the position method with the others itself, and dense is the baseline."""
    methods = parse_spec(spec).methods
    if len(methods) != 1:
        raise InputError(f"candidate '{spec}' combines {len(methods)} methods; give single methods (tune composes "
                         "the position method it picks with the prefill and press candidates itself)")
    if methods[0].name == "dense":
        raise InputError("dense is the baseline every candidate is compared with; leave it out of --candidates")
    kinds = {"select": "prefill", "press": "press", "position": "position"}
    if methods[0].kind not in kinds:
        raise InputError(f"candidate '{spec}' is a {methods[0].kind} (it replaces the prefill); tune screens "
                         "select methods, presses and position methods: compare it with longreach eval")
    return kinds[methods[0].kind]


def compose(position: str | None, spec: str) -> str:
    """``spec`` under the chosen position method (canonical), or ``spec`` itself within the trained window."""
    if position is None:
        return spec
    return canonical(position if spec == "dense" else f"{position}+{spec}")


# ---- stage 1: the screen ----

@dataclass
class Screened:
    """One candidate's screen: means over the screening prompts. Select methods are replayed by
    ``diagnostics.diagnose`` (mass recall, output error); presses run on the prompt and move the next-token
    distribution at its end by ``shift`` (total variation distance from dense, 0..1)."""

    spec: str
    kind: str
    prompts: int
    recall: float | None = None
    output_error: float | None = None
    density: float | None = None
    shift: float | None = None
    agree: float | None = None  # share of prompts whose most likely next token is dense's
    kept: bool = True
    reason: str = ""


@dataclass(frozen=True)
class ScreenRule:
    min_recall: float = 0.7  # select methods: dense softmax mass kept, mean over layers, heads and queries
    max_error: float = 0.35  # select methods: ||out - dense|| / ||dense||, mean
    max_shift: float = 0.5  # presses: total variation distance of the next-token distribution from dense's
    survivors: int = 6  # at most this many per kind go on to the tuning eval (closest to dense first)


def cut(screened: Sequence[Screened], rule: ScreenRule) -> list[Screened]:
    """Mark each candidate kept or dropped, with the reason; returns the kept ones, closest to dense first.

    Dropped when below ``min_recall``, above ``max_error`` or above ``max_shift``; of those left, at most
    ``survivors`` per kind are kept, by the lowest output error (select) or shift (press), ties in grid order."""
    for s in screened:
        s.kept, s.reason = True, ""
        if s.recall is not None and s.recall < rule.min_recall:
            s.kept, s.reason = False, f"mass recall {s.recall:.3f} < {rule.min_recall:g}"
        elif s.output_error is not None and s.output_error > rule.max_error:
            s.kept, s.reason = False, f"output error {s.output_error:.3f} > {rule.max_error:g}"
        elif s.shift is not None and s.shift > rule.max_shift:
            s.kept, s.reason = False, f"next-token shift {s.shift:.3f} > {rule.max_shift:g}"
    kept = []
    for kind in KINDS:
        mine = [s for s in screened if s.kind == kind and s.kept]
        mine.sort(key=lambda s: s.output_error if s.output_error is not None else (s.shift or 0.0))  # stable
        for rank, s in enumerate(mine, 1):
            if rank > rule.survivors:
                s.kept, s.reason = False, f"closest to dense rank {rank} > --survivors {rule.survivors}"
        kept += [s for s in mine if s.kept]
    return kept


# ---- stages 2 and 3: the acceptance rule ----

@dataclass(frozen=True)
class Rule:
    max_drop: float = 2.0  # points: the observed candidate - baseline difference may be at most this far below 0
    min_lower: float = -10.0  # points: the 95% interval's lower end must be above this (reporting stage)
    min_speedup: float = 1.0  # prefill candidates: baseline prefill time / candidate's must exceed this
    tune_slack: int = 1  # tuning prompts per task a candidate may lose net of those it wins, whatever max_drop says

    def __post_init__(self) -> None:
        if not 0 <= self.max_drop <= 100:
            raise InputError(f"--max-drop is in points, 0..100; got {self.max_drop}")
        if not -100 <= self.min_lower <= 0:
            raise InputError(f"--min-lower is the interval's lower end in points, -100..0; got {self.min_lower}")
        if not self.min_speedup >= 0:
            raise InputError(f"--min-speedup must be >= 0, got {self.min_speedup}")
        if not (isinstance(self.tune_slack, int) and self.tune_slack >= 0):
            raise InputError(f"--tune-slack is a count of prompts, >= 0; got {self.tune_slack!r}")


def forgiven(p: Paired, rule: Rule, final: bool) -> int:
    """Prompts the tuning slack forgave on this task: the net loss of a task that passed by the slack alone, else
    0 (it passed by the observed difference, or it failed)."""
    if final or not p.table or not 100 * p.diff < -rule.max_drop - EPS:
        return 0
    lost = p.table[2] - p.table[1]
    return lost if lost <= rule.tune_slack else 0


def judge(p: Paired, rule: Rule, final: bool) -> str | None:
    """Why the paired evidence of one task fails the rule, or None when it passes.

    Tuning prompts (``final=False``) are too few for an interval to say anything, so there only the observed
    difference counts, and a right/wrong task also passes when the candidate lost at most ``tune_slack`` prompts
    net of those it won: with n prompts one is 100/n points, and a prompt dense answers on a near-tie can flip
    under a small change (docs/tuning.md, "Near-ties"), so one loss there may be noise; the reporting prompts
    decide. On the reporting prompts (``final=True``) the interval's lower end must also clear
    ``min_lower``, and no slack applies. Boundaries are inclusive for the observed difference (−2.0 passes
    ``max_drop=2``) and strict for the lower end, each with :data:`EPS` of float slack towards refusing the claim."""
    if p.n == 0:
        return "no paired baseline rows"
    if 100 * p.diff < -rule.max_drop - EPS:
        if forgiven(p, rule, final):
            return None
        lost = p.table[2] - p.table[1] if p.table else None
        net = f" ({lost} prompt{'s' * (lost != 1)} lost net of those won, more than --tune-slack " \
              f"{rule.tune_slack})" if not final and lost is not None else ""
        return f"observed {100 * p.diff:+.1f} points{net}, more than {rule.max_drop:g} below the baseline"
    if final and not 100 * p.lo > rule.min_lower + EPS:
        return f"95% interval's lower end {100 * p.lo:+.1f} is not above {rule.min_lower:g} points (n = {p.n})"
    return None


@dataclass
class Standing:
    """A candidate's evidence on one stage, over every task: whether it passed, and what it buys."""

    spec: str  # as run (composed with the position method past the trained length)
    kind: str
    order: int  # position in the grid (ties)
    passed: bool
    reasons: list[str] = field(default_factory=list)
    score: float = 0.0  # sum of scores over every task's rows (position methods rank by it)
    speed_ratio: float | None = None  # baseline prefill time / candidate's (medians over comparable rows)
    speed_from: str = ""  # "" this stage's rows; "timing": rows timed again alike; "tuning": the tuning stage's
    cache_ratio: float | None = None  # candidate's KV bytes after the prompt / baseline's
    baseline: str = "dense"  # what it was judged against (past the trained length: a position method)
    rows_shared: int = 0  # rows of both sides that shared the cores with other work (eval.sharing) ...
    rows_recorded: int = 0  # ... of the rows that recorded it


def rank(standings: Sequence[Standing], kind: str) -> list[Standing]:
    """The passing candidates of ``kind``, best first: prefill by speed (fastest), press by cache (smallest, then
    more accurate), position by accuracy (most correct); ties in grid order."""
    mine = [s for s in standings if s.kind == kind and s.passed]
    if kind == "prefill":
        return sorted(mine, key=lambda s: (-(s.speed_ratio or 0.0), s.order))
    if kind == "press":
        return sorted(mine, key=lambda s: (s.cache_ratio if s.cache_ratio is not None else math.inf, -s.score,
                                           s.order))
    return sorted(mine, key=lambda s: (-s.score, s.order))
