"""``--replicas N``: the same app on Ray Serve, one model, engine and prefix cache per replica.

Ray Serve routes each request to a replica with room and keeps at most ``max_queued_requests`` more waiting in
front of the replicas (Ray answers 503 past that). A replica's room (``max_ongoing_requests``) is set above the
app's own admission capacity, so the app's gate is what fills first: a full replica answers its own 429 with an
OpenAI error body, at once, as without Ray. Local Ray unless ``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .app import Limits, create_app
from .engine import DEFAULT_CACHE_BYTES, Engine

RAY_HEADROOM = 4  # requests Ray may send a full replica beyond its app's capacity: each gets the app's quick 429


@dataclass(frozen=True)
class ReplicaConfig:
    model: str  # what load_model takes: a bundled name or a path every replica can read
    name: str  # the model id clients send
    method: str = "dense"
    chunk: int = 512
    cache_bytes: int = DEFAULT_CACHE_BYTES
    limits: Limits = field(default_factory=Limits)


def deployment_options(limits: Limits, replicas: int) -> dict:
    """Ray Serve's limits for ``replicas`` replicas that each apply ``limits``.

    ``max_ongoing_requests`` is the app's capacity plus ``RAY_HEADROOM``: were it equal, Ray would never send a
    replica the request its gate refuses, and a full deployment would answer Ray's 503 instead of the app's 429.
    ``max_queued_requests`` (at least 1: Ray takes -1 for no limit and refuses 0) bounds what waits in Ray."""
    return {"num_replicas": replicas, "max_ongoing_requests": limits.capacity + RAY_HEADROOM,
            "max_queued_requests": max(1, limits.max_queue * replicas)}


def build_app(config: ReplicaConfig, replicas: int, cpus_per_replica: float = 1.0):
    """The Ray Serve application (``Deployment.bind()``) of ``replicas`` replicas serving ``config``."""
    from ray import serve

    class Replica:
        def __init__(self, config: ReplicaConfig) -> None:
            from .. import load_model

            model, tokenizer = load_model(config.model)
            self.asgi = create_app(Engine(model, tokenizer, config.name, config.method, chunk=config.chunk,
                                         cache_bytes=config.cache_bytes), config.limits)

        def __serve_build_asgi_app__(self):
            return self.asgi

    deployment = serve.deployment(serve.ingress()(Replica), name="longreach",
                                  ray_actor_options={"num_cpus": cpus_per_replica},
                                  **deployment_options(config.limits, replicas))
    return deployment.bind(config)


def run(config: ReplicaConfig, replicas: int, host: str, port: int, blocking: bool = True) -> None:
    """Start (or join, with ``RAY_ADDRESS``) Ray, then serve ``replicas`` replicas on ``host:port``."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas), name="longreach", route_prefix="/", blocking=blocking)
