"""Attention-level position re-mapping: Self-Extend, STRING, Ms-PoE.

All three work on the q/k transformers already rotated, by rotating them again by a position delta
(``rotary.rerotate``), inside longreach's attention function. Self-Extend and STRING are *two-piece*:
keys closer than a window keep their true relative positions, farther keys get re-mapped ones that
stay within the trained range; the kernel attends the two pieces apart and merges them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..configurable import param
from ..errors import InputError, SpecError
from ..kernels import FarKeys
from ..methods.base import check_int
from ..methods.registry import register
from ..methods.scoring import causal_probs
from ..stages import PLAIN, SoftmaxExtras
from .base import PositionView, RemapPositions
from .rotary import RopeInfo, rerotate, rope_info, text_config


def _positions(t_q: int, t_k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Query and key positions: the queries are the last ``t_q`` of ``t_k`` tokens."""
    return torch.arange(t_k - t_q, t_k, device=device), torch.arange(t_k, device=device)


@register
@dataclass(frozen=True)
class SelfExtend(RemapPositions):
    """Neighbours (distance < window) keep exact positions; farther keys use grouped positions
    ``floor(j / group)``, with the query at ``floor(p / group) + window - floor(window / group)`` so the
    two pieces meet at the window. ``group=none`` picks, per sequence, the smallest group that keeps
    every grouped relative position below the trained length (1 within it: exactly dense)."""

    name: ClassVar[str] = "selfextend"
    summary: ClassVar[str] = "Self-Extend: exact neighbour attention + floor-grouped positions for far keys"
    paper: ClassVar[str] = "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning (arXiv:2401.01325)"

    group: int | None = param(None, "group size G for far positions (none: smallest that fits the trained length)")
    window: int = param(1024, "neighbour window: keys this close keep their exact relative position")

    def __post_init__(self) -> None:
        check_int(self, "window", self.window, minimum=1)
        if self.group is not None:
            check_int(self, "group", self.group, minimum=1)

    def check_model(self, model: torch.nn.Module) -> None:
        trained = rope_info(model).trained
        if self.window >= trained:
            raise InputError(f"selfextend: window={self.window} must be below the trained length ({trained})")

    def reach(self, trained: int) -> int | None:
        if self.group is None:
            return None  # group=none picks one that fits each sequence
        # the largest length whose max_relative stays below trained: (L - 1) // G <= trained - 1 - W + W // G
        return self.group * (trained - self.window + self.window // self.group)

    def max_relative(self, length: int, group: int) -> int:
        """The largest grouped relative position for ``length`` tokens."""
        return (length - 1) // group + self.window - self.window // group

    def group_for(self, length: int, trained: int) -> int:
        if self.window >= trained:
            raise InputError(f"selfextend: window={self.window} must be below the trained length ({trained})")
        if self.group is not None:
            if self.max_relative(length, self.group) >= trained:
                raise InputError(
                    f"selfextend: group={self.group} maps {length} tokens to relative position "
                    f"{self.max_relative(length, self.group)}, past the trained {trained}; raise group or use "
                    "group=none (picks the smallest that fits)")
            return self.group
        group = 1
        while self.max_relative(length, group) >= trained:
            group += 1
        return group

    def view(self, q: Tensor, k: Tensor, rope: RopeInfo, state: dict) -> PositionView:
        t_q, t_k = q.shape[2], k.shape[2]
        group = max(state.get("group", 1), self.group_for(t_k, rope.trained))
        state["group"] = group  # grows, never shrinks, within one sequence
        if group == 1 or t_k <= self.window:
            return PositionView(q, k)  # grouping by 1 (or no far key) changes nothing: exactly dense
        pq, pk = _positions(t_q, t_k, q.device)
        dq = torch.div(pq, group, rounding_mode="floor") + self.window - self.window // group - pq
        dk = torch.div(pk, group, rounding_mode="floor") - pk
        far = FarKeys(rerotate(q, dq, rope.inv_freq), rerotate(k, dk, rope.inv_freq), self.window)
        return PositionView(q, k, far)


@register
@dataclass(frozen=True)
class String(RemapPositions):
    """Relative positions ``r >= shift`` become ``r - shift + local``: the far keys reuse well-trained
    positions instead of the rarely-trained largest ones. ``shift=none`` uses a third of the trained
    length, raised when needed so the largest shifted position stays below the trained length; that
    reaches ``2 x trained - local`` tokens (longer inputs are refused)."""

    name: ClassVar[str] = "string"
    summary: ClassVar[str] = "STRING: shift well-trained relative positions over the rarely-trained far ones"
    paper: ClassVar[str] = "Why Does the Effective Context Length of LLMs Fall Short? (arXiv:2410.18745)"

    shift: int | None = param(None, "S: relative positions >= S are shifted down by S - local (none: auto)")
    local: int = param(128, "W: the shifted positions start at W, so the nearest W stay unique")

    def __post_init__(self) -> None:
        check_int(self, "local", self.local, minimum=1)
        if self.shift is not None:
            check_int(self, "shift", self.shift, minimum=1)
            if self.shift <= self.local:
                raise SpecError(f"string: shift ({self.shift}) must exceed local ({self.local})")

    def check_model(self, model: torch.nn.Module) -> None:
        trained = rope_info(model).trained
        if self.shift is not None and self.shift >= trained:
            raise InputError(f"string: shift={self.shift} must be below the trained length ({trained})")

    def reach(self, trained: int) -> int | None:
        # the farthest relative position, length - 1, shifts to length - 1 - shift + local: below trained
        shift = trained - 1 if self.shift is None else self.shift  # shift=none grows to at most trained - 1
        return trained + shift - self.local

    def shift_for(self, length: int, trained: int) -> int:
        if self.shift is not None:
            if length > self.reach(trained):
                raise InputError(
                    f"string: shift={self.shift} maps {length} tokens to relative position "
                    f"{length - 1 - self.shift + self.local}, past the trained {trained}; raise shift (at most "
                    f"{trained - 1}) or use shift=none (picks one that fits)")
            return self.shift
        shift = max(trained // 3, length - trained + self.local, self.local + 1)
        if shift >= trained:
            raise InputError(
                f"string: {length} tokens cannot keep every relative position below the trained {trained} "
                f"(STRING reaches {self.reach(trained)} tokens); use selfextend or a rope scaling "
                "method for longer inputs")
        return shift

    def view(self, q: Tensor, k: Tensor, rope: RopeInfo, state: dict) -> PositionView:
        t_k = k.shape[2]
        shift = max(state.get("shift", 0), self.shift_for(t_k, rope.trained))
        state["shift"] = shift
        if t_k <= shift:
            return PositionView(q, k)  # no key is that far: exactly dense
        delta = torch.full((q.shape[2],), float(self.local - shift), device=q.device)
        return PositionView(q, k, FarKeys(rerotate(q, delta, rope.inv_freq), k, shift))


@register
@dataclass(frozen=True)
class MsPoE(RemapPositions):
    """Each KV head group reads positions divided by its own ratio in [min_ratio, max_ratio]; groups
    whose attention is most concentrated (most weights above 4x the row mean, as in the authors' code,
    averaged over the prompt's last queries) get the smallest ratio. Ratios are per KV head, not per
    query head, so GQA keys are never copied per query head. The first ``first_layer`` layers are left
    as they are (as in the paper)."""

    name: ClassVar[str] = "mspoe"
    summary: ClassVar[str] = "Ms-PoE: multi-scale position rescaling per head against lost-in-the-middle"
    paper: ClassVar[str] = "Found in the Middle: How Language Models Use Long Contexts Better via " \
                           "Plug-and-Play Positional Encoding (arXiv:2403.04797)"

    min_ratio: float = param(1.2, "smallest position compression ratio (>= 1)")
    max_ratio: float = param(1.8, "largest position compression ratio")
    first_layer: int = param(2, "layers below this keep their positions")
    observe: int = param(64, "last prompt queries that rank the heads")

    def __post_init__(self) -> None:
        if not 1 <= self.min_ratio <= self.max_ratio:
            raise SpecError(f"mspoe: need 1 <= min_ratio <= max_ratio, got {self.min_ratio} and {self.max_ratio}")
        check_int(self, "first_layer", self.first_layer, minimum=0)
        check_int(self, "observe", self.observe, minimum=1)

    def check_model(self, model: torch.nn.Module) -> None:
        layers = text_config(model).num_hidden_layers
        if self.first_layer >= layers and self.max_ratio > 1:
            raise InputError(f"mspoe: first_layer={self.first_layer} leaves every one of this model's {layers} "
                             "layers as it is, so nothing would change; lower first_layer")

    def ratios(self, q: Tensor, k: Tensor, scale: float, extras: SoftmaxExtras = PLAIN) -> Tensor:
        """(Hkv,) ratio per KV head: outlier-rich heads (position-aware) get the smallest. ``extras``: the
        model's softcap and learned sinks, so the weights counted are the model's own."""
        n_kv = k.shape[1]
        group = q.shape[1] // n_kv
        t_k = k.shape[2]
        rows = torch.arange(max(q.shape[2] - self.observe, 0), q.shape[2], device=q.device)
        probs = causal_probs(q, k, scale, rows, extras=extras).flatten(2, 3)  # (B, Hkv, G*rows, Tk)
        pos = ((t_k - q.shape[2]) + rows).repeat(group)
        causal = torch.arange(t_k, device=q.device)[None, :] <= pos[:, None]
        uniform = 1.0 / (pos + 1).float()[:, None]
        if extras.sinks is not None:  # the row mean of the keys' weights: the sink's share is no key's
            uniform = uniform * probs.sum(-1, keepdim=True)
        outliers = ((probs > 4 * uniform) & causal).float().sum(-1) / (pos + 1).float()  # (B, Hkv, rows)
        score = outliers.mean(dim=(0, 2))
        ratios = torch.linspace(self.min_ratio, self.max_ratio, n_kv, device=q.device, dtype=torch.float64)
        out = torch.empty_like(ratios)
        out[score.argsort(descending=True)] = ratios
        return out

    def view(self, q: Tensor, k: Tensor, rope: RopeInfo, state: dict) -> PositionView:
        layer = state.get("layer_idx", 0)
        if layer < self.first_layer or self.max_ratio == 1:
            return PositionView(q, k)
        if "ratios" not in state:
            state["ratios"] = self.ratios(q, k, state.get("scale") or q.shape[-1] ** -0.5, state.get("extras", PLAIN))
        ratios = state["ratios"]  # (Hkv,)
        pq, pk = _positions(q.shape[2], k.shape[2], q.device)
        group = q.shape[1] // k.shape[1]
        rk = ratios[:, None]
        rq = ratios.repeat_interleave(group)[:, None]
        q2 = rerotate(q, pq[None].double() / rq - pq[None], rope.inv_freq)
        k2 = rerotate(k, pk[None].double() / rk - pk[None], rope.inv_freq)
        return PositionView(q2, k2)


@register
@dataclass(frozen=True)
class Gali(RemapPositions):
    """Past the trained length L, the newest tokens keep integer positions up to L - 1 and the oldest
    are packed ``g`` per position (fractional positions i + j/g), greedily keeping as many well-trained
    unit intervals as fit. Queries sit at ``ceil`` of their position; a key at a fractional position
    is scored by interpolating the attention logits of its ``floor`` and ``ceil`` positions — which, the
    logit being linear in the key, is one key vector (1 - a) R(floor) k + a R(ceil) k. Positions are
    recomputed for the current length at every forward, so prefill in chunks (``--chunk``) to follow
    the paper's chunk-wise schedule; a one-shot prefill puts every query at its final position."""

    name: ClassVar[str] = "gali"
    summary: ClassVar[str] = "GALI: greedy position interpolation + attention-logit interpolation past L"
    paper: ClassVar[str] = "A Training-Free Length Extrapolation Approach for LLMs: Greedy Attention Logit " \
                           "Interpolation (arXiv:2502.02659)"

    window: int = param(1024, "newest tokens guaranteed unit-spaced integer positions (0: the paper code's default)")

    def __post_init__(self) -> None:
        check_int(self, "window", self.window, minimum=0)

    def check_model(self, model: torch.nn.Module) -> None:
        trained = rope_info(model).trained
        if self.window >= trained - 1:
            raise InputError(f"gali: window={self.window} must be below the trained length ({trained}) - 1")

    def reach(self, trained: int) -> int | None:
        return None  # packs any length below the trained positions

    def positions(self, length: int, trained: int) -> Tensor:
        """(length,) float64 positions, all below ``trained``; integers when ``length <= trained``."""
        if length <= trained:
            return torch.arange(length, dtype=torch.float64)
        group = -(-(length - self.window) // (trained - self.window))  # ceil
        # and enough packing that the last position stays an integer below trained (queries sit at ceil)
        group = max(group, 2, 1 + -(-(length - trained) // (trained - 1)))
        packed_units = -(-(length - trained) // (group - 1))  # positions [0, packed_units) hold `group` each
        n_packed = length - (trained - packed_units)
        packed = torch.arange(n_packed, dtype=torch.float64) / group
        tail = torch.arange(packed_units, trained, dtype=torch.float64)
        return torch.cat([packed, tail])

    def view(self, q: Tensor, k: Tensor, rope: RopeInfo, state: dict) -> PositionView:
        t_q, t_k = q.shape[2], k.shape[2]
        if t_k <= rope.trained:
            return PositionView(q, k)
        pos = self.positions(t_k, rope.trained).to(q.device)
        pq, pk = _positions(t_q, t_k, q.device)
        q2 = rerotate(q, pos[-t_q:].ceil() - pq, rope.inv_freq)
        low, frac = pos.floor(), (pos - pos.floor()).to(k.dtype)
        k_low = rerotate(k, low - pk, rope.inv_freq)
        k_high = rerotate(k, low + 1 - pk, rope.inv_freq)
        k2 = k_low + frac[:, None] * (k_high - k_low)
        return PositionView(q2, k2)
