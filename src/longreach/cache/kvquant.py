"""``kvquant``: store the KV cache quantized, KIVI-style (arXiv:2402.02750).

A cache policy that keeps every key it is given and changes only how they are held: after each forward of a
full-attention layer, the layer becomes a ``QuantizedLayer`` (keys per channel, values per token, int8 or int4,
the most recent tokens exact). Stacked after a press (``snapkv:density=0.25+kvquant:bits=4``) it quantizes the
keys the press kept; the press must compress once per forward of several tokens (not while decoding: groups
of quantized keys cannot lose members), and layers whose heads hold different keys (head policies) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..configurable import param
from ..errors import LongreachError, SpecError
from ..methods.base import Method, check_int
from ..methods.registry import register
from ..stages import CachePolicy, LayerCall
from .compressed import CompressedLayer, shrinkable_layer
from .press import Press
from .quant import BITS, quantize
from .quantized import QuantizedLayer


@register
@dataclass(frozen=True)
class KVQuant(Method):
    name: ClassVar[str] = "kvquant"
    kind: ClassVar[str] = "press"
    summary: ClassVar[str] = "store the KV cache as int8/int4 codes: keys per channel, values per token (KIVI)"
    paper: ClassVar[str] = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (arXiv:2402.02750)"

    bits: int = param(4, "bits per stored key and value element: 8 or 4 (two codes per byte)")
    group: int = param(32, "elements sharing a scale and zero point: tokens per key group, channels per value group")
    residual: int = param(128, "most recent tokens kept in full precision (at least; about residual + group)")

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise SpecError(f"kvquant: bits must be 8 or 4 (int8 or packed int4 codes), got {self.bits!r}")
        check_int(self, "group", self.group, minimum=1)
        check_int(self, "residual", self.residual, minimum=0)

    def cache_policy(self, owner: object) -> CachePolicy:
        return QuantPolicy(self, owner)


class QuantPolicy:
    """``kvquant`` as the runtime's cache policy: quantize each full-attention layer after its first forward;
    a quantized layer then quantizes what arrives itself."""

    stores_only = True  # keeps every key: may follow one press in a spec, and runs after it
    attends_codes = True  # a decode step reads the codes (attend), unless the runtime did not arm the layer
    reads_decode_keys = False
    holds_last = True

    def __init__(self, method: KVQuant, owner: object) -> None:
        self.method = method
        self.name = method.name
        spec = owner.spec if owner is not None else None  # the Handle; ``plan`` asks without one
        for other in spec.methods if spec is not None else ():
            if other is not method and other.cache_policy(None) is not None:
                _check_partner(other)

    def attend(self, call: LayerCall) -> Tensor | None:
        """A decode step whose update left the quantized part out (the runtime armed it: dense selection, see
        ``LayerRuntime.reads_codes``) attends it here; any other call takes the runtime's selector + kernel path."""
        layers = call.cache_layers
        layer = layers[call.layer_idx] if layers is not None else None
        if not isinstance(layer, QuantizedLayer) or not layer.deferred:
            return None
        return layer.attend_deferred(call.q, call.k, call.v, call.scale, call.kernel, call.softcap, call.sinks)

    def kept_tokens(self, layer_idx: int, n_layers: int, seen: int, n_kv: int) -> float:
        return seen

    def stored_bytes(self, tokens: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one layer holds for ``tokens`` stored tokens (what ``longreach plan`` counts): the whole groups
        past the exact residual as codes, scales and zero points (measured on one group of zeros: every group of
        a shape takes the same bytes), the rest at full width, as ``QuantizedLayer`` stores them."""
        m = self.method
        take = max(0, (tokens - m.residual) // m.group * m.group)
        one = torch.zeros(1, n_kv, m.group, head_dim, dtype=dtype)
        per_group = quantize(one, m.bits, m.group, axis=-2).nbytes + quantize(one, m.bits, m.group, axis=-1).nbytes
        return take // m.group * per_group + (tokens - take) * 2 * n_kv * head_dim * one.element_size()

    def after_forward(self, call: LayerCall) -> bool:
        layers = call.cache_layers
        if layers is not None and isinstance(layers[call.layer_idx], QuantizedLayer):
            return False  # it quantizes its own new tokens
        layer = shrinkable_layer(layers, call.layer_idx, self.name)  # refuses no cache and other cache types
        if isinstance(layer, CompressedLayer) and layer.split:
            raise LongreachError("kvquant stores a cache whose heads hold the same keys; this layer was split by a "
                                 "head policy: use kvquant alone or after a press")
        m = self.method
        assert layers is not None
        layers[call.layer_idx] = QuantizedLayer(layer.keys, layer.values, layer.get_seq_length(), m.bits, m.group,
                                                m.residual)
        return True  # stored keys changed (block summaries kept beside them are rebuilt)


def _check_partner(other: Method) -> None:
    """Refuse, at ``apply``, a cache policy ``kvquant`` cannot follow."""
    if isinstance(other, Press) and other.interval == 0:
        return
    if isinstance(other, Press):
        why = (f"{other.name} evicts keys while decoding (every={other.interval}), and quantized key groups cannot "
               f"lose members; use {other.name}:every=0 or a press that compresses after the prompt (snapkv, "
               "pyramidkv, finch)")
    elif isinstance(other, KVQuant):
        why = "keep one kvquant per spec"
    else:
        why = f"{other.name} gives heads different keys; use kvquant alone or after a press (snapkv, pyramidkv)"
    raise SpecError(f"cannot stack kvquant with {other.name}: {why}")
