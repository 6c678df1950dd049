"""Context-window extension: read past the trained length without training.

Two shapes (see ``base``): transformers' rope types configured as specs (``linear``, ``dynamic``,
``yarn``, ``longrope``, ``llama3``), and attention-level re-mapping of positions (``selfextend``,
``string``, ``mspoe``) done by re-rotating q/k inside longreach's attention function. Two lost-in-the-middle
methods work the same way: ``buckets`` (attention under several RoPE bases, averaged) and ``posdim``
(positional q/k dims scaled).
"""

from .base import PositionMethod, PositionView, RemapPositions, RopeScaling
from .rotary import RopeInfo, rerotate, rope_info

__all__ = ["PositionMethod", "PositionView", "RemapPositions", "RopeInfo", "RopeScaling", "rerotate", "rope_info"]
