"""The only module that touches transformers: one attention function registered with AttentionInterface.

``apply(model, spec)`` switches the model's attention implementation to ``"longreach"`` and binds a
per-layer runtime to each attention module; ``Handle.remove()`` switches back. Nothing in
transformers is patched: the function and its mask builder are registered by name, and the model's
own ``set_attn_implementation`` does the switching.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import kernels
from .cache.summaries import BlockSummaries
from .compat import can_set_attn_implementation
from .errors import InputError, LongreachError, UnsupportedModelError
from .methods.base import SelectContext
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


class LayerRuntime:
    """Per attention module: the method to run and the block summaries kept beside the HF cache."""

    def __init__(self, handle: Handle, module: nn.Module) -> None:
        self.handle = handle
        self.layer_idx = int(getattr(module, "layer_idx", 0) or 0)
        method = handle.spec.selector
        stats = getattr(method, "block_stats", ())
        self.summaries = BlockSummaries(getattr(method, "kblock", method.block), stats) if stats else None
        self.state: dict = {}  # the method's per-layer scratch for the current sequence

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, sliding_window: int | None
    ) -> Tensor:
        batch, _, t_q, _ = q.shape
        t_k = k.shape[2]
        key_mask = self.handle_key_mask(mask, batch, t_q, t_k, sliding_window)
        new_sequence = t_k == t_q
        if sliding_window is not None:
            # sliding-window layers (Gemma 3's local layers) keep exactly their own window
            sel = Selection.local(batch, t_q, t_k, sinks=0, window=sliding_window, key_mask=key_mask,
                                  device=q.device)
        else:
            if self.summaries is not None:
                self.summaries.update(k, new_sequence=new_sequence)
            if new_sequence:
                self.state.clear()
            ctx = SelectContext(self.layer_idx, key_mask, self.summaries, self.state, scale)
            sel = self.handle.spec.selector.select(q, k, ctx)
        if self.handle.observer is not None:
            self.handle.observer(self.layer_idx, q, k, v, scale, sliding_window, key_mask)
        if self.handle.track_density and sliding_window is None:  # density of the layers the method controls
            self.handle.stats.add("decode" if t_q == 1 else "prefill", sel)
        return kernels.attend(q, k, v, sel, scale, self.handle.kernel)

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
    if any(m in _RUNTIMES for m in modules):
        raise LongreachError(f"a longreach method is already applied to this {name}; call handle.remove() first")
    unsupported = [p for p in parsed.methods if p.kind != "select"]
    if unsupported:
        raise LongreachError(
            f"'{unsupported[0].name}' is a {unsupported[0].kind} method, which this version cannot apply yet"
        )
    _register()
    previous = config._attn_implementation or "sdpa"
    handle = Handle(model, parsed, kernel, track_density, previous)
    for m in modules:
        _RUNTIMES[m] = LayerRuntime(handle, m)
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:
        handle.remove()
        raise
    return handle
