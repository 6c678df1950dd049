"""The conformance matrix: every registered method on a tiny random model of every supported family.

New model families are where long-context libraries break (a query/key norm, softcapping, learned sinks, a
value dim that differs from the key dim, layers without RoPE). Each cell (family, method) is one of

- ``✓``: the method did what it promises on that family:
  - a full budget equals the unpatched model, token for token, in prefill and decode;
  - a partial budget changes the output (select methods, output hooks);
  - a press (or cache-shrinking head policy) really drops cache bytes;
  - a context-extension method leaves outputs unchanged inside the trained window (and changes them past it);
- ``refused``: ``apply()`` said why, before any forward (the reason is kept);
- ``✗``: anything else (a wrong output, a forward-time error, a raw torch error): a bug.

``longreach models check`` prints the matrix and writes ``docs/models.md``; ``tests/test_conformance.py``
runs it in ``make test``.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cache.compressed import cache_bytes
from .compat import cache_kwargs, output_cache
from .errors import LongreachError
from .heads.profile import SCORES, HeadProfile
from .hf import apply
from .methods import method_names
from .models import FAMILIES, tiny_family

TOL = 1e-4  # logits after 2 layers: fp32 attention differences of ~1e-6 grow a little
P = "{profile}"


@dataclass(frozen=True)
class Probe:
    """How one method is checked. ``full``: a spec that must equal the unpatched model in prefill and decode
    (for context extension: inside the trained window). ``partial``: a spec that must have ``effect``:
    "output" (prefill or decode logits change), "decode" (decode logits change), "bytes" (the cache after the
    prefill is smaller), "past" (logits change on a prompt past the trained window)."""

    full: str | None
    partial: str | None
    effect: str = "output"


def _budgeted(name: str, extra: str = "") -> Probe:
    return Probe(f"{name}:density=1.0,block=16{extra}", f"{name}:density=0.3,block=16{extra}")


def _press(name: str) -> Probe:
    return Probe(f"{name}:density=1.0", f"{name}:density=0.3", "bytes")


PROBES: dict[str, Probe] = {
    "dense": Probe("dense", None),
    **{n: _budgeted(n) for n in ("quest", "moba", "hip", "hyper", "loki", "squeezed", "streaming", "twilight",
                                 "vslash")},
    "longheads": _budgeted("longheads", ",sinks=4"),  # its default 64 sinks would cover a short prompt
    "anchor": _budgeted("anchor"),
    "flexprefill": _budgeted("flexprefill"),
    "recycled": Probe("recycled:density=1.0,block=16", "recycled:density=0.3,block=16", "decode"),
    "a2ats": Probe("a2ats:density=1.0,block=16", "a2ats:density=0.3,block=16", "decode"),  # dense prefill
    "ltri": _budgeted("ltri"),
    "duo": Probe(f"duo:profile={P},ratio=1.0,window=16", f"duo:profile={P},ratio=0.5,window=16"),
    "lserve": Probe(f"lserve:profile={P},ratio=1.0,window=16,density=1.0,block=16",
                    f"lserve:profile={P},ratio=0.5,window=16,density=0.3,block=16"),
    "ablate": Probe(f"ablate:profile={P},top=0", f"ablate:profile={P},top=0.25"),
    "act": Probe(f"act:profile={P},heads=1.0,damp=1.0", f"act:profile={P},heads=1.0,alpha=1.0"),
    **{n: _press(n) for n in ("snapkv", "h2o", "tova", "streamingkv")},
    "finch": Probe("finch:density=1.0,chunk=16,window=16", "finch:density=0.3,chunk=16,window=16", "bytes"),
    # budgets shrink from the first layer to the last: only a flat pyramid (beta=1) keeps every key everywhere
    "pyramidkv": Probe("pyramidkv:density=1.0,beta=1", "pyramidkv:density=0.3", "bytes"),
    "razor": Probe(f"razor:profile={P},ratio=1.0,window=16", f"razor:profile={P},ratio=0.5,window=16", "bytes"),
    "headkv": Probe(f"headkv:profile={P},ratio=1.0,density=1.0", f"headkv:profile={P},density=0.5,ratio=0.25",
                    "bytes"),
    # a residual longer than the prompt keeps every token exact; a short one quantizes the rest
    "kvquant": Probe("kvquant:residual=1024", "kvquant:bits=4,group=16,residual=16", "bytes"),
    # context extension: ``full`` runs inside the trained window; methods that move every position by design
    # (linear, yarn, llama3, mspoe) run there at their identity setting
    "linear": Probe("linear:factor=1.0", "linear:factor=2", "past"),
    "dynamic": Probe("dynamic:factor=2", "dynamic:factor=2", "past"),
    "yarn": Probe("yarn:factor=1.0", "yarn:factor=2", "past"),
    "llama3": Probe("llama3:factor=1.0", "llama3:factor=2", "past"),
    "longrope": Probe("longrope:factor=2", "longrope:factor=2", "past"),
    "selfextend": Probe("selfextend:window=16", "selfextend:group=4,window=16", "past"),
    "gali": Probe("gali:window=16", "gali:window=16", "past"),
    "string": Probe("string:shift=30,local=8", "string:local=8", "past"),  # shifts from S on, by design
    "mspoe": Probe("mspoe:first_layer=0,min_ratio=1.0,max_ratio=1.0", "mspoe:first_layer=0", "past"),
    # lost in the middle: change attention at every length; the identity settings must equal the model
    "buckets": Probe("buckets:bases=1x", "buckets:bases=1x|0.01x"),  # far from 1x: few rotary dims (gpt-neox)
    "posdim": Probe("posdim:dims=0|1,scale=1.0", "posdim:dims=0|1,scale=0.25"),
    # one run (a plain forward) at the model's base, and at another; several runs go through longreach.generate
    # (tests/test_lost_middle.py checks them against the model rebuilt at each base)
    "buckets-runs": Probe("buckets-runs:bases=1x", "buckets-runs:bases=0.01x"),
    # a procedure replaces the prefill of prompts past one chunk (checked by tests/test_homer.py, through
    # longreach.generate); a prompt within one chunk is the model's own prefill, exactly
    "homer": Probe("homer:chunk=1024,prefix=4,suffix=4", None),
}


@dataclass(frozen=True)
class Sizes:
    """Token counts: small enough for ``make test``, long enough for 16-token blocks to leave keys out."""

    trained: int = 48  # the tiny models' max_position_embeddings
    prompt: int = 96  # sparse methods and presses
    inside: int = 24  # context extension inside the trained window (plus ``decode`` steps)
    past: int = 80  # context extension past it
    decode: int = 3


@dataclass(frozen=True)
class Cell:
    family: str
    method: str
    status: str  # "ok" | "refused" | "fail"
    reason: str = ""

    @property
    def mark(self) -> str:
        return {"ok": "✓", "refused": "refused", "fail": "✗"}[self.status]


@dataclass
class Matrix:
    families: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # family -> why it was not built

    def failures(self) -> list[Cell]:
        return [c for c in self.cells.values() if c.status == "fail"]

    def refused(self) -> dict[tuple[str, str], str]:
        return {k: c.reason for k, c in self.cells.items() if c.status == "refused"}


class Failed(Exception):
    """A check that did not hold (the cell's ✗ reason)."""


def _run(model: nn.Module, ids: torch.Tensor, decode: int, spec: str | None) -> tuple[list[torch.Tensor], int]:
    """Logits of a prefill (every position) and ``decode`` one-token steps, and the cache bytes after the prefill.
    ``spec=None``: the model as transformers runs it."""
    steps = ids[0, :decode]  # the same decode tokens for every run
    with torch.no_grad(), (apply(model, spec) if spec else contextlib.nullcontext()):
        out = model(ids, use_cache=True)
        logits, stored = [out.logits[0]], cache_bytes(output_cache(out))
        for token in steps:
            out = model(token.view(1, 1), use_cache=True, **cache_kwargs(model, output_cache(out)))
            logits.append(out.logits[0])
    return logits, stored


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Largest |difference| of the prefill logits and of the decode logits."""
    prefill = float((a[0] - b[0]).abs().max())
    decode = max((float((x - y).abs().max()) for x, y in zip(a[1:], b[1:], strict=True)), default=0.0)
    return prefill, decode


def random_profile(model: nn.Module, folder: Path, seed: int = 0) -> str:
    """A head profile of random scores shaped like ``model`` (head policies need one), saved under ``folder``."""
    config = getattr(model.config, "text_config", None) or model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    rng = random.Random(seed)
    scores = {s: [[rng.random() for _ in range(heads)] for _ in range(layers)] for s in SCORES}
    return str(HeadProfile("", layers, heads, kv, scores).save(folder / "profile.json"))


class FamilyCheck:
    """One family's model, its unpatched outputs, and the checks of each method on it."""

    def __init__(self, family: str, sizes: Sizes, folder: Path, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = tiny_family(family, max_positions=sizes.trained)
        self.sizes = sizes
        self.profile = random_profile(self.model, folder, seed)
        gen = torch.Generator().manual_seed(seed)
        self.ids = {n: torch.randint(3, 128, (1, t), generator=gen)
                    for n, t in (("prompt", sizes.prompt), ("inside", sizes.inside), ("past", sizes.past))}
        self._plain: dict[str, tuple[list[torch.Tensor], int]] = {}

    def plain(self, which: str) -> tuple[list[torch.Tensor], int]:
        if which not in self._plain:
            self._plain[which] = _run(self.model, self.ids[which], self.sizes.decode, None)
        return self._plain[which]

    def spec(self, text: str) -> str:
        return text.format(profile=self.profile)

    def check(self, method: str) -> None:
        """Raise Failed (or whatever the library raised) unless ``method`` does what it promises here."""
        probe = PROBES[method]
        position = probe.effect == "past"
        if probe.full is not None:
            which = "inside" if position else "prompt"
            want, want_bytes = self.plain(which)
            got, got_bytes = _run(self.model, self.ids[which], self.sizes.decode, self.spec(probe.full))
            prefill, decode = _max_diff(got, want)
            where = "inside the trained window" if position else "at full budget"
            if prefill > TOL or decode > TOL:
                raise Failed(f"{probe.full} differs from the model {where}: max |logit diff| {prefill:.2g} in "
                             f"prefill, {decode:.2g} in decode")
            if got_bytes != want_bytes and not position:
                raise Failed(f"{probe.full} changed the cache ({got_bytes} bytes, the model stores {want_bytes})")
        if probe.partial is None:
            return
        which = "past" if position else "prompt"
        want, want_bytes = self.plain(which)
        got, got_bytes = _run(self.model, self.ids[which], self.sizes.decode, self.spec(probe.partial))
        prefill, decode = _max_diff(got, want)
        if probe.effect == "bytes":
            if got_bytes >= 0.9 * want_bytes:
                raise Failed(f"{probe.partial} kept {got_bytes} of {want_bytes} cache bytes")
        elif probe.effect == "decode":
            if decode <= TOL:
                raise Failed(f"{probe.partial} left the decode output as the model's")
        elif max(prefill, decode) <= TOL:
            what = "past the trained window" if position else ""
            raise Failed(f"{probe.partial} left the output {what} as the model's".replace("  ", " "))


def cell(check: FamilyCheck, family: str, method: str) -> Cell:
    """Run one check; a refusal counts only when ``apply()`` raised it (never a forward)."""
    probe = PROBES[method]
    specs = [s for s in (probe.full, probe.partial) if s is not None]
    for spec in specs:  # apply alone first: a refusal must come from apply, before any forward
        try:
            with torch.no_grad(), apply(check.model, check.spec(spec)):
                pass
        except LongreachError as err:
            return Cell(family, method, "refused", _one_line(str(err)))
        except Exception as err:
            return Cell(family, method, "fail", f"apply raised {type(err).__name__}: {_one_line(str(err))}")
    try:
        check.check(method)
    except Failed as err:
        return Cell(family, method, "fail", str(err))
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Cell(family, method, "fail", f"forward raised {type(err).__name__}: {_one_line(str(err))} "
                                            f"({Path(where.filename).name}:{where.lineno})")
    return Cell(family, method, "ok")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_matrix(families: Iterable[str] | None = None, methods: Iterable[str] | None = None,
               sizes: Sizes | None = None, progress: Callable[[str], None] | None = None) -> Matrix:
    """Every (family, method) cell; a family this transformers lacks is skipped with the reason."""
    families = list(families or FAMILIES)
    methods = list(methods or method_names())
    unknown = [m for m in methods if m not in PROBES]
    if unknown:
        raise LongreachError(f"no conformance probe for {', '.join(unknown)}: add one to longreach.conformance.PROBES")
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise LongreachError(f"unknown families {', '.join(bad)}; known: {', '.join(FAMILIES)}")
    matrix = Matrix(families, methods)
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            try:
                check = FamilyCheck(family, sizes or Sizes(), Path(tmp))
            except LongreachError as err:
                matrix.skipped[family] = str(err)
                continue
            for method in methods:
                matrix.cells[family, method] = got = cell(check, family, method)
                if progress is not None:
                    progress(f"{family} {method}: {got.mark} {got.reason}".rstrip())
    return matrix


def markdown(matrix: Matrix) -> str:
    """``docs/models.md``: the family x method table, then every refusal and failure with its reason."""
    fams = [f for f in matrix.families if f not in matrix.skipped]
    notes: dict[str, int] = {}
    rows = []
    for method in matrix.methods:
        row = [f"`{method}`"]
        for family in fams:
            c = matrix.cells[family, method]
            if c.status == "ok":
                row.append("✓")
            else:
                # one note for the reason every method of a family shares, which names the method refused
                reason = c.reason.replace(f": {c.method} would change nothing", ": the method would change nothing")
                n = notes.setdefault(reason, len(notes) + 1)
                row.append(f"{c.mark} [{n}](#r{n})")
        rows.append("| " + " | ".join(row) + " |")
    head = "| method | " + " | ".join(fams) + " |\n|---|" + "---|" * len(fams)
    lines = [
        "# Models: which method runs on which family",
        "",
        "Generated by `longreach models check` (`longreach.conformance`); `tests/test_conformance.py` runs the same",
        "matrix in `make test`. Each family is a 2-layer random model built from its transformers config "
        "(`longreach.models.FAMILIES`).",
        "✓: a full budget equals the unpatched model in prefill and decode (context extension: inside the trained",
        "window), and a partial budget changes the output / a press drops cache bytes / context extension changes",
        "the output past the trained window. refused: `apply()` refuses it up front, with the reason below.",
        "✗: a bug. Gemma 2's logit softcap and GPT-OSS's learned sink logits are computed by the kernels and by "
        "every",
        "method that scores keys by attention mass "
        "([methods.md](methods.md#softcap-and-learned-sinks-in-mass-scoring));",
        "a method whose own softmax leaves them out is refused on those families. Gemma 2's tiny model has a cap that",
        "bends its scores (cap 0.5, weights 5x the default scale), so a dropped cap fails the exactness check.",
        "Sliding-window layers keep the model's own window under every method: on Gemma 2/3 and GPT-OSS the methods",
        "act on the full-attention layers; a model whose every layer slides (`mistral-v0.1`, `starcoder2`) leaves them",
        "no layer to act on, so they are refused there.",
        "",
        head,
        *rows,
        "",
        "## Reasons",
        "",
    ]
    for reason, n in notes.items():
        lines.append(f'<a id="r{n}"></a>{n}. {reason}')
        lines.append("")
    for family, why in matrix.skipped.items():
        lines.append(f"- {family}: not checked ({why})")
    return "\n".join(lines).rstrip() + "\n"
