"""One attention module's runtime: the stages of ``longreach.stages`` in their fixed order, per call.

    position map -> selector -> kernel -> cache policy -> output hooks

The model's own sliding-window layers (Gemma 3's local layers) keep exactly their window: no method,
policy or hook acts on them. A cache policy (a press or head policy) also holds the prompt's last token
back: the rows before it are attended and the cache shrunk, then the last row attends the shrunk cache,
exactly as if it were the first decode step. So the first answer token reads the compressed cache on every
path, ``model.generate()`` included (unless a press says ``hold=false``: then every row attends every key and
the cache shrinks after the forward, SnapKV's own order).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import kernels
from ..cache.growing import cached_tokens, grow_in_place, truncate_layer
from ..cache.quantized import defer_next, deferred_tokens
from ..compat import cache_from_kwargs
from ..errors import InputError, LongreachError
from ..methods.base import SelectContext
from ..methods.dense import Dense
from ..methods.summaries import BlockSummaries
from ..position.rotary import half_split
from ..selection import Selection
from ..stages import CachePolicy, LayerCall, SoftmaxExtras
from .allocator import release_free_memory

if TYPE_CHECKING:
    from torch import nn

    from ..hf import Handle


class LayerRuntime:
    def __init__(self, handle: Handle, module: nn.Module, layer_idx: int) -> None:
        self.handle = handle
        self.layer_idx = layer_idx
        selector = handle.spec.selector
        stats = selector.block_stats
        self.summaries = BlockSummaries(selector.block_k, stats) if stats else None
        self.select_state: dict = {}  # the selector's per-layer scratch for the current sequence
        self.prompt_tail = False  # attending the held-back last prompt row (hold_last)
        self.policy_state: dict = {}  # the cache policy's (recent queries, accumulated attention, steps)
        self.position_state: dict = {}  # the position method's (group size, head ratios)
        self.cache: object | None = None  # the forward's transformers cache (set by the pre-hook)
        # a layer kind no method acts on and no Selection expresses (chunked local attention): ``hf`` runs the
        # model's own attention for it
        self.own_attention = False
        # a layer without position embedding (Llama 4's NoPE layers): position methods leave it alone
        self.no_rope = False
        # this call's attention features, set by ``hf`` per call: Gemma 2's logit softcap, GPT-OSS's learned
        # sink logits (Hq,); every kernel call of the layer passes them on
        self.softcap: float | None = None
        self.sinks: Tensor | None = None

    @property
    def extras(self) -> SoftmaxExtras:
        """This call's softcap and sinks for every softmax a method computes itself (selectors, position maps)."""
        return SoftmaxExtras(self.softcap, self.sinks)

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the attention module: note the forward's cache and make its layer grow in place (a
        transformers ``DynamicLayer`` re-concatenates the whole cache at every decode step)."""
        self.cache = cache_from_kwargs(kwargs)
        grow_in_place(self.cache, self.layer_idx)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, Tensor) and hidden.dim() == 3 and hidden.shape[1] > 1:
            # a prefill: what the layer before freed leaves the process (see allocator)
            release_free_memory(hidden.shape[1] + cached_tokens(self.cache, self.layer_idx))
        elif isinstance(hidden, Tensor) and hidden.dim() == 3 and self.reads_codes():
            defer_next(self.cache, self.layer_idx, self.handle)  # a kvquant layer's update leaves its codes to it

    def reads_codes(self) -> bool:
        """Whether a decode step may attend a quantized (kvquant) cache from its codes: the cache policy does
        (``attends_codes``: kvquant, no press reading every key while decoding), every stored key is attended (no
        select method), positions are not re-mapped and no observer wants the keys."""
        handle = self.handle
        return (handle.policy is not None and handle.policy.attends_codes and isinstance(handle.spec.selector, Dense)
                and handle.remap is None and handle.observer is None and not self.own_attention)

    # -- the entry point -----------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                sliding_window: int | None) -> Tensor:
        batch, _, t_q, _ = q.shape
        t_k = k.shape[2] + deferred_tokens(self.cache, self.layer_idx)  # a kvquant update may leave its codes out
        key_mask = self.handle.masks.get(mask, batch, t_q, t_k, sliding_window)
        policy = self.handle.policy if sliding_window is None else None
        if policy is not None and key_mask is not None:
            raise InputError(f"{policy.name} compresses unpadded sequences: run one sequence per batch (or batch "
                             "prompts of equal length without padding)")
        if policy is not None and t_q > 1 and self.cache is not None and policy.holds_last:
            return self.hold_last(q, k, v, scale, policy)
        return self.run(q, k, v, key_mask, scale, sliding_window)

    def hold_last(self, q: Tensor, k: Tensor, v: Tensor, scale: float, policy: CachePolicy) -> Tensor:
        """Attend all rows but the last, let the policy shrink the cache, then attend the last row as a decode
        step over the shrunk cache (transformers stored every key of this forward already: give one back)."""
        layers = getattr(self.cache, "layers", None)
        if layers is None:
            return self.run(q, k, v, None, scale, None)
        latent = self.handle.latent
        self.policy_state.pop("kept", None)  # what an earlier press call kept is not this forward's
        if latent:  # the cache holds the module's latent, not k/v: give back the last token's latent
            last = layers[self.layer_idx].keys[:, :, -1:].clone(), layers[self.layer_idx].values[:, :, -1:].clone()
        truncate_layer(layers[self.layer_idx], 1)
        head = self.run(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], None, scale, None)
        if latent:
            layers[self.layer_idx].update(*last)
            keys, values = kept_heads(k, v, self.policy_state.pop("kept", None))
        else:
            keys, values = layers[self.layer_idx].update(k[:, :, -1:], v[:, :, -1:])
        self.prompt_tail = True  # the last prompt row, attended as a decode step, is still the prompt's time
        try:
            tail = self.run(q[:, :, -1:], keys, values, None, scale, None)
        finally:
            self.prompt_tail = False
        return torch.cat([head, tail], dim=1)

    # -- the stages ----------------------------------------------------------------------------
    def run(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float,
            sliding_window: int | None) -> Tensor:
        handle, t_q = self.handle, q.shape[2]
        controlled = sliding_window is None  # the layers the method acts on
        deferred = deferred_tokens(self.cache, self.layer_idx)  # keys a kvquant update left to its codes
        new_sequence = k.shape[2] + deferred == t_q
        if new_sequence and controlled:
            self.select_state.clear()
            self.policy_state.clear()
        phase = "decode" if t_q == 1 else "prefill"
        policy = handle.policy if controlled else None
        call = LayerCall(self.layer_idx, handle.n_layers, q, k, v, scale, handle.kernel, self.cache, self.policy_state,
                         (lambda sel, n, seen: handle.stats.add_heads(phase, sel, n, seen))
                         if handle.track_density else None, self.softcap, self.sinks, handle.latent,
                         (lambda seconds: self.count_select_time(q, seconds)) if handle.track_density else None)
        # 1. position map
        far, branches = None, ()
        if controlled and handle.remap is not None and not self.no_rope:
            q, k, far, branches = self.remap_positions(q, k, key_mask, scale, new_sequence)
        # 2-3. selector and kernel (a head policy attends its split parts itself)
        ctx = SelectContext(self.layer_idx, key_mask, None, self.select_state, scale, self.extras)
        out = policy.attend(call) if policy is not None else None
        if deferred and (out is None or deferred_tokens(self.cache, self.layer_idx)):
            raise LongreachError(f"layer {self.layer_idx}: a kvquant cache left its codes to a policy that did not "
                                 "attend them (please report this)")
        if deferred and handle.track_density:  # every stored key, as the dense selection the runtime skipped
            handle.stats.add(phase, Selection.dense(q.shape[0], t_q, k.shape[2] + deferred, device=q.device),
                             q.shape[1])
        if out is None:
            sel = self.select(q, k, key_mask, scale, sliding_window, new_sequence, far)
            if t_q > 1:  # the projections' and the selector's freed scratch leave before the output is allocated
                release_free_memory(k.shape[2])
            if handle.track_density and controlled:
                handle.stats.add(phase, sel, q.shape[1])
            out = kernels.attend(q, k, v, sel, scale, handle.kernel, far=far, softcap=self.softcap, sinks=self.sinks)
            if branches:
                out = self.average_branches(out, branches, v, sel, scale)
        # 4. cache policy
        if policy is not None and policy.after_forward(call) and self.summaries is not None:
            self.summaries.reset()  # stored keys changed under the block summaries
        # 5. output hooks
        selector = handle.spec.selector
        if controlled and selector.rewrites_output:
            out = selector.postprocess(out, q, k, v, ctx)
        if handle.observer is not None:
            handle.observer(self.layer_idx, q, k, v, scale, sliding_window, key_mask)
        return out

    def select(self, q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float, sliding_window: int | None,
               new_sequence: bool, far: object | None) -> Selection:
        """The selector stage: the model's own window on sliding layers, the method's choice elsewhere."""
        batch, t_q, t_k = q.shape[0], q.shape[2], k.shape[2]
        if sliding_window is not None:
            return Selection.local(batch, t_q, t_k, sinks=0, window=sliding_window, key_mask=key_mask,
                                   device=q.device)
        start = time.perf_counter()
        # a position method re-rotates every key at each forward: summaries of stored keys would be stale
        summaries = self.summaries if self.handle.remap is None else None
        if summaries is not None:
            summaries.update(k, new_sequence=new_sequence)
        ctx = SelectContext(self.layer_idx, key_mask, summaries, self.select_state, scale, self.extras)
        # with a two-piece position method, blocks are chosen on the far (re-mapped) positions
        sel = self.handle.spec.selector.select(far.q if far else q, far.k if far else k, ctx)
        self.count_select_time(q, time.perf_counter() - start)
        if far is not None and not sel.full and sel.window < far.distance:
            sel = replace(sel, window=far.distance)  # the near piece is always attended whole
        return sel

    def count_select_time(self, q: Tensor, seconds: float) -> None:
        """Add a selector call's time to the handle's total for its phase, the phase whose time holds it (the
        held-back last prompt row is the prompt's). None (not measured) sticks: an untracked handle, or tensors off
        the CPU (a GPU call returns before its kernels finish, so the time would be too small)."""
        handle = self.handle
        phase = "decode" if q.shape[2] == 1 and not self.prompt_tail else "prefill"
        total = handle.select_s[phase]
        if total is not None:
            handle.select_s[phase] = None if q.device.type != "cpu" else total + seconds

    def remap_positions(self, q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float, new_sequence: bool
                        ) -> tuple[Tensor, Tensor, object, tuple]:
        """The position stage: re-rotated q/k, for two-piece methods the far pair, for multi-view methods
        (Attention Buckets) the other views."""
        remap = self.handle.remap
        assert remap is not None and self.handle.rope is not None
        if key_mask is not None:
            raise InputError(f"{remap.name} re-maps token positions by index: run one sequence per batch (or "
                             "prompts of equal length without padding)")
        if new_sequence:
            self.position_state.clear()
            self.position_state.update(layer_idx=self.layer_idx, scale=scale, extras=self.extras)
        rope = self.handle.rope
        if rope.interleaved:  # GLM-4's (2i, 2i+1) pairs, re-ordered alike in q and k: every q.k is unchanged
            q, k = half_split(q, rope.rotated_dims), half_split(k, rope.rotated_dims)
        view = remap.view(q, k, rope, self.position_state)
        return view.q, view.k, view.far, view.branches

    def average_branches(self, out: Tensor, branches: tuple, v: Tensor, sel: Selection, scale: float) -> Tensor:
        """The kernel stage for a multi-view position method: each other view of the same keys attended with the
        same Selection, and the outputs (this one's included) averaged in float32."""
        total = out.float()
        for view in branches:
            total = total + kernels.attend(view.q, view.k, v, sel, scale, self.handle.kernel, far=view.far,
                                           softcap=self.softcap, sinks=self.sinks).float()
        return (total / (len(branches) + 1)).to(out.dtype)


def kept_heads(k: Tensor, v: Tensor, kept: Tensor | None) -> tuple[Tensor, Tensor]:
    """This forward's expanded keys/values (B, H, T, D) of the tokens a press kept of the first T - 1, then the
    last token's: what the module would expand from the shrunk latent cache (each token's heads come from its own
    latent). ``kept`` (B, 1, n) positions, or None when the press kept every token."""
    if kept is None:
        return k, v
    idx = kept.expand(-1, k.shape[1], -1)[..., None]
    keys = torch.cat([k[:, :, :-1].gather(2, idx.expand(-1, -1, -1, k.shape[-1])), k[:, :, -1:]], dim=2)
    values = torch.cat([v[:, :, :-1].gather(2, idx.expand(-1, -1, -1, v.shape[-1])), v[:, :, -1:]], dim=2)
    return keys, values
