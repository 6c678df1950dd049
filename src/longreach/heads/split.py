"""Head policies as the runtime's cache policy: the long KV heads keep every key, the short ones a few.

Long and short heads hold different keys, so once a layer is split they are attended apart (each part with
its own Selection) and the short heads' dropped keys are really freed. ``duo`` / ``lserve`` split from the
first forward; ``razor`` / ``headkv`` prefill densely and split the layer after it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import kernels
from ..cache.compressed import CompressedLayer, shrinkable_layer
from ..methods.base import SelectContext
from ..selection import Selection
from ..stages import LayerCall

if TYPE_CHECKING:  # policies.py builds this class: a runtime import would be a cycle
    from .policies import HeadPolicy, HeadSplit


def query_heads(kv_heads: Tensor, group: int, device: torch.device) -> Tensor:
    """The query heads that read the given KV heads (GQA: ``group`` consecutive query heads per KV head)."""
    return (kv_heads.to(device)[:, None] * group + torch.arange(group, device=device)).flatten()


class SplitPolicy:
    stores_only = False  # it chooses which keys each head keeps
    attends_codes = False
    reads_decode_keys = True
    holds_last = True

    def __init__(self, policy: HeadPolicy, owner: object) -> None:
        self.policy = policy
        self.name = policy.name
        self.owner = owner
        # the long heads' keys: a select method stacked before the policy (quest+razor) chooses them, else
        # the policy's own choice (every key; lserve's blocks)
        spec = owner.spec if owner is not None else None  # the Handle; ``plan`` asks without one
        stacked = [m for m in (spec.methods if spec is not None else ()) if m.kind == "select" and m is not policy]
        self.long_select = stacked[0].select if stacked else policy.long_select

    def kept_tokens(self, layer_idx: int, n_layers: int, seen: int, n_kv: int) -> float:
        split = self.policy.head_split(layer_idx, n_kv)
        if split is None:
            return seen
        keeper = split.keeper
        short = keeper.short_capacity(seen) if keeper is not None else split.sinks + split.window + split.compensate
        return (len(split.long) * seen + len(split.short) * min(short, seen)) / n_kv

    def _split(self, call: LayerCall) -> HeadSplit | None:
        """The split to attend with: always for duo/lserve, once the layer is split for razor/headkv."""
        layers = call.cache_layers
        layer = layers[call.layer_idx] if layers is not None else None
        split_layer = isinstance(layer, CompressedLayer) and layer.split
        if not (self.policy.split_prefill or split_layer):
            return None
        return self.policy.head_split(call.layer_idx, call.k.shape[1])

    def attend(self, call: LayerCall) -> Tensor | None:
        """Attend the long and short KV heads apart (they hold different keys); None before the layer splits."""
        split = self._split(call)
        if split is None:
            return None
        q, k, v = call.q, call.k, call.v
        layers = call.cache_layers
        layer = layers[call.layer_idx] if layers is not None else None
        if isinstance(layer, CompressedLayer) and layer.short is not None:
            long_kv = (layer.keys, layer.values)
            short_k, short_v, short_sinks = layer.short.view()
        else:
            long_kv = (k[:, split.long], v[:, split.long])
            short_k, short_v, short_sinks = k[:, split.short], v[:, split.short], split.sinks
        batch, n_q, t_q, _ = q.shape
        group = n_q // k.shape[1]
        out = q.new_empty(batch, t_q, n_q, v.shape[-1])
        seen = layer.seen if isinstance(layer, CompressedLayer) else k.shape[2]
        for heads, (kk, vv), sinks in ((split.long, long_kv, None), (split.short, (short_k, short_v), short_sinks)):
            if not len(heads):
                continue
            qh = query_heads(heads, group, q.device)
            qq = q[:, qh]
            if sinks is None:  # the long heads: the policy's own choice, or a select method stacked before it
                ctx = SelectContext(call.layer_idx, None, None, call.state.setdefault("select", {}), call.scale,
                                    call.extras.heads(qh))
                start = time.perf_counter()
                sel = self.long_select(qq, kk, ctx)
                if call.count_select is not None:
                    call.count_select(time.perf_counter() - start)
            elif split.keeper is not None:  # headkv: every key the short heads still hold
                sel = Selection.dense(batch, t_q, kk.shape[2], device=q.device)
            else:
                sel = Selection.local(batch, t_q, kk.shape[2], sinks=sinks, window=split.window, device=q.device)
            out[:, :, qh] = kernels.attend(qq, kk, vv, sel, call.scale, call.kernel, softcap=call.softcap,
                                           sinks=None if call.sinks is None else call.sinks[qh])
            if call.record is not None:
                call.record(sel, len(qh), seen)
        return out

    def after_forward(self, call: LayerCall) -> bool:
        """Split the layer after its dense prefill (razor, headkv), or shrink the short heads of a split one."""
        split = self.policy.head_split(call.layer_idx, call.k.shape[1])
        if split is None:
            return False
        layers = call.cache_layers
        if layers is None and self.policy.split_prefill:
            return False  # duo / lserve attended split already; with no cache there is nothing to free
        layer = shrinkable_layer(layers, call.layer_idx, self.name)
        assert layers is not None
        if isinstance(layer, CompressedLayer) and layer.short is not None:
            self._reduce_short(layer, call, split)
            return True
        if call.t_q == 1 and not self.policy.split_prefill:
            return False  # razor / headkv split after a forward of several tokens (the prompt or a chunk)
        compressed = CompressedLayer.from_layer(layer, self.owner)
        long, short = split.long.to(call.k.device), split.short.to(call.k.device)
        compressed.split_heads(long, short, call.k[:, short], call.v[:, short])
        self._reduce_short(compressed, call, split)
        layers[call.layer_idx] = compressed
        return True

    @staticmethod
    def _reduce_short(layer: CompressedLayer, call: LayerCall, split: HeadSplit) -> None:
        """Shrink the short heads: to sinks + window (razor, duo: every step), or to the keys the forward's last
        queries vote for (headkv, after forwards of several tokens; decoding only appends)."""
        part = layer.short
        assert part is not None
        if split.keeper is None:
            part.trim(split.sinks, split.window, split.compensate)
            return
        if call.t_q == 1:
            return
        q = call.q
        qh = query_heads(part.heads, q.shape[1] // (len(split.long) + len(split.short)), q.device)
        keep = split.keeper.short_keep(q[:, qh], part.keys, call.scale, layer.seen, call.extras.heads(qh))
        if keep is not None:
            part.keep(keep)
