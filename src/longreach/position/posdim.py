"""Position-bias scaling of a single dimension (Yu et al., arXiv:2406.02536), at the attention level.

The paper finds that the causal mask alone writes absolute position into a few hidden-state dimensions
(values monotonic in position), that these drive the attention's position bias ("lost in the middle"), and
that scaling one such dimension by a factor below 1 reduces the bias. Here search and scaling act on what
longreach's attention function sees, the queries and keys, taken back to before RoPE (each token un-rotated by
its own position, so a dim is a content channel, not a rotating coordinate):

- detection (``position_scores``; run on a model by ``longreach heads posdim``): per layer, each head
  dimension scores the |Spearman rank correlation| of its un-rotated value with the token's position over a
  probe prompt, averaged over query and key heads; monotonic dims score near 1;
- scaling (``posdim``): the chosen dims of every head's un-rotated q and/or k are multiplied by ``scale``,
  then rotated back. Scaling before the rotation keeps RoPE's relative-position property (scaling a
  post-RoPE coordinate alone would not: it is half of a rotating pair).

Why un-rotate: on post-RoPE q/k, any pair of dims whose rotation covers less than half a turn over the probe
looks monotonic in position (SmolLM2's dims 14-19 / 46-51 over 1k tokens), whatever the content.

Simplifications against the paper: dims of the per-head q/k instead of one residual-stream dimension; a rank
correlation instead of the paper's monotonicity-and-smoothness search; ``scale`` applies at every position
(the paper reports the effect as mainly on the last tokens' attention).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..configurable import param
from ..errors import InputError, SpecError, UnsupportedModelError
from ..methods.base import check_int
from ..methods.registry import register
from ..saved import load_tagged, write_atomic
from .base import PositionView, RemapPositions
from .rotary import RopeInfo, rerotate, rope_info, text_config

FORMAT = "longreach.PositionDims/1"


def position_scores(x: Tensor, skip: int = 4) -> Tensor:
    """x (B, H, T, D) -> (D,): per dim, |Spearman correlation| of its value with position, mean over B and H.

    The first ``skip`` tokens are left out: attention-sink tokens carry outlier values that say nothing of
    position elsewhere. Tied values share their mean rank (bf16 activations tie often; ranking ties by
    index would fake a correlation with position), so a constant dim scores 0.
    """
    x = x[..., skip:, :]
    t = x.shape[-2]
    if t < 3:
        raise InputError(f"position scores need at least {skip + 3} tokens, got {skip + t}")
    ranks = midranks(x.transpose(-1, -2).double())  # (B, H, D, T): each dim's values ranked along positions
    ranks = ranks - ranks.mean(dim=-1, keepdim=True)
    pos = torch.arange(t, dtype=torch.float64, device=x.device)
    pos = pos - pos.mean()
    corr = (ranks @ pos) / (ranks.norm(dim=-1) * pos.norm()).clamp_min(1e-30)  # (B, H, D)
    return corr.abs().mean(dim=(0, 1))


def midranks(x: Tensor) -> Tensor:
    """Ranks (0-based, float64) along the last dim; tied values share the mean of their ranks."""
    values, order = x.sort(dim=-1)
    n = x.shape[-1]
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[..., 1:] = values[..., 1:] != values[..., :-1]
    group = starts.long().cumsum(-1) - 1  # (..., T) which run of equal values each sorted slot is in
    slot = torch.arange(n, dtype=torch.float64, device=x.device).expand(values.shape)
    first = torch.full_like(slot, float(n)).scatter_reduce(-1, group, slot, "amin")
    last = torch.zeros_like(slot).scatter_reduce(-1, group, slot, "amax")
    mean_rank = ((first + last) / 2).gather(-1, group)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


@dataclass
class PositionDims:
    """Per layer, every head dimension's position score (``position_scores``), plus what produced them."""

    model: str
    layers: int
    head_dim: int
    scores: list[list[float]]  # (layers, head_dim)
    probe: dict = field(default_factory=dict)
    version: str = ""

    def best(self, layer: int, n: int = 1, min_score: float = 0.0) -> list[int]:
        """The ``n`` best-scoring dims of ``layer`` (best first), those below ``min_score`` left out."""
        row = torch.tensor(self.scores[layer], dtype=torch.float64)
        order = row.argsort(descending=True, stable=True)[:n]
        return [int(d) for d in order if row[d] >= min_score]

    def save(self, path: str | Path) -> Path:
        head = {"format": FORMAT, **asdict(self)}
        rows = ",\n".join("  " + json.dumps(row) for row in head.pop("scores"))  # one line per layer
        return write_atomic(path, json.dumps(head, indent=1)[:-2] + f',\n "scores": [\n{rows}\n ]\n}}\n')

    @classmethod
    def load(cls, path: str | Path) -> PositionDims:
        dims = load_tagged(path, FORMAT, "position dims file", "`longreach heads posdim --model M --out dims.json`",
                           cls)
        if len(dims.scores) != dims.layers or any(len(row) != dims.head_dim for row in dims.scores):
            raise InputError(f"{path}: scores are not {dims.layers} layers x {dims.head_dim} dims")
        return dims

    def check_model(self, model: nn.Module, where: str) -> None:
        """Refuse dims found on another model: shapes must agree, and names when both are known."""
        layers, head_dim = model_shape(model)
        if (layers, head_dim) != (self.layers, self.head_dim):
            raise InputError(f"{where} was made for {self.model or 'a model'} with {self.layers} layers x head_dim "
                             f"{self.head_dim}, but this model has {layers} x {head_dim}; detect this model's dims "
                             "with `longreach heads posdim`")
        name = str(getattr(model, "longreach_id", "") or getattr(model.config, "_name_or_path", "") or "")
        if name and self.model and name != self.model:
            raise InputError(f"{where} was made for '{self.model}', not '{name}'; detect this model's dims with "
                             "`longreach heads posdim`")


def model_shape(model: nn.Module) -> tuple[int, int]:
    """(layers, head_dim) of a causal LM's config."""
    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(cfg.num_hidden_layers), int(head_dim)


@functools.cache
def _load(path: str, mtime: float) -> PositionDims:
    return PositionDims.load(path)


def load_dims(path: str) -> PositionDims:
    """Loaded once per file version: every attention call asks for its layer's dims."""
    p = Path(path)
    return _load(str(p.resolve()), p.stat().st_mtime if p.exists() else 0.0)


@register
@dataclass(frozen=True)
class PosDim(RemapPositions):
    """Multiplies the positional dims of the un-rotated q and/or k by ``scale`` (see the module docstring): per
    layer the ``top`` best of a ``file`` from ``longreach heads posdim`` (those scoring at least ``min_score``),
    or the ``dims`` given inline for every layer. ``scale=1`` changes nothing (exactly dense). Cost: two
    re-rotations of every query and cached key per layer and forward."""

    name: ClassVar[str] = "posdim"
    summary: ClassVar[str] = "scale the position-correlated q/k dimension(s) against position bias"
    paper: ClassVar[str] = "Mitigate Position Bias in Large Language Models via Scaling a Single Dimension " \
                           "(arXiv:2406.02536)"

    file: str = param("", "dims JSON from `longreach heads posdim` (per-layer position scores)")
    dims: str = param("", "instead of file: head dims joined by '|' (e.g. 31|63), scaled in every layer")
    scale: float = param(0.5, "factor on those dims (1: unchanged; the paper scales by a factor below 1)")
    top: int = param(1, "with file: dims per layer, best first")
    min_score: float = param(0.0, "with file: leave a layer's dims scoring below this alone (scores are in [0, 1])")
    on: str = param("qk", "scale the dims in q, k or qk")

    def __post_init__(self) -> None:
        if self.file and self.dims:
            raise SpecError("posdim: give file=PATH (from `longreach heads posdim`) or dims=D|D|..., not both")
        if self.on not in ("q", "k", "qk"):
            raise SpecError(f"posdim: on must be q, k or qk, got '{self.on}'")
        check_int(self, "top", self.top, minimum=1)
        if self.file:
            load_dims(self.file)  # a missing or malformed file fails now, before any model work
        elif self.dims:
            self._inline  # noqa: B018 (validates the list)

    @cached_property
    def _inline(self) -> list[int]:
        try:
            out = [int(d) for d in self.dims.split("|")]
        except ValueError:
            raise SpecError(f"posdim: dims are head-dimension indices joined by '|', got '{self.dims}'") from None
        if any(d < 0 for d in out) or len(set(out)) != len(out):
            raise SpecError(f"posdim: dims must be distinct indices >= 0, got '{self.dims}'")
        return out

    def check_model(self, model: nn.Module) -> None:
        if not (self.file or self.dims):
            raise SpecError("posdim: say which dims to scale: file=PATH (make one with `longreach heads posdim "
                            "--model M --out dims.json`) or dims=D|D|...")
        try:
            rope = rope_info(model)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"posdim runs in longreach's position stage, which acts on RoPE models: "
                                        f"{err}") from None
        if rope.interleaved:
            raise UnsupportedModelError(f"posdim: {type(model).__name__} pairs rotary dims (2i, 2i+1); posdim "
                                        "scales dims in half-split order, which this model does not use; use "
                                        "buckets or a rope scaling method (yarn, ...)")
        if self.file:
            load_dims(self.file).check_model(model, where=f"posdim: {self.file}")
            return
        head_dim = model_shape(model)[1]
        if max(self._inline) >= head_dim:
            raise InputError(f"posdim: dims {self.dims} reach past this model's head_dim {head_dim}")

    def layer_dims(self, layer: int) -> list[int]:
        if not self.file:
            return self._inline
        return load_dims(self.file).best(layer, self.top, self.min_score)

    def view(self, q: Tensor, k: Tensor, rope: RopeInfo, state: dict) -> PositionView:
        dims = self.layer_dims(state.get("layer_idx", 0))
        if not dims or self.scale == 1:
            return PositionView(q, k)
        weight = torch.ones(q.shape[-1], dtype=q.dtype, device=q.device)
        weight[dims] = self.scale
        t_q, t_k = q.shape[2], k.shape[2]
        pq = torch.arange(t_k - t_q, t_k, device=q.device)
        pk = torch.arange(t_k, device=q.device)

        def scaled(x: Tensor, pos: Tensor) -> Tensor:  # un-rotate, scale, rotate back
            return rerotate(rerotate(x, -pos, rope.inv_freq) * weight, pos, rope.inv_freq)

        return PositionView(scaled(q, pq) if "q" in self.on else q, scaled(k, pk) if "k" in self.on else k)
