"""Every method family that ships with longreach, imported once so each registers its methods by name."""

from .cache import kvquant, presses  # noqa: F401
from .heads import policies  # noqa: F401
from .methods import (  # noqa: F401
    a2ats,
    anchor,
    blocktopk,
    dense,
    flexprefill,
    hip,
    hyper,
    loki,
    longheads,
    ltri,
    recycled,
    squeezed,
    streaming,
    twilight,
    vslash,
)
from .position import bucketruns, buckets, posdim, remap, rescale  # noqa: F401
from .procedure import homer  # noqa: F401
