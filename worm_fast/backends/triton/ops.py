"""The Triton kernels as ``worm_fast::triton_*`` ops.

Declared with ``torch.library.triton_op`` and launched through ``wrap_triton``, so
``torch.compile`` traces into the kernels instead of treating the ops as opaque. Each op
also has an explicit fake kernel: the default one, the op's own body, launches the
kernels, which the Triton interpreter cannot do on fake tensors.

Under the interpreter (``TRITON_INTERPRET=1``, no GPU) ``wrap_triton`` hands back the
plain interpreted kernel, which cannot run on the functional tensors of AOT tracing
either, so there the ops stay opaque to ``torch.compile`` (``_opaque_when_interpreted``).

The masked SGD and AdamW steps launch one kernel per tensor. Every op (and its fake
kernel) first checks the op's contract (``worm_fast._checks``, as every backend does), so
no call reads or writes out of bounds or changes anything before it fails.
"""

import math
import struct

import torch
import triton
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from worm_fast import _checks
from worm_fast._ops import (
    MAGNITUDE_KEYS,
    NAMESPACE,
    SAMPLE_BLOCK,
    packed_nbytes,
    soft_mask_distance_autograd,
)
from worm_fast.backends.triton.kernels import (
    INTERPRETED,
    _hamming_window_kernel,
    _magnitude_histogram_kernel,
    _masked_adamw_step_kernel,
    _masked_sgd_step_kernel,
    _pack_mask_kernel,
    _soft_mask_distance_backward_kernel,
    _soft_mask_distance_kernel,
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
SOFT_MASK_BLOCK = 1024


@triton_op(f"{NAMESPACE}::triton_pack_mask", mutates_args=())
def pack_mask(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    _check_device("values", values)
    _checks.check_pack_mask(values, threshold)
    threshold = threshold.to(values.device)  # a CPU scalar is allowed, as on every backend
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
    _checks.check_unpack_mask(packed, numel)
    packed = packed.contiguous()
    out = torch.empty(numel, dtype=torch.bool, device=packed.device)
    if numel:
        grid = (triton.cdiv(numel, UNPACK_BLOCK),)
        wrap_triton(_unpack_mask_kernel)[grid](packed, out, numel, BLOCK=UNPACK_BLOCK)
    return out


@triton_op(f"{NAMESPACE}::triton_hamming_window", mutates_args=())
def hamming_window(current: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    _check_device("window", window)
    _checks.check_hamming_window(current, window)
    nbytes = current.numel()
    out = torch.zeros(window.shape[0], dtype=torch.int64, device=window.device)
    if out.numel() and nbytes:
        current_words, window_words = _words(current), _words(window)
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
    _checks.check_magnitude_histogram(tensors, lo, shift, bits, stride)
    for i, tensor in enumerate(tensors):
        _check_device(f"tensors[{i}]", tensor)
    device, key = tensors[0].device, MAGNITUDE_KEYS[tensors[0].dtype]
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
    truncation_tensor: torch.Tensor | None = None,
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
    _checks.check_sgd_step(
        params, grads, momentum_buffers, masks, momentum=momentum, truncation=truncation,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
    )  # fmt: skip
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
    for i, param in enumerate(params):
        _check_device(f"params[{i}]", param)
    lr_tensor, grad_scale, found_inf = _on_device(params[0], lr_tensor, grad_scale, found_inf)
    truncation_tensor = _fp64_on_device(params[0], truncation_tensor)
    launches = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        numel = param.numel()
        buf = momentum_buffers[i] if momentum != 0 else None
        mask = masks[i].contiguous() if masks and masks[i] is not None else None
        if numel:
            launches.append((param, grad.contiguous(), buf, mask, numel))
    for param, grad, buf, mask, numel in launches:
        wrap_triton(_masked_sgd_step_kernel)[(triton.cdiv(numel, SGD_BLOCK),)](
            param, grad, buf, mask, lr_tensor, grad_scale, found_inf, truncation_tensor, numel,
            **bits, **flags,
        )  # fmt: skip


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
    truncation_tensor: torch.Tensor | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    truncation: float,
    truncate: str = "update",
) -> None:
    """``reference.masked_adamw_step_``, one kernel launch per tensor.

    ``max_exp_avg_sqs`` may be empty unless ``amsgrad``; ``masks`` is empty or has one
    packed mask (or None) per param; ``state_steps`` are float32 one-element tensors.
    The kernels read the step counts from one copy taken before the first launch (a
    device-side ``torch.cat``, no host sync) and advance the originals themselves, so a
    step with ``found_inf`` set leaves the counts as they were.
    """
    _checks.check_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks,
        beta1=beta1, beta2=beta2, amsgrad=amsgrad, truncation=truncation, truncate=truncate,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
    )  # fmt: skip
    if not params:
        return
    for i, param in enumerate(params):
        _check_device(f"params[{i}]", param)
    lr_tensor, grad_scale, found_inf = _on_device(params[0], lr_tensor, grad_scale, found_inf)
    truncation_tensor = _fp64_on_device(params[0], truncation_tensor)
    launches = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        states = [exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None]
        mask = masks[i].contiguous() if masks and masks[i] is not None else None
        launches.append((param, grad.contiguous(), *states, mask, state_steps[i], param.numel()))

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
    flags = dict(
        HAS_WEIGHT_DECAY=weight_decay != 0, MAXIMIZE=maximize,
        TRUNCATE_GRADIENT=truncate == "gradient", BLOCK=ADAMW_BLOCK,
    )  # fmt: skip
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
            truncation_tensor,
            old_steps,
            step,
            i,
            numel,
            log_beta1_bits=_double_bits(_log_of_rounded(beta1, fp64)),
            log_beta2_bits=_double_bits(_log_of_rounded(beta2, fp64)),
            **bits,
            **flags,
        )


@triton_op(f"{NAMESPACE}::triton_soft_mask_distance", mutates_args=())
def soft_mask_distance(
    values: list[torch.Tensor],
    window: torch.Tensor,
    thresholds: torch.Tensor,
    temperatures: torch.Tensor,
) -> torch.Tensor:
    """``reference.soft_mask_distance``: one launch per tensor, one partial sum per
    program, added by torch (in a fixed order, so the result does not vary by run)."""
    _checks.check_soft_mask_distance(values, window, thresholds, temperatures)
    launches, numel = _soft_mask_launches(values, window)
    acc = torch.float64 if values[0].dtype == torch.float64 else torch.float32
    programs = [triton.cdiv(launch[0].numel(), SOFT_MASK_BLOCK) for launch in launches]
    partial = torch.zeros(sum(programs), dtype=acc, device=window.device)
    first = 0
    for (v, k, segment_offset), count in zip(launches, programs):
        if count:
            wrap_triton(_soft_mask_distance_kernel)[(count,)](
                v, window, thresholds, temperatures, partial, k, segment_offset, first,
                v.numel(), window.shape[0], window.stride(0), BLOCK=SOFT_MASK_BLOCK,
            )  # fmt: skip
        first += count
    return partial.sum() / (window.shape[0] * numel)


@triton_op(f"{NAMESPACE}::triton_soft_mask_distance_backward", mutates_args=())
def soft_mask_distance_backward(
    grad: torch.Tensor,
    values: list[torch.Tensor],
    window: torch.Tensor,
    thresholds: torch.Tensor,
    temperatures: torch.Tensor,
) -> list[torch.Tensor]:
    """``reference.soft_mask_distance_backward``: one launch per tensor."""
    _checks.check_soft_mask_distance(values, window, thresholds, temperatures, grad)
    launches, numel = _soft_mask_launches(values, window)
    acc = torch.float64 if values[0].dtype == torch.float64 else torch.float32
    scale = (grad.to(acc) / (window.shape[0] * numel)).reshape(1)
    grads = [torch.empty_like(v, memory_format=torch.contiguous_format) for v in values]
    for (v, k, segment_offset), out in zip(launches, grads):
        if v.numel():
            wrap_triton(_soft_mask_distance_backward_kernel)[
                (triton.cdiv(v.numel(), SOFT_MASK_BLOCK),)
            ](
                v, window, thresholds, temperatures, scale, out, k, segment_offset, v.numel(),
                window.shape[0], window.stride(0), BLOCK=SOFT_MASK_BLOCK,
            )  # fmt: skip
    return grads


_backward, _setup_context = soft_mask_distance_autograd(
    torch.ops.worm_fast.triton_soft_mask_distance_backward
)
soft_mask_distance.register_autograd(_backward, setup_context=_setup_context)


def _soft_mask_launches(values, window):
    """(value, its index, its first byte in a window row) per tensor, and all elements;
    checks what the kernels rely on beyond the op's contract (``_checks``)."""
    _check_device("window", window)
    if window.stride(1) != 1:
        raise ValueError("window rows must be contiguous")
    launches, offset = [], 0
    for k, v in enumerate(values):
        _checks.check_contiguous(f"values[{k}]", v)
        launches.append((v, k, offset))
        offset += packed_nbytes(v.numel())
    numel = sum(v.numel() for v in values)
    if numel == 0:
        raise ValueError("values hold no elements")
    return launches, numel


# Fake kernels: shapes only (see the module docstring for why they are explicit).
@pack_mask.register_fake
def _(values, threshold):
    _checks.check_pack_mask(values, threshold)
    return values.new_empty(packed_nbytes(values.numel()), dtype=torch.uint8)


@unpack_mask.register_fake
def _(packed, numel):
    _checks.check_unpack_mask(packed, numel)
    return packed.new_empty(numel, dtype=torch.bool)


@hamming_window.register_fake
def _(current, window):
    _checks.check_hamming_window(current, window)
    return window.new_empty(window.shape[0], dtype=torch.int64)


@magnitude_histogram.register_fake
def _(tensors, lo, shift, bits, stride=1):
    _checks.check_magnitude_histogram(tensors, lo, shift, bits, stride)
    return lo.new_empty(lo.numel(), (1 << bits) + 2, dtype=torch.int64)


@masked_sgd_step_.register_fake
def _(params, grads, momentum_buffers, masks, lr_tensor=None, grad_scale=None, found_inf=None,
      truncation_tensor=None, *, momentum, truncation, **other):  # fmt: skip
    _checks.check_sgd_step(
        params, grads, momentum_buffers, masks, momentum=momentum, truncation=truncation,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
        fake=True,
    )  # fmt: skip


@masked_adamw_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks,
      lr_tensor=None, grad_scale=None, found_inf=None, truncation_tensor=None, *, beta1, beta2,
      amsgrad, truncation, truncate="update", **other):  # fmt: skip
    _checks.check_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks,
        beta1=beta1, beta2=beta2, amsgrad=amsgrad, truncation=truncation, truncate=truncate,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
        fake=True,
    )  # fmt: skip


@soft_mask_distance.register_fake
def _(values, window, thresholds, temperatures):
    return window.new_empty(
        (), dtype=torch.float64 if values[0].dtype == torch.float64 else torch.float32
    )


@soft_mask_distance_backward.register_fake
def _(grad, values, window, thresholds, temperatures):
    return [torch.empty_like(v, memory_format=torch.contiguous_format) for v in values]


def _opaque_when_interpreted(mode, op, types, args, kwargs):
    # Keep the op whole (as torch.export does) instead of decomposing into its kernels.
    return mode.__torch_dispatch__(op, types, args, kwargs)


if INTERPRETED:
    for _op in (
        pack_mask, unpack_mask, hamming_window, magnitude_histogram, masked_sgd_step_,
        masked_adamw_step_, soft_mask_distance, soft_mask_distance_backward,
    ):  # fmt: skip
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
    """The int64 words of packed masks (last dim), padded with zero bytes (which never
    differ) to whole words, and copied unless every row starts 8-byte aligned (a storage
    offset, or a row stride, that is not a multiple of 8 needs the copy; a single row
    counts as contiguous whatever its stride)."""
    pad = -masks.shape[-1] % 8
    if pad:
        masks = torch.nn.functional.pad(masks, (0, pad))
    aligned = (
        masks.is_contiguous()
        and masks.storage_offset() % 8 == 0
        and all(stride % 8 == 0 for stride in masks.stride()[:-1])
    )
    if not aligned:
        masks = masks.new_empty(masks.shape).copy_(masks)
    return masks.view(torch.int64)


def _on_device(like: torch.Tensor, *scalars: torch.Tensor | None) -> list:
    """Scalar tensors on ``like``'s device (a CPU one is allowed on every backend)."""
    return [None if t is None else t.to(like.device) for t in scalars]


def _fp64_on_device(like: torch.Tensor, scalar: torch.Tensor | None) -> torch.Tensor | None:
    """A scalar tensor as fp64 on ``like``'s device (the kernels read r in double, as
    the float argument travels, and round it to the compute dtype)."""
    return None if scalar is None else scalar.to(like.device, torch.float64).reshape(1)


def _check_device(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type not in DEVICE_TYPES:
        raise ValueError(
            f"{name}: the triton backend runs on {DEVICE_TYPES} tensors here, got {tensor.device}"
        )
