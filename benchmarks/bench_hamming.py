"""Mask distances over a window: ``hamming_window`` on packed masks against the Early-Bird
code's ``(m1 != m2).sum()`` on bool and on float masks.

As in ``MaskWindow.distances``: the newest of ``length`` masks against each older one,
``length - 1`` distances, left on the device (no host sync). ``torch_sum_packed_bytes``
(torch summing the same packed bytes as int64) is not a distance: it is what merely
reading those bytes costs at this size, the floor for any kernel of the task.
"""

from collections.abc import Callable

import torch

from benchmarks.timing import Timing, measure
from worm_fast import ops

EARLY_BIRD_BOOL = "early_bird_bool_ne_sum"
READ_FLOOR = "torch_sum_packed_bytes"


def run(
    bits: int,
    length: int,
    device: torch.device,
    backends: list[str],
    *,
    warmup: int,
    reps: int,
    budget_s: float | None,
    flush: Callable[[], object],
) -> tuple[dict[str, int], dict[str, Timing]]:
    """Timings by provider, and the bytes of the ``length`` masks each one reads."""
    generator = torch.Generator(device=device).manual_seed(0)
    bool_masks = [torch.rand(bits, device=device, generator=generator) < 0.5 for _ in range(length)]
    float_masks = [m.float() for m in bool_masks]
    packed = torch.stack([ops.pack_mask(m, 0.5) for m in bool_masks])
    newest, older = packed[-1], packed[:-1]

    def early_bird(masks: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(masks[-1] != m).sum() for m in masks[:-1]])

    fns = {
        f"hamming_window_{name}": (
            lambda name=name: ops.hamming_window(newest, older, backend=name)
        )
        for name in backends
    }
    fns[EARLY_BIRD_BOOL] = lambda: early_bird(bool_masks)
    fns["early_bird_float_ne_sum"] = lambda: early_bird(float_masks)
    expected = early_bird(bool_masks)
    for name, fn in fns.items():
        if not torch.equal(fn().cpu(), expected.cpu()):
            raise RuntimeError(f"{name} disagrees with the bool computation")
    fns[READ_FLOOR] = lambda: packed.view(torch.int64).sum()
    read = {name: length * packed.shape[1] for name in fns}
    read[EARLY_BIRD_BOOL] = length * bits
    read["early_bird_float_ne_sum"] = length * bits * 4
    return read, measure(
        fns, device=device, warmup=warmup, reps=reps, budget_s=budget_s, flush=flush
    )
