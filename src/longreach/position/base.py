"""The two shapes a context-extension method takes.

- ``RopeScaling``: transformers already implements the rescaled frequencies (linear, dynamic, yarn,
  longrope, llama3); the method only *configures* them, by swapping the model's rotary-embedding
  modules for ones built from a copy of the config with new ``rope_parameters``. ``remove()`` puts the
  originals back; the model's own config is never modified. Length-dependent types (longrope, dynamic)
  keep one set of frequencies per sequence (``frozen``).
- ``RemapPositions``: re-maps positions inside the attention function (post-RoPE re-rotation by a
  delta). It returns a ``PositionView`` per attention call: the queries/keys to use and, for two-piece
  methods (Self-Extend, STRING), the re-rotated pair used for keys at distance >= ``distance``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ..errors import SpecError, UnsupportedModelError
from ..kernels import FarKeys
from ..methods.base import Method
from .frozen import LENGTH_DEPENDENT, PerSequenceFrequencies
from .rotary import RopeInfo, global_rope_parameters, rope_info, rotary_modules, text_config, trained_positions


@dataclass(frozen=True)
class PositionMethod(Method):
    kind: ClassVar[str] = "position"

    def install(self, model: nn.Module) -> Callable[[], None]:
        """Prepare ``model`` (before any forward); returns the undo."""
        raise NotImplementedError


@dataclass(frozen=True)
class RopeScaling(PositionMethod):
    """A transformers rope type, configured: new rotary modules while applied, the originals after."""

    rope_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        factor = getattr(self, "factor", 1.0)
        if not isinstance(factor, int | float) or isinstance(factor, bool) or factor < 1:
            raise SpecError(f"{self.name}: factor must be a number >= 1 (target length / trained length), "
                            f"got {factor!r}")

    def rope_parameters(self, old: dict, trained: int, head_dim: int) -> dict:
        """The new ``rope_parameters`` entry, from the model's current one."""
        raise NotImplementedError

    def max_positions(self, trained: int) -> int:
        return trained

    def reach(self, trained: int) -> int | None:
        return math.floor(trained * self.factor)  # type: ignore[attr-defined]  # every rope type here has one

    def check_model(self, model: nn.Module) -> None:
        """A model that already scales RoPE (Llama 3.1's llama3, a yarn Qwen2.5, Phi-3's longrope) would lose
        its own scaling: refused, rather than changing positions inside the trained window."""
        own = global_rope_parameters(text_config(model))
        kind = own.get("rope_type", "default")
        if kind not in ("default", None):
            raise UnsupportedModelError(
                f"{self.name}: this model already scales RoPE ({kind}, factor {own.get('factor')}); a second rope type "
                "would replace it and move positions inside the trained window. Use a re-mapping method "
                "(selfextend, string, gali) on top of the model's own scaling instead")

    def install(self, model: nn.Module) -> Callable[[], None]:
        mods = rotary_modules(model)
        if not mods:
            rope_info(model)  # raises the "needs a RoPE model" error
        config = text_config(model)
        trained = trained_positions(model)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        new_config = copy.copy(config)
        if hasattr(new_config, "head_dim") and new_config.head_dim is None:
            new_config.head_dim = head_dim  # Mixtral's head_dim=None: transformers' yarn/longrope would fail on it
        params = copy.deepcopy(config.rope_parameters)
        if "full_attention" in params:  # per layer type (Gemma 3): only global layers see far positions
            params["full_attention"] = self.rope_parameters(params["full_attention"], trained, head_dim)
        else:
            params = self.rope_parameters(params, trained, head_dim)
        new_config.rope_parameters = params
        new_config.max_position_embeddings = self.max_positions(trained)
        swapped = []
        for parent, attr, old in mods:
            new = type(old)(new_config).to(next(iter(old.buffers())).device)
            if self.rope_type in LENGTH_DEPENDENT:
                new = PerSequenceFrequencies(new, trained)
            setattr(parent, attr, new)
            swapped.append((parent, attr, old))

        def undo() -> None:
            for parent, attr, old in swapped:
                setattr(parent, attr, old)
        return undo


@dataclass(frozen=True, eq=False)
class PositionView:
    """What one attention call uses: q/k (possibly re-rotated) and the far pair of two-piece methods.

    ``branches``: more views of the same keys and values (Attention Buckets: one per extra RoPE base); the
    runtime attends each with this view's Selection and averages the outputs, this view's included.
    """

    q: Tensor
    k: Tensor
    far: FarKeys | None = None
    branches: tuple[PositionView, ...] = ()


@dataclass(frozen=True)
class RemapPositions(PositionMethod):
    """Re-rotates q/k inside longreach's attention function; the model itself is untouched."""

    remaps_positions: ClassVar[bool] = True

    def install(self, model: nn.Module) -> Callable[[], None]:
        return lambda: None  # nothing to change in the model: ``apply`` reads its RoPE (rope_info) instead

    def view(self, q: Tensor, k: Tensor, rope: RopeInfo, state: dict) -> PositionView:
        """q (B, Hq, Tq, D), k (B, Hkv, Tk, D), rotated by transformers at positions ``Tk - Tq + i`` / ``j``;
        ``state`` is per-layer scratch for the current sequence."""
        raise NotImplementedError
