"""`longreach serve` through the official ``openai`` client against a real server on loopback (uvicorn in a
thread; the CLI in a subprocess): answers equal ``longreach.generate`` on the same model, streaming and not,
prefix reuse, every error path, limits, cancellation, and a bounded load test."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import longreach  # noqa: E402
from longreach.serve import Engine, Limits, create_app  # noqa: E402
from longreach.serve.app import loopback_hosts  # noqa: E402
from longreach.serve.ray import deployment_options  # noqa: E402

CHUNK = 16
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine: Engine, limits: Limits | None = None):
    """A real uvicorn server on a free loopback port, in a thread, answering only loopback Host headers as the CLI
    does; yields its base URL."""
    port = free_port()
    limits = dataclasses.replace(limits or Limits(), allowed_hosts=loopback_hosts("127.0.0.1"))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, limits), host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def client(url: str, key: str = "none", timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def lm(tiny_lm_folder):
    return longreach.load_model(tiny_lm_folder)


@pytest.fixture(scope="module")
def server(lm):
    model, tok = lm
    engine = Engine(model, tok, NAME, chunk=CHUNK)
    with serving(engine, Limits(max_input_tokens=600, max_concurrency=1, max_queue=8)) as url:
        yield url, engine


DOC = "The grass is green. The sky is blue. The pass key is 4821. The sun is yellow. Here we go. " * 3


def chat_ids(tok, question: str, doc: str = DOC) -> dict:
    text = tok.apply_chat_template([{"role": "user", "content": doc + question}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, return_tensors="pt", add_special_tokens=False)


def oracle(lm, ids: dict, max_new: int, spec: str = "dense", eos: set[int] | None = None) -> str:
    """What longreach.generate answers (greedy, the server's chunking) with ``spec`` applied; ``eos``: the
    model's own unless given."""
    model, tok = lm
    eos = longreach.generation.eos_ids(model, tok) if eos is None else eos
    with longreach.apply(model, spec):
        gen = longreach.generate(model, ids, max_new, eos=eos, chunk=CHUNK)
    return tok.decode(gen.tokens, skip_special_tokens=True)


def ask(c, question: str, doc: str = DOC, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": doc + question}], **kw)


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    err = info.value
    assert set(err.body) == {"message", "type", "param", "code"} and err.body["message"], err.body
    return err


# -- answers -------------------------------------------------------------------------------------------
def test_chat_greedy_equals_generate_streaming_or_not(server, lm):
    url, _ = server
    c = client(url)
    ids = chat_ids(lm[1], "What is the pass key?")
    want = oracle(lm, ids, 8)
    got = ask(c, "What is the pass key?")
    assert got.choices[0].message.content == want and got.object == "chat.completion"
    assert got.usage.prompt_tokens == ids["input_ids"].shape[1] and got.usage.completion_tokens == 8
    assert got.usage.total_tokens == got.usage.prompt_tokens + 8 and got.choices[0].finish_reason == "length"
    chunks = list(ask(c, "What is the pass key?", stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want and chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    with httpx.stream("POST", url + "/v1/chat/completions", json={  # the raw SSE framing
            "model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_completions_with_a_per_request_method(server, lm):
    url, _ = server
    _model, tok = lm
    prompt = DOC + "The pass key is"
    ids = tok(prompt, return_tensors="pt")
    for spec in ("snapkv:density=0.5", "quest:density=0.3,block=16"):
        got = client(url).completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                             extra_body={"method": spec})
        assert got.choices[0].text == oracle(lm, ids, 6, spec), spec
        assert got.model_extra["longreach"]["method"] == spec


def test_a_second_question_reuses_the_document(server, lm):
    """Dense: the second question's answer equals the cold one, and it continued from the last block boundary
    inside the shared document (the first shares only the chat template's system prompt with earlier tests)."""
    url, _engine = server
    doc = "A long document about rivers and the sea. " * 8
    c = client(url)
    first = ask(c, "Question one?", doc=doc)
    second = ask(c, "And a different, second question?", doc=doc)
    cached = second.usage.prompt_tokens_details.cached_tokens
    shared = next(i for i, (a, b) in enumerate(zip(chat_ids(lm[1], "Question one?", doc)["input_ids"][0],
                                                   chat_ids(lm[1], "And a different", doc)["input_ids"][0],
                                                   strict=False)) if a != b)
    assert cached == shared // CHUNK * CHUNK and cached > first.usage.prompt_tokens_details.cached_tokens
    assert second.choices[0].message.content == oracle(lm, chat_ids(lm[1], "And a different, second question?",
                                                                    doc), 8)


def test_stop_strings_max_tokens_and_seeded_sampling(server, lm):
    url, _ = server
    c = client(url)
    want = oracle(lm, chat_ids(lm[1], "Stop?"), 12)
    stop = want[len(want) // 2:len(want) // 2 + 3]
    got = ask(c, "Stop?", max_tokens=12, stop=[stop, "never-appears"])
    assert got.choices[0].message.content == want[:want.index(stop)] and got.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(c, "Stop?", max_tokens=12, stop=stop,
                                                                       stream=True) if ch.choices)
    assert streamed == want[:want.index(stop)]
    one, two, other = (ask(c, "Sample.", temperature=1.0, top_p=0.9, seed=s, max_tokens=10).choices[0].message.content
                       for s in (7, 7, 8))
    assert one == two and one != other


def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list()] == [NAME]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["inflight"] == 0


# -- errors ---------------------------------------------------------------------------------------------
def test_every_bad_request_gets_an_openai_error_body(server):
    url, engine = server
    c = client(url)
    raw = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(url + "/v1/chat/completions", json={"model": NAME})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    bad_type = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": "lots"})
    assert bad_type.status_code == 400 and bad_type.json()["error"]["param"] == "max_tokens"
    err = error_of(lambda: ask(c, "?", extra_body={"method": "quest:density=2"}))
    with pytest.raises(longreach.SpecError) as spec_error:
        longreach.parse_spec("quest:density=2")
    assert err.status_code == 400 and err.body["message"] == str(spec_error.value) and err.body["param"] == "method"
    err = error_of(lambda: ask(c, "?", extra_body={"method": "duo:profile=/etc/passwd"}))
    assert err.status_code == 400 and "may not name a file" in err.body["message"]
    err = error_of(lambda: c.chat.completions.create(model="/etc/passwd", messages=[{"role": "user", "content": "x"}]))
    assert err.status_code == 404 and NAME in err.body["message"]
    err = error_of(lambda: ask(c, "?", n=2))
    assert err.status_code == 400 and err.body["param"] == "n"
    before = engine.prefix.stats()
    err = error_of(lambda: ask(c, "?", doc="word " * 700))
    assert err.status_code == 413 and "600" in err.body["message"] and err.body["code"] == "context_length_exceeded"
    after = engine.prefix.stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])  # no model work was done


def test_unknown_fields_are_refused_and_no_op_fields_accepted(server, lm):
    """A field the server does not implement is a 400 naming it (a typo gets the nearest name), never ignored;
    OpenAI's fields that change nothing here, at values that change nothing, give the plain answer."""
    url, _ = server
    c = client(url)
    for extra, param in (({"max_token": 5}, "max_token"), ({"top_k": 5}, "top_k"), ({"min_p": 0.1}, "min_p"),
                         ({"repetition_penalty": 1.2}, "repetition_penalty")):
        err = error_of(lambda extra=extra: ask(c, "?", extra_body=extra))
        assert err.status_code == 400 and err.body["param"] == param and err.body["code"] == "unknown_parameter"
        assert f"'{param}'" in err.body["message"], err.body
    assert "did you mean 'max_tokens'" in error_of(lambda: ask(c, "?", extra_body={"max_token": 5})).body["message"]
    for kw, param in (({"presence_penalty": 0.5}, "presence_penalty"), ({"logprobs": True}, "logprobs"),
                      ({"response_format": {"type": "json_object"}}, "response_format")):
        err = error_of(lambda kw=kw: ask(c, "?", **kw))
        assert err.status_code == 400 and err.body["param"] == param and err.body["code"] == "unsupported_parameter"
    nested = httpx.post(url + "/v1/chat/completions", json={
        "model": NAME, "messages": [{"role": "user", "content": "x", "name": "bob"}]})
    assert nested.status_code == 400 and nested.json()["error"]["param"] == "messages.0.name"
    legacy = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x", "logprobs": 0})
    assert legacy.status_code == 400 and legacy.json()["error"]["param"] == "logprobs"  # 0 asks for logprobs
    got = ask(c, "No-ops?", max_tokens=4, user="u1", metadata={"k": "v"}, store=False, n=1, logprobs=False,
              presence_penalty=0, frequency_penalty=0.0, logit_bias={}, parallel_tool_calls=False,
              stream_options=None, extra_body={"service_tier": "auto", "top_logprobs": 0})
    assert got.choices[0].message.content == oracle(lm, chat_ids(lm[1], "No-ops?"), 4)


def test_posts_must_be_json_and_loopback_servers_answer_only_loopback_hosts(server):
    """Cross-site requests: a browser's form-encoded POST is a 415, and a Host a DNS-rebinding page would send
    (its own domain, resolved to 127.0.0.1) is a 400; loopback names are served, on any port (a tunnel's)."""
    url, _ = server
    port = url.rsplit(":", 1)[1]
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 1}).encode()
    for kind in (None, "text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": kind} if kind else {})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (kind, r.text)
    ok = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 1
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}", f"127.0.0.1.nip.io:{port}"):
        for r in (httpx.get(url + "/health", headers={"host": host}),
                  httpx.post(url + "/v1/completions", content=body, headers={"host": host,
                                                                            "content-type": "application/json"})):
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text)
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.1", "localhost:9000"):
        assert httpx.get(url + "/health", headers={"host": host}).status_code == 200, host
    assert loopback_hosts("0.0.0.0") is None and loopback_hosts("10.1.2.3") is None
    assert set(loopback_hosts("::1")) == {"localhost", "127.0.0.1", "[::1]"}
    assert "127.0.0.2" in loopback_hosts("127.0.0.2")


def test_oversized_bodies_and_answers_are_refused_before_any_work(server, monkeypatch):
    """A body that cannot fit --max-input-tokens (16 bytes a token) is a 413 before it is read or tokenized,
    declared (Content-Length) or not (chunked); max_tokens over --max-output-tokens is a 400 naming the limit."""
    url, engine = server
    tokenized = []
    monkeypatch.setattr(engine, "encode_text", lambda text: tokenized.append(text) or (1,))
    cap = Limits(max_input_tokens=600).max_body_bytes
    body = json.dumps({"model": NAME, "prompt": "x" * cap}).encode()
    headers = {"content-type": "application/json"}
    declared = httpx.post(url + "/v1/completions", content=body, headers=headers)
    chunked = httpx.post(url + "/v1/completions", content=iter([body[:1000], body[1000:]]), headers=headers)
    for r in (declared, chunked):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert str(cap) in r.json()["error"]["message"]
    assert "transfer-encoding" in chunked.request.headers and not tokenized
    c = client(url)
    for kw, param in (({"max_tokens": 4097}, "max_tokens"), ({"max_completion_tokens": 5000}, "max_completion_tokens")):
        err = error_of(lambda kw=kw: c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                                               **kw))
        assert err.status_code == 400 and err.body["param"] == param and "4096" in err.body["message"]
        assert "--max-output-tokens" in err.body["message"]


def test_api_key(lm):
    model, tok = lm
    with serving(Engine(model, tok, NAME, chunk=CHUNK), Limits(api_key="sesame", max_output_tokens=3)) as url:
        for key in ("none", "sesame2"):
            err = error_of(lambda key=key: ask(client(url, key), "?"))
            assert err.status_code == 401 and err.body["type"] == "authentication_error"
        assert ask(client(url, "sesame"), "?", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(url + "/health").status_code == 200
        # no max_tokens: the default (256) capped by --max-output-tokens
        unasked = client(url, "sesame").chat.completions.create(model=NAME, messages=[{"role": "user", "content": "?"}])
        assert unasked.usage.completion_tokens <= 3
        assert error_of(lambda: ask(client(url, "sesame"), "?", max_tokens=4)).status_code == 400


def test_a_failing_request_gets_a_500_and_the_next_is_served(server, lm, caplog):
    """The 500's body names the failure's type only; its text and traceback go to the server's log."""
    url, _ = server
    model, _ = lm
    calls = []

    def boom(*_):
        calls.append(1)
        raise RuntimeError("injected fault at /secret/path")

    hook = model.model.layers[0].register_forward_pre_hook(boom)
    try:
        with caplog.at_level(logging.ERROR, logger="longreach.serve"):
            err = error_of(lambda: ask(client(url), "Fail?"))
    finally:
        hook.remove()
    assert err.status_code == 500 and err.body["type"] == "server_error" and calls
    assert "/secret/path" not in err.body["message"] and "server's log" in err.body["message"]
    assert "/secret/path" in caplog.text  # the traceback is logged
    assert model.config._attn_implementation != "longreach"  # the request's method was removed
    assert ask(client(url), "Fail?").choices[0].message.content == oracle(lm, chat_ids(lm[1], "Fail?"), 8)


def test_a_full_server_answers_429_before_reading_the_body(lm):
    model, tok = lm
    engine = Engine(model, tok, NAME, chunk=CHUNK)
    with serving(engine, Limits(max_concurrency=1, max_queue=1)) as url, ThreadPoolExecutor(2) as pool:
        engine.lock.acquire()  # the model is busy: one request runs (waiting for it), one waits to be admitted
        try:
            waiting = [pool.submit(ask, client(url), "Busy?") for _ in range(2)]
            while httpx.get(url + "/health").json()["inflight"] < 2:
                time.sleep(0.02)
            err = error_of(lambda: ask(client(url), "Busy?"))
            assert err.status_code == 429 and err.body["type"] == "rate_limit_error"
            unread = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                                headers={"content-type": "application/json"})
            assert unread.status_code == 429  # not the 400 that reading it would give
        finally:
            engine.lock.release()
        assert [f.result().usage.completion_tokens for f in waiting] == [8, 8]
        assert httpx.get(url + "/health").json()["requests"] == {"served": 2, "failed": 0, "cancelled": 0,
                                                                "rejected": 2}


def wait_until_idle(url: str, engine: Engine, cancelled_before: int, seconds: float = 20) -> dict:
    """/health once the engine has cancelled a generation and nothing is in flight."""
    deadline = time.time() + seconds
    while engine.cancelled == cancelled_before or (health := httpx.get(url + "/health").json())["inflight"]:
        assert time.time() < deadline, "the generation went on after its client left"
        time.sleep(0.05)
    return health


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server):
    url, engine = server
    before = engine.cancelled
    with httpx.stream("POST", url + "/v1/completions", json={
            "model": NAME, "prompt": "Go on forever:", "max_tokens": 4000, "temperature": 0, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    wait_until_idle(url, engine, before)
    gc.collect()
    assert len(engine.live) == 0  # its cache is freed


def test_a_client_that_gives_up_on_a_plain_request_cancels_its_generation(lm):
    """Not streaming: the text arrives all the time, yet the server notices within its poll interval that the
    client timed out and closed, and the engine stops (the model never ends by itself here: no EOS)."""
    model, tok = lm
    engine = Engine(model, tok, NAME, chunk=CHUNK)
    engine.eos = set()
    with serving(engine, Limits(max_output_tokens=100_000)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", timeout=1.5, json={
                "model": NAME, "prompt": "Go on forever:", "max_tokens": 100_000, "temperature": 0})
        health = wait_until_idle(url, engine, 0, seconds=10)
    gc.collect()
    assert engine.cancelled == 1 and health["requests"]["cancelled"] == 1 and health["requests"]["served"] == 0
    assert len(engine.live) == 0  # its cache is freed


# -- load -----------------------------------------------------------------------------------------------
def test_bounded_load_with_mixed_methods_and_cancelling_clients(lm, capsys):
    """50 requests, 8 at a time, over a server that admits 2 + queues 5: every request gets exactly one
    well-formed answer (equal to the oracle for its method) or a 429, and the server's own counters agree with
    what the clients saw: served = answered, rejected = 429, cancelled = the clients that closed their stream,
    each of which stopped in the engine. EOS is off, so a generation ends only at max_tokens or by cancelling
    and each outcome is exact. Afterwards the server is healthy, no request's cache is alive, the prefix cache
    is within its bound and holds exactly the bytes of its entries' tensors, and clearing it frees every
    snapshot (nothing else holds one) and brings its bytes back to 0."""
    model, tok = lm
    limit = 200_000
    engine = Engine(model, tok, NAME, chunk=CHUNK, cache_bytes=limit)
    engine.eos = set()
    methods = ["dense", "snapkv:density=0.5", "quest:density=0.3,block=16", "streaming:window=16,block=16"]
    docs = [f"Document {i}: " + "the river runs to the sea and the sea is wide. " * (4 + 3 * i) for i in range(3)]
    questions = ["Where does the river run?", "How wide is the sea?"]
    cases = [(d, q, m) for d in range(3) for q in range(2) for m in methods]
    want = {case: oracle(lm, chat_ids(tok, questions[case[1]], docs[case[0]]), 6, case[2], eos=set())
            for case in cases}
    rng = random.Random(0)
    plan = [(rng.choice(cases), rng.random() < 0.2) for _ in range(50)]
    outcomes: list[tuple[str, float]] = []

    def one(url: str, case: tuple, cancel: bool) -> tuple[str, float]:
        d, q, m = case
        start = time.perf_counter()
        try:
            if cancel:
                stream = ask(client(url), questions[q], doc=docs[d], max_tokens=500, stream=True,
                             extra_body={"method": m})
                next(iter(stream))
                stream.close()
                return "cancelled", time.perf_counter() - start
            got = ask(client(url), questions[q], doc=docs[d], max_tokens=6, extra_body={"method": m})
            assert got.choices[0].message.content == want[case], case
            assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
            return "ok", time.perf_counter() - start
        except openai.APIStatusError as err:
            assert err.status_code == 429 and set(err.body) == {"message", "type", "param", "code"}
            return "429", time.perf_counter() - start

    with serving(engine, Limits(max_concurrency=2, max_queue=5)) as url:
        base = httpx.get(url + "/health").json()
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda p: one(url, *p), plan))
        deadline = time.time() + 30
        while (health := httpx.get(url + "/health").json())["inflight"]:
            assert time.time() < deadline
            time.sleep(0.05)
        stored = [weakref.ref(e.cache) for e in engine.prefix._entries.values()]
        entry_bytes = stored_bytes_of(engine.prefix._entries.values())
        engine.prefix.clear()
        cleared = httpx.get(url + "/health").json()
    gc.collect()
    kinds = [k for k, _ in outcomes]
    assert len(outcomes) == 50 and kinds.count("ok") >= 10
    assert health["requests"] == {"served": kinds.count("ok"), "rejected": kinds.count("429"),
                                  "cancelled": kinds.count("cancelled"), "failed": 0}
    assert health["cancelled"] == kinds.count("cancelled")  # each stopped inside the engine, not just dropped
    assert health["status"] == "ok" and len(engine.live) == 0
    assert base["prefix_cache"]["bytes"] == 0 and 0 < health["prefix_cache"]["bytes"] <= limit
    assert health["prefix_cache"]["bytes"] == entry_bytes and stored
    assert cleared["prefix_cache"]["bytes"] == 0 and all(ref() is None for ref in stored)
    lat = sorted(s for k, s in outcomes if k == "ok")
    figures = {"requests": 50, "by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
               "p50_s": round(lat[len(lat) // 2], 3), "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
               "prefix_bytes_before": base["prefix_cache"]["bytes"], "prefix_bytes_after":
               health["prefix_cache"]["bytes"], "prefix_bytes_after_clear": cleared["prefix_cache"]["bytes"],
               "prefix_bound": limit, "live_caches_after": len(engine.live), "server_counts": health["requests"],
               "engine_cancelled": health["cancelled"]}
    with capsys.disabled():
        print("\nload test:", json.dumps(figures))


def stored_bytes_of(entries) -> int:
    """The bytes of every distinct floating-point buffer the entries' cache layers hold (keys, values, a press's
    side parts; views of one buffer counted once): an independent count of what the prefix cache reports."""
    import torch

    storages: dict[int, int] = {}
    for entry in entries:
        for layer in entry.cache.layers:
            parts = list(vars(layer).values())
            short = getattr(layer, "short", None)
            if short is not None:
                parts += [getattr(short, f.name) for f in dataclasses.fields(short)]
            for t in parts:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# -- the command line -----------------------------------------------------------------------------------
def test_the_cli_serves_a_model_folder_on_loopback(tiny_lm_folder, lm):
    psutil = pytest.importorskip("psutil")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "longreach", "serve", "--model", str(tiny_lm_folder), "--port",
                             str(port), "--api-key", "k", "--chunk", str(CHUNK)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        name = tiny_lm_folder.name
        got = client(url, "k").chat.completions.create(
            model=name, messages=[{"role": "user", "content": DOC + "Key?"}], max_tokens=8, temperature=0)
        assert got.choices[0].message.content == oracle(lm, chat_ids(lm[1], "Key?"), 8)
        assert error_of(lambda: client(url).models.list()).status_code == 401
        rebound = httpx.get(url + "/health", headers={"host": f"evil.example:{port}"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_cli_refuses_a_bad_method_before_loading():
    out = subprocess.run([sys.executable, "-m", "longreach", "serve", "--model", "no-such-model", "--method",
                          "quest:density=2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "density" in out.stdout


# -- a real model ---------------------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.slow
def test_smollm2_answers_a_passkey_question_about_a_4k_document_twice():
    from longreach.eval.tasks.passkey import FILLER, INSTRUCTION, NEEDLES

    model, tok = longreach.load_model("smollm2-135m")
    words = FILLER.split(" ")
    filler = " ".join(words[i % len(words)] for i in range(3100))
    half = len(filler) // 2
    doc = INSTRUCTION + filler[:half] + NEEDLES[0].format(key="71432") + filler[half:]
    engine = Engine(model, tok, "smollm2-135m", chunk=512)
    with serving(engine) as url:
        c = client(url, timeout=900)
        answers = [c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": doc + q}],
                                             max_tokens=10, temperature=0)
                   for q in ("\n\nWhat is the pass key? Answer with the number only.",
                             "\n\nWhich number was given as the pass key?")]
    assert 3500 < answers[0].usage.prompt_tokens < 4600
    assert all("71432" in a.choices[0].message.content for a in answers), [a.choices[0].message.content
                                                                           for a in answers]
    assert answers[1].usage.prompt_tokens_details.cached_tokens >= answers[0].usage.prompt_tokens - 512 - 40


# -- Ray Serve ------------------------------------------------------------------------------------------
def test_ray_sends_a_full_replica_the_request_its_app_answers_429():
    """Ray's room per replica is above the app's capacity, so the app's gate fills first and a full replica
    answers the app's 429 (with an OpenAI body) rather than Ray's 503; Ray's own queue is bounded (>= 1)."""
    limits = Limits(max_concurrency=2, max_queue=3)
    options = deployment_options(limits, replicas=2)
    assert options["max_ongoing_requests"] > limits.max_concurrency + limits.max_queue
    assert options["num_replicas"] == 2 and options["max_queued_requests"] == 6
    assert deployment_options(Limits(max_queue=0), 3)["max_queued_requests"] == 1  # Ray refuses 0


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_alike_each_with_its_own_prefix_cache(tiny_lm_folder, lm):
    """Both replicas answer (equal to longreach.generate) behind loopback-only Host checks, as the CLI sets
    them, and each keeps its own prefix cache: each missed the shared document once, and each cache was looked
    up exactly by the requests its replica served."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from longreach.serve.ray import ReplicaConfig, build_app

    name, port = tiny_lm_folder.name, free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        limits = Limits(max_concurrency=1, max_queue=4, allowed_hosts=loopback_hosts("127.0.0.1"))
        config = ReplicaConfig(str(tiny_lm_folder), name, chunk=CHUNK, limits=limits)
        serve.run(build_app(config, replicas=2, cpus_per_replica=0.5), name="longreach", route_prefix="/")
        c = client(url)
        questions = [f"Question {i}?" for i in range(8)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda q: c.chat.completions.create(
                model=name, messages=[{"role": "user", "content": DOC + q}], max_tokens=6, temperature=0), questions))
        for q, got in zip(questions, answers, strict=True):
            assert got.choices[0].message.content == oracle(lm, chat_ids(lm[1], q), 6)
        replicas = {got.model_extra["longreach"]["replica"] for got in answers}
        assert len(replicas) == 2, replicas  # requests spread over both
        health: dict[str, dict] = {}
        with ThreadPoolExecutor(4) as pool:  # /health goes to either replica: ask until both have answered
            for _ in range(60):  # 4 at once: one at a time, a loaded machine's router kept picking one replica
                for h in pool.map(lambda _: httpx.get(url + "/health").json(), range(4)):
                    health[h["replica"]] = h
                if len(health) == 2:
                    break
        assert set(health) == replicas
        assert sum(h["requests"]["served"] for h in health.values()) == 8
        for h in health.values():
            cache = h["prefix_cache"]
            assert cache["misses"] >= 1 and cache["entries"] >= 1, h
            assert cache["hits"] + cache["misses"] == h["requests"]["served"], h
        assert httpx.get(url + "/health", headers={"host": f"evil.example:{port}"}).status_code == 400
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
