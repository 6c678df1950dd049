"""``longreach serve``: an OpenAI-compatible HTTP server for one model (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from longreach import load_model, parse_spec
from longreach.models import BUNDLED

from .common import MODEL_HELP, console, fail, user_errors


def serve(
    model: str = typer.Option(..., help=MODEL_HELP + "; chosen here only, never by a request"),
    method: str = typer.Option("dense", help="default method spec; a request's 'method' field overrides it"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback unless told otherwise)"),
    port: int = typer.Option(8000, min=1, max=65535),
    cache_bytes: int = typer.Option(None, min=0, help="prefix cache bound in bytes of KV tensors (0: off) "
                                                       "[default: 2 GiB]"),
    chunk: int = typer.Option(512, min=1, help="prefill chunk and prefix-cache block in tokens"),
    max_input_tokens: int = typer.Option(None, min=1, help="longer prompts get a 413 (and bodies over 16 bytes "
                                                            "a token a 413, unread)"),
    max_output_tokens: int = typer.Option(None, min=1, help="a larger max_tokens gets a 400 [default: 4096]"),
    max_concurrency: int = typer.Option(1, min=1, help="requests admitted at once (the model runs them in turn)"),
    max_queue: int = typer.Option(16, min=0, help="requests waiting beyond those; more get a 429"),
    api_key: str = typer.Option(None, envvar="LONGREACH_API_KEY", help="require 'Authorization: Bearer KEY'"),
    replicas: int = typer.Option(None, min=1, help="serve N replicas on Ray Serve (local Ray, or RAY_ADDRESS)"),
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /health (OpenAI shapes, SSE streaming)."""
    try:
        from longreach.serve import Engine, Limits, create_app
        from longreach.serve.app import DEFAULT_MAX_OUTPUT_TOKENS, loopback_hosts
        from longreach.serve.engine import DEFAULT_CACHE_BYTES
    except ImportError as err:
        fail(f"longreach serve needs the serve extra ({err.name} is missing): pip install 'longreach[serve]'")
    cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
    max_output_tokens = DEFAULT_MAX_OUTPUT_TOKENS if max_output_tokens is None else max_output_tokens
    with user_errors(ValueError):
        parse_spec(method)  # a bad spec fails before the model loads
        limits = Limits(max_input_tokens=max_input_tokens, max_concurrency=max_concurrency, max_queue=max_queue,
                        api_key=api_key, max_output_tokens=max_output_tokens,
                        allowed_hosts=loopback_hosts(host))
    name = model if model in BUNDLED else Path(model).name
    if replicas:
        try:
            from longreach.serve.ray import ReplicaConfig, run
        except ImportError as err:
            fail(f"--replicas needs Ray Serve ({err.name} is missing): pip install 'longreach[serve,ray]'")
        console.print(f"serving {name} on http://{host}:{port}/v1 with {replicas} Ray Serve replicas")
        with user_errors():
            run(ReplicaConfig(model, name, method, chunk, cache_bytes, limits), replicas, host, port)
        return
    import uvicorn

    with user_errors():
        lm, tokenizer = load_model(model)
        engine = Engine(lm, tokenizer, name, method, chunk=chunk, cache_bytes=cache_bytes)
    console.print(f"serving {name} ({method}) on http://{host}:{port}/v1")
    uvicorn.run(create_app(engine, limits), host=host, port=port, log_level="warning")
