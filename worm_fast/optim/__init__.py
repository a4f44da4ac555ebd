"""Optimizers with WORM gradient truncation fused into their step."""

from worm_fast.optim.sgd import WormSGD

__all__ = ["WormSGD"]
