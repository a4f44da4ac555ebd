"""One SGD step under ``torch.compile`` (Inductor) against the same step run eagerly.

The providers of ``step_harness`` (``bench_sgd``'s parameter sets, hyperparameters and
masks), each eagerly and compiled (``@compile``):

* ``worm_sgd_<backend>+trunc``: WormSGD with truncation, compiled with
  ``torch.compile(opt.step, fullgraph=True)`` (the op stays opaque: Inductor compiles what
  is around it);
* ``torch_sgd_fused`` (**the named baseline**, eager, column *vs fused*) and
  ``torch_sgd_foreach``, without truncation; torch breaks the graph around its own step,
  so these compile with ``fullgraph=False``;
* ``torch_sgd_foreach+foreach_mul``: how users truncate today (column *vs mask\\**), which
  Inductor can fuse into one pass with the step;
* ``worm_sgd_reference+trunc@compile``: the pure-torch oracle, traced and fused by
  Inductor (fewer repetitions).

Every optimizer takes one eager step first, so its state exists and each compiled step
compiles once (its first call, timed: the ``compile`` note). Column *vs eager*: the eager
step's time over the compiled one's.
"""

import itertools
import time
from collections.abc import Callable

import torch

from benchmarks import bench_sgd, param_sets
from benchmarks.step_harness import Provider, StepCase, compiled_backends, float_masks, masked_step

BENCHMARK = "compile_step"
FUSED = bench_sgd.FUSED
MASK_MUL = bench_sgd.MASK_MUL
OURS = bench_sgd.OURS
STEP_BYTES_PER_ELEMENT = bench_sgd.STEP_BYTES_PER_ELEMENT
COMPILED = "{}@compile"
REFERENCE = COMPILED.format(bench_sgd.REFERENCE)
# Every step compiles through one code object (torch.optim wraps each optimizer's step
# in the same function), once per optimizer: more than Dynamo's default of 8 entries.
RECOMPILE_LIMIT = 64


def for_run(quick: bool) -> dict[str, param_sets.Shapes]:
    """ResNet-18 (Inductor takes minutes to compile the foreach step of BERT-base's 201
    tensors on a few cores); ``quick``: three small tensors."""
    if quick:
        return {"three-tensors": [("a", (4096,)), ("b", (64, 65)), ("c", (7,))]}
    return {"resnet18": param_sets.resnet18_cifar()}


def _compiled(fn: Callable, fullgraph: bool, *args) -> tuple[Callable, float]:
    """``fn`` compiled, and the seconds its first call (with ``args``: the compile) took."""
    compiled = torch.compile(fn, fullgraph=fullgraph)
    start = time.perf_counter()
    compiled(*args)
    return compiled, time.perf_counter() - start


def providers(case: StepCase, device: torch.device) -> dict[str, Provider]:
    """Every step, eager and compiled, by name."""
    found = {}
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for ours in compiled_backends(device):
            step = bench_sgd.worm_sgd(case, ours, True).step
            _add(found, OURS.format(backend=ours), step, truncates=True, fullgraph=True)
        for name, impl in ((FUSED, "fused"), ("torch_sgd_foreach", "foreach")):
            step = bench_sgd.torch_sgd(case, **{impl: True}).step
            _add(found, name, step, truncates=False, fullgraph=False)
        _add_mask_mul(found, case)
        step = bench_sgd.worm_sgd(case, "reference", True).step
        step()
        compiled, seconds = _compiled(step, True)
        found[REFERENCE] = Provider(compiled, truncates=True, compile_s=seconds)
    return found


def _add(found: dict, name: str, step: Callable[[], object], *, truncates, fullgraph) -> None:
    """``step`` eagerly under ``name`` and compiled under ``name@compile``; its first
    eager call makes the optimizer's state, so that the compiled step compiles once."""
    step()
    found[name] = Provider(step, truncates)
    compiled, seconds = _compiled(step, fullgraph)
    found[COMPILED.format(name)] = Provider(compiled, truncates, compile_s=seconds)


def _add_mask_mul(found: dict, case: StepCase) -> None:
    """``MASK_MUL`` eagerly, and compiled with the masks as an argument (the eager
    provider alternates them by a counter in its closure, which Dynamo would take for a
    constant of the graph, compiling again at every call)."""
    grads, phases = [p.grad for p in case.bool_masks], float_masks(case)
    eager = masked_step(grads, phases, bench_sgd.torch_sgd(case, foreach=True), foreach=True)
    eager()
    found[MASK_MUL] = Provider(eager, truncates=True)
    opt = bench_sgd.torch_sgd(case, foreach=True)

    def truncated_step(masks: list[torch.Tensor]) -> None:
        torch._foreach_mul_(grads, masks)
        opt.step()

    truncated_step(phases[0])
    compiled, seconds = _compiled(truncated_step, False, phases[1])
    calls = itertools.count()
    found[COMPILED.format(MASK_MUL)] = Provider(
        lambda: compiled(phases[next(calls) % 2]), truncates=True, compile_s=seconds
    )


def eager_twin(provider: str) -> str | None:
    """The eager provider of a compiled one (``None`` for an eager one)."""
    suffix = COMPILED.format("")
    return provider.removesuffix(suffix) if provider.endswith(suffix) else None
