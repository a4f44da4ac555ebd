"""Pure-torch kernels: the oracle every other backend is tested against.

Written to be read line by line against DESIGN §3, not to be fast; they also serve as
the fallback on any device the compiled backends do not cover (registered as the
``CompositeExplicitAutograd`` kernel of each op, so they never sync with the host).
Each first checks the op's contract (``worm_fast._checks``), as every backend does.
"""

import torch

from worm_fast import _checks
from worm_fast._ops import MAGNITUDE_KEYS, NAMESPACE, SAMPLE_BLOCK, packed_nbytes
from worm_fast.backends import BackendStatus


def status() -> BackendStatus:
    return BackendStatus("reference", True, "pure torch, any device", None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for parameters of ``dtype``: fp32 for half types, else itself."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_mask(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    _checks.check_pack_mask(values, threshold)
    acc = compute_dtype(values.dtype)
    kept = values.reshape(-1).to(acc).abs() > threshold.to(acc)
    bits = torch.zeros(packed_nbytes(kept.numel()) * 8, dtype=torch.uint8, device=kept.device)
    bits[: kept.numel()] = kept
    # Bit i of a byte is element 8 * byte + i. Constants come from arange on the device,
    # never from a host list, so no kernel here copies host data.
    shifts = torch.arange(8, dtype=torch.uint8, device=kept.device)
    return (bits.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    _checks.check_unpack_mask(packed, numel)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def hamming_window(current: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    _checks.check_hamming_window(current, window)
    differing = torch.bitwise_xor(window, current.unsqueeze(0))
    shifts = torch.arange(8, dtype=torch.uint8, device=window.device)
    bits = (differing.unsqueeze(-1) >> shifts) & 1
    return bits.sum(dim=(1, 2), dtype=torch.int64)


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """The magnitude keys (``_ops.MagnitudeKey``) of ``values``, flattened, as int64."""
    key = MAGNITUDE_KEYS[values.dtype]
    bits = values.reshape(-1).view(key.storage).to(torch.int64)
    return bits & ((1 << key.bits) - 1)


def magnitude_histogram(
    tensors: list[torch.Tensor], lo: torch.Tensor, shift: int, bits: int, stride: int = 1
) -> torch.Tensor:
    """Counts [rows, 2**bits + 2] of the keys in the window [lo, lo + 2**(shift + bits)):
    digit (key - lo) >> shift, then the keys below lo, then the NaNs (``_ops``)."""
    _checks.check_magnitude_histogram(tensors, lo, shift, bits, stride)
    digits = 1 << bits
    counts = torch.zeros(lo.numel(), digits + 2, dtype=torch.int64, device=lo.device)
    inf = MAGNITUDE_KEYS[tensors[0].dtype].inf
    for i, tensor in enumerate(tensors):
        row = i if lo.numel() > 1 else 0
        key = magnitude_keys(tensor)
        block = torch.arange(key.numel(), device=key.device) // SAMPLE_BLOCK
        counted = block % stride == 0
        nan = counted & (key > inf)
        valid = counted & ~nan
        offset = key - lo[row]
        # `offset >> (shift + bits) == 0` rather than `< 2**(shift + bits)`: no int64
        # overflow for 63-bit keys.
        inside = valid & (offset >= 0) & (offset >> (shift + bits) == 0)
        digit = torch.where(inside, offset >> shift, 0)
        counts[row, :digits].index_add_(0, digit, inside.to(torch.int64))
        counts[row, digits] += (valid & (offset < 0)).sum()
        counts[row, digits + 1] += nan.sum()
    return counts


def masked_sgd_step_(
    params,
    grads,
    momentum_buffers,
    masks,
    *,
    lr,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    maximize,
    is_first_step,
    truncation,
    lr_tensor=None,
    grad_scale=None,
    found_inf=None,
    truncation_tensor=None,
):
    """torch.optim.SGD's update, with the raw gradient truncated first:

    g = grad / grad_scale;  g = g * (kept ? 1 : truncation);  g = -g if maximize
    g = g + weight_decay * p;  b = g (first step) or momentum * b + (1 - dampening) * g
    g = g + momentum * b (nesterov) or b;  p = p - lr * g

    A step with ``found_inf != 0`` leaves params and buffers unchanged. ``lr_tensor`` and
    ``truncation_tensor``, when given, replace ``lr`` and ``truncation``.
    """
    _checks.check_sgd_step(
        params, grads, momentum_buffers, masks, momentum=momentum, truncation=truncation,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
    )  # fmt: skip
    for i, (param, grad) in enumerate(zip(params, grads)):
        acc = compute_dtype(param.dtype)
        p = param.to(acc)
        g = grad.to(acc)
        if grad_scale is not None:
            g = g / grad_scale.to(param.device, acc)
        if masks and masks[i] is not None:
            kept = unpack_mask(masks[i], param.numel()).view_as(param)
            g = torch.where(kept, g, g * _truncation(truncation, truncation_tensor, param))
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            buf = momentum_buffers[i]
            new_buf = g if is_first_step else momentum * buf.to(acc) + (1 - dampening) * g
            g = g + momentum * new_buf if nesterov else new_buf
        step_lr = lr_tensor.to(param.device, acc) if lr_tensor is not None else lr
        new_p = p - step_lr * g

        if found_inf is not None:
            # Select instead of branching so the reference never syncs with the host.
            keep_old = found_inf.to(param.device, torch.bool)
            new_p = torch.where(keep_old, p, new_p)
            if momentum != 0:
                new_buf = torch.where(keep_old, momentum_buffers[i].to(acc), new_buf)
        param.copy_(new_p)
        if momentum != 0:
            momentum_buffers[i].copy_(new_buf)


def masked_adamw_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    masks,
    *,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    amsgrad,
    maximize,
    truncation,
    lr_tensor=None,
    grad_scale=None,
    found_inf=None,
    truncate="update",
    truncation_tensor=None,
):
    """torch.optim.AdamW's update, with pruned elements truncated by ``truncation``:

    t = t + 1;  g = grad / grad_scale;  g = g * (kept ? 1 : truncation) (truncate="gradient")
    g = -g if maximize;  p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
    v_max = max(v_max, v) (amsgrad);  denom = sqrt(v or v_max) / sqrt(1 - beta2^t) + eps
    p = p - lr / (1 - beta1^t) * (kept ? 1 : truncation) * m / denom  (truncate="update")
    p = p - lr / (1 - beta1^t) * m / denom                            (truncate="gradient")

    ``update`` (the default): Adam divides by the gradient's running scale, so scaling
    the raw gradient by r would be undone once v adapts; scaling the update keeps pruned
    elements learning r times slower, which is what WORM's truncation asks of SGD too.
    ``gradient``: the paper's literal rule (the moments see the truncated gradient).
    Weight decay is not truncated. A step with ``found_inf != 0`` changes nothing, the
    step count included. ``lr_tensor`` and ``truncation_tensor``, when given, replace
    ``lr`` and ``truncation``.
    """
    _checks.check_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks,
        beta1=beta1, beta2=beta2, amsgrad=amsgrad, truncation=truncation, truncate=truncate,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
    )  # fmt: skip
    for i, (param, grad) in enumerate(zip(params, grads)):
        acc = compute_dtype(param.dtype)
        p = param.to(acc)
        g = grad.to(acc)
        if grad_scale is not None:
            g = g / grad_scale.to(param.device, acc)
        kept = None
        if masks and masks[i] is not None:
            kept = unpack_mask(masks[i], param.numel()).view_as(param)
            r = _truncation(truncation, truncation_tensor, param)
            if truncate == "gradient":
                g = torch.where(kept, g, g * r)
        if maximize:
            g = -g
        step = state_steps[i] + 1
        step_lr = lr_tensor.to(param.device, acc) if lr_tensor is not None else lr
        p = p * (1 - step_lr * weight_decay)
        m = exp_avgs[i].to(acc).lerp(g, 1 - beta1)
        v = exp_avg_sqs[i].to(acc) * beta2 + (1 - beta2) * g * g
        v_max = torch.maximum(max_exp_avg_sqs[i].to(acc), v) if amsgrad else v
        bias_correction1 = 1 - beta1 ** step.to(acc)
        bias_correction2_sqrt = (1 - beta2 ** step.to(acc)).sqrt()
        update = m / (v_max.sqrt() / bias_correction2_sqrt + eps)
        if kept is not None and truncate == "update":
            update = torch.where(kept, update, update * r)
        new = {"p": p - step_lr / bias_correction1 * update, "m": m, "v": v, "v_max": v_max}

        targets = {"p": param, "m": exp_avgs[i], "v": exp_avg_sqs[i], "step": state_steps[i]}
        if amsgrad:
            targets["v_max"] = max_exp_avg_sqs[i]
        new["step"] = step
        for key, target in targets.items():
            value = new[key]
            if found_inf is not None:  # select, so the reference never syncs with the host
                skip = found_inf.to(param.device, torch.bool).reshape(())
                value = torch.where(skip, target.to(value.dtype), value)
            target.copy_(value)


def _truncation(truncation, truncation_tensor, param):
    """The factor r of ``param``'s pruned elements: ``truncation_tensor`` in the compute
    dtype when given (it replaces the float ``truncation``)."""
    if truncation_tensor is None:
        return truncation
    return truncation_tensor.to(param.device, compute_dtype(param.dtype)).reshape(())


def _segments(values, window):
    """(values[k] flattened, its bytes of every window row [l, packed_nbytes]) per tensor."""
    offset = 0
    for v in values:
        nbytes = packed_nbytes(v.numel())
        yield v.reshape(-1), window[:, offset : offset + nbytes]
        offset += nbytes


def _soft_mask(v, threshold, temperature, acc):
    return torch.sigmoid((v.to(acc).abs() - threshold.to(acc)) / temperature.to(acc))


def soft_mask_distance(values, window, thresholds, temperatures):
    """mean over the l rows and the N elements of ``|s - m|``, ``s = sigmoid((|v| - t) / tau)``
    with the t and tau of v's tensor, m = v's bit in the row.

    Row by row, so the unpacked window is never held whole. Differentiable in ``values``
    through torch's autograd, which makes it the oracle of the backward kernels too.
    """
    _checks.check_soft_mask_distance(values, window, thresholds, temperatures)
    acc = compute_dtype(values[0].dtype)
    total = torch.zeros((), dtype=acc, device=window.device)
    for k, (v, rows) in enumerate(_segments(values, window)):
        s = _soft_mask(v, thresholds[k], temperatures[k], acc)
        for row in rows:
            total = total + (s - unpack_mask(row, v.numel()).to(acc)).abs().sum()
    return total / (window.shape[0] * sum(v.numel() for v in values))


def soft_mask_distance_backward(grad, values, window, thresholds, temperatures):
    """d distance / d v = grad * sign(v) * s (1 - s) / tau * (l - 2 c) / (l N), with c the
    rows in which v is kept: of the l terms |s - m|, c have slope -1 in s and l - c +1."""
    _checks.check_soft_mask_distance(values, window, thresholds, temperatures, grad)
    acc = compute_dtype(values[0].dtype)
    rows = window.shape[0]
    scale = grad.to(acc) / (rows * sum(v.numel() for v in values))
    grads = []
    for k, (v, segment) in enumerate(_segments(values, window)):
        s = _soft_mask(v, thresholds[k], temperatures[k], acc)
        kept = torch.zeros(v.numel(), dtype=acc, device=v.device)
        for row in segment:
            kept += unpack_mask(row, v.numel())
        slope = s * (1 - s) / temperatures[k].to(acc) * (rows - 2 * kept)
        grads.append((scale * v.to(acc).sign() * slope).to(v.dtype).view(values[k].shape))
    return grads


for _name in (
    "pack_mask", "unpack_mask", "hamming_window", "magnitude_histogram", "masked_sgd_step_",
    "masked_adamw_step_",
    "soft_mask_distance", "soft_mask_distance_backward",
):  # fmt: skip
    torch.library.impl(f"{NAMESPACE}::{_name}", "CompositeExplicitAutograd", globals()[_name])
