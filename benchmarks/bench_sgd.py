"""One SGD step over a parameter set: WormSGD with truncation against torch SGD.

Every provider steps the same parameters and gradients (timing does not depend on their
values) with its own momentum buffers, initialized by a first step before timing.
Hyperparameters: fp32, lr 0.01, momentum 0.9, weight decay 5e-4; truncation r = 3e-3
on the representative tensors (``param_sets.representative``) with masks of density 0.5.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import param_sets
from benchmarks.timing import Timing, measure
from worm_fast import WormSGD, backends
from worm_fast.ops import packed_nbytes

LR, MOMENTUM, WEIGHT_DECAY, R = 0.01, 0.9, 5e-4, 3e-3
# Read param, grad, momentum buffer; write param, momentum buffer (fp32).
STEP_BYTES_PER_ELEMENT = 5 * 4

FUSED = "torch_sgd_fused"  # the named baseline, no truncation
MASK_MUL = "torch_sgd_foreach+foreach_mul"  # how users truncate today
OURS = "worm_sgd_{backend}+trunc"
REFERENCE = OURS.format(backend="reference")


@dataclass
class SgdCase:
    """A parameter set in memory, ready to be stepped."""

    params: list[torch.nn.Parameter]
    bool_masks: dict[torch.nn.Parameter, torch.Tensor]
    numel: int
    masked_numel: int
    mask_bytes: int


def make_case(shapes: param_sets.Shapes, device: torch.device, seed: int = 0) -> SgdCase:
    generator = torch.Generator(device=device).manual_seed(seed)
    chosen = param_sets.representative(shapes)
    params, masks = [], {}
    for name, shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator))
        param.grad = torch.randn(shape, device=device, generator=generator)
        params.append(param)
        if name in chosen:
            masks[param] = torch.rand(shape, device=device, generator=generator) < 0.5
    return SgdCase(
        params=params,
        bool_masks=masks,
        numel=sum(p.numel() for p in params),
        masked_numel=sum(p.numel() for p in masks),
        mask_bytes=sum(packed_nbytes(p.numel()) for p in masks),
    )


def _torch_sgd(case: SgdCase, **impl) -> torch.optim.SGD:
    return torch.optim.SGD(case.params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **impl)


def _worm_sgd(case: SgdCase, backend: str, truncate: bool) -> WormSGD:
    opt = WormSGD(case.params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=backend)
    if truncate:
        opt.set_truncation(case.bool_masks, R)
    return opt


def _float_masks(case: SgdCase) -> list[list[torch.Tensor]]:
    """The gradient scales m + r(1 - m) of the masked tensors, and their reciprocals."""
    scale = [m.float() + R * (~m).float() for m in case.bool_masks.values()]
    return [scale, [1.0 / s for s in scale]]


def _masked_step(
    grads: list[torch.Tensor], phases: list[list[torch.Tensor]], opt: torch.optim.SGD, foreach: bool
) -> Callable[[], None]:
    """Truncate ``grads`` with a float-mask multiply, then step ``opt``.

    Successive calls alternate the masks and their reciprocals: the same work, but the
    shared gradients keep their magnitude instead of decaying to denormals, which are
    slow and would distort every provider's timing.
    """
    calls = 0

    def step() -> None:
        nonlocal calls
        masks = phases[calls % 2]
        calls += 1
        if foreach:
            torch._foreach_mul_(grads, masks)
        else:  # one kernel per tensor: the work a per-parameter gradient hook does
            for grad, mask in zip(grads, masks):
                grad.mul_(mask)
        opt.step()

    return step


@dataclass(frozen=True)
class Provider:
    step: Callable[[], None]
    truncates: bool


def providers(case: SgdCase, device: torch.device) -> dict[str, Provider]:
    """Every implementation of one optimizer step, by name; the reference backend too."""
    found: dict[str, Provider] = {}
    ours = fast_backend(device)
    if ours is not None:
        found[OURS.format(backend=ours)] = Provider(_worm_sgd(case, ours, True).step, True)
        found[f"worm_sgd_{ours}"] = Provider(_worm_sgd(case, ours, False).step, False)
    found[FUSED] = Provider(_torch_sgd(case, fused=True).step, False)
    found["torch_sgd_foreach"] = Provider(_torch_sgd(case, foreach=True).step, False)
    grads, phases = [p.grad for p in case.bool_masks], _float_masks(case)
    for name, impl, foreach in (
        (MASK_MUL, "foreach", True),
        ("torch_sgd_fused+foreach_mul", "fused", True),
        ("torch_sgd_foreach+mul_per_param", "foreach", False),
    ):
        opt = _torch_sgd(case, **{impl: True})
        found[name] = Provider(_masked_step(grads, phases, opt, foreach), True)
    found[REFERENCE] = Provider(_worm_sgd(case, "reference", True).step, True)
    return found


def fast_backend(device: torch.device) -> str | None:
    """The compiled WormSGD backend for ``device``, or None when none is built."""
    names = ("cpp",) if device.type == "cpu" else ("cuda", "triton")
    for name, status in backends.available().items():
        if name in names and status.available and device.type in status.device_types:
            return name
    return None


def step_bytes(case: SgdCase, truncates: bool) -> int:
    """Bytes the step must move at least: one fused pass, plus the packed masks if it
    truncates (GB/s is then proportional to speed among providers of the same task)."""
    return STEP_BYTES_PER_ELEMENT * case.numel + (case.mask_bytes if truncates else 0)


def run(
    shapes: param_sets.Shapes,
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    reference_reps: int,
    budget_s: float | None,
    alongside: dict[str, Callable[[], None]],
    flush: Callable[[], object],
    bench=None,
) -> tuple[SgdCase, dict[str, Provider], dict[str, Timing]]:
    """Time every provider of ``bench`` (a module with ``providers`` and ``REFERENCE``:
    this one, or ``bench_adamw``) on one parameter set, interleaved with ``alongside``
    (timed in the same rounds); then the reference backend, with fewer repetitions: it
    is one to two orders of magnitude slower."""
    bench = bench or sys.modules[__name__]
    case = make_case(shapes, device)
    found = bench.providers(case, device)
    timings = time_providers(
        found, bench.REFERENCE, device, warmup=warmup, reps=reps, reference_reps=reference_reps,
        budget_s=budget_s, alongside=alongside, flush=flush,
    )  # fmt: skip
    return case, found, timings


def time_providers(
    found: dict[str, Provider],
    reference: str,
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    reference_reps: int,
    budget_s: float | None,
    alongside: dict[str, Callable[[], None]],
    flush: Callable[[], object],
) -> dict[str, Timing]:
    """One first step each (optimizer state exists from then on), then the timings: the
    fast providers and ``alongside`` interleaved, the ``reference`` provider on its own;
    ``flush`` runs before every timed call (``timing.cache_flusher``)."""
    for provider in found.values():
        provider.step()
    fast = {name: p.step for name, p in found.items() if name != reference} | alongside
    timings = measure(fast, device=device, warmup=warmup, reps=reps, budget_s=budget_s, flush=flush)
    timings |= measure(
        {reference: found[reference].step},
        device=device,
        warmup=0,
        reps=reference_reps,
        flush=flush,
    )
    return timings


def describe(case: SgdCase) -> str:
    return (
        f"{len(case.params)} tensors, {case.numel / 1e6:.2f}M elements; "
        f"{len(case.bool_masks)} masked, {case.masked_numel / case.numel:.0%} of the elements"
    )
