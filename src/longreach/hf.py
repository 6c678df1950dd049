"""The only module that touches transformers: one attention function registered with AttentionInterface.

``apply(model, spec)`` switches the model's attention implementation to ``"longreach"`` and binds a
per-layer runtime to each attention module; ``Handle.remove()`` switches back. Nothing in
transformers is patched: the function and its mask builder are registered by name, and the model's
own ``set_attn_implementation`` does the switching.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from . import kernels
from .cache.compressed import CompressedLayer
from .cache.growing import GrowingLayer
from .cache.press import Observation, Press, attention_received
from .cache.summaries import BlockSummaries
from .compat import cache_from_kwargs, can_set_attn_implementation
from .errors import InputError, LongreachError, SpecError, UnsupportedModelError
from .features import unsupported_features
from .heads.policies import HeadSplit
from .methods.base import SelectContext
from .position import PositionMethod, RemapPositions, RopeInfo, rope_info
from .selection import Selection
from .spec import Spec, parse_spec

ATTN_NAME = "longreach"
_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, LayerRuntime] = weakref.WeakKeyDictionary()
_UNSUPPORTED_KWARGS = ("softcap", "s_aux")


@dataclass
class DensityStats:
    """Query-key pairs kept vs. causal pairs, summed over heads and the layers the method controls
    (a model's own sliding-window layers keep their window and are not counted), per phase."""

    kept: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    causal: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})

    def add(self, phase: str, sel: Selection) -> None:
        total = float(sel.causal_counts().sum().item()) * sel.heads
        kept = total if sel.full else float(sel.visible_counts().sum().item())
        self.kept[phase] += kept
        self.causal[phase] += total

    def add_heads(self, phase: str, sel: Selection, n_heads: int, seen: int) -> None:
        """Count ``sel`` for ``n_heads`` query heads (head policies attend groups of heads apart); causal pairs
        are counted over the ``seen`` tokens, not just the keys still held."""
        kept = float(sel.causal_counts().sum().item()) if sel.full else \
            float(sel.visible_counts().sum().item()) / sel.heads
        causal = float(sum(seen - sel.q_len + i + 1 for i in range(sel.q_len)))
        self.kept[phase] += kept * n_heads
        self.causal[phase] += causal * n_heads

    def density(self, phase: str | None = None) -> float | None:
        phases = [phase] if phase else list(self.kept)
        causal = sum(self.causal[p] for p in phases)
        return None if causal == 0 else sum(self.kept[p] for p in phases) / causal


class Handle:
    """What ``apply`` returns: undo with ``remove()`` or use as a context manager."""

    def __init__(self, model: nn.Module, spec: Spec, kernel: str, track_density: bool, previous: str) -> None:
        self.model = model
        self.spec = spec
        self.kernel = kernel
        self.track_density = track_density
        self.previous = previous
        self.stats = DensityStats()
        self.active = True
        # called with (layer_idx, q, k, v, scale, sliding_window, key_mask) before each attention: diagnostics
        self.observer: Callable[..., None] | None = None
        self._mask_cache: dict[tuple, tuple[weakref.ref, Tensor | None]] = {}
        presses = [m for m in spec.of_kind("press") if isinstance(m, Press)]
        self.press: Press | None = presses[0] if presses else None
        # a head policy (duo, lserve, razor): some KV heads keep every key, the others a few
        self.split = next((m for m in spec.methods if hasattr(m, "head_split")), None)
        # context extension: rope types swap the rotary modules (undone on remove); re-mapping methods
        # re-rotate q/k in the attention function with the model's frequencies
        self.position: PositionMethod | None = next(iter(spec.of_kind("position")), None)  # type: ignore[arg-type]
        self.remap = self.position if isinstance(self.position, RemapPositions) else None
        self.rope: RopeInfo | None = None
        self.n_layers = 0
        self._hooks: list = []
        self._undo: list = []

    @property
    def compresses(self) -> bool:
        """Whether this handle shrinks the KV cache (callers then feed the prompt's last token as a decode step,
        so every generated token reads the compressed cache)."""
        return self.press is not None or self.split is not None

    def density(self, phase: str | None = None) -> float | None:
        """Fraction of causal query-key pairs actually attended since the last ``reset_stats``."""
        return self.stats.density(phase)

    def reset_stats(self) -> None:
        self.stats = DensityStats()

    def remove(self) -> None:
        """Restore the attention implementation the model had before ``apply`` (idempotent)."""
        if not self.active:
            return
        self.model.set_attn_implementation(self.previous)
        for hook in self._hooks:
            hook.remove()
        for undo in self._undo:
            undo()
        for module in list(_RUNTIMES):
            if _RUNTIMES[module].handle is self:
                del _RUNTIMES[module]
        self.active = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<longreach.Handle {self.spec} kernel={self.kernel} {state}>"


def query_heads(kv_heads: Tensor, group: int, device: torch.device) -> Tensor:
    """The query heads that read the given KV heads (GQA: ``group`` consecutive query heads per KV head)."""
    return (kv_heads.to(device)[:, None] * group + torch.arange(group, device=device)).flatten()


class LayerRuntime:
    """Per attention module: the method to run and the block summaries kept beside the HF cache."""

    def __init__(self, handle: Handle, module: nn.Module) -> None:
        self.handle = handle
        self.layer_idx = int(getattr(module, "layer_idx", 0) or 0)
        method = handle.spec.selector
        stats = getattr(method, "block_stats", ())
        self.summaries = BlockSummaries(getattr(method, "kblock", method.block), stats) if stats else None
        self.state: dict = {}  # the method's per-layer scratch for the current sequence
        self.press_state: dict = {}  # the press's: recent queries, accumulated attention, decode steps
        self.cache: object | None = None  # the forward's transformers cache (set by a pre-hook)
        self.position_state: dict = {}  # the position method's per-layer scratch (group size, head ratios)

    def remember_cache(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.cache = cache_from_kwargs(kwargs)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, sliding_window: int | None
    ) -> Tensor:
        batch, _, t_q, _ = q.shape
        t_k = k.shape[2]
        key_mask = self.handle_key_mask(mask, batch, t_q, t_k, sliding_window)
        if key_mask is not None and self.handle.compresses:
            raise InputError("presses compress unpadded sequences: run one sequence per batch (or batch prompts of "
                             "equal length without padding)")
        new_sequence = t_k == t_q
        split = self.split_for(k, t_q, sliding_window)
        if split is not None:
            return self.attend_split(q, k, v, scale, split, new_sequence)
        far = None
        if sliding_window is not None:
            # sliding-window layers (Gemma 3's local layers) keep exactly their own window
            sel = Selection.local(batch, t_q, t_k, sinks=0, window=sliding_window, key_mask=key_mask,
                                  device=q.device)
        else:
            if new_sequence:
                self.state.clear()
                self.press_state.clear()
            if self.handle.remap is not None:
                q, k, far = self.remap_positions(q, k, key_mask, scale, new_sequence)
            summaries = self.summaries if far is None else None  # far keys move when the group grows
            if summaries is not None:
                summaries.update(k, new_sequence=new_sequence)
            ctx = SelectContext(self.layer_idx, key_mask, summaries, self.state, scale)
            # with a two-piece position method, blocks are chosen on the far (re-mapped) positions
            sel = self.handle.spec.selector.select(far.q if far else q, far.k if far else k, ctx)
            if far is not None and not sel.full and sel.window < far.distance:
                sel = replace(sel, window=far.distance)  # the near piece is always attended whole
        if self.handle.observer is not None:
            self.handle.observer(self.layer_idx, q, k, v, scale, sliding_window, key_mask)
        if self.handle.track_density and sliding_window is None:  # density of the layers the method controls
            self.handle.stats.add("decode" if t_q == 1 else "prefill", sel)
        out = kernels.attend(q, k, v, sel, scale, self.handle.kernel, far=far)
        post = getattr(self.handle.spec.selector, "postprocess", None)
        if post is not None and sliding_window is None:  # ablate / act rework some heads' outputs
            out = post(out, q, k, v, ctx)
        if self.handle.press is not None and sliding_window is None:
            self.press_step(self.handle.press, q, k, scale)
        elif self.handle.split is not None and sliding_window is None and t_q > 1:
            split = self.handle.split.head_split(self.layer_idx, k.shape[1])
            if split is not None:  # razor, headkv: the prefill was dense; now the short heads give up keys
                self.shrink_short_heads(q, k, v, split, scale)
        return out

    def remap_positions(self, q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float, new_sequence: bool
                        ) -> tuple[Tensor, Tensor, object]:
        """The position method's view of this call: re-rotated q/k and, for two-piece methods, the far pair."""
        if key_mask is not None:
            raise InputError(f"{self.handle.remap.name} re-maps token positions by index: run one sequence per "
                             "batch (or prompts of equal length without padding)")
        if new_sequence:
            self.position_state.clear()
            self.position_state.update(layer_idx=self.layer_idx, scale=scale)
        assert self.handle.remap is not None and self.handle.rope is not None
        view = self.handle.remap.view(q, k, self.handle.rope, self.position_state)
        return view.q, view.k, view.far

    def split_for(self, k: Tensor, t_q: int, sliding_window: int | None) -> HeadSplit | None:
        """The head split to attend with: always for duo/lserve, after the (dense) prefill for razor."""
        policy = self.handle.split
        if policy is None or sliding_window is not None:
            return None
        layer = self._cache_layer()
        compressed = isinstance(layer, CompressedLayer) and layer.split
        if not (policy.split_prefill or compressed):
            return None
        return policy.head_split(self.layer_idx, k.shape[1])

    def _shrinkable_layer(self) -> tuple[list, DynamicLayer]:
        """This forward's cache layers and this layer's entry. A forward without a cache is refused (the press
        would silently do nothing), and so are caches a press cannot shrink."""
        if self.cache is None:
            owner = self.handle.press or self.handle.split
            raise LongreachError(
                f"{owner.name} compresses the KV cache, but this forward has no cache (use_cache=False, or a "
                "transformers version that passes the cache under a name longreach does not know); call the "
                "model with use_cache=True, or apply a select method instead of a press")
        layers = getattr(self.cache, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"presses and head policies need a transformers DynamicCache, got {type(self.cache).__name__}")
        layer = layers[self.layer_idx]
        if type(layer) not in (DynamicLayer, GrowingLayer, CompressedLayer):
            raise UnsupportedModelError(
                f"presses and head policies need a DynamicCache; layer {self.layer_idx} of this cache is a "
                f"{type(layer).__name__} (static / quantized caches are not supported)")
        return layers, layer

    def _cache_layer(self) -> object | None:
        layers = getattr(self.cache, "layers", None)
        return layers[self.layer_idx] if layers is not None else None

    def attend_split(self, q: Tensor, k: Tensor, v: Tensor, scale: float, split: HeadSplit, new_sequence: bool
                     ) -> Tensor:
        """Attend the long and short KV heads apart (they hold different keys), then free the short heads' old keys."""
        layer = self._cache_layer()
        if new_sequence:
            self.state.clear()
        if isinstance(layer, CompressedLayer) and layer.short is not None:
            long_kv = (layer.keys, layer.values)
            short_k, short_v, short_sinks = layer.short.view()
        else:
            long_kv = (k[:, split.long], v[:, split.long])
            short_k, short_v, short_sinks = k[:, split.short], v[:, split.short], split.sinks
        batch, n_q, t_q, _ = q.shape
        group = n_q // k.shape[1]
        out = q.new_empty(batch, t_q, n_q, v.shape[-1])
        parts = ((split.long, long_kv, None), (split.short, (short_k, short_v), short_sinks))
        for heads, (kk, vv), sinks in parts:
            if not len(heads):
                continue
            qh = query_heads(heads, group, q.device)
            qq = q[:, qh]
            if sinks is None:
                ctx = SelectContext(self.layer_idx, None, None, self.state, scale)
                long_select = getattr(self.handle.split, "long_select", None)
                sel = long_select(qq, kk, ctx) if long_select else Selection.dense(batch, t_q, kk.shape[2])
            elif split.keeper is not None:  # headkv: every key the short heads still hold
                sel = Selection.dense(batch, t_q, kk.shape[2], device=q.device)
            else:
                sel = Selection.local(batch, t_q, kk.shape[2], sinks=sinks, window=split.window, device=q.device)
            out[:, :, qh] = kernels.attend(qq, kk, vv, sel, scale, self.handle.kernel)
            if self.handle.track_density:
                seen = layer.seen if isinstance(layer, CompressedLayer) else k.shape[2]
                self.handle.stats.add_heads("decode" if t_q == 1 else "prefill", sel, len(qh), seen)
        if self.handle.observer is not None:
            self.handle.observer(self.layer_idx, q, k, v, scale, None, None)
        if isinstance(layer, CompressedLayer) and layer.short is not None:
            self.reduce_short(layer, q, split, scale)
        elif layer is not None:
            self.shrink_short_heads(q, k, v, split, scale)
        return out

    def shrink_short_heads(self, q: Tensor, k: Tensor, v: Tensor, split: HeadSplit, scale: float) -> None:
        """Turn this layer's cache into long heads (every key) + short heads (sinks + window [+ compensation],
        or headkv's voted keys)."""
        layers, layer = self._shrinkable_layer()
        compressed = CompressedLayer.from_layer(layer, self.handle)
        long, short = split.long.to(k.device), split.short.to(k.device)
        compressed.split_heads(long, short, k[:, short], v[:, short])
        self.reduce_short(compressed, q, split, scale)
        layers[self.layer_idx] = compressed
        if self.summaries is not None:
            self.summaries.reset()

    @staticmethod
    def reduce_short(layer: CompressedLayer, q: Tensor, split: HeadSplit, scale: float) -> None:
        """Shrink the short heads after a forward: to sinks + window (razor, every step), or to the keys the
        forward's last queries vote for (headkv, after forwards of several tokens; decoding only appends)."""
        part = layer.short
        assert part is not None
        if split.keeper is None:
            part.trim(split.sinks, split.window, split.compensate)
            return
        if q.shape[2] == 1:
            return
        qh = query_heads(part.heads, q.shape[1] // (len(split.long) + len(split.short)), q.device)
        keep = split.keeper.short_keep(q[:, qh], part.keys, scale, layer.seen)
        if keep is not None:
            part.keep(keep)

    def press_step(self, press: Press, q: Tensor, k: Tensor, scale: float) -> None:
        """After attention: track what the press scores with, and compress the layer when it is due."""
        layers, layer = self._shrinkable_layer()
        st, t_q = self.press_state, q.shape[2]
        queries = st.get("queries")
        st["queries"] = (q if queries is None or t_q > 1 else torch.cat([queries, q], dim=2))[:, :, -press.observe:]
        if press.wants_history:
            history = st.get("history")
            got = attention_received(q, k, scale)
            if history is not None:
                got[:, :, : history.shape[2]] += history
            st["history"] = got
        st["steps"] = st.get("steps", 0) + (t_q == 1)
        due = t_q > 1 or (press.interval > 0 and st["steps"] % press.interval == 0)
        if not due:
            return
        seen = layer.get_seq_length()
        capacity = press.capacity(self.layer_idx, self.handle.n_layers, seen)
        obs = Observation(self.layer_idx, self.handle.n_layers, seen, st["queries"], layer.keys, layer.values,
                          scale, st.get("history"))
        keep = press.keep_indices(obs, capacity)
        if keep is None:
            return
        compressed = CompressedLayer.from_layer(layer, self.handle)
        compressed.keep(keep)
        layers[self.layer_idx] = compressed
        if "history" in st:
            st["history"] = st["history"].gather(2, keep)
        if self.summaries is not None:
            self.summaries.reset()  # stored keys changed under the block summaries

    def handle_key_mask(
        self, mask: Tensor | None, batch: int, t_q: int, t_k: int, sliding_window: int | None
    ) -> Tensor | None:
        if mask is None:
            return None
        # transformers builds one mask per forward and shares it across layers: check it once
        key = (id(mask), sliding_window)
        cache = self.handle._mask_cache
        hit = cache.get(key)
        if hit is not None and hit[0]() is mask:
            return hit[1]
        if len(cache) > 8:
            cache.clear()
        key_mask = _key_mask_from(mask, batch, t_q, t_k, sliding_window)
        cache[key] = (weakref.ref(mask), key_mask)
        return key_mask


def _key_mask_from(mask: Tensor, batch: int, t_q: int, t_k: int, sliding_window: int | None) -> Tensor | None:
    """Recover per-key padding from transformers' 4-D mask, refusing any pattern we would not reproduce."""
    if mask.dim() != 4 or mask.shape[-2:] != (t_q, t_k) or mask.shape[0] not in (1, batch):
        raise InputError(f"unexpected attention mask of shape {tuple(mask.shape)} for {t_q} queries x {t_k} keys")
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    key_mask = allowed.any(dim=1).expand(batch, t_k)  # (B, Tk): a key any query may see is not padding
    pos = (t_k - t_q) + torch.arange(t_q, device=mask.device)
    j = torch.arange(t_k, device=mask.device)
    expected = j[None, :] <= pos[:, None]
    if sliding_window is not None:
        expected = expected & (j[None, :] > pos[:, None] - sliding_window)
    expected = expected[None] & key_mask[:, None, :]
    # rows of padding queries may be all-allowed or all-masked depending on the version: ignore them
    real_rows = key_mask[:, t_k - t_q :]
    if not bool(((allowed == expected) | ~real_rows[:, :, None]).all()):
        raise InputError(
            "the attention mask is not causal + padding (packed sequences, a static cache or a custom 4-D mask?); "
            "longreach supports causal attention with key padding: pass a 2-D attention_mask and a dynamic cache"
        )
    return None if bool(key_mask.all()) else key_mask.contiguous()


def longreach_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """transformers' attention contract: inputs (B, H, S, D); returns ((B, S, H, D), no weights)."""
    runtime = _RUNTIMES.get(module)
    if runtime is None:
        raise LongreachError(
            "this model's attention is set to 'longreach' but no longreach method is applied to it; "
            "use longreach.apply(model, spec) (or set_attn_implementation('sdpa') to go back)"
        )
    if dropout:
        raise InputError("longreach attention is for inference: call model.eval() (attention dropout is on)")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"{type(module).__name__} uses attention '{name}', which longreach kernels do not implement"
            )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = runtime.forward(query, key, value, attention_mask, float(scale), sliding_window)
    return out.contiguous(), None


def _mask_builder(*args: object, **kwargs: object) -> Tensor | None:
    """Same masks as SDPA's builder (None when plain causal): keeps padding information flowing to us."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, longreach_attention)
    AttentionMaskInterface.register(ATTN_NAME, _mask_builder)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")
            and hasattr(m, "scaling")]


def apply(
    model: nn.Module, spec: str | Spec, *, kernel: str = "auto", track_density: bool = True
) -> Handle:
    """Route every attention layer of ``model`` through ``spec``; returns a Handle to undo it.

    >>> with longreach.apply(model, "quest:density=0.1") as h:
    ...     model.generate(**inputs)
    ...     print(h.density())
    """
    parsed = parse_spec(spec)
    if kernel not in kernels.kernel_names():
        kernels.resolve(kernel, torch.empty(0))  # raises the "did you mean" error
    name = type(model).__name__
    config = getattr(model, "config", None)
    modules = _attention_modules(model)
    if config is None or not hasattr(model, "set_attn_implementation") or not can_set_attn_implementation(model):
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' AttentionInterface, so longreach cannot "
            "attach to it; supported: causal LMs such as Llama, Qwen2, Mistral, Gemma 3"
        )
    if not modules:
        raise UnsupportedModelError(f"{name}: found no attention layers that use AttentionInterface")
    if not getattr(config, "is_causal", True) or any(getattr(m, "is_causal", True) is False for m in modules):
        raise UnsupportedModelError(
            f"{name} has non-causal (bidirectional) attention; longreach methods assume causal decoding"
        )
    missing = unsupported_features(model, modules)
    if missing:
        raise UnsupportedModelError(
            f"{name} uses attention that longreach kernels do not implement yet: {'; '.join(missing)}. Running it "
            "through longreach would compute a different attention, so it is refused; use the model's own "
            "attention (no longreach method) for this family"
        )
    if any(m in _RUNTIMES for m in modules):
        raise LongreachError(f"a longreach method is already applied to this {name}; call handle.remove() first")
    cache_owners = [m for m in parsed.methods if m.kind == "press" or hasattr(m, "head_split")]
    if len(cache_owners) > 1:  # presses and head policies (duo, lserve, razor) each reshape the KV cache
        names = " and ".join(m.name for m in cache_owners)
        raise SpecError(f"cannot stack presses and head policies ({names}): each manages the KV cache; keep one "
                        "per spec (it may follow a select method)")
    remaps = [m for m in parsed.methods if isinstance(m, RemapPositions)]
    if remaps and cache_owners:
        raise SpecError(f"cannot stack {remaps[0].name} with {cache_owners[0].name}: {remaps[0].name} re-maps "
                        "positions by cache index, and presses / head policies drop keys (indices stop being "
                        "positions); use a rope scaling method (yarn, linear, ...) with a press instead")
    for m in parsed.methods:
        check = getattr(m, "check_model", None)
        if check is not None:
            check(model)  # e.g. a head profile made for another model: refuse before any work
    _register()
    previous = config._attn_implementation or "sdpa"
    handle = Handle(model, parsed, kernel, track_density, previous)
    handle.n_layers = len(modules)
    if handle.remap is not None:
        handle.rope = rope_info(model)
    if handle.position is not None:
        handle._undo.append(handle.position.install(model))
    for m in modules:
        runtime = _RUNTIMES[m] = LayerRuntime(handle, m)
        if handle.compresses:
            handle._hooks.append(m.register_forward_pre_hook(runtime.remember_cache, with_kwargs=True))
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:
        handle.remove()
        raise
    return handle
