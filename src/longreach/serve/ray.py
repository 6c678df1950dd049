"""``--replicas N``: the same app on Ray Serve, one model, engine and prefix cache per replica.

Ray Serve routes each request to a replica with room (``max_ongoing_requests`` = the app's admission
capacity) and keeps at most ``max_queued_requests`` more waiting in front of them (Ray answers 503 past that);
inside each replica the app's own limits apply as without Ray. Local Ray unless ``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .app import Limits, create_app
from .engine import Engine


@dataclass(frozen=True)
class ReplicaConfig:
    model: str  # what load_model takes: a bundled name or a path every replica can read
    name: str  # the model id clients send
    method: str = "dense"
    chunk: int = 512
    cache_bytes: int = 2 << 30
    limits: Limits = field(default_factory=Limits)


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

    limits = config.limits
    deployment = serve.deployment(
        serve.ingress()(Replica), name="longreach", num_replicas=replicas,
        max_ongoing_requests=limits.max_concurrency + limits.max_queue,
        max_queued_requests=limits.max_queue * replicas, ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment.bind(config)


def run(config: ReplicaConfig, replicas: int, host: str, port: int, blocking: bool = True) -> None:
    """Start (or join, with ``RAY_ADDRESS``) Ray, then serve ``replicas`` replicas on ``host:port``."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas), name="longreach", route_prefix="/", blocking=blocking)
