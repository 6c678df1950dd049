"""Which heads retrieve, which sink, which only look nearby: a reusable per-(layer, head) profile.

Probes are copy tasks on real prose: a line of random words is hidden at some depth, and at the end the
model is asked to repeat it, with the answer teacher-forced. One dense forward per probe; an observer
reads each layer's q and k and scores a sample of queries (the answer span and the tokens before it):

- retrieval (Retrieval Head, arXiv:2404.15574): how often the head's most-attended key is exactly the
  needle token the model is copying at that step;
- sink: attention mass on the first ``sinks`` tokens;
- hidden_sink (ACT, arXiv:2406.15765): mass on later tokens that draw ``alpha`` x their uniform share;
- locality (DuoAttention's streaming notion): mass inside the first ``sinks`` + last ``window`` tokens;
- entropy: attention entropy over log(visible keys), 0 = one key, 1 = uniform;
- learned_sink (models with learned sink logits, GPT-OSS): the softmax share the head's sink logit takes,
  averaged over the sampled queries, beside ``sink``, the attention the first tokens actually draw.

Scores use the model's own softmax (``stages.SoftmaxExtras``: softcapped logits, the learned sink taking its
share); entropy is that of the keys' own distribution (the sink's share is no key's).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..methods.scoring import causal_probs, keys_share
from ..saved import load_tagged, write_atomic
from ..stages import PLAIN, SoftmaxExtras

SCORES = ("retrieval", "sink", "hidden_sink", "locality", "entropy")
LEARNED_SINK = "learned_sink"  # only in profiles of models with learned sink logits (older profiles lack it)
FORMAT = "longreach.HeadProfile/1"


@dataclass
class HeadProfile:
    """Scores per (layer, query head), plus what produced them."""

    model: str
    layers: int
    heads: int
    kv_heads: int
    scores: dict[str, list[list[float]]]
    probe: dict = field(default_factory=dict)
    version: str = ""

    def tensor(self, score: str) -> Tensor:
        if score not in self.scores:
            raise InputError(f"head profile has no '{score}' score; it has: {', '.join(self.scores)}")
        return torch.tensor(self.scores[score], dtype=torch.float64)

    def kv_scores(self, score: str) -> Tensor:
        """(layers, kv_heads): a KV head scores as its best query head (GQA: one KV head serves the group)."""
        return self.tensor(score).view(self.layers, self.kv_heads, -1).amax(dim=-1)

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps({"format": FORMAT, **asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        prof = load_tagged(path, FORMAT, "head profile", "`longreach heads profile --model M --out profile.json`",
                           cls)
        prof.validate(str(path))
        return prof

    def validate(self, where: str = "head profile") -> None:
        if self.layers < 1 or self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise InputError(f"{where}: bad shape layers={self.layers} heads={self.heads} kv_heads={self.kv_heads}")
        for name, rows in self.scores.items():
            if len(rows) != self.layers or any(len(r) != self.heads for r in rows):
                raise InputError(f"{where}: score '{name}' is not {self.layers} layers x {self.heads} heads")

    def check_model(self, model: nn.Module, where: str = "head profile") -> None:
        """Refuse a profile made for another model: names (when both known) and shapes must agree."""
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        shape = (cfg.num_hidden_layers, cfg.num_attention_heads,
                 getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        if shape != (self.layers, self.heads, self.kv_heads):
            raise InputError(
                f"{where} was made for {self.model or 'a model'} with {self.layers} layers x {self.heads} heads "
                f"({self.kv_heads} KV), but this model has {shape[0]} x {shape[1]} ({shape[2]} KV); "
                "profile this model with `longreach heads profile`")
        name = model_name(model)
        if name and self.model and name != self.model:
            raise InputError(f"{where} was made for '{self.model}', not '{name}'; profile this model with "
                             "`longreach heads profile`")


def model_name(model: nn.Module) -> str:
    return str(getattr(model, "longreach_id", "") or getattr(model.config, "_name_or_path", "") or "")


@dataclass(frozen=True)
class Probe:
    ids: list[int]
    needle: list[int]  # positions of the copied tokens in the context
    answer: list[int]  # positions of the same tokens in the (teacher-forced) answer


def build_probe(tokenizer, prose: str, vocab: list[str], length: int, depth: float, seed: int,
                n_secret: int = 12) -> Probe:
    """``prose`` cut to ``length`` tokens with a line of random words at ``depth``, then the request to repeat it."""
    rng = random.Random(seed)
    if len(vocab) < n_secret:
        raise InputError(f"head probes need at least {n_secret} distinct words, got {len(vocab)}")
    sec = _encode(tokenizer, " " + " ".join(rng.sample(vocab, n_secret)))
    intro = _encode(tokenizer, "\nThe secret words are:")
    question = _encode(tokenizer, ".\n\nRepeat the secret words.\nThe secret words are:")
    room = length - len(intro) - 2 * len(sec) - len(question)
    if room < 16:
        raise InputError(f"probe length {length} is too short; use at least {length - room + 16} tokens")
    text = _encode(tokenizer, prose)
    if len(text) < room:
        raise InputError(f"the prose has {len(text)} tokens, fewer than the {room} a {length}-token probe needs")
    text = text[:room]
    at = int(depth * room)
    ids = text[:at] + intro + sec + text[at:] + question + sec
    n0, a0 = at + len(intro), len(ids) - len(sec)
    return Probe(ids, list(range(n0, n0 + len(sec))), list(range(a0, a0 + len(sec))))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class ProfileAccumulator:
    """Observer for ``Handle.observer``: scores each layer's sampled queries of the current probe."""

    def __init__(self, layers: int, heads: int, sinks: int, window: int, alpha: float) -> None:
        self.sinks, self.window, self.alpha = sinks, window, alpha
        self.sums = {s: torch.zeros(layers, heads, dtype=torch.float64) for s in (*SCORES, LEARNED_SINK)}
        self.counts = dict.fromkeys(self.sums, 0)
        self.probe: Probe | None = None
        # layer -> the model's softmax extras in that layer's current call (``Handle.softmax_extras``)
        self.extras: Callable[[int], SoftmaxExtras] | None = None

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, sliding: int | None,
                 key_mask: Tensor | None) -> None:
        probe = self.probe
        if probe is None or q.shape[2] != k.shape[2]:
            return
        t = k.shape[2]
        rows = sorted(set(range(max(0, probe.answer[0] - 128), t)))
        rows_t = torch.tensor(rows, device=q.device)
        extras = self.extras(layer) if self.extras is not None else PLAIN
        probs = causal_probs(q[:1], k[:1], scale, rows_t, window=sliding, extras=extras)[0].flatten(0, 1)  # (Hq,R,T)
        cols = torch.arange(t, device=q.device)
        hidden = cols[None, :] > rows_t[:, None]
        if sliding is not None:
            hidden |= cols[None, :] <= rows_t[:, None] - sliding
        visible = (~hidden).sum(-1).clamp(min=2).double()
        # retrieval: the query before each answer token is copying the matching needle token
        qa = torch.tensor([rows.index(p - 1) for p in probe.answer], device=q.device)
        target = torch.tensor(probe.needle, device=q.device)
        self._add("retrieval", layer, (probs[:, qa].argmax(-1) == target).double().mean(-1))
        self._add("sink", layer, probs[..., : self.sinks].sum(-1).double().mean(-1))
        near = cols[None, :] > rows_t[:, None] - self.window
        far_sinks = probs[..., : self.sinks].masked_fill(near[:, : self.sinks], 0)
        local = probs.masked_fill(~near, 0).sum(-1) + far_sinks.sum(-1)
        self._add("locality", layer, local.double().mean(-1))
        if extras.sinks is not None:  # each row gives the sink 1 - (its keys' total)
            self._add(LEARNED_SINK, layer, (1 - probs.sum(-1)).clamp(min=0).double().mean(-1))
        own = keys_share(probs) if extras.sinks is not None else probs
        ent = -(own * own.clamp(min=1e-30).log()).sum(-1).double() / visible.log()
        self._add("entropy", layer, ent.mean(-1))
        share = probs.mean(1)  # (Hq, T) mean attention each key receives
        heavy = (share > self.alpha / visible.mean()) & (cols >= self.sinks) & ~near[-1]
        self._add("hidden_sink", layer, (probs * heavy[:, None, :]).sum(-1).double().mean(-1))

    def _add(self, score: str, layer: int, values: Tensor) -> None:
        self.sums[score][layer] += values.cpu()
        if layer == 0:
            self.counts[score] += 1

    def scores(self) -> dict[str, list[list[float]]]:
        found = [*SCORES, *([LEARNED_SINK] if self.counts[LEARNED_SINK] else [])]
        return {s: (self.sums[s] / max(self.counts[s], 1)).tolist() for s in found}


@torch.no_grad()
def profile_heads(model: nn.Module, tokenizer, prose: Callable[[int], str], vocab: list[str], *,
                  lengths: tuple[int, ...] = (1024, 2048),
                  depths: tuple[float, ...] = (0.1, 0.4, 0.7, 0.95), sinks: int = 4, window: int = 64,
                  alpha: float = 10.0, progress: Callable[[str], None] | None = None) -> HeadProfile:
    """Run the copy probes densely and return the profile (one forward per length x depth).

    ``prose(seed)`` gives haystack text (a different passage per probe); ``vocab`` the words secrets are drawn from.
    """
    from ..hf import apply
    from ..version import __version__

    cfg = getattr(model.config, "text_config", None) or model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    acc = ProfileAccumulator(cfg.num_hidden_layers, heads, sinks, window, alpha)
    with apply(model, "dense", track_density=False) as handle:
        handle.observer = acc
        acc.extras = handle.softmax_extras
        for length in lengths:
            for i, depth in enumerate(depths):
                seed = 1000 * length + i
                probe = build_probe(tokenizer, prose(seed), vocab, length, depth, seed)
                acc.probe = probe
                if progress:
                    progress(f"probe {len(probe.ids)} tokens, depth {depth}")
                model(input_ids=torch.tensor([probe.ids], device=model.device), use_cache=False, logits_to_keep=1)
    probe_info = {"lengths": list(lengths), "depths": list(depths), "sinks": sinks, "window": window,
                  "alpha": alpha, "task": "copy a line of 12 random words from prose (teacher-forced)"}
    return HeadProfile(model_name(model), cfg.num_hidden_layers, heads, kv, acc.scores(), probe_info, __version__)
