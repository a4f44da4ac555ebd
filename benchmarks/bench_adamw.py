"""One AdamW step over a parameter set: WormAdamW with truncation against torch AdamW.

The same parameter sets, gradients and masks as the SGD benchmark (``bench_sgd``);
fp32, lr 1e-3, weight decay 1e-2, truncation r = 3e-3 on the representative tensors.
"How users truncate today" multiplies the gradients by float masks before the step; for
AdamW that does not even truncate the update once the second moment adapts (WormAdamW
scales the update instead), so it stands here for the cost of a separate mask pass.
"""

import torch

from benchmarks.bench_sgd import (
    Provider,
    R,
    SgdCase,
    _float_masks,
    _masked_step,
    fast_backend,
)
from worm_fast import WormAdamW

LR, WEIGHT_DECAY = 1e-3, 1e-2
# Read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq (fp32).
STEP_BYTES_PER_ELEMENT = 7 * 4

FUSED = "torch_adamw_fused"  # the named baseline, no truncation
MASK_MUL = "torch_adamw_foreach+foreach_mul"
OURS = "worm_adamw_{backend}+trunc"
REFERENCE = OURS.format(backend="reference")


def _torch_adamw(case: SgdCase, **impl) -> torch.optim.AdamW:
    return torch.optim.AdamW(case.params, lr=LR, weight_decay=WEIGHT_DECAY, **impl)


def _worm_adamw(case: SgdCase, backend: str, truncate: bool) -> WormAdamW:
    opt = WormAdamW(case.params, lr=LR, weight_decay=WEIGHT_DECAY, backend=backend)
    if truncate:
        opt.set_truncation(case.bool_masks, R)
    return opt


def providers(case: SgdCase, device: torch.device) -> dict[str, Provider]:
    found: dict[str, Provider] = {}
    ours = fast_backend(device)
    if ours is not None:
        found[OURS.format(backend=ours)] = Provider(_worm_adamw(case, ours, True).step, True)
        found[f"worm_adamw_{ours}"] = Provider(_worm_adamw(case, ours, False).step, False)
    found[FUSED] = Provider(_torch_adamw(case, fused=True).step, False)
    found["torch_adamw_foreach"] = Provider(_torch_adamw(case, foreach=True).step, False)
    grads, phases = [p.grad for p in case.bool_masks], _float_masks(case)
    for name, impl in ((MASK_MUL, "foreach"), ("torch_adamw_fused+foreach_mul", "fused")):
        opt = _torch_adamw(case, **{impl: True})
        found[name] = Provider(_masked_step(grads, phases, opt, True), True)
    found[REFERENCE] = Provider(_worm_adamw(case, "reference", True).step, True)
    return found


def step_bytes(case: SgdCase, truncates: bool) -> int:
    return STEP_BYTES_PER_ELEMENT * case.numel + (case.mask_bytes if truncates else 0)
