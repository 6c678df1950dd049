"""The model side of the server: one request at a time on the model, prefilled through the prefix cache, decoded
token by token with cancellation.

A request's method is applied to the whole model while it runs (``apply`` binds one handle per model), so the
model serves one request at a time; ``run`` is called in a worker thread and takes ``lock`` for the request's
whole prefill and decode. Events go back to the event loop through ``emit``.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache.growing import growing_cache, reserve
from ..compat import cache_kwargs, output_cache
from ..errors import SpecError
from ..generation import eos_ids, prefill_chunks
from ..hf import apply
from ..position.frozen import LENGTH_DEPENDENT
from ..spec import Spec, parse_spec
from .prefix import PrefixCache, truncatable

DEFAULT_MAX_TOKENS = 256  # an answer's length when a request names none (capped by --max-output-tokens)
DEFAULT_CACHE_BYTES = 2 << 30  # the prefix cache's bound (--cache-bytes)
_PROFILE = re.compile(r"(^|[:,])\s*profile\s*=", re.IGNORECASE)


class Cancelled(Exception):
    """The client went away: generation stopped and its cache dropped."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Job:
    tokens: tuple[int, ...]
    spec: Spec
    sampling: Sampling
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Event:
    kind: str  # text | done | error | cancelled
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: BaseException | None = None
    info: dict | None = None


class TextStream:
    """Decoded text released as it becomes final: held back while it could still become a stop string, or
    while it ends in an incomplete UTF-8 character."""

    def __init__(self, tokenizer: object, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """(new final text, whether a stop string ended the answer)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            delta, self.sent = text[self.sent:end], max(self.sent, end)
            return delta, True
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= self.sent:
            return "", False
        delta, self.sent = text[self.sent:safe], safe
        return delta, False

    def rest(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        return text[self.sent:]


def pick(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    """Next token from (vocab,) logits: argmax at temperature 0, else temperature + nucleus (top_p) sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ordered, idx = probs.sort(descending=True)
        drop = ordered.cumsum(-1) - ordered >= sampling.top_p  # the smallest head reaching top_p is kept
        probs = probs.scatter(-1, idx, ordered.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


def _rope_types(params: object) -> set[str]:
    if not isinstance(params, dict):
        return set()
    found = {str(params["rope_type"])} if "rope_type" in params else set()
    for value in params.values():
        found |= _rope_types(value)
    return found


def servable(spec: Spec) -> Spec:
    """``spec``, or an error when the server cannot run it: a prefill procedure (homer) replaces the whole prefill
    with its own hierarchy of chunks, while the engine prefills in chunks of its own and reuses stored prefixes."""
    for m in spec.of_kind("procedure"):
        raise SpecError(f"{m.name} replaces the prefill with its own procedure, which the server's chunked, "
                        "prefix-reusing prefill does not run: use longreach.generate or longreach eval with it, "
                        "or serve a select method or a press")
    if spec.runs > 1:  # one base is one ordinary run
        raise SpecError(f"{spec} runs every request once per RoPE base and combines the runs' logits, which the "
                        "server's batched decode does not do: use longreach.generate or longreach eval with it, or "
                        "serve buckets (its one-forward form)")
    return spec


class Engine:
    """A loaded model and tokenizer, the default method, and the prefix cache of one server (or replica)."""

    def __init__(self, model: object, tokenizer: object, name: str, method: str = "dense", *, chunk: int = 512,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {chunk}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.method = method
        self.default_spec = servable(parse_spec(method))  # a bad --method fails at start-up
        self.prefix = PrefixCache(cache_bytes, chunk)
        self.chunk = chunk
        self.lock = threading.Lock()
        self.eos = eos_ids(model, tokenizer)
        self.live: weakref.WeakSet = weakref.WeakSet()  # caches of requests in progress: a leak shows here
        self.cancelled = 0  # generations stopped because their client went away
        config = getattr(model, "config", None)
        self._length_rope = _rope_types(getattr(config, "rope_parameters", None)) & set(LENGTH_DEPENDENT)

    # -- request side (event loop or any thread; no model work) -------------------------------------
    def spec_for(self, text: str | None) -> Spec:
        """The request's method, parsed and validated like the CLI's; the default when ``text`` is None.
        A request may not name a file: head policies read a profile, so they are for ``--method`` only."""
        if text is None or text.strip() == self.method.strip():
            return self.default_spec
        if _PROFILE.search(text):
            raise SpecError("a request's method may not name a file (profile=...): start the server with "
                            "--method '<policy>:profile=PATH' to serve a head policy")
        return servable(parse_spec(text))

    def encode_chat(self, messages: list[dict]) -> tuple[int, ...]:
        """Messages through the model's own chat template (its generation prompt appended)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise SpecError(f"{self.name} has no chat template: use /v1/completions with a plain prompt")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,  # type: ignore[attr-defined]
                                                  tokenize=False)
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    def encode_text(self, prompt: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(prompt)["input_ids"])  # type: ignore[operator]

    def reuse_blocker(self, spec: Spec) -> str | None:
        """Why requests under ``spec`` cannot continue from a stored prefix (None: they can). Everything else keeps
        no state across prefill chunks but the cache itself (tests/test_serve_engine.py checks every method)."""
        if spec.of_kind("position"):
            return "position methods re-map or re-scale positions over the whole prompt"
        if self._length_rope:
            return f"this model's RoPE ({', '.join(sorted(self._length_rope))}) depends on the prompt's length"
        for m in spec.methods:
            if getattr(type(m), "wants_history", False):
                return f"{m.name} scores keys by the attention every query since the start paid them"
        return None

    # -- model side (one worker thread at a time) ---------------------------------------------------
    def run(self, job: Job, emit: Callable[[Event], None]) -> None:
        """Prefill and decode ``job``, emitting text events and then exactly one done / error / cancelled event."""
        try:
            with self.lock:
                self._run(job, emit)
        except Cancelled:
            self.cancelled += 1
            emit(Event("cancelled"))
        except BaseException as err:  # answered as an error event; the server goes on
            emit(Event("error", error=err))

    @torch.no_grad()
    def _run(self, job: Job, emit: Callable[[Event], None]) -> None:
        if job.cancel.is_set():
            raise Cancelled
        start = time.perf_counter()
        with apply(self.model, job.spec) as handle:
            cache, logits, cached = self._prefill(job, handle)
            self.live.add(cache)
            prefill_s = time.perf_counter() - start
            tokens, finish = self._decode(job, cache, logits, emit)
            del cache
        usage = {"prompt_tokens": len(job.tokens), "completion_tokens": len(tokens),
                 "total_tokens": len(job.tokens) + len(tokens), "prompt_tokens_details": {"cached_tokens": cached}}
        info = {"method": str(job.spec), "cached_tokens": cached, "prefill_s": round(prefill_s, 4),
                "total_s": round(time.perf_counter() - start, 4)}
        emit(Event("done", finish_reason=finish, usage=usage, info=info))

    def _prefill(self, job: Job, handle: object) -> tuple[object, torch.Tensor, int]:
        """Continue from the longest stored prefix (a block boundary, at most n - 1 tokens: the last token's
        logits are needed), prefill the rest in block-aligned chunks, and store the last boundary before the end
        (and, for entries that serve only whole, the one before it: a short question may cross a boundary)."""
        tokens, block = job.tokens, self.chunk
        n, key = len(tokens), str(job.spec)
        reusable = self.reuse_blocker(job.spec) is None
        entry, reused = self.prefix.lookup(key, tokens, n - 1) if reusable else (None, 0)
        cache = self.prefix.restore(entry, reused, handle) if entry is not None else growing_cache(self.model.config)
        reserve(cache, n + job.sampling.max_tokens - 1)  # allocated once for the whole request, not copied as it grows
        last = (n - 1) // block * block
        stores = {b for b in (last, last - block) if b > reused} if reusable else set()
        ids = torch.tensor([tokens[reused:]], dtype=torch.long)
        logits = None
        for _, hi, out, past in prefill_chunks(self.model, ids, block, cache, logits_to_keep=1):
            if job.cancel.is_set():
                raise Cancelled
            end, logits = reused + hi, out.logits[0, -1]
            if end in stores and (end == last or not truncatable(past)):
                self.prefix.put(key, tokens[:end], past)
        assert logits is not None
        return past, logits, reused

    def _decode(self, job: Job, cache: object, logits: torch.Tensor, emit: Callable[[Event], None]
                ) -> tuple[list[int], str]:
        sampling = job.sampling
        gen = torch.Generator()
        gen.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        stream = TextStream(self.tokenizer, sampling.stop)
        tokens: list[int] = []
        visible: list[int] = []
        while True:
            token = pick(logits, sampling, gen)
            tokens.append(token)
            if token in self.eos:
                finish = "stop"
                break
            visible.append(token)
            delta, stopped = stream.push(visible)
            if delta:
                emit(Event("text", delta))
            if stopped:
                return tokens, "stop"
            if len(tokens) >= sampling.max_tokens:
                finish = "length"
                break
            if job.cancel.is_set():
                raise Cancelled
            out = self.model(input_ids=torch.tensor([[token]]), use_cache=True,  # type: ignore[operator]
                             **cache_kwargs(self.model, cache))
            cache, logits = output_cache(out), out.logits[0, -1]
        rest = stream.rest(visible)
        if rest:
            emit(Event("text", rest))
        return tokens, finish

    def stats(self) -> dict:
        return {"model": self.name, "method": str(self.default_spec), "chunk": self.chunk,
                "prefix_cache": self.prefix.stats(), "live_caches": len(self.live), "cancelled": self.cancelled}
