"""The server's engine and prefix cache without HTTP: continuing from a stored prefix gives the cold prefill bit for
bit, entries are never changed by later requests, and the byte bound holds (checked before any copy)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model
from test_effects import EFFECTS
from test_heads import random_profile

import longreach
from longreach.serve import prefix as prefix_module
from longreach.serve.engine import Engine, Event, Job, Sampling, TextStream
from longreach.serve.prefix import PrefixCache
from longreach.spec import parse_spec

BLOCK = 16
GREEDY = Sampling(max_tokens=6, temperature=0.0)


class Digits:
    """A tokenizer stand-in whose decode is injective: equal texts mean equal tokens."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def answer(engine: Engine, tokens: list[int], spec: str | None = None, sampling: Sampling = GREEDY) -> dict:
    """Run one job to completion: the text, the finish event and every event kind, in order."""
    events: list[Event] = []
    engine.run(Job(tuple(tokens), engine.spec_for(spec), sampling), events.append)
    done = events[-1]
    assert done.kind == "done", done.error
    return {"text": "".join(e.text for e in events if e.kind == "text"), "usage": done.usage,
            "kinds": [e.kind for e in events]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model("llama", vocab_size=128, max_position_embeddings=512)


def prompts(seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(3, 128, (101,), generator=g).tolist()  # not a block multiple: boundaries fall inside
    q1, q2 = torch.randint(3, 128, (7,), generator=g).tolist(), torch.randint(3, 128, (12,), generator=g).tolist()
    return doc, doc + q1, doc + q2


def prefill(engine: Engine, tokens: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """The engine's prefill of ``tokens`` alone: the last token's logits, copies of every tensor of the cache it
    leaves (keys and values, and a head policy's short-head parts), and how many tokens it reused."""
    job = Job(tuple(tokens), engine.default_spec, GREEDY)
    with torch.no_grad(), longreach.apply(engine.model, job.spec) as handle:
        cache, logits, cached = engine._prefill(job, handle)
        tensors = []
        for layer in cache.layers:
            tensors += [layer.keys.clone(), layer.values.clone()]
            short = getattr(layer, "short", None)
            if short is not None:
                tensors += [short.keys.clone(), short.values.clone()]
    return logits.clone(), tensors, cached


@pytest.mark.parametrize("name", sorted(EFFECTS))
def test_a_reused_prefix_gives_the_cold_prefill_bit_for_bit_for_every_method(name, model, tmp_path):
    """Second question over the same document: prefilled from the stored prefix (warm) vs by a fresh engine
    (cold). The last token's logits and every cache tensor must be equal bit for bit (so every answer is the
    same, greedy or sampled), and where the engine reuses, the reuse must have happened; where it refuses,
    nothing is stored."""
    cfg = model.config
    profile = random_profile(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    spec = EFFECTS[name][0].format(profile=profile.save(tmp_path / "p.json"))
    _, first, second = prompts()
    if parse_spec(spec).of_kind("procedure"):  # homer prefills by its own hierarchy: refused at start-up
        with pytest.raises(longreach.SpecError, match="replaces the prefill"):
            Engine(model, Digits(), "tiny", spec, chunk=BLOCK)
        return
    warm = Engine(model, Digits(), "tiny", spec, chunk=BLOCK)
    answer(warm, first)
    warm_logits, warm_cache, cached = prefill(warm, second)
    cold_logits, cold_cache, cold_cached = prefill(Engine(model, Digits(), "tiny", spec, chunk=BLOCK), second)
    if warm.reuse_blocker(warm.default_spec) is None:
        assert cached == 96  # the document's last block boundary (101 tokens)
    else:
        assert cached == 0 and len(warm.prefix) == 0
    assert cold_cached == 0
    assert torch.equal(warm_logits, cold_logits), f"{spec}: the reused prefix changed the logits"
    assert len(warm_cache) == len(cold_cache) and all(
        torch.equal(a, b) for a, b in zip(warm_cache, cold_cache, strict=True)), f"{spec}: it changed the cache"


def entry_tensors(engine: Engine) -> list[torch.Tensor]:
    out = []
    for entry in engine.prefix._entries.values():
        for layer in entry.cache.layers:
            out += [layer.keys.clone(), layer.values.clone()]
    return out


@pytest.mark.parametrize("spec", ["dense", "snapkv:density=0.5", "streamingkv:density=0.3"])
def test_stored_entries_never_change_under_later_requests(spec, model):
    """Reusing an entry (a truncated copy for dense, the whole compressed cache for a press) and decoding after
    it leaves the entry's tensors bit for bit as stored."""
    _doc, first, second = prompts(1)
    engine = Engine(model, Digits(), "tiny", spec, chunk=BLOCK)
    answer(engine, first, sampling=Sampling(max_tokens=20, temperature=0.0))
    stored = entry_tensors(engine)
    assert stored
    for want in (96, 112):  # the first question's entry, then the one the second question stored
        got = answer(engine, second, sampling=Sampling(max_tokens=20, temperature=0.0))
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == want
    assert all(torch.equal(a, b) for a, b in zip(stored, entry_tensors(engine)[:len(stored)], strict=True))


def test_a_compressed_entry_serves_only_requests_it_is_a_whole_prefix_of(model):
    """A press's stored cache is no token-exact prefix: a request that shares only part of its key gets nothing
    from it (a dense entry would be truncated instead)."""
    _doc, first, _ = prompts(2)
    for spec, want in (("snapkv:density=0.5", 0), ("dense", 48)):
        engine = Engine(model, Digits(), "tiny", spec, chunk=BLOCK)
        answer(engine, first)
        diverging = first[:50] + [7] * 30  # shares 50 tokens: past the 48 boundary, short of every stored key
        got = answer(engine, diverging)
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == want, spec


def test_the_prefix_cache_keeps_its_byte_bound_evicting_the_least_recent(model):
    engine = Engine(model, Digits(), "tiny", chunk=BLOCK)
    answer(engine, prompts(3)[1])
    one = engine.prefix.nbytes
    bound = PrefixCache(int(2.5 * one), BLOCK)
    engine.prefix = bound
    docs = [prompts(10 + i)[1] for i in range(4)]
    for tokens in docs:
        answer(engine, tokens)
        assert bound.nbytes <= bound.max_bytes
    assert len(bound) == 2  # each entry is the same size: the two newest stay
    kept = {e.tokens[:5] for e in bound._entries.values()}
    assert kept == {tuple(d[:5]) for d in docs[2:]}
    assert PrefixCache(0, BLOCK).put("dense", (1,), engine.prefix._entries[next(iter(bound._entries))].cache) is False


def test_spec_for_refuses_files_and_bad_specs_and_defaults():
    class Stub:
        generation_config = None
        config = None

    engine = Engine(Stub(), Digits(), "x", "snapkv:density=0.25", chunk=BLOCK)
    assert engine.spec_for(None) is engine.default_spec
    with pytest.raises(longreach.SpecError, match="may not name a file"):
        engine.spec_for("duo:profile=/etc/passwd")
    with pytest.raises(longreach.SpecError, match="did you mean"):
        engine.spec_for("snapkvv")
    assert str(engine.spec_for("quest:density=0.1")) == "quest:density=0.1"


def test_text_stream_holds_back_what_could_become_a_stop_string():
    stream = TextStream(Digits(), ("<3><4>",))
    assert stream.push([1]) == ("", False)  # the last len(stop) - 1 characters could still start it
    assert stream.push([1, 3]) == ("<", False)
    assert stream.push([1, 3, 4]) == ("1>", True)  # stopped: the text up to the stop string, none of it
    free = TextStream(Digits(), ())
    assert free.push([1]) == ("<1>", False) and free.push([1, 2]) == ("<2>", False) and free.rest([1, 2]) == ""


def test_cancelling_stops_generation_and_frees_its_cache(model):
    engine = Engine(model, Digits(), "tiny", chunk=BLOCK)
    job = Job(tuple(prompts(4)[1]), engine.default_spec, Sampling(max_tokens=10_000, temperature=0.0))
    events: list[Event] = []

    def emit(ev: Event) -> None:
        events.append(ev)
        if len(events) == 3:
            job.cancel.set()

    worker = threading.Thread(target=engine.run, args=(job, emit))
    worker.start()
    worker.join(30)
    assert [e.kind for e in events][-1] == "cancelled" and len(events) < 10 and engine.cancelled == 1
    import gc

    gc.collect()
    assert len(engine.live) == 0 and model.config._attn_implementation != "longreach"


def test_a_cache_over_the_bound_is_refused_before_it_is_copied(model, monkeypatch):
    """With --cache-bytes 0 (or any cache whose keys alone pass the bound) no request pays for a snapshot."""
    copies = []
    real = prefix_module.copy_cache
    monkeypatch.setattr(prefix_module, "copy_cache", lambda *a, **kw: copies.append(1) or real(*a, **kw))
    engine = Engine(model, Digits(), "tiny", chunk=BLOCK, cache_bytes=0)
    answer(engine, prompts(5)[1])
    assert not copies and len(engine.prefix) == 0
    bounded = Engine(model, Digits(), "tiny", chunk=BLOCK)
    answer(bounded, prompts(5)[1])
    assert copies and len(bounded.prefix) == 1  # the spy sees copies where the bound allows them
