"""A transformers cache layer that stores its keys and values quantized (KIVI), with a full-precision residual.

Keys are quantized per channel over groups of ``group`` tokens, values per token over groups of ``group``
channels (``cache.quant``). The most recent tokens stay in full precision: a residual that holds at least
``residual`` tokens; whenever it reaches ``residual + group``, its oldest whole groups of tokens are quantized
and appended to the quantized part (so key groups always fill). Quantizing happens at the *next* update, so
the tokens a forward brings are attended exactly as given (and can be given back: ``truncate``).

Nothing full-precision is kept but the residual: ``update`` returns a dequantized copy of the quantized part
joined to the residual, which lives only as long as the layer's attention uses it. A decode step the runtime
attends from the codes (``defer_next``) gets the residual alone, and ``attend_deferred`` reads the quantized part
in place (``kernels.quantdecode``) where that measured faster on this machine, so no dequantized copy is made.
The layer reports the tokens it was given as its length (a press may have dropped some before it was quantized, as
``CompressedLayer`` does) and sizes the attention mask to the keys it returns, so any attention can read it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from .. import kernels
from ..errors import LongreachError
from ..kernels import choice, quantdecode
from ..selection import Selection
from .quant import Quantized, quantize


class QuantizedLayer(DynamicLayer):
    is_croppable = False
    # set by the runtime just before a decode step it attends from the codes (one-shot, and only while the handle
    # that armed it is applied): that update returns the residual alone and records in ``deferred`` how many
    # quantized tokens it left out
    defer_next: Callable[[], object | None] | None = None  # a weak reference to the arming handle
    deferred = 0

    def __init__(self, keys: Tensor, values: Tensor, seen: int, bits: int, group: int, residual: int) -> None:
        """Hold ``keys`` / ``values`` (B, H, n, D), the stored part of ``seen`` tokens, quantized."""
        super().__init__()
        self.lazy_initialization(keys, values)
        self.bits, self.group, self.residual = bits, group, residual
        self.seen = seen
        self.qkeys: Quantized | None = None
        self.qvalues: Quantized | None = None
        # the residual (self.keys / self.values): exactly sized copies, so the layer this one replaces is freed
        self.keys, self.values = keys.clone(), values.clone()
        self._flush()

    # -- storage -----------------------------------------------------------------------------
    def _flush(self) -> None:
        """Quantize the residual's oldest whole groups of tokens, keeping at least ``residual`` tokens exact."""
        assert self.keys is not None and self.values is not None
        take = max(0, (self.keys.shape[-2] - self.residual) // self.group * self.group)
        if take == 0:
            return
        qk = quantize(self.keys[..., :take, :], self.bits, self.group, axis=-2)
        qv = quantize(self.values[..., :take, :], self.bits, self.group, axis=-1)
        self.qkeys = qk if self.qkeys is None else self.qkeys.cat(qk)
        self.qvalues = qv if self.qvalues is None else self.qvalues.cat(qv)
        self.keys, self.values = self.keys[..., take:, :].clone(), self.values[..., take:, :].clone()

    @property
    def quantized_tokens(self) -> int:
        return self.qkeys.tokens if self.qkeys is not None else 0

    @property
    def residual_tokens(self) -> int:
        return self.keys.shape[-2] if self.keys is not None else 0

    @property
    def stored(self) -> int:
        """Tokens held (quantized and residual); fewer than ``seen`` after a press."""
        return self.quantized_tokens + self.residual_tokens

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and zero points of keys and values, and the residual."""
        held = [t for t in (self.keys, self.values) if t is not None]
        quantized = sum(q.nbytes for q in (self.qkeys, self.qvalues) if q is not None)
        return quantized + sum(t.numel() * t.element_size() for t in held)

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """Every stored key and value (B, H, stored, D): the quantized part dequantized, then the residual."""
        assert self.keys is not None and self.values is not None
        if self.qkeys is None or self.qvalues is None:
            return self.keys, self.values
        return _joined(self.qkeys, self.keys), _joined(self.qvalues, self.values)

    def keep(self, idx: Tensor) -> None:
        """Keep the stored tokens at ``idx`` (B, H, m) per head, in their order: a press stacked before kvquant,
        on a prompt fed in several forwards, shrinks a layer kvquant already holds. Token groups cannot lose
        members, so the kept tokens are dequantized and quantized again in new groups; a token kept from the
        quantized part so carries the error of both grids (at most half a step of each), and a chunk adds at
        most one more. The residual's tokens stay exact."""
        keys, values = self.dequantized()
        at = idx[..., None]
        keys = keys.gather(2, at.expand(-1, -1, -1, keys.shape[-1]))
        values = values.gather(2, at.expand(-1, -1, -1, values.shape[-1]))
        self.qkeys = self.qvalues = None
        self.keys, self.values = keys, values
        self._flush()

    def truncate(self, n: int) -> None:
        """Give back the last ``n`` tokens (the runtime holds a prompt's last token back): they are in the
        residual, since quantizing waits for the next update."""
        if n <= 0:
            return
        if n > self.residual_tokens:
            raise LongreachError(f"cannot give back {n} tokens: only the last {self.residual_tokens} are not "
                                 "quantized yet")
        assert self.keys is not None and self.values is not None
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.seen -= n

    # -- what transformers calls -------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:  # after reset(): start over, empty
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self._flush()
        assert self.keys is not None and self.values is not None
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        armed, self.defer_next = self.defer_next() if self.defer_next is not None else None, None
        defer = getattr(armed, "active", False) and key_states.shape[-2] == 1 and self.qkeys is not None
        self.deferred = self.quantized_tokens if defer else 0
        return (self.keys, self.values) if defer else self.dequantized()

    def attend_deferred(self, q: Tensor, k_rest: Tensor, v_rest: Tensor, scale: float, kernel: str,
                        softcap: float | None, sinks: Tensor | None) -> Tensor:
        """Attention of the decode step whose update returned only the residual (``k_rest``/``v_rest``, the new
        token included) over every stored key: from the codes where the compiled kernel measured faster for this
        shape (``kernel`` auto or gather), else dequantized as ``update`` would have, then ``kernels.attend``."""
        assert self.qkeys is not None and self.qvalues is not None and self.deferred
        self.deferred = 0
        if kernel in ("auto", "gather") and quantdecode.usable(q, self.qkeys, self.qvalues) and codes_faster(
                q.shape[1], k_rest.shape[1], q.shape[-1], self.bits, self.group):
            return quantdecode.attend(q, self.qkeys, self.qvalues, k_rest, v_rest, scale, softcap, sinks)
        keys, values = _joined(self.qkeys, k_rest), _joined(self.qvalues, v_rest)
        sel = Selection.dense(q.shape[0], q.shape[2], keys.shape[2], device=q.device)
        return kernels.attend(q, keys, values, sel, scale, kernel, softcap=softcap, sinks=sinks)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def crop(self, tokens_to_remove: int) -> None:
        raise LongreachError("a quantized (kvquant) cache cannot be cropped (assisted decoding / rollback); "
                             "use an unquantized cache for that")

    def reset(self) -> None:
        self.qkeys = self.qvalues = None
        self.seen = self.deferred = 0
        self.defer_next = None
        super().reset()

    # beam search, batch edits and offloading: the same edit on every stored tensor
    def batch_repeat_interleave(self, repeats: int) -> None:
        self._edit(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._edit(lambda t: t[indices])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._edit(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        self._edit(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._edit(lambda t: t.to(self.device, non_blocking=True))

    def _edit(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not self.is_initialized or self.keys is None or self.values is None:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.qkeys is not None and self.qvalues is not None:
            self.qkeys, self.qvalues = self.qkeys.edit(fn), self.qvalues.edit(fn)


def _joined(quantized: Quantized, residual: Tensor) -> Tensor:
    """The quantized rows dequantized and the full-precision residual after them, in one new tensor: the
    quantized part written in place where its groups allow, so a decode step makes no other full-size copy."""
    n = quantized.tokens
    out = residual.new_empty(*residual.shape[:-2], n + residual.shape[-2], residual.shape[-1])
    if not quantized.dequantize_into(out[..., :n, :]):
        out[..., :n, :] = quantized.dequantize()
    out[..., n:, :] = residual
    return out


def stored_keys(layer: DynamicLayer) -> tuple[Tensor, Tensor]:
    """Every key and value a cache layer holds, (B, H, n, D): a quantized layer's dequantized (a temporary)."""
    if isinstance(layer, QuantizedLayer):
        return layer.dequantized()
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def defer_next(cache: object, layer_idx: int, owner: object) -> None:
    """Arm ``layer_idx``'s next update to leave the quantized part to ``attend_deferred`` (the runtime's pre-hook,
    before a decode step it attends from the codes); a layer that is not quantized is left alone. The arming
    holds while ``owner`` (the handle) is active: a forward that failed before its update, then ran without
    longreach, still gets every key."""
    layer = _layer(cache, layer_idx)
    if isinstance(layer, QuantizedLayer):
        layer.defer_next = weakref.ref(owner)


def deferred_tokens(cache: object, layer_idx: int) -> int:
    """Keys of this call that its update left out of the returned tensors (attended by ``attend_deferred``)."""
    layer = _layer(cache, layer_idx)
    return layer.deferred if isinstance(layer, QuantizedLayer) else 0


def _layer(cache: object, layer_idx: int) -> object | None:
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if layers is not None and 0 <= layer_idx < len(layers) else None


_faster: dict[tuple, bool] = {}  # every decode step asks: a dict look-up, not the choice file's key

CHOICE_TOKENS = 16384  # the representative cache: the length long-context decode runs at


def codes_faster(n_q: int, n_kv: int, dim: int, bits: int, group: int) -> bool:
    """Whether attending the codes beat dequantize-then-attend for this head shape on this machine (measured
    once on a random cache of ``CHOICE_TOKENS`` tokens, best of 3 each, cached with the kernel choices)."""
    key = (n_q, n_kv, dim, bits, group, torch.get_num_threads(), os.environ.get("LONGREACH_NATIVE"))
    if key not in _faster:
        shape = f"quant_decode/{n_q}/{n_kv}/{dim}/{bits}/{group}"
        _faster[key] = choice.decide(shape, lambda: _timings(n_q, n_kv, dim, bits, group))["path"] == "native"
    return _faster[key]


def _timings(n_q: int, n_kv: int, dim: int, bits: int, group: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    n = CHOICE_TOKENS // group * group
    k, v = (torch.randn(1, n_kv, n + 1, dim, generator=gen) for _ in range(2))
    qk, qv = quantize(k[:, :, :n], bits, group, axis=-2), quantize(v[:, :, :n], bits, group, axis=-1)
    q = torch.randn(1, n_q, 1, dim, generator=gen)
    rest_k, rest_v = k[:, :, n:], v[:, :, n:]
    sel = Selection.dense(1, 1, n + 1)
    return choice.best_seconds({
        "native": lambda: quantdecode.attend(q, qk, qv, rest_k, rest_v, dim**-0.5),
        "torch": lambda: kernels.attend(q, _joined(qk, rest_k), _joined(qv, rest_v), sel, dim**-0.5)})
