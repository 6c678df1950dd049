"""Every method family that ships with longreach, imported once so each registers its methods by name."""

from .cache import presses  # noqa: F401
from .heads import policies  # noqa: F401
from .methods import (  # noqa: F401
    anchor,
    blocktopk,
    dense,
    flexprefill,
    hip,
    hyper,
    loki,
    longheads,
    recycled,
    squeezed,
    streaming,
    twilight,
    vslash,
)
from .position import remap, rescale  # noqa: F401
