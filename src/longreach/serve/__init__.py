"""``longreach serve``: an OpenAI-compatible server for long documents, with a prefix cache (context reuse),
limits, and scale-out on Ray Serve. See docs/serve.md."""

from .app import Limits, create_app
from .engine import Engine, Sampling

__all__ = ["Engine", "Limits", "Sampling", "create_app"]
