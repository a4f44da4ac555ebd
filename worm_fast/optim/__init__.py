"""Optimizers with WORM truncation fused into their step."""

from worm_fast.optim.adamw import WormAdamW
from worm_fast.optim.base import TruncatingOptimizer
from worm_fast.optim.sgd import WormSGD

__all__ = ["TruncatingOptimizer", "WormAdamW", "WormSGD"]
