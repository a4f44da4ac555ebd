"""Triton kernels of the worm_fast ops (formulas: ``backends/reference.py``).

Conventions shared by every kernel:

* program ids are cast to int64 before they scale offsets, so tensors past 2**31
  elements index correctly;
* arithmetic runs in fp64 for fp64 tensors and in fp32 for every other dtype
  (``reference.compute_dtype``), results are stored back in the tensor's dtype;
* float hyperparameters arrive as the int64 bits of the Python double, because Triton
  passes a Python float as an fp32 scalar and that would round fp64 steps;
* optional tensors arrive as ``None`` and are tested with ``is not None``, which
  Triton resolves at compile time, like the ``tl.constexpr`` flags.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _to_acc(x, like_ptr):
    # fp64 tensors compute in fp64, every other dtype in fp32.
    if like_ptr.dtype.element_ty == tl.float64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _to_storage(x, like_ptr):
    """``x`` (fp32 or fp64) rounded to nearest even into the dtype ``like_ptr`` points to.

    bf16 is rounded by hand: Triton's interpreter truncates fp32 -> bf16, and the same
    integer rounding (as in c10::BFloat16) keeps CPU tests bit-identical to the GPU's.
    """
    if like_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays a quiet NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(like_ptr.dtype.element_ty)


@triton.jit
def _double_from_bits(bits):
    # Small bit patterns may arrive as int32 (interpreter), so widen before the bitcast.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _from_bits(bits, like_ptr):
    return _to_acc(_double_from_bits(bits), like_ptr)


@triton.jit
def _sqrt(x):
    # Correctly rounded, as torch's: tl.sqrt is approximate in fp32 (exact in fp64).
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _popcount64(x):
    # SWAR popcount: Triton has no portable popcount intrinsic. Unsigned, so that the
    # right shifts are logical.
    x = x.to(tl.uint64, bitcast=True)
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).to(tl.int64)


@triton.jit
def _byte_tile(BLOCK: tl.constexpr):
    """This program's elements as a [BLOCK // 8, 8] tile: one row per mask byte.

    Returns the byte index [B, 1], the bit index [1, 8] and the element index [B, 8],
    so each mask byte is loaded once per row and its bits are expanded in registers.
    """
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[:, None]
    bit = tl.arange(0, 8)[None, :]
    return byte, bit, byte * 8 + bit


@triton.jit
def _bits_of(packed, bit):
    # packed [B, 1] bytes, bit [1, 8] -> [B, 8] bools, LSB first.
    return ((packed.to(tl.int32) >> bit) & 1) != 0


@triton.jit
def _pack_mask_kernel(values_ptr, threshold_ptr, out_ptr, numel, nbytes, BLOCK_BYTES: tl.constexpr):
    """out[byte] bit i = |values[8 * byte + i]| > threshold; bytes past ``numel`` are 0."""
    byte, bit, index = _byte_tile(BLOCK_BYTES * 8)
    inside = index < numel
    values = _to_acc(tl.load(values_ptr + index, mask=inside, other=0), values_ptr)
    threshold = _to_acc(tl.load(threshold_ptr), values_ptr)
    # `inside` again: padding must stay 0 even for a negative threshold.
    kept = (tl.abs(values) > threshold) & inside
    packed = tl.sum(kept.to(tl.int32) << bit, axis=1, keep_dims=True)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


@triton.jit
def _unpack_mask_kernel(packed_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out[i] = bit i % 8 of packed[i // 8]."""
    byte, bit, index = _byte_tile(BLOCK)
    inside = index < numel
    packed = tl.load(packed_ptr + byte, mask=byte * 8 < numel, other=0)
    tl.store(out_ptr + index, _bits_of(packed, bit), mask=inside)


@triton.jit
def _hamming_window_kernel(
    current_ptr, window_ptr, out_ptr, nwords, rows, row_stride, BLOCK: tl.constexpr
):
    """out[r] += popcount(current ^ window[r]) over this program's int64 words.

    Each program reads its block of ``current`` once and compares it with every row, then
    adds one partial count per row atomically (``out`` starts at zero).
    """
    pid = tl.program_id(0).to(tl.int64)
    index = pid * BLOCK + tl.arange(0, BLOCK)
    inside = index < nwords
    current = tl.load(current_ptr + index, mask=inside, other=0)
    for row in range(rows):
        other = tl.load(window_ptr + index, mask=inside, other=0)
        tl.atomic_add(out_ptr + row, tl.sum(_popcount64(current ^ other), axis=0))
        # Advance the pointer rather than scale `row`: no int32 product to overflow.
        window_ptr += row_stride


@triton.jit
def _truncation(truncation_ptr, truncation_bits, like_ptr):
    """r in the compute dtype of ``like_ptr``'s tensor: read from ``truncation_ptr`` (fp64)
    when given, else from the bits of the float argument."""
    if truncation_ptr is not None:
        return _to_acc(tl.load(truncation_ptr), like_ptr)
    return _from_bits(truncation_bits, like_ptr)


@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "weight_decay_bits",
        "momentum_bits",
        "one_minus_dampening_bits",
        "truncation_bits",
    ]
)
def _masked_sgd_step_kernel(
    param_ptr,
    grad_ptr,
    buf_ptr,  # None: momentum == 0
    mask_ptr,  # None: no truncation for this tensor
    lr_ptr,  # None: use lr_bits
    grad_scale_ptr,
    found_inf_ptr,
    truncation_ptr,  # None: use truncation_bits; else r as an fp64 scalar
    numel,
    lr_bits: tl.int64,
    weight_decay_bits: tl.int64,
    momentum_bits: tl.int64,
    one_minus_dampening_bits: tl.int64,
    truncation_bits: tl.int64,
    HAS_WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One SGD step over ``BLOCK`` elements of one tensor, the gradient truncated first.

    g = grad / grad_scale;  g *= (kept ? 1 : truncation);  g = -g if maximize
    g += weight_decay * p;  b = g (first step) or momentum * b + (1 - dampening) * g
    g = g + momentum * b (nesterov) or b;  p -= lr * g
    """
    # A skipped GradScaler step, decided on the device so the host never waits. Nested:
    # the outer test is resolved at compile time, the inner one per launch.
    if found_inf_ptr is not None:  # noqa: SIM102
        if tl.load(found_inf_ptr) != 0:
            return
    byte, bit, index = _byte_tile(BLOCK)
    inside = index < numel
    p = _to_acc(tl.load(param_ptr + index, mask=inside), param_ptr)
    g = _to_acc(tl.load(grad_ptr + index, mask=inside), param_ptr)
    if grad_scale_ptr is not None:
        g = g / _to_acc(tl.load(grad_scale_ptr), param_ptr)
    if mask_ptr is not None:
        kept = _bits_of(tl.load(mask_ptr + byte, mask=byte * 8 < numel, other=0), bit)
        g = tl.where(kept, g, g * _truncation(truncation_ptr, truncation_bits, param_ptr))
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + _from_bits(weight_decay_bits, param_ptr) * p
    if buf_ptr is not None:
        momentum = _from_bits(momentum_bits, param_ptr)
        if FIRST_STEP:
            buf = g
        else:
            old = _to_acc(tl.load(buf_ptr + index, mask=inside), param_ptr)
            buf = momentum * old + _from_bits(one_minus_dampening_bits, param_ptr) * g
        tl.store(buf_ptr + index, _to_storage(buf, buf_ptr), mask=inside)
        g = g + momentum * buf if NESTEROV else buf
    if lr_ptr is not None:
        lr = _to_acc(tl.load(lr_ptr), param_ptr)
    else:
        lr = _from_bits(lr_bits, param_ptr)
    tl.store(param_ptr + index, _to_storage(p - lr * g, param_ptr), mask=inside)


@triton.jit(
    do_not_specialize=[
        "step_index",
        "lr_bits",
        "decay_bits",
        "weight_decay_bits",
        "one_minus_beta1_bits",
        "beta2_bits",
        "one_minus_beta2_bits",
        "log_beta1_bits",
        "log_beta2_bits",
        "eps_bits",
        "truncation_bits",
    ]
)
def _masked_adamw_step_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,  # None: no amsgrad
    mask_ptr,  # None: no truncation for this tensor
    lr_ptr,  # None: use lr_bits and decay_bits
    grad_scale_ptr,
    found_inf_ptr,
    truncation_ptr,  # None: use truncation_bits; else r as an fp64 scalar
    old_steps_ptr,  # fp32 copy of every step count, taken before the first launch
    step_ptr,  # this tensor's fp32 step count, advanced by program 0
    step_index,  # this tensor's entry in old_steps
    numel,
    lr_bits: tl.int64,
    decay_bits: tl.int64,  # 1 - lr * weight_decay, for the float lr
    weight_decay_bits: tl.int64,
    one_minus_beta1_bits: tl.int64,
    beta2_bits: tl.int64,
    one_minus_beta2_bits: tl.int64,
    log_beta1_bits: tl.int64,  # ln(beta1), beta1 first rounded to the compute dtype
    log_beta2_bits: tl.int64,
    eps_bits: tl.int64,
    truncation_bits: tl.int64,
    HAS_WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    TRUNCATE_GRADIENT: tl.constexpr,  # truncate the raw gradient, not the Adam update
    BLOCK: tl.constexpr,
):
    """One AdamW step over ``BLOCK`` elements of one tensor, truncated.

    t = step + 1;  g = grad / grad_scale;  g *= kept ? 1 : truncation (TRUNCATE_GRADIENT)
    g = -g if maximize;  p *= 1 - lr * wd
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g^2;  v_max = max(v_max, v)
    u = m / (sqrt(v or v_max) / sqrt(1 - beta2^t) + eps)
    u *= kept ? 1 : truncation (not TRUNCATE_GRADIENT);  p -= lr / (1 - beta1^t) * u

    Every program reads the old count from the snapshot ``old_steps`` and program 0
    writes t to ``step``: reading ``step`` itself would race with that write, since
    programs of one launch run in no fixed order.
    """
    if found_inf_ptr is not None:  # noqa: SIM102  (see the SGD kernel)
        if tl.load(found_inf_ptr) != 0:
            return
    step = tl.load(old_steps_ptr + step_index) + 1.0  # fp32, as the reference counts
    if tl.program_id(0) == 0:
        tl.store(step_ptr, step)
    # beta^t = exp(t ln beta) in fp64, then rounded like the reference's fp32 pow.
    t = step.to(tl.float64)
    beta1_power = _to_acc(tl.exp(t * _double_from_bits(log_beta1_bits)), param_ptr)
    beta2_power = _to_acc(tl.exp(t * _double_from_bits(log_beta2_bits)), param_ptr)
    bias_correction1 = 1 - beta1_power
    bias_correction2_sqrt = _sqrt(1 - beta2_power)
    if lr_ptr is not None:
        lr = _to_acc(tl.load(lr_ptr), param_ptr)
        decay = 1 - lr * _from_bits(weight_decay_bits, param_ptr)
    else:
        lr = _from_bits(lr_bits, param_ptr)
        decay = _from_bits(decay_bits, param_ptr)

    byte, bit, index = _byte_tile(BLOCK)
    inside = index < numel
    p = _to_acc(tl.load(param_ptr + index, mask=inside), param_ptr)
    g = _to_acc(tl.load(grad_ptr + index, mask=inside), param_ptr)
    if grad_scale_ptr is not None:
        g = g / _to_acc(tl.load(grad_scale_ptr), param_ptr)
    truncation = _truncation(truncation_ptr, truncation_bits, param_ptr)
    if mask_ptr is not None:  # noqa: SIM102  (compile-time conditions, one at a time)
        if TRUNCATE_GRADIENT:
            kept = _bits_of(tl.load(mask_ptr + byte, mask=byte * 8 < numel, other=0), bit)
            g = tl.where(kept, g, g * truncation)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        p = p * decay
    # torch.lerp(m, g, w): m + w * (g - m) for |w| < 0.5, else g + (w - 1) * (g - m).
    m = _to_acc(tl.load(exp_avg_ptr + index, mask=inside), param_ptr)
    weight = _from_bits(one_minus_beta1_bits, param_ptr)
    from_start = tl.abs(weight) < 0.5
    m = tl.where(from_start, m, g) + tl.where(from_start, weight, weight - 1) * (g - m)
    v = _to_acc(tl.load(exp_avg_sq_ptr + index, mask=inside), param_ptr)
    v = v * _from_bits(beta2_bits, param_ptr) + _from_bits(one_minus_beta2_bits, param_ptr) * g * g
    tl.store(exp_avg_ptr + index, _to_storage(m, exp_avg_ptr), mask=inside)
    tl.store(exp_avg_sq_ptr + index, _to_storage(v, exp_avg_sq_ptr), mask=inside)
    if max_exp_avg_sq_ptr is not None:
        v_max = _to_acc(tl.load(max_exp_avg_sq_ptr + index, mask=inside), param_ptr)
        v = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)  # NaN wins, as in torch
        tl.store(max_exp_avg_sq_ptr + index, _to_storage(v, max_exp_avg_sq_ptr), mask=inside)
    update = m / (_sqrt(v) / bias_correction2_sqrt + _from_bits(eps_bits, param_ptr))
    if mask_ptr is not None:  # noqa: SIM102  (compile-time conditions, one at a time)
        if not TRUNCATE_GRADIENT:
            kept = _bits_of(tl.load(mask_ptr + byte, mask=byte * 8 < numel, other=0), bit)
            update = tl.where(kept, update, update * truncation)
    p = p - lr / bias_correction1 * update
    tl.store(param_ptr + index, _to_storage(p, param_ptr), mask=inside)


@triton.jit
def _soft_mask_tile(
    values_ptr,
    window_ptr,
    thresholds_ptr,
    temperatures_ptr,
    tensor_index,
    segment_offset,
    numel,
    rows,
    row_stride,
    BLOCK: tl.constexpr,
):
    """This program's [BLOCK // 8, 8] tile of one tensor of soft_mask_distance: the values,
    their soft masks s = sigmoid((|v| - t) / tau), how many window rows keep each (read
    bit by bit from the tensor's segment of each row), tau, the indices and ``inside``."""
    byte, bit, index = _byte_tile(BLOCK)
    inside = index < numel
    v = _to_acc(tl.load(values_ptr + index, mask=inside, other=0), values_ptr)
    threshold = _to_acc(tl.load(thresholds_ptr + tensor_index), values_ptr)
    temperature = _to_acc(tl.load(temperatures_ptr + tensor_index), values_ptr)
    s = 1 / (1 + tl.exp((threshold - tl.abs(v)) / temperature))
    kept = tl.zeros([BLOCK // 8, 8], dtype=tl.int32)
    row_ptr = window_ptr + segment_offset
    for _ in range(rows):
        packed = tl.load(row_ptr + byte, mask=byte * 8 < numel, other=0)
        kept += _bits_of(packed, bit).to(tl.int32)
        # Advance the pointer rather than scale the row: no int32 product to overflow.
        row_ptr += row_stride
    return v, s, kept.to(v.dtype), temperature, index, inside


@triton.jit
def _soft_mask_distance_kernel(
    values_ptr,
    window_ptr,
    thresholds_ptr,
    temperatures_ptr,
    partial_ptr,
    tensor_index,
    segment_offset,
    partial_offset,
    numel,
    rows,
    row_stride,
    BLOCK: tl.constexpr,
):
    """partial[partial_offset + program] = the sum over this program's elements and the
    rows of |s - bit|: of an element's terms, ``kept`` are 1 - s and the others s."""
    _, s, kept, _, _, inside = _soft_mask_tile(
        values_ptr, window_ptr, thresholds_ptr, temperatures_ptr, tensor_index,
        segment_offset, numel, rows, row_stride, BLOCK,
    )  # fmt: skip
    terms = tl.where(inside, kept + s * (rows - 2 * kept), 0)
    pid = tl.program_id(0).to(tl.int64)
    tl.store(partial_ptr + partial_offset + pid, tl.sum(tl.sum(terms, axis=1), axis=0))


@triton.jit
def _soft_mask_distance_backward_kernel(
    values_ptr,
    window_ptr,
    thresholds_ptr,
    temperatures_ptr,
    scale_ptr,  # the output's gradient / (rows * all elements), one element
    grad_ptr,
    tensor_index,
    segment_offset,
    numel,
    rows,
    row_stride,
    BLOCK: tl.constexpr,
):
    """grad = scale * sign(v) * s (1 - s) / tau * (rows - 2 kept), in the values' dtype."""
    v, s, kept, temperature, index, inside = _soft_mask_tile(
        values_ptr, window_ptr, thresholds_ptr, temperatures_ptr, tensor_index,
        segment_offset, numel, rows, row_stride, BLOCK,
    )  # fmt: skip
    scale = _to_acc(tl.load(scale_ptr), values_ptr)
    sign = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)
    grad = scale * sign * (s * (1 - s) / temperature * (rows - 2 * kept))
    tl.store(grad_ptr + index, _to_storage(grad, grad_ptr), mask=inside)


@triton.jit
def _magnitude_keys(values, like_ptr):
    """The magnitude keys (``_ops.MagnitudeKey``) of ``values`` as int64: the bits of
    ``|x|``, sign-extended by the integer view and then masked back to the key width."""
    if like_ptr.dtype.element_ty == tl.float64:
        return values.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    elif like_ptr.dtype.element_ty == tl.float32:
        return values.to(tl.int32, bitcast=True).to(tl.int64) & 0x7FFFFFFF
    else:
        return values.to(tl.int16, bitcast=True).to(tl.int64) & 0x7FFF


@triton.jit
def _magnitude_histogram_kernel(
    values_ptr,
    lo_ptr,  # this tensor's window start (int64)
    counts_ptr,  # this tensor's row of counts: 2**BITS digits, below, NaNs (int64)
    numel,
    shift,
    stride,  # only blocks of 64 whose index is a multiple of stride count
    INF: tl.constexpr,  # the key of inf; larger keys are NaNs
    BITS: tl.constexpr,
    BLOCKS: tl.constexpr,  # sampled blocks of 64 elements per program
):
    """Counts the keys of ``BLOCKS`` sampled blocks in the window [lo, lo + 2**(shift +
    BITS)) by digit ``(key - lo) >> shift``, and the keys below it and the NaNs.

    With at most 2**12 digits a program adds its keys up with ``tl.histogram`` first and
    then adds one count per digit it saw; wider windows (few keys in them, as the
    narrowing passes have) add each key's count atomically.
    """
    pid = tl.program_id(0).to(tl.int64)
    block = (pid * BLOCKS + tl.arange(0, BLOCKS)[:, None]) * stride
    index = block * 64 + tl.arange(0, 64)[None, :]
    exists = index < numel
    key = _magnitude_keys(tl.load(values_ptr + index, mask=exists, other=0), values_ptr)
    nan = exists & (key > INF)
    valid = exists & (key <= INF)
    offset = key - tl.load(lo_ptr)
    # `>> (shift + BITS) == 0` rather than `< 2**(shift + BITS)`: no overflow for 63 bits.
    in_window = valid & (offset >= 0) & ((offset >> (shift + BITS)) == 0)
    digit = tl.where(in_window, offset >> shift, 0)
    if BITS <= 12:
        # int32 digits: the interpreter's histogram takes its counts' dtype from them.
        counts = tl.histogram(
            tl.reshape(digit.to(tl.int32), [BLOCKS * 64]),
            1 << BITS,
            mask=tl.reshape(in_window, [BLOCKS * 64]),
        )
        digits = tl.arange(0, 1 << BITS)
        tl.atomic_add(counts_ptr + digits, counts.to(tl.int64), mask=counts > 0)
    else:
        tl.atomic_add(counts_ptr + digit, in_window.to(tl.int64), mask=in_window)
    below = (valid & (offset < 0)).to(tl.int64)
    tl.atomic_add(counts_ptr + (1 << BITS), tl.sum(tl.sum(below, axis=1), axis=0))
    tl.atomic_add(counts_ptr + (1 << BITS) + 1, tl.sum(tl.sum(nan.to(tl.int64), axis=1), axis=0))


# TRITON_INTERPRET=1 (read when the kernels above were decorated) runs them on the CPU.
INTERPRETED = isinstance(_masked_sgd_step_kernel, InterpretedFunction)
