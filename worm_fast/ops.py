"""Public functional ops: validate the inputs, then run the chosen backend's kernel.

Validation happens here, once, before any kernel runs, so bad input raises a clear
error and never leaves parameters or buffers half-updated. ``backend`` is ``None``
(``$WORM_FAST_BACKEND`` or auto), or one of ``worm_fast.backends.NAMES``.

A caller that makes several step calls which must all happen or none (an optimizer
with several devices or dtypes) validates them all first with ``prepare_masked_sgd_step``
/ ``prepare_masked_adamw_step``, which return the launch without running it.
"""

import inspect
import numbers
from collections.abc import Callable, Sequence

import torch

from worm_fast import _checks, _ops
from worm_fast.backends import reference, resolve  # reference: registers default kernels

packed_nbytes = _ops.packed_nbytes

__all__ = [
    "hamming_window",
    "magnitude_histogram",
    "masked_adamw_step_",
    "masked_sgd_step_",
    "pack_mask",
    "packed_nbytes",
    "prepare_masked_adamw_step",
    "prepare_masked_sgd_step",
    "soft_mask_distance",
    "unpack_mask",
]


def pack_mask(
    values: torch.Tensor, threshold: float | torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Pack ``|values| > threshold`` (flattened row-major) into a uint8 mask, 1 = kept."""
    if not (values.is_floating_point() or values.dtype == torch.bool):
        raise TypeError(f"pack_mask: values must be floating point or bool, got {values.dtype}")
    if values.dtype == torch.bool:
        values = values.to(torch.float32)
    if not isinstance(threshold, torch.Tensor):
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"pack_mask: threshold must be a real number, got {threshold!r}")
        # Keep a Python number's double precision (fp64 values compare against all of it).
        threshold = torch.tensor(threshold, dtype=torch.float64, device=values.device)
    if threshold.is_complex() or threshold.dtype == torch.bool:
        raise TypeError(f"pack_mask: threshold must be a real number, got {threshold.dtype}")
    if threshold.numel() != 1:
        raise ValueError(
            f"pack_mask: threshold must be a scalar, got shape {tuple(threshold.shape)}"
        )
    if threshold.device != values.device:
        raise ValueError(
            f"pack_mask: threshold is on {threshold.device}, values on {values.device}"
        )
    threshold = threshold.reshape(()).to(reference.compute_dtype(values.dtype))
    return resolve(backend, values.device).pack_mask(values, threshold)


def unpack_mask(packed: torch.Tensor, numel: int, *, backend: str | None = None) -> torch.Tensor:
    """The bool mask (1-D, ``numel`` elements) stored in a packed mask."""
    _check_packed(packed, numel, "unpack_mask: packed")
    return resolve(backend, packed.device).unpack_mask(packed, numel)


def hamming_window(
    current: torch.Tensor, window: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Differing bits (int64[l]) between ``current`` [nbytes] and each row of ``window``."""
    if current.dtype != torch.uint8 or window.dtype != torch.uint8:
        raise TypeError(
            f"hamming_window: masks must be uint8, got {current.dtype} and {window.dtype}"
        )
    if current.dim() != 1 or window.dim() != 2 or window.shape[1] != current.numel():
        raise ValueError(
            "hamming_window: expected current [nbytes] and window [l, nbytes], got "
            f"{tuple(current.shape)} and {tuple(window.shape)}"
        )
    if current.numel() % 8:
        raise ValueError(f"hamming_window: nbytes must be a multiple of 8, got {current.numel()}")
    if current.device != window.device:
        raise ValueError(f"hamming_window: current on {current.device}, window on {window.device}")
    return resolve(backend, window.device).hamming_window(current.contiguous(), window.contiguous())


def magnitude_histogram(
    tensors: Sequence[torch.Tensor],
    lo: torch.Tensor,
    shift: int,
    bits: int,
    *,
    stride: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Counts (int64 [rows, 2**bits + 2]) of the magnitude keys of ``tensors`` in the
    window of keys [lo, lo + 2**(shift + bits)): by digit ``(key - lo) >> shift``, then
    the keys below ``lo``, then the NaNs. ``lo`` is int64 [1] (one row for all tensors)
    or [len(tensors)] (a row per tensor), each in [0, 2**key_bits); ``stride`` > 1 counts
    only every stride-th block of 64 elements of each tensor. The exact contract is in
    ``worm_fast._ops``; ``worm_fast.radix_select`` selects exact magnitudes with it.
    """
    tensors = list(tensors)
    _checks.check_magnitude_histogram(tensors, lo, shift, bits, stride)
    device = tensors[0].device
    kernel = resolve(backend, device).magnitude_histogram
    return kernel([t.contiguous() for t in tensors], lo, shift, bits, stride)


def soft_mask_distance(
    values: Sequence[torch.Tensor],
    window: torch.Tensor,
    thresholds: torch.Tensor | Sequence[float],
    temperatures: torch.Tensor | Sequence[float],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """WORM-gradient's differentiable mask distance, read straight from packed masks.

    The mean, over the ``l`` rows of ``window`` and the ``N`` elements of ``values``, of
    ``|sigmoid((|v| - t_k) / tau_k) - m|``: ``v`` an element of ``values[k]``, ``t_k`` and
    ``tau_k`` that tensor's entries of ``thresholds`` and ``temperatures`` (> 0), ``m``
    its bit in the row. A row of ``window`` [l, nbytes] is laid out as a ``MaskWindow``
    row: the packed mask of each tensor in turn, each padded to whole words.

    A 0-d tensor (fp64 for fp64 values, else fp32), differentiable with respect to
    ``values``; thresholds and temperatures are constants (detached). The window is never
    unpacked: the forward and backward kernels read its bits where they need them.
    """
    values = list(values)
    if not values:
        raise ValueError("soft_mask_distance: values must hold at least one tensor")
    dtype, device = values[0].dtype, values[0].device
    for i, v in enumerate(values):
        if not v.is_floating_point():
            raise TypeError(
                f"soft_mask_distance: values[{i}] must be floating point, got {v.dtype}"
            )
        if v.dtype != dtype or v.device != device:
            raise ValueError(
                f"soft_mask_distance: values must share one dtype and device; values[{i}] is "
                f"{v.dtype} on {v.device}, values[0] {dtype} on {device}"
            )
    numel = sum(v.numel() for v in values)
    if numel == 0:
        raise ValueError("soft_mask_distance: values hold no elements")
    nbytes = sum(_ops.packed_nbytes(v.numel()) for v in values)
    if window.dtype != torch.uint8 or window.dim() != 2 or window.shape[1] != nbytes:
        raise ValueError(
            f"soft_mask_distance: window must be uint8 [rows, {nbytes}] (the packed masks of "
            f"the {len(values)} tensors, each padded to whole words), got {window.dtype} of "
            f"shape {tuple(window.shape)}"
        )
    if window.shape[0] == 0:
        raise ValueError("soft_mask_distance: the window holds no mask (0 rows)")
    if window.device != device:
        raise ValueError(f"soft_mask_distance: window is on {window.device}, values on {device}")
    constants = []
    for name, given in (("thresholds", thresholds), ("temperatures", temperatures)):
        if isinstance(given, torch.Tensor) and given.device != device:
            raise ValueError(f"soft_mask_distance: {name} on {given.device}, values on {device}")
        tensor = torch.as_tensor(given, device=device).detach()
        if not tensor.is_floating_point() or tensor.shape != (len(values),):
            raise ValueError(
                f"soft_mask_distance: {name} must be {len(values)} floats (one per tensor), got "
                f"{tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        constants.append(tensor.to(reference.compute_dtype(dtype)).contiguous())
    return resolve(backend, device).soft_mask_distance(
        [v.contiguous() for v in values], window.contiguous(), *constants
    )


def prepare_masked_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    truncation: float = 1.0,
    lr_tensor: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
    truncation_tensor: torch.Tensor | None = None,
) -> Callable[[], None]:
    """Validate the arguments of :func:`masked_sgd_step_` now; return the step, to run later.

    The step reads the tensors when it runs; it may fail only if they change in between.
    ``lr_tensor`` and ``truncation_tensor`` (one element on the params' device), when
    given, replace ``lr`` and ``truncation``; the kernel reads them where they live.
    """
    return _fused_step(
        "masked_sgd_step_",
        params,
        grads,
        {"momentum buffer": (momentum_buffers, momentum != 0)},
        masks,
        scalars=dict(
            lr=float(lr), weight_decay=float(weight_decay), momentum=float(momentum),
            dampening=float(dampening), nesterov=bool(nesterov), maximize=bool(maximize),
            is_first_step=bool(is_first_step), truncation=float(truncation),
        ),
        tensors=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
        backend=backend,
    )  # fmt: skip


def prepare_masked_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    amsgrad: bool = False,
    maximize: bool = False,
    truncation: float = 1.0,
    lr_tensor: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
    truncate: str = "update",
    truncation_tensor: torch.Tensor | None = None,
) -> Callable[[], None]:
    """Validate the arguments of :func:`masked_adamw_step_` now; return the step, to run later.

    ``truncate``: ``"update"`` scales the Adam update of pruned elements by ``truncation``,
    ``"gradient"`` their raw gradient (see ``backends.reference.masked_adamw_step_``).
    ``lr_tensor`` and ``truncation_tensor`` as in :func:`prepare_masked_sgd_step`.
    """
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        _checks.check_fraction(f"masked_adamw_step_: {name}", beta, closed=False)
    _checks.check_adamw_truncate(truncate)
    return _fused_step(
        "masked_adamw_step_",
        params,
        grads,
        {
            "exp_avg": (exp_avgs, True),
            "exp_avg_sq": (exp_avg_sqs, True),
            "max_exp_avg_sq": (max_exp_avg_sqs, amsgrad),
            "step": (state_steps, True),
        },
        masks,
        scalars=dict(
            lr=float(lr), beta1=float(beta1), beta2=float(beta2),
            weight_decay=float(weight_decay), eps=float(eps), amsgrad=bool(amsgrad),
            maximize=bool(maximize), truncation=float(truncation), truncate=truncate,
        ),
        tensors=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
        backend=backend,
    )  # fmt: skip


def masked_sgd_step_(*args, **kwargs) -> None:
    """One fused SGD step with WORM truncation, in place (formula: ``reference``).

    All tensors must be on one device. ``momentum_buffers`` is empty when
    ``momentum == 0``; ``masks`` is empty or holds one packed mask (or None) per param.
    Non-contiguous parameters or buffers (e.g. channels_last weights) are updated
    through contiguous copies. Arguments: those of :func:`prepare_masked_sgd_step`.
    """
    prepare_masked_sgd_step(*args, **kwargs)()


def masked_adamw_step_(*args, **kwargs) -> None:
    """One fused AdamW step with WORM truncation, in place (formula: ``reference``).

    ``state_steps`` are float32 scalar tensors on the params' device, incremented here
    (not when ``found_inf`` is set); ``max_exp_avg_sqs`` is empty unless ``amsgrad``.
    Arguments: those of :func:`prepare_masked_adamw_step`.
    """
    prepare_masked_adamw_step(*args, **kwargs)()


# The same signatures as the prepare functions, for help() and editors.
masked_sgd_step_.__signature__ = inspect.signature(prepare_masked_sgd_step).replace(
    return_annotation=None
)
masked_adamw_step_.__signature__ = inspect.signature(prepare_masked_adamw_step).replace(
    return_annotation=None
)


def _fused_step(op, params, grads, states, masks, *, scalars, tensors, backend):
    """Validate a fused optimizer step's inputs; return the launch that stages strided
    tensors, runs the kernel and writes the staged tensors back.

    ``states`` maps a state's name to (its tensors, whether the step uses it); a used
    state has one tensor per param, an unused one none. ``"step"`` holds scalar counters.
    """
    params, grads, masks = list(params), list(grads), list(masks)
    states = {name: (list(tensors_), used) for name, (tensors_, used) in states.items()}
    _check_step_inputs(op, params, grads, states, masks, scalars["truncation"])
    if not params:
        return lambda: None
    device = params[0].device
    for name, tensor in tensors.items():
        if tensor is not None and (tensor.numel() != 1 or tensor.device != device):
            raise ValueError(
                f"{op}: {name} must be a 1-element tensor on {device}, "
                f"got shape {tuple(tensor.shape)} on {tensor.device}"
            )
    kernel = getattr(resolve(backend, device), op)
    originals = params + [t for tensors_, _ in states.values() for t in tensors_]
    contiguous = [t.is_contiguous() for t in originals]
    _check_written(op, originals, contiguous, params, states)

    def launch() -> None:
        # Kernels need contiguous storage; stage any strided tensor, write it back after.
        staged = [t if flat else t.contiguous() for t, flat in zip(originals, contiguous)]
        staged_states, at = [], len(params)
        for tensors_, _ in states.values():
            staged_states.append(staged[at : at + len(tensors_)])
            at += len(tensors_)
        kernel(
            staged[: len(params)],
            [g.contiguous() for g in grads],
            *staged_states,
            masks,
            **scalars,
            **{name: None if t is None else t.reshape(1) for name, t in tensors.items()},
        )
        for original, work in zip(originals, staged):
            if work is not original:
                original.copy_(work)

    return launch


def _check_packed(packed: torch.Tensor, numel: int, what: str) -> None:
    expected = _ops.packed_nbytes(numel)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"{what} must be a 1-D uint8 packed mask of {expected} bytes for {numel} "
            f"elements, got {packed.dtype} of shape {tuple(packed.shape)}"
        )


def _check_step_inputs(op, params, grads, states, masks, truncation):
    if not 0.0 <= truncation <= 1.0:
        raise ValueError(f"{op}: truncation must be in [0, 1], got {truncation}")
    if len(grads) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(grads)} grads")
    for name, (tensors, used) in states.items():
        expected = len(params) if used else 0
        if len(tensors) != expected:
            raise ValueError(f"{op}: expected {expected} {name} tensors, got {len(tensors)}")
    if masks and len(masks) != len(params):
        raise ValueError(
            f"{op}: masks must be empty or one per param ({len(params)}), got {len(masks)}"
        )
    device = params[0].device if params else None
    for i, (param, grad) in enumerate(zip(params, grads)):
        if param.dtype not in _checks.STEP_DTYPES:
            raise TypeError(
                f"{op}: param {i} must be float32, float64, float16 or bfloat16, got {param.dtype}"
            )
        if grad.is_sparse or param.is_sparse:
            raise RuntimeError(f"{op}: param {i} has a sparse gradient; not supported")
        others = [("grad", grad)]
        for name, (tensors, used) in states.items():
            if used:
                others.append((name, tensors[i]))
        if masks and masks[i] is not None:
            _check_packed(masks[i], param.numel(), f"{op}: mask {i}")
            others.append(("mask", masks[i]))
        for what, tensor in [("param", param), *others]:
            if tensor.device != device:
                raise ValueError(
                    f"{op}: {what} {i} is on {tensor.device}, expected {device} "
                    "(one call per device)"
                )
            if what == "step":
                if tensor.numel() != 1 or tensor.dtype != torch.float32:
                    raise ValueError(
                        f"{op}: step {i} must be a float32 scalar tensor, got "
                        f"{tensor.dtype}{tuple(tensor.shape)}"
                    )
            elif what not in ("param", "mask") and (
                tensor.shape != param.shape or tensor.dtype != param.dtype
            ):
                raise ValueError(
                    f"{op}: {what} {i} is {tensor.dtype}{tuple(tensor.shape)}, "
                    f"param is {param.dtype}{tuple(param.shape)}"
                )


def _check_written(op, originals, contiguous, params, states) -> None:
    """The tensors a step writes (params, then each state's): none overlaps itself (a
    strided view with stride 0, e.g. an expanded tensor, cannot take the staged result
    back) and no two share memory."""

    def name_of(k: int) -> str:
        if k < len(params):
            return f"{op}: param {k}"
        k -= len(params)
        for name, (tensors, _) in states.items():
            if k < len(tensors):
                return f"{op}: {name} {k}"
            k -= len(tensors)
        raise AssertionError("index past the written tensors")  # pragma: no cover

    for k, (tensor, flat) in enumerate(zip(originals, contiguous) if not all(contiguous) else ()):
        # torch's own test for certain internal overlap (``has_internal_overlap``), in
        # Python so that torch.compile traces it: a dimension of size > 1 and stride 0.
        if not flat and any(n > 1 and s == 0 for n, s in zip(tensor.shape, tensor.stride())):
            raise ValueError(
                f"{name_of(k)} has elements that share memory (e.g. an expanded tensor); "
                "it cannot be updated in place (clone it first)"
            )
    if originals[0].device.type != "meta":
        _checks.check_distinct(originals, name_of)
