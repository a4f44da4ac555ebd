"""The optimizer-step benchmark harness, whatever the optimizer.

A provider module (``bench_sgd``, ``bench_adamw``) names its benchmark and baselines and
builds its providers, each one implementation of one optimizer step on a parameter set;
this module builds the parameter set in memory, times the providers (interleaved, with
the roofline kernels ``alongside``) and counts the bytes each step must move.

A provider module has: ``BENCHMARK`` (the result rows' benchmark name), ``FUSED`` (the
named baseline: torch's fused step without truncation), ``MASK_MUL`` (torch's step after
a float-mask multiply, how users truncate today), ``OURS`` (``"..._{backend}+trunc"``),
``REFERENCE`` (``OURS`` on the reference backend), ``STEP_BYTES_PER_ELEMENT`` and
``providers(case, device) -> dict[str, Provider]``.
"""

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from benchmarks import param_sets
from benchmarks.timing import Timing, measure
from worm_fast import backends
from worm_fast.ops import packed_nbytes

# Truncation factor of every truncating provider, on masks of this density.
R, MASK_DENSITY = 3e-3, 0.5


@dataclass
class StepCase:
    """A parameter set in memory, gradients set, ready to be stepped."""

    params: list[torch.nn.Parameter]
    bool_masks: dict[torch.nn.Parameter, torch.Tensor]  # of the representative tensors
    numel: int
    masked_numel: int
    mask_bytes: int


@dataclass(frozen=True)
class Provider:
    step: Callable[[], None]
    truncates: bool
    compile_s: float | None = None  # a torch.compile'd step: its first call's seconds


def make_case(shapes: param_sets.Shapes, device: torch.device, seed: int = 0) -> StepCase:
    """Random parameters and gradients of ``shapes``; random masks of ``MASK_DENSITY`` on
    the representative tensors (``param_sets.representative``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    chosen = param_sets.representative(shapes)
    params, masks = [], {}
    for name, shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator))
        param.grad = torch.randn(shape, device=device, generator=generator)
        params.append(param)
        if name in chosen:
            masks[param] = torch.rand(shape, device=device, generator=generator) < MASK_DENSITY
    return StepCase(
        params=params,
        bool_masks=masks,
        numel=sum(p.numel() for p in params),
        masked_numel=sum(p.numel() for p in masks),
        mask_bytes=sum(packed_nbytes(p.numel()) for p in masks),
    )


def compiled_backends(device: torch.device) -> list[str]:
    """worm_fast's compiled backends that run on ``device`` here, fastest first: the
    choices of ``auto`` but the reference (so not the Triton interpreter on CPU)."""
    status = backends.available()
    return [
        name
        for name in backends.AUTO_ORDER.get(device.type, ())
        if name != "reference"
        and status[name].available
        and device.type in status[name].device_types
    ]


def fast_backend(device: torch.device) -> str | None:
    """The backend worm_fast picks for ``device``, or None when no compiled one runs."""
    found = compiled_backends(device)
    return found[0] if found else None


def float_masks(case: StepCase) -> list[list[torch.Tensor]]:
    """The gradient scales m + r(1 - m) of the masked tensors, and their reciprocals."""
    scale = [m.float() + R * (~m).float() for m in case.bool_masks.values()]
    return [scale, [1.0 / s for s in scale]]


def masked_step(
    grads: list[torch.Tensor], phases: list[list[torch.Tensor]], opt: torch.optim.Optimizer,
    foreach: bool,
) -> Callable[[], None]:  # fmt: skip
    """Truncate ``grads`` with a float-mask multiply (``phases``: ``float_masks``, shared
    by the providers), then step ``opt``.

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


def step_bytes(bench: ModuleType, case: StepCase, truncates: bool) -> int:
    """Bytes one step of ``bench`` must move at least: one fused pass, plus the packed
    masks if it truncates (GB/s is then proportional to speed among providers of the
    same task)."""
    return bench.STEP_BYTES_PER_ELEMENT * case.numel + (case.mask_bytes if truncates else 0)


def run(
    bench: ModuleType,
    shapes: param_sets.Shapes,
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    reference_reps: int,
    budget_s: float | None,
    alongside: dict[str, Callable[[], None]],
    flush: Callable[[], object],
) -> tuple[StepCase, dict[str, Provider], dict[str, Timing]]:
    """Time every provider of ``bench`` on one parameter set, interleaved with
    ``alongside`` (timed in the same rounds); then the reference backend, with fewer
    repetitions: it is one to two orders of magnitude slower."""
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


def describe(case: StepCase) -> str:
    return (
        f"{len(case.params)} tensors, {case.numel / 1e6:.2f}M elements; "
        f"{len(case.bool_masks)} masked, {case.masked_numel / case.numel:.0%} of the elements"
    )
