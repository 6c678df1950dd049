"""The only runtime module that touches transformers: one attention function registered with AttentionInterface,
and the ``Handle`` that ``apply`` returns.

``apply(model, spec)`` switches the model's attention implementation to ``"longreach"`` and binds a
per-layer runtime (``runtime.layer``) to each attention module; ``Handle.remove()`` switches back. Nothing
in transformers is patched: the function and its mask builder are registered by name, and the model's
own ``set_attn_implementation`` does the switching.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import kernels
from .cache.press import PressPolicy
from .compat import cache_from_kwargs, can_set_attn_implementation
from .errors import InputError, LongreachError, SpecError, UnsupportedModelError
from .features import latent_cache, own_attention_layers, sliding_everywhere, softmax_extras
from .kernels import rowlinear
from .position import PositionMethod, RemapPositions, RopeInfo, rope_info
from .position.bucketruns import BucketRuns
from .position.rotary import nope_layers
from .procedure import Procedure
from .runtime.density import DensityStats
from .runtime.layer import LayerRuntime
from .runtime.masks import KeyMasks
from .spec import Spec, parse_spec
from .stages import PLAIN, CachePolicy, SoftmaxExtras, stack_policies

ATTN_NAME = "longreach"
_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, LayerRuntime] = weakref.WeakKeyDictionary()


class Handle:
    """What ``apply`` returns: undo with ``remove()`` or use as a context manager."""

    def __init__(self, model: nn.Module, spec: Spec, kernel: str, track_density: bool, previous: str) -> None:
        self.model = model
        self.spec = spec
        self.kernel = kernel
        self.track_density = track_density
        self.previous = previous
        self.stats = DensityStats()
        # seconds in the selector stage per phase; None where not measured (an untracked handle, or tensors off
        # the CPU, whose launches return before the work)
        self.select_s: dict[str, float | None] = self._fresh_select_s()
        self.active = True
        # called with (layer_idx, q, k, v, scale, sliding_window, key_mask) after each attention: diagnostics
        self.observer: Callable[..., None] | None = None
        self.masks = KeyMasks()
        # presses and head policies: what the KV cache keeps (at most one per spec, checked by apply), then how
        # it is stored (kvquant), run as one policy
        self.policies: list[CachePolicy] = [p for m in spec.methods if (p := m.cache_policy(self)) is not None]
        self.policy: CachePolicy | None = stack_policies(self.policies)
        # context extension: rope types swap the rotary modules (undone on remove); re-mapping methods
        # re-rotate q/k in the attention function with the model's frequencies
        self.position: PositionMethod | None = next(iter(spec.of_kind("position")), None)  # type: ignore[arg-type]
        self.remap = self.position if isinstance(self.position, RemapPositions) else None
        # parallel runs (buckets-runs, several bases): ``longreach.generate`` batches the prompt once per run and
        # combines the logits
        self.parallel: BucketRuns | None = (self.position if isinstance(self.position, BucketRuns)
                                            and self.position.runs > 1 else None)
        # a procedure (homer) replaces the prefill: ``longreach.generate`` runs it instead of the model's forward
        self.procedure: Procedure | None = next(iter(spec.of_kind("procedure")), None)  # type: ignore[arg-type]
        self.rope: RopeInfo | None = None
        self.n_layers = 0
        self.latent = False  # multi-head latent attention: a press drops tokens of the shared latent (apply sets it)
        self._hooks: list = []
        self._undo: list = []

    @property
    def compresses(self) -> bool:
        """Whether this handle shrinks the KV cache (a press or a head policy)."""
        return self.policy is not None

    def density(self, phase: str | None = None) -> float | None:
        """Fraction of causal query-key pairs actually attended since the last ``reset_stats``."""
        return self.stats.density(phase)

    def reset_stats(self) -> None:
        self.stats = DensityStats()
        self.select_s = self._fresh_select_s()

    def _fresh_select_s(self) -> dict[str, float | None]:
        start = 0.0 if self.track_density else None
        return {"prefill": start, "decode": start}

    def softmax_extras(self, layer_idx: int) -> SoftmaxExtras:
        """Layer ``layer_idx``'s softcap and sink logits in its current attention call: for an observer that
        recomputes attention probabilities (the head profile) and must use the model's softmax."""
        for runtime in list(_RUNTIMES.values()):
            if runtime.handle is self and runtime.layer_idx == layer_idx:
                return runtime.extras
        return PLAIN

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
    if runtime.own_attention:  # a layer no method acts on (Llama 4's chunked local layers): exactly the model's
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")  # Gemma 2's logit cap, GPT-OSS's sink logits
    runtime.softcap = float(softcap) if softcap is not None else None
    runtime.sinks = sinks if isinstance(sinks, Tensor) else None
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


def applied(model: nn.Module) -> Handle | None:
    """The handle of the method applied to ``model``; None when none is."""
    for m in _attention_modules(model):
        runtime = _RUNTIMES.get(m)
        if runtime is not None:
            return runtime.handle
    return None


def _procedure_guard(model: nn.Module, procedure: Procedure) -> Callable[..., None]:
    """A pre-hook on the decoder refusing a plain forward of a prompt the procedure would have read otherwise:
    ``model.generate()`` and direct forwards would silently run the model's own prefill. Decode steps and prompts
    the procedure leaves alone (a single HOMER chunk is exactly the model) pass."""

    def guard(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        x = x if x is not None else kwargs.get("inputs_embeds")
        cache = cache_from_kwargs(kwargs)
        seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        new = x.shape[1] if isinstance(x, Tensor) and x.dim() >= 2 else 0
        if new > 1 and procedure.replaces(model, seen + new):
            raise InputError(
                f"{procedure.name} replaces the prefill of prompts this long ({seen + new} tokens): generate with "
                "longreach.generate(model, ids, ...) (or longreach.homer_generate), which runs it; model.generate() "
                "and plain forwards would run the model's own prefill instead")

    return guard


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
    window = sliding_everywhere(model)
    acting = [m.name for m in parsed.methods
              if (m.kind in ("select", "press") and m.name != "dense") or isinstance(m, RemapPositions)]
    if window is not None and acting:
        raise UnsupportedModelError(
            f"every attention layer of {name} is a sliding-window layer (window {window}), and longreach leaves a "
            f"model's own sliding layers as they are: {', '.join(acting)} would change nothing. Methods inside a "
            "sliding window are not supported yet; its window already bounds this model's cache and attention. "
            "To read past its trained length, use a rope scaling method (yarn, linear, ...), which still applies")
    extras = softmax_extras(model, modules)
    by_mass = [m.name for m in parsed.methods if m.scores_attention]
    if extras and by_mass:
        raise UnsupportedModelError(
            f"{', '.join(by_mass)} score{'s' if len(by_mass) == 1 else ''} keys by attention mass with a softmax "
            f"of q.k, but {name}'s softmax also holds {' and '.join(extras)}, which that scoring leaves out yet. "
            "Use a method that ranks keys by q.k or position (quest, moba, hip, streaming, duo, razor, "
            "streamingkv) or one whose scoring holds them (snapkv, flexprefill, twilight, vslash, ...); the kernels "
            "compute this model's attention exactly")
    if any(m in _RUNTIMES for m in modules):
        raise LongreachError(f"a longreach method is already applied to this {name}; call handle.remove() first")
    previous = config._attn_implementation or "sdpa"
    handle = Handle(model, parsed, kernel, track_density, previous)
    owners = handle.policies
    droppers = [p for p in owners if not p.stores_only]  # kvquant only stores what they keep: it may follow one
    if len(droppers) > 1:  # presses and head policies (duo, lserve, razor, headkv) each reshape the KV cache
        names = " and ".join(p.name for p in droppers)
        raise SpecError(f"cannot stack presses and head policies ({names}): each manages the KV cache; keep one "
                        "per spec (it may follow a select method, and kvquant may follow it)")
    fixed = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if owners and fixed not in (None, "dynamic"):
        raise UnsupportedModelError(
            f"{name}'s generation config asks generate() for a '{fixed}' cache, which {owners[0].name} cannot "
            "shrink or re-store (it works on a DynamicCache); set model.generation_config.cache_implementation = "
            "None before apply(), or use a select method, which works with any cache")
    latent = latent_cache(modules)
    handle.latent = latent is not None
    per_head = [p for p in owners if not isinstance(p, PressPolicy)]
    if latent and per_head:
        raise UnsupportedModelError(
            f"{per_head[0].name} works on the KV cache per key/value head (dropping keys per head, or re-storing "
            f"them), but {name}'s {latent}, which no head owns. A press (snapkv, pyramidkv, h2o, ...) drops whole "
            "tokens of the latent and works here; so does a select method (quest, moba, flexprefill, ...)")
    remaps = [m for m in parsed.methods if isinstance(m, RemapPositions)]
    if remaps and owners:
        owner = owners[0].name
        why = ("stores the keys as quantized codes that decode reads in place, which cannot be re-rotated to new "
               "positions" if owner == "kvquant" else "drops keys (cache indices stop being positions)")
        raise SpecError(f"cannot stack {remaps[0].name} with {owner}: {remaps[0].name} re-maps positions by cache "
                        f"index, and {owner} {why}; use a rope scaling method (yarn, linear, ...) with {owner} "
                        "instead")
    if handle.parallel is not None and owners:
        raise SpecError(f"cannot stack buckets-runs with {owners[0].name}: each run would compress its own cache, "
                        "and the runs must stay the same prompt under different bases; use buckets-runs alone or "
                        "with a select method")
    for m in parsed.methods:
        m.check_model(model)  # e.g. a head profile made for another model: refuse before any work
    _register()
    handle.n_layers = len(modules)
    own, no_rope = own_attention_layers(model), nope_layers(model)
    if handle.remap is not None:
        handle.rope = rope_info(model)
        if all(int(m.layer_idx or 0) in own | no_rope for m in modules):
            raise UnsupportedModelError(
                f"{handle.remap.name} re-maps RoPE positions, but every layer of {name} it would act on uses no "
                "position embedding (NoPE) or keeps its own chunked attention (as in Llama 4, whose RoPE layers are "
                "its chunked local ones): it would change nothing. Use a rope scaling method (yarn, linear, ...)")
    if handle.position is not None:
        handle._undo.append(handle.position.install(model))
    handle._undo.append(rowlinear.install(model))  # decode's one-row projections on every thread (where faster)
    for m in modules:
        runtime = _RUNTIMES[m] = LayerRuntime(handle, m, int(m.layer_idx or 0))
        runtime.own_attention = runtime.layer_idx in own
        runtime.no_rope = runtime.layer_idx in no_rope
        handle._hooks.append(m.register_forward_pre_hook(runtime.before_forward, with_kwargs=True))
    if handle.procedure is not None:
        guard = _procedure_guard(model, handle.procedure)
        handle._hooks.append(model.get_decoder().register_forward_pre_hook(guard, with_kwargs=True))
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:
        handle.remove()
        raise
    return handle
