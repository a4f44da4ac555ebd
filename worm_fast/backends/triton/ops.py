"""The Triton kernels as ``worm_fast::triton_*`` ops.

Declared with ``torch.library.triton_op`` and launched through ``wrap_triton``, so
``torch.compile`` traces into the kernels instead of treating the ops as opaque. Each op
also has an explicit fake kernel: the default one, the op's own body, launches the
kernels, which the Triton interpreter cannot do on fake tensors.

Under the interpreter (``TRITON_INTERPRET=1``, no GPU) ``wrap_triton`` hands back the
plain interpreted kernel, which cannot run on the functional tensors of AOT tracing
either, so there the ops stay opaque to ``torch.compile`` (``_opaque_when_interpreted``).

The masked SGD and AdamW steps launch one kernel per tensor. The bodies check what the
kernels rely on (sizes, dtypes of masks, contiguity, devices) so that no call reads or
writes out of bounds; ``worm_fast.ops`` validates the rest for users.
"""

import math
import struct

import torch
import triton
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from worm_fast._ops import (
    MAGNITUDE_KEYS,
    MAX_HISTOGRAM_BITS,
    NAMESPACE,
    SAMPLE_BLOCK,
    packed_nbytes,
)
from worm_fast.backends.triton.kernels import (
    INTERPRETED,
    _hamming_window_kernel,
    _magnitude_histogram_kernel,
    _masked_adamw_step_kernel,
    _masked_sgd_step_kernel,
    _pack_mask_kernel,
    _unpack_mask_kernel,
)

# The interpreter copies any tensor to the host and back; compiled kernels need CUDA.
DEVICE_TYPES = ("cpu", "cuda") if INTERPRETED else ("cuda",)

# Work per program: large enough to amortize index math, small enough to fill the GPU
# on ~1M-element tensors. Fewer, larger programs also keep the interpreter fast.
PACK_BLOCK_BYTES = 256  # 2048 elements
UNPACK_BLOCK = 2048
HAMMING_BLOCK_WORDS = 1024  # 64 Ki bits
HISTOGRAM_BLOCKS = 32  # blocks of 64 elements: 2048 elements per program
SGD_BLOCK = 1024
ADAMW_BLOCK = 1024


@triton_op(f"{NAMESPACE}::triton_pack_mask", mutates_args=())
def pack_mask(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    _check_device("values", values)
    _check_same_device("threshold", threshold, values.device)
    if threshold.numel() != 1:
        raise ValueError(f"threshold must have one element, got shape {tuple(threshold.shape)}")
    values = values.reshape(-1).contiguous()
    numel = values.numel()
    nbytes = packed_nbytes(numel)
    out = torch.empty(nbytes, dtype=torch.uint8, device=values.device)
    if nbytes:
        grid = (triton.cdiv(nbytes, PACK_BLOCK_BYTES),)
        wrap_triton(_pack_mask_kernel)[grid](
            values, threshold, out, numel, nbytes, BLOCK_BYTES=PACK_BLOCK_BYTES
        )
    return out


@triton_op(f"{NAMESPACE}::triton_unpack_mask", mutates_args=())
def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    _check_device("packed", packed)
    _check_uint8("packed", packed)
    if numel < 0 or packed.numel() * 8 < numel:
        raise ValueError(f"packed holds {packed.numel() * 8} bits, asked for {numel}")
    packed = packed.reshape(-1).contiguous()
    out = torch.empty(numel, dtype=torch.bool, device=packed.device)
    if numel:
        grid = (triton.cdiv(numel, UNPACK_BLOCK),)
        wrap_triton(_unpack_mask_kernel)[grid](packed, out, numel, BLOCK=UNPACK_BLOCK)
    return out


@triton_op(f"{NAMESPACE}::triton_hamming_window", mutates_args=())
def hamming_window(current: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    _check_device("window", window)
    _check_same_device("current", current, window.device)
    _check_uint8("current", current)
    _check_uint8("window", window)
    nbytes = current.numel()
    if window.dim() != 2 or window.shape[1] != nbytes or nbytes % 8:
        raise ValueError(
            "expected current [nbytes] and window [l, nbytes] with nbytes a multiple of 8, "
            f"got {tuple(current.shape)} and {tuple(window.shape)}"
        )
    out = torch.zeros(window.shape[0], dtype=torch.int64, device=window.device)
    if out.numel() and nbytes:
        current_words, window_words = _words(current.reshape(-1)), _words(window)
        nwords = current_words.numel()
        wrap_triton(_hamming_window_kernel)[(triton.cdiv(nwords, HAMMING_BLOCK_WORDS),)](
            current_words,
            window_words,
            out,
            nwords,
            out.numel(),
            window_words.stride(0),
            BLOCK=HAMMING_BLOCK_WORDS,
        )
    return out


@triton_op(f"{NAMESPACE}::triton_magnitude_histogram", mutates_args=())
def magnitude_histogram(
    tensors: list[torch.Tensor], lo: torch.Tensor, shift: int, bits: int, stride: int = 1
) -> torch.Tensor:
    """``reference.magnitude_histogram``, one kernel launch per tensor."""
    if not tensors:
        raise ValueError("expected at least one tensor")
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in MAGNITUDE_KEYS:
        raise TypeError(f"tensors must be float32, float64, float16 or bfloat16, got {dtype}")
    for i, tensor in enumerate(tensors):
        _check_device(f"tensors[{i}]", tensor)
        _check_same_device(f"tensors[{i}]", tensor, device)
        if tensor.dtype != dtype:
            raise TypeError(f"tensors[{i}] is {tensor.dtype}, tensors[0] is {dtype}")
    _check_same_device("lo", lo, device)
    if lo.dtype != torch.int64 or lo.numel() not in (1, len(tensors)):
        raise ValueError(f"lo must be int64 with 1 or {len(tensors)} elements, got {lo.dtype}")
    key = MAGNITUDE_KEYS[dtype]
    if not (1 <= bits <= MAX_HISTOGRAM_BITS and shift >= 0 and shift + bits <= key.bits):
        raise ValueError(f"bad window for {dtype} keys: shift={shift}, bits={bits}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    lo = lo.reshape(-1)
    out = torch.zeros(lo.numel(), (1 << bits) + 2, dtype=torch.int64, device=device)
    for i, tensor in enumerate(tensors):
        row = i if lo.numel() > 1 else 0
        values = tensor.reshape(-1).contiguous()
        sampled_blocks = triton.cdiv(triton.cdiv(values.numel(), SAMPLE_BLOCK), stride)
        if sampled_blocks:
            wrap_triton(_magnitude_histogram_kernel)[
                (triton.cdiv(sampled_blocks, HISTOGRAM_BLOCKS),)
            ](
                values,
                lo[row:],
                out[row],
                values.numel(),
                shift,
                stride,
                INF=key.inf,
                BITS=bits,
                BLOCKS=HISTOGRAM_BLOCKS,
            )
    return out


@triton_op(f"{NAMESPACE}::triton_masked_sgd_step_", mutates_args=("params", "momentum_buffers"))
def masked_sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    # Positional: custom ops cannot take keyword-only tensors.
    lr_tensor: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    truncation: float,
) -> None:
    """``reference.masked_sgd_step_``, one kernel launch per tensor.

    ``momentum_buffers`` may be empty when ``momentum == 0``; ``masks`` is empty or has
    one packed mask (or None) per param.
    """
    if len(grads) != len(params) or (masks and len(masks) != len(params)):
        raise ValueError(
            f"{len(params)} params need as many grads and masks (or no masks), "
            f"got {len(grads)} grads and {len(masks)} masks"
        )
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError(
            f"momentum={momentum} needs one buffer per param ({len(params)}), "
            f"got {len(momentum_buffers)}"
        )
    if not params:
        return
    bits = dict(
        lr_bits=_double_bits(lr),
        weight_decay_bits=_double_bits(weight_decay),
        momentum_bits=_double_bits(momentum),
        one_minus_dampening_bits=_double_bits(1 - dampening),
        truncation_bits=_double_bits(truncation),
    )
    flags = dict(
        HAS_WEIGHT_DECAY=weight_decay != 0,
        NESTEROV=nesterov,
        MAXIMIZE=maximize,
        FIRST_STEP=is_first_step,
        BLOCK=SGD_BLOCK,
    )
    # Check every tensor before the first launch, so bad input changes nothing.
    launches = []
    device = params[0].device
    _check_scalar_tensors(device, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    for i, (param, grad) in enumerate(zip(params, grads)):
        numel = param.numel()
        _check_device(f"params[{i}]", param)
        _check_same_device(f"params[{i}]", param, device)
        _check_contiguous(f"params[{i}]", param)
        _check_same_device(f"grads[{i}]", grad, device)
        _check_numel(f"grads[{i}]", grad, numel)
        buf = momentum_buffers[i] if momentum != 0 else None
        if buf is not None:
            _check_same_device(f"momentum_buffers[{i}]", buf, device)
            _check_contiguous(f"momentum_buffers[{i}]", buf)
            _check_numel(f"momentum_buffers[{i}]", buf, numel)
        mask = masks[i] if masks else None
        if mask is not None:
            _check_same_device(f"masks[{i}]", mask, device)
            _check_uint8(f"masks[{i}]", mask)
            _check_numel(f"masks[{i}]", mask, packed_nbytes(numel))
            mask = mask.contiguous()
        if numel:
            launches.append((param, grad.contiguous(), buf, mask, numel))
    for param, grad, buf, mask, numel in launches:
        wrap_triton(_masked_sgd_step_kernel)[(triton.cdiv(numel, SGD_BLOCK),)](
            param, grad, buf, mask, lr_tensor, grad_scale, found_inf, numel, **bits, **flags
        )


@triton_op(
    f"{NAMESPACE}::triton_masked_adamw_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
)
def masked_adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    # Positional: custom ops cannot take keyword-only tensors.
    lr_tensor: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    truncation: float,
) -> None:
    """``reference.masked_adamw_step_``, one kernel launch per tensor.

    ``max_exp_avg_sqs`` may be empty unless ``amsgrad``; ``masks`` is empty or has one
    packed mask (or None) per param; ``state_steps`` are float32 one-element tensors.
    The kernels read the step counts from one copy taken before the first launch (a
    device-side ``torch.cat``, no host sync) and advance the originals themselves, so a
    step with ``found_inf`` set leaves the counts as they were.
    """
    n = len(params)
    if any(len(states) != n for states in (grads, exp_avgs, exp_avg_sqs, state_steps)) or (
        masks and len(masks) != n
    ):
        raise ValueError(
            f"{n} params need as many grads, exp_avgs, exp_avg_sqs and state_steps and "
            f"as many masks (or none), got {len(grads)}, {len(exp_avgs)}, "
            f"{len(exp_avg_sqs)}, {len(state_steps)} and {len(masks)}"
        )
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(
            f"amsgrad needs one max_exp_avg_sq per param ({n}), got {len(max_exp_avg_sqs)}"
        )
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not beta >= 0:  # beta^t is computed as exp(t ln beta)
            raise ValueError(f"{name} must be >= 0, got {beta}")
    if not params:
        return
    # Check every tensor before the first launch, so bad input changes nothing.
    device = params[0].device
    _check_scalar_tensors(device, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    launches = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        numel = param.numel()
        _check_device(f"params[{i}]", param)
        _check_same_device(f"params[{i}]", param, device)
        _check_contiguous(f"params[{i}]", param)
        _check_same_device(f"grads[{i}]", grad, device)
        _check_numel(f"grads[{i}]", grad, numel)
        states = [exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None]
        for name, state in zip(("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), states):
            if state is not None:
                _check_same_device(f"{name}[{i}]", state, device)
                _check_contiguous(f"{name}[{i}]", state)
                _check_numel(f"{name}[{i}]", state, numel)
        step = state_steps[i]
        _check_same_device(f"state_steps[{i}]", step, device)
        _check_numel(f"state_steps[{i}]", step, 1)
        if step.dtype != torch.float32:
            raise TypeError(f"state_steps[{i}] must be float32, got {step.dtype}")
        mask = masks[i] if masks else None
        if mask is not None:
            _check_same_device(f"masks[{i}]", mask, device)
            _check_uint8(f"masks[{i}]", mask)
            _check_numel(f"masks[{i}]", mask, packed_nbytes(numel))
            mask = mask.contiguous()
        launches.append((param, grad.contiguous(), *states, mask, step, numel))

    old_steps = torch.cat([step.reshape(1) for step in state_steps])
    bits = dict(
        lr_bits=_double_bits(lr),
        decay_bits=_double_bits(1 - lr * weight_decay),
        weight_decay_bits=_double_bits(weight_decay),
        one_minus_beta1_bits=_double_bits(1 - beta1),
        beta2_bits=_double_bits(beta2),
        one_minus_beta2_bits=_double_bits(1 - beta2),
        eps_bits=_double_bits(eps),
        truncation_bits=_double_bits(truncation),
    )
    flags = dict(HAS_WEIGHT_DECAY=weight_decay != 0, MAXIMIZE=maximize, BLOCK=ADAMW_BLOCK)
    for i, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, mask, step, numel) in enumerate(
        launches
    ):
        fp64 = param.dtype == torch.float64
        # An empty tensor still gets one program: its step count advances too.
        wrap_triton(_masked_adamw_step_kernel)[(max(1, triton.cdiv(numel, ADAMW_BLOCK)),)](
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
            mask,
            lr_tensor,
            grad_scale,
            found_inf,
            old_steps,
            step,
            i,
            numel,
            log_beta1_bits=_double_bits(_log_of_rounded(beta1, fp64)),
            log_beta2_bits=_double_bits(_log_of_rounded(beta2, fp64)),
            **bits,
            **flags,
        )


# Fake kernels: shapes only (see the module docstring for why they are explicit).
@pack_mask.register_fake
def _(values, threshold):
    return values.new_empty(packed_nbytes(values.numel()), dtype=torch.uint8)


@unpack_mask.register_fake
def _(packed, numel):
    return packed.new_empty(numel, dtype=torch.bool)


@hamming_window.register_fake
def _(current, window):
    return window.new_empty(window.shape[0], dtype=torch.int64)


@magnitude_histogram.register_fake
def _(tensors, lo, shift, bits, stride=1):
    return lo.new_empty(lo.numel(), (1 << bits) + 2, dtype=torch.int64)


@masked_sgd_step_.register_fake
def _(params, grads, momentum_buffers, masks, *optional_tensors, **hyperparameters):
    return None


@masked_adamw_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *rest, **kw):
    return None


def _opaque_when_interpreted(mode, op, types, args, kwargs):
    # Keep the op whole (as torch.export does) instead of decomposing into its kernels.
    return mode.__torch_dispatch__(op, types, args, kwargs)


if INTERPRETED:
    for _op in (
        pack_mask,
        unpack_mask,
        hamming_window,
        magnitude_histogram,
        masked_sgd_step_,
        masked_adamw_step_,
    ):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque_when_interpreted)


def _double_bits(x: float) -> int:
    """The IEEE-754 bits of ``x`` as an int64 (kernels.py: why floats travel as bits)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _log_of_rounded(beta: float, fp64: bool) -> float:
    """ln(beta) after rounding beta to the compute dtype, as the reference's pow sees it.

    The kernel takes beta^t = exp(t ln beta) in fp64 and rounds it to the compute dtype,
    which gives the correctly rounded fp32 power that torch's ``beta ** step`` does.
    """
    if not fp64:
        beta = struct.unpack("<f", struct.pack("<f", beta))[0]
    return math.log(beta) if beta > 0 else -math.inf


def _words(masks: torch.Tensor) -> torch.Tensor:
    """The int64 words of packed masks (last dim), copying when not 8-byte aligned."""
    masks = masks.contiguous()
    if masks.storage_offset() % 8:
        masks = masks.clone()
    return masks.view(torch.int64)


def _check_device(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type not in DEVICE_TYPES:
        raise ValueError(
            f"{name}: the triton backend runs on {DEVICE_TYPES} tensors here, got {tensor.device}"
        )


def _check_same_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def _check_scalar_tensors(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, scalar in tensors.items():
        if scalar is not None:
            _check_same_device(name, scalar, device)
            _check_numel(name, scalar, 1)


def _check_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the kernel updates it in place")


def _check_numel(name: str, tensor: torch.Tensor, numel: int) -> None:
    if tensor.numel() != numel:
        raise ValueError(f"{name} has {tensor.numel()} elements, expected {numel}")


def _check_uint8(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 packed mask, got {tensor.dtype}")
