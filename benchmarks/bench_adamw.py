"""One AdamW step over a parameter set: WormAdamW with truncation against torch AdamW.

The providers of ``step_harness``, on the same parameter sets, gradients and masks as
the SGD benchmark (``bench_sgd``); fp32, lr 1e-3, weight decay 1e-2, truncation r = 3e-3
on the representative tensors. "How users truncate today" multiplies the gradients by
float masks before the step; for AdamW that does not even truncate the update once the
second moment adapts (WormAdamW scales the update instead), so it stands here for the
cost of a separate mask pass.
"""

import torch

from benchmarks.step_harness import (
    Provider,
    R,
    StepCase,
    compiled_backends,
    float_masks,
    masked_step,
)
from worm_fast import WormAdamW

BENCHMARK = "adamw_step"
LR, WEIGHT_DECAY = 1e-3, 1e-2
# Read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq (fp32).
STEP_BYTES_PER_ELEMENT = 7 * 4

FUSED = "torch_adamw_fused"  # the named baseline, no truncation
MASK_MUL = "torch_adamw_foreach+foreach_mul"
OURS = "worm_adamw_{backend}+trunc"
REFERENCE = OURS.format(backend="reference")


def _torch_adamw(case: StepCase, **impl) -> torch.optim.AdamW:
    return torch.optim.AdamW(case.params, lr=LR, weight_decay=WEIGHT_DECAY, **impl)


def _worm_adamw(case: StepCase, backend: str, truncate: bool) -> WormAdamW:
    opt = WormAdamW(case.params, lr=LR, weight_decay=WEIGHT_DECAY, backend=backend)
    if truncate:
        opt.set_truncation(case.bool_masks, R)
    return opt


def providers(case: StepCase, device: torch.device) -> dict[str, Provider]:
    """Every implementation of one AdamW step, by name; the reference backend too."""
    found: dict[str, Provider] = {}
    for ours in compiled_backends(device):
        found[OURS.format(backend=ours)] = Provider(_worm_adamw(case, ours, True).step, True)
        found[f"worm_adamw_{ours}"] = Provider(_worm_adamw(case, ours, False).step, False)
    found[FUSED] = Provider(_torch_adamw(case, fused=True).step, False)
    found["torch_adamw_foreach"] = Provider(_torch_adamw(case, foreach=True).step, False)
    grads, phases = [p.grad for p in case.bool_masks], float_masks(case)
    for name, impl in ((MASK_MUL, "foreach"), ("torch_adamw_fused+foreach_mul", "fused")):
        opt = _torch_adamw(case, **{impl: True})
        found[name] = Provider(masked_step(grads, phases, opt, True), True)
    found[REFERENCE] = Provider(_worm_adamw(case, "reference", True).step, True)
    return found
