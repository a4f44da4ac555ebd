"""worm_fast: fast Early-Bird lottery-ticket search with WORM gradient truncation.

The library: ``ops`` (packed masks, Hamming distances, fused optimizer steps),
``WormSGD`` / ``WormAdamW``, ``EarlyBirdSearch`` and its ``Ticket``, ``prune``,
``presets``, ``profiling`` and ``integrations``. ``worm_fast.experiments`` is the
research harness that reproduces the paper with them.
"""

from worm_fast import (
    _ops,  # noqa: F401  (declares the ops before any backend registers)
    ops,
    prune,
)
from worm_fast.backends import available
from worm_fast.backends import cpp as _cpp  # noqa: F401  (loads _C: torch.ops.worm_fast get its kernels)
from worm_fast.optim import WormAdamW, WormSGD
from worm_fast.search import EarlyBirdSearch, NonFiniteError, Ticket

__all__ = [
    "EarlyBirdSearch",
    "NonFiniteError",
    "Ticket",
    "WormAdamW",
    "WormSGD",
    "available",
    "ops",
    "prune",
]
__version__ = "0.1.0"
