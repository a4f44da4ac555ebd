"""One SGD step over a parameter set: WormSGD with truncation against torch SGD.

The providers of ``step_harness``: every one steps the same parameters and gradients
(timing does not depend on their values) with its own momentum buffers, initialized by a
first step before timing. Hyperparameters: fp32, lr 0.01, momentum 0.9, weight decay
5e-4; truncation r = 3e-3 on the representative tensors (``param_sets.representative``)
with masks of density 0.5.
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
from worm_fast import WormSGD

BENCHMARK = "sgd_step"
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
# Read param, grad, momentum buffer; write param, momentum buffer (fp32).
STEP_BYTES_PER_ELEMENT = 5 * 4

FUSED = "torch_sgd_fused"  # the named baseline, no truncation
MASK_MUL = "torch_sgd_foreach+foreach_mul"  # how users truncate today
OURS = "worm_sgd_{backend}+trunc"
REFERENCE = OURS.format(backend="reference")


def torch_sgd(case: StepCase, **impl) -> torch.optim.SGD:
    return torch.optim.SGD(case.params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **impl)


def worm_sgd(case: StepCase, backend: str, truncate: bool) -> WormSGD:
    opt = WormSGD(case.params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=backend)
    if truncate:
        opt.set_truncation(case.bool_masks, R)
    return opt


def providers(case: StepCase, device: torch.device) -> dict[str, Provider]:
    """Every implementation of one SGD step, by name; the reference backend too."""
    found: dict[str, Provider] = {}
    for ours in compiled_backends(device):
        found[OURS.format(backend=ours)] = Provider(worm_sgd(case, ours, True).step, True)
        found[f"worm_sgd_{ours}"] = Provider(worm_sgd(case, ours, False).step, False)
    found[FUSED] = Provider(torch_sgd(case, fused=True).step, False)
    found["torch_sgd_foreach"] = Provider(torch_sgd(case, foreach=True).step, False)
    grads, phases = [p.grad for p in case.bool_masks], float_masks(case)
    for name, impl, foreach in (
        (MASK_MUL, "foreach", True),
        ("torch_sgd_fused+foreach_mul", "fused", True),
        ("torch_sgd_foreach+mul_per_param", "foreach", False),
    ):
        opt = torch_sgd(case, **{impl: True})
        found[name] = Provider(masked_step(grads, phases, opt, foreach), True)
    found[REFERENCE] = Provider(worm_sgd(case, "reference", True).step, True)
    return found
