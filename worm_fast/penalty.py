"""WORM-gradient's loss terms: the mask distance made differentiable, and made to cost
more the longer the search runs (the proposal's first search, DESIGN §1).

The Early-Bird stop rule watches the hard mask ``|w| > t`` settle; its distance to the
window's masks is a count of flipped bits and has no gradient. The **soft mask**
``s = sigmoid((|w| - t) / tau)`` does: it is ~1 well above the threshold, ~0 well below,
and moves smoothly in a band of width ~``tau`` around it. Training on

    loss = task_loss + (distance_weight + duration_weight * k) * D(w)

where ``D`` is the mean of ``|s - m|`` over the representative elements and the masks
``m`` in the window (``worm_fast.ops.soft_mask_distance``, read from the packed window)
and ``k`` the checks run so far, pulls the elements near the threshold towards the side
the recent masks put them on, so the mask settles sooner.

Choices, and why:

* ``t`` is the current threshold of the search: the one of its newest mask (global or
  per tensor), detached, a reference point and not a parameter. Every check refreshes
  it, with the spread below, so a training step pays for the op alone: selecting the
  threshold again at every step would cost far more than the penalty itself (on
  BERT-base's 14M query / key weights, ~10x the op on a CPU). The selection returns the
  largest pruned magnitude itself; ``t`` is moved to midway between it and the smallest
  kept one, which leaves the hard mask as it is. On the selected value that element
  would read s = 1/2 and get the largest push down, and a threshold recomputed from the
  moving weights would follow it into the pruned elements, raising their soft masks as
  fast as the penalty lowers them.
* ``tau = temperature * spread``, ``spread`` the standard deviation of ``|w|`` over the
  elements that share the threshold (detached), floored at 1 % of their mean magnitude
  so that equal magnitudes (BatchNorm's γ = 1 at initialization) still give a positive
  tau. ``temperature`` is then unitless: the same setting fits BatchNorm γ (|w| ~ 1) and
  attention weights (|w| ~ 0.03), and elements within about ``2 * tau`` of the threshold,
  the ones that can still flip, are those that get a gradient.
* The duration term is ``duration_weight * k * D``, growing linearly with the checks
  run. A term that depends on time alone would be a constant of the weights, with no
  gradient, so it could not change training; what a longer search costs is the mask
  movement that is still to come, so time raises the price of that. Linear, because
  the search's cost is linear in its epochs: each check that passes without settling
  adds the same weight, and a search that drags on is pushed harder and harder to
  settle.
* The hard Early-Bird rule (``d_max < s`` over a full window) still decides when the
  search stops; the penalty only changes the training that leads there.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worm_fast import masks as mask_ops

# Defaults of EarlyBirdSearch(mode="gradient"): the distance in the loss's own units,
# its weight doubled after 10 checks, a soft band a tenth of the spread of |w| wide. Not
# tuned: on a 1,000-image demo subset, weights 1 and 0.1 both settled the mask at the
# first full window (docs/searches.md).
DEFAULT_DISTANCE_WEIGHT = 1.0
DEFAULT_DURATION_WEIGHT = 0.1
DEFAULT_TEMPERATURE = 0.1

# The spread never falls below this fraction of the mean magnitude.
SPREAD_FLOOR = 1e-2


@dataclass(frozen=True)
class PenaltySettings:
    """The hyperparameters of WORM-gradient's penalty (EarlyBirdSearch keyword arguments)."""

    distance_weight: float = DEFAULT_DISTANCE_WEIGHT  # λ_d
    duration_weight: float = DEFAULT_DURATION_WEIGHT  # λ_T, per check run
    temperature: float = DEFAULT_TEMPERATURE  # tau, in units of the spread of |w|

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature > 0):
            raise ValueError(
                "temperature must be a number > 0 (the soft mask's width in units of the "
                f"spread of |w|), got {self.temperature!r}"
            )
        for name in ("distance_weight", "duration_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def weight(self, checks: int) -> float:
        """The factor of the mask distance after ``checks`` checks."""
        return self.distance_weight + self.duration_weight * checks


def soft_mask_constants(
    params: Sequence[torch.Tensor], prune_ratio: float, *, scope: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds, temperatures), one each per tensor of ``params``, as device tensors.

    ``scope="global"``: one threshold and one spread over all of ``params``; else one
    per tensor. Nothing here waits for the device.
    """
    if scope not in mask_ops.SCOPES:
        raise ValueError(f"scope must be one of {mask_ops.SCOPES}, got {scope!r}")
    groups = [list(params)] if scope == "global" else [[p] for p in params]
    thresholds, temperatures = [], []
    for group in groups:
        threshold = _midway_threshold(group, prune_ratio)
        tau = temperature * _spread(group)
        thresholds += [threshold] * len(group)
        temperatures += [tau] * len(group)
    return torch.stack(thresholds), torch.stack(temperatures)


def _midway_threshold(group: Sequence[torch.Tensor], prune_ratio: float) -> torch.Tensor:
    """Midway between the largest pruned |w| (the selected threshold) and the smallest
    kept one; the selected threshold itself when nothing is kept."""
    threshold = mask_ops.global_threshold(group, prune_ratio)
    smallest_kept = torch.stack([
        p.detach().abs().float().masked_fill(p.detach().abs() <= threshold, float("inf")).amin()
        for p in group if p.numel()
    ]).amin()  # fmt: skip
    midway = (threshold + smallest_kept) / 2
    return torch.where(smallest_kept.isfinite(), midway, threshold)


def _spread(group: Sequence[torch.Tensor]) -> torch.Tensor:
    """std of |w| over ``group``, floored at SPREAD_FLOOR x mean |w| (float64 sums)."""
    numel = sum(p.numel() for p in group)
    first = sum(p.detach().abs().sum(dtype=torch.float64) for p in group) / numel
    second = sum(p.detach().square().sum(dtype=torch.float64) for p in group) / numel
    std = (second - first.square()).clamp_min(0).sqrt()
    spread = torch.maximum(std, SPREAD_FLOOR * first)
    # All-zero weights: any positive width will do, since sign(0) zeroes their gradient.
    return spread.clamp_min(torch.finfo(torch.float32).tiny).float()
