"""The argument contract of every worm_fast op, checked by every kernel written in Python.

The compiled kernels check the same rules in ``csrc/common.cpp``; the reference kernels,
the Triton ops and the fake (meta) kernels call these functions first, so a direct call
to ``torch.ops.worm_fast.*`` with bad arguments fails the same way on every backend and
before anything is written (a fake kernel that skipped them would hand back an empty
tensor for a meta tensor mixed among CPU tensors, or do nothing for a step).
``worm_fast.ops`` validates user input before it gets here, with friendlier messages.

Rules beyond shapes and devices: the optimizer steps compute in the parameters' dtype
(float32, float64, float16 or bfloat16 only); ``truncation`` is in [0, 1], AdamW's
betas in [0, 1) and its ``truncate`` one of ``ADAMW_TRUNCATE``; the tensors a step
writes are distinct (a step count or buffer shared by two parameters would be advanced
twice on one backend and once on another); scalar
tensors (``threshold``, ``lr_tensor``, ``grad_scale``, ``found_inf``,
``truncation_tensor``) have one element
and live on the tensors' device or on the CPU.
"""

from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

# Packed masks are padded to whole 64-bit words (DESIGN §3.1).
WORD_BITS = 64

STEP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Where masked_adamw_step_ truncates: the Adam update of pruned elements, or their raw
# gradient before the moments (the paper's rule, which Adam's normalization undoes).
ADAMW_TRUNCATE = ("update", "gradient")


def packed_nbytes(numel: int) -> int:
    """Bytes of a packed mask over ``numel`` elements (a multiple of 8)."""
    return (numel + WORD_BITS - 1) // WORD_BITS * (WORD_BITS // 8)


def check_pack_mask(values: torch.Tensor, threshold: torch.Tensor) -> None:
    if values.layout != torch.strided:
        raise ValueError(f"values must be a strided (dense) tensor, got {values.layout}")
    for name, tensor in (("values", values), ("threshold", threshold)):
        if tensor.is_complex():
            raise TypeError(f"{name} must be real, got {tensor.dtype}")
    if threshold.numel() != 1:
        raise ValueError(f"threshold must have one element, got shape {tuple(threshold.shape)}")
    check_scalar_device("threshold", threshold, values.device)


def check_unpack_mask(packed: torch.Tensor, numel: int) -> None:
    check_uint8("packed", packed)
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    if not 0 <= numel <= packed.numel() * 8:
        raise ValueError(f"packed holds {packed.numel() * 8} bits, asked for {numel}")


def check_hamming_window(current: torch.Tensor, window: torch.Tensor) -> None:
    check_uint8("current", current)
    check_uint8("window", window)
    if current.dim() != 1 or window.dim() != 2 or window.shape[1] != current.shape[0]:
        raise ValueError(
            "expected current [nbytes] and window [l, nbytes], got "
            f"{tuple(current.shape)} and {tuple(window.shape)}"
        )
    check_same_device("current", current, window.device)


def check_magnitude_histogram(
    tensors: Sequence[torch.Tensor], lo: torch.Tensor, shift: int, bits: int, stride: int
) -> None:
    """``magnitude_histogram``: tensors of one float dtype and device, ``lo`` int64 [1] or
    [len(tensors)] there, a window of 1..18 digit bits within the dtype's key bits."""
    from worm_fast._ops import MAGNITUDE_KEYS, MAX_HISTOGRAM_BITS  # _ops imports this module

    if not tensors:
        raise ValueError("magnitude_histogram: expected at least one tensor")
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in MAGNITUDE_KEYS:
        raise TypeError(
            f"magnitude_histogram: tensors must be float32, float64, float16 or bfloat16, "
            f"got {dtype}"
        )
    for i, tensor in enumerate(tensors):
        if tensor.layout != torch.strided:
            raise ValueError(f"magnitude_histogram: tensors[{i}] must be a strided tensor")
        if tensor.dtype != dtype or tensor.device != device:
            raise ValueError(
                f"magnitude_histogram: tensors[{i}] is {tensor.dtype} on {tensor.device}, "
                f"tensors[0] is {dtype} on {device} (one dtype and device per call)"
            )
    if lo.dtype != torch.int64 or lo.dim() != 1 or lo.numel() not in (1, len(tensors)):
        raise ValueError(
            f"magnitude_histogram: lo must be int64 of shape [1] or [{len(tensors)}], got "
            f"{lo.dtype}{tuple(lo.shape)}"
        )
    check_same_device("lo", lo, device)
    key_bits = MAGNITUDE_KEYS[dtype].bits
    if not (1 <= bits <= MAX_HISTOGRAM_BITS and shift >= 0 and shift + bits <= key_bits):
        raise ValueError(
            f"magnitude_histogram: need 1 <= bits <= {MAX_HISTOGRAM_BITS}, shift >= 0 and "
            f"shift + bits <= {key_bits} (the key bits of {dtype}), got shift={shift}, "
            f"bits={bits}"
        )
    if stride < 1:
        raise ValueError(f"magnitude_histogram: stride must be >= 1, got {stride}")


def check_soft_mask_distance(
    values: Sequence[torch.Tensor],
    window: torch.Tensor,
    thresholds: torch.Tensor,
    temperatures: torch.Tensor,
    grad: torch.Tensor | None = None,
) -> None:
    """``soft_mask_distance`` (and, with ``grad``, its backward): values of one step dtype on
    one device, the window uint8 [rows >= 1, the values' packed bytes] there, thresholds
    and temperatures one float per tensor, there or on the CPU."""
    if not values:
        raise ValueError("values must hold at least one tensor")
    first = values[0]
    if first.dtype not in STEP_DTYPES:
        raise TypeError(f"values must be float32, float64, float16 or bfloat16, got {first.dtype}")
    for i, v in enumerate(values):
        if v.layout != torch.strided:
            raise ValueError(f"values[{i}] must be a strided (dense) tensor, got {v.layout}")
        if v.dtype != first.dtype or v.device != first.device:
            raise ValueError(
                f"values must share one dtype and device; values[{i}] is {v.dtype} on "
                f"{v.device}, values[0] {first.dtype} on {first.device}"
            )
    check_uint8("window", window)
    nbytes = sum(packed_nbytes(v.numel()) for v in values)
    if window.dim() != 2 or window.shape[0] < 1 or window.shape[1] != nbytes:
        raise ValueError(
            f"window must be [rows >= 1, {nbytes}] (the values' packed masks), got "
            f"{tuple(window.shape)}"
        )
    check_same_device("window", window, first.device)
    for name, constants in (("thresholds", thresholds), ("temperatures", temperatures)):
        if not constants.is_floating_point() or constants.dim() != 1:
            raise ValueError(f"{name} must be a 1-D float tensor, got {constants.dtype}")
        check_numel(name, constants, len(values))
        check_scalar_device(name, constants, first.device)
    if grad is not None:
        check_numel("grad", grad, 1)
        check_scalar_device("grad", grad, first.device)


def check_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    *,
    momentum: float,
    truncation: float,
    scalars: dict[str, torch.Tensor | None],
    fake: bool = False,
) -> None:
    """``masked_sgd_step_``'s arguments; ``fake``: meta or fake tensors (no data pointers)."""
    n = len(params)
    _check_lengths(n, grads=grads, masks=masks)
    if momentum != 0 and len(momentum_buffers) != n:
        raise ValueError(
            f"momentum={momentum} needs one buffer per param ({n}), got {len(momentum_buffers)}"
        )
    if momentum == 0 and len(momentum_buffers) not in (0, n):
        raise ValueError(
            f"momentum_buffers must be empty or one per param ({n}), got {len(momentum_buffers)}"
        )
    check_fraction("truncation", truncation, closed=True)
    states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
    _check_step_tensors(params, grads, states, {}, masks, scalars, fake)


def check_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    *,
    beta1: float,
    beta2: float,
    amsgrad: bool,
    truncation: float,
    scalars: dict[str, torch.Tensor | None],
    truncate: str = "update",
    fake: bool = False,
) -> None:
    """``masked_adamw_step_``'s arguments; ``fake``: meta or fake tensors."""
    n = len(params)
    _check_lengths(
        n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps,
        masks=masks,
    )  # fmt: skip
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(
            f"amsgrad needs one max_exp_avg_sq per param ({n}), got {len(max_exp_avg_sqs)}"
        )
    if not amsgrad and len(max_exp_avg_sqs) not in (0, n):
        raise ValueError(
            f"max_exp_avg_sqs must be empty or one per param ({n}), got {len(max_exp_avg_sqs)}"
        )
    check_fraction("beta1", beta1, closed=False)
    check_fraction("beta2", beta2, closed=False)
    check_fraction("truncation", truncation, closed=True)
    check_adamw_truncate(truncate)
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    _check_step_tensors(params, grads, states, {"state_steps": state_steps}, masks, scalars, fake)


def check_adamw_truncate(truncate: str) -> None:
    if truncate not in ADAMW_TRUNCATE:
        raise ValueError(f"truncate must be one of {ADAMW_TRUNCATE}, got {truncate!r}")


def check_fraction(name: str, value: float, *, closed: bool) -> None:
    """``value`` in [0, 1] (``closed``) or [0, 1); NaN never is."""
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be >= 0 and {'<=' if closed else '<'} 1, got {value}")


def check_uint8(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 packed mask, got {tensor.dtype}")


def check_same_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def check_scalar_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """A scalar tensor is read where the data is, or on the host (a CPU tensor)."""
    if tensor.device != device and tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}, expected {device} or the CPU")


def check_numel(name: str, tensor: torch.Tensor, numel: int) -> None:
    if tensor.numel() != numel:
        raise ValueError(f"{name} has {tensor.numel()} elements, expected {numel}")


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the kernel updates it in place")


def check_distinct(tensors: Sequence[torch.Tensor], name_of: Callable[[int], str]) -> None:
    """No two of the tensors a step writes share memory (compared by data pointer);
    ``name_of(k)`` names ``tensors[k]`` in the error.

    Skipped while torch.compile traces: traced tensors have no memory, and Dynamo cannot
    trace ``data_ptr`` (docs/compile.md)."""
    if torch.compiler.is_compiling() or any(map(is_fake, tensors)):
        return
    addresses = [t.data_ptr() for t in tensors]
    if len(set(addresses)) == len(addresses):
        return
    seen: dict[int, int] = {}
    for k, (tensor, address) in enumerate(zip(tensors, addresses)):
        if tensor.numel() == 0:
            continue  # empty tensors may share a null pointer
        if address in seen:
            raise ValueError(
                f"{name_of(k)} and {name_of(seen[address])} are the same memory; a step "
                "writes each of its params and states once, so they must be distinct tensors"
            )
        seen[address] = k


def _check_lengths(n: int, **lists: Sequence) -> None:
    """One entry per param in each list (``masks`` may also be empty)."""
    if all(len(items) == n or (name == "masks" and not items) for name, items in lists.items()):
        return
    names = [*lists]
    raise ValueError(
        f"{n} params need as many {', '.join(names[:-1])} and {names[-1]} (or no masks), "
        f"got {', '.join(str(len(items)) for items in lists.values())}"
    )


def _check_step_tensors(params, grads, states, steps, masks, scalars, fake) -> None:
    if not params:
        return
    device = params[0].device
    for name, scalar in scalars.items():
        if scalar is not None:
            check_numel(name, scalar, 1)
            check_scalar_device(name, scalar, device)
    written = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        numel = param.numel()
        check_same_device(f"params[{i}]", param, device)
        if param.dtype not in STEP_DTYPES:
            raise TypeError(
                f"params[{i}] has dtype {param.dtype}, expected one of "
                + ", ".join(str(d).removeprefix("torch.") for d in STEP_DTYPES)
            )
        if param.layout != torch.strided or grad.layout != torch.strided:
            raise ValueError(f"params[{i}] and grads[{i}] must be strided (sparse: unsupported)")
        check_contiguous(f"params[{i}]", param)
        written.append((f"params[{i}]", param))
        check_same_device(f"grads[{i}]", grad, device)
        _check_like(f"grads[{i}]", grad, param)
        for name, tensors in states.items():
            state = tensors[i]
            check_same_device(f"{name}[{i}]", state, device)
            _check_like(f"{name}[{i}]", state, param)
            check_contiguous(f"{name}[{i}]", state)
            written.append((f"{name}[{i}]", state))
        for name, tensors in steps.items():
            step = tensors[i]
            check_same_device(f"{name}[{i}]", step, device)
            check_numel(f"{name}[{i}]", step, 1)
            if step.dtype != torch.float32:
                raise TypeError(f"{name}[{i}] must be float32, got {step.dtype}")
            written.append((f"{name}[{i}]", step))
        mask = masks[i] if masks else None
        if mask is not None:
            check_same_device(f"masks[{i}]", mask, device)
            check_uint8(f"masks[{i}]", mask)
            check_numel(f"masks[{i}]", mask, packed_nbytes(numel))
    if not fake:
        check_distinct([tensor for _, tensor in written], lambda k: written[k][0])


def _check_like(name: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
    if tensor.dtype != param.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected {param.dtype} (its param's)")
    check_numel(name, tensor, param.numel())
