"""worm_fast: fast Early-Bird lottery-ticket search with WORM gradient truncation."""

from worm_fast import _ops, ops
from worm_fast.backends import available
from worm_fast.backends import cpp as _cpp  # noqa: F401  (loads _C: torch.ops.worm_fast get its kernels)
from worm_fast.optim import WormAdamW, WormSGD

__all__ = ["WormAdamW", "WormSGD", "_ops", "available", "ops"]
__version__ = "0.1.0"
