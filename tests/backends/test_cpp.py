"""The C++ CPU kernels of ``worm_fast._C`` against the reference backend (the oracle).

``torch.ops.worm_fast.<op>`` on CPU tensors dispatches to the C++ kernel; the oracle is
called directly as ``reference.<op>``. The extension must be built (the Makefile builds
it), so a missing ``_C`` is a failure here, not a skip.

The SGD step is compared on a list mixing the odd sizes (one call, as the optimizer
makes it) for every dtype, every combination of momentum / dampening / nesterov /
weight decay / maximize, both ``is_first_step`` values and masks of 0 %, 100 % and random
density; and, without a mask, step for step against ``torch.optim.SGD`` itself. The
AdamW step likewise, over several steps, for every combination of amsgrad / weight
decay / maximize, with grad_scale, found_inf, lr_tensor, and against
``torch.optim.AdamW``.
"""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import ODD_SIZES, TOLERANCES, assert_close
from worm_fast._ops import MAGNITUDE_KEYS, packed_nbytes
from worm_fast.backends import cpp, reference

ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
OPS = (
    "pack_mask",
    "unpack_mask",
    "hamming_window",
    "magnitude_histogram",
    "masked_sgd_step_",
    "masked_adamw_step_",
)

HYPERPARAMETERS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product(
        (0.0, 0.9), (0.0, 0.25), (False, True), (0.0, 1e-2), (False, True)
    )
]


def _hp_id(hp):
    return "m{momentum}-d{dampening}-n{nesterov:d}-wd{weight_decay}-max{maximize:d}".format(**hp)


def _reference_tolerance(dtype):
    # The C++ kernel rounds like torch.optim.SGD (add(alpha=) as one FMA); the reference
    # rounds every product separately. Near cancellation the two differ by an ulp of the
    # operands rather than of the result, so allow a few ulps of O(1) values absolutely.
    tol = dict(TOLERANCES[dtype])
    tol["atol"] = max(tol["atol"], 8 * torch.finfo(dtype).eps)
    return tol


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _random_bytes(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=_gen(seed), dtype=torch.uint8)


def _masks(sizes, density, seed):
    """One packed mask per size: 0 % kept, 100 % kept, random, or a mix with None."""
    if density == "no_masks":
        return []
    masks = []
    for i, size in enumerate(sizes):
        nbytes = packed_nbytes(size)
        if density == "none_kept":
            masks.append(torch.zeros(nbytes, dtype=torch.uint8))
        elif density == "all_kept":
            masks.append(torch.full((nbytes,), 255, dtype=torch.uint8))
        elif density == "random":
            masks.append(_random_bytes(nbytes, seed=seed + i))
        elif density == "mixed":
            masks.append(_random_bytes(nbytes, seed=seed + i) if i % 2 else None)
        else:
            raise ValueError(density)
    return masks


def _case(sizes, dtype, density, seed=0):
    params = [_randn(n, dtype=dtype, seed=seed + 3 * i) for i, n in enumerate(sizes)]
    grads = [_randn(n, dtype=dtype, seed=seed + 3 * i + 1) for i, n in enumerate(sizes)]
    bufs = [_randn(n, dtype=dtype, seed=seed + 3 * i + 2) for i, n in enumerate(sizes)]
    return params, grads, bufs, _masks(sizes, density, seed)


def _step(fn, case, **kwargs):
    """Run one step of ``fn`` on copies of ``case``; returns (params, bufs, grads)."""
    params, grads, bufs, masks = ([t.clone() if t is not None else None for t in ts] for ts in case)
    fn(params, grads, bufs, masks, **kwargs)
    return params, bufs, grads


def _step_kwargs(hp, **extra):
    kwargs = dict(lr=0.1, is_first_step=False, truncation=3e-3, **hp)
    kwargs.update(extra)
    return kwargs


def _assert_step_matches_reference(case, what, **kwargs):
    dtype = case[0][0].dtype
    tol = _reference_tolerance(dtype)
    got_p, got_b, got_g = _step(torch.ops.worm_fast.masked_sgd_step_, case, **kwargs)
    exp_p, exp_b, _ = _step(reference.masked_sgd_step_, case, **kwargs)
    for i, (gp, ep) in enumerate(zip(got_p, exp_p)):
        assert_close(gp, ep, what=f"{what}: params[{i}]", **tol)
        assert_close(
            got_g[i], case[1][i], what=f"{what}: grads[{i}] must not change", rtol=0, atol=0
        )
    if kwargs.get("momentum", 0.0) != 0.0:
        for i, (gb, eb) in enumerate(zip(got_b, exp_b)):
            assert_close(gb, eb, what=f"{what}: momentum_buffers[{i}]", **tol)


# ---------------------------------------------------------------------------------------
# The extension is there and registered.


def test_extension_is_built_and_registers_cpu_kernels():
    assert cpp.LOAD_ERROR is None, cpp.LOAD_ERROR
    assert cpp.status().available
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"worm_fast::{op}", "CPU"), op
    assert cpp.missing_kernels("CPU") == []


def test_cpu_loops_follow_torch_cpu_capability():
    from worm_fast import _C

    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(
        torch.backends.cpu.get_cpu_capability(), "default"
    )
    assert expected == _C.CPU_ISA


def test_extension_loads_before_or_after_the_schemas():
    # The .so registers its kernels with TORCH_LIBRARY_IMPL only; the schemas come from
    # worm_fast/_ops.py. Loading the .so before the Python definitions must work too.
    from worm_fast import _C

    script = (
        "import torch\n"
        f"torch.ops.load_library({_C.__file__!r})\n"
        "import worm_fast._ops\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('worm_fast::pack_mask', 'CPU')\n"
        "values = torch.tensor([1.0, 0.0, -2.0])\n"
        "packed = torch.ops.worm_fast.pack_mask(values, torch.tensor(0.5))\n"
        "assert packed.tolist() == [5, 0, 0, 0, 0, 0, 0, 0], packed\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------
# pack_mask / unpack_mask / hamming_window.

DENSITY_THRESHOLDS = {"none_kept": float("inf"), "random": 0.5, "all_kept": -1.0}


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITY_THRESHOLDS)
def test_pack_mask_matches_reference(size, dtype, density):
    values = _randn(size, dtype=dtype, seed=size)
    values[::3] = 0.5  # ties with the random threshold: kept = |v| > t, strictly
    threshold = torch.tensor(DENSITY_THRESHOLDS[density])
    got = torch.ops.worm_fast.pack_mask(values, threshold)
    assert got.dtype == torch.uint8 and got.shape == (packed_nbytes(size),)
    assert torch.equal(got, reference.pack_mask(values, threshold))
    # Padding bits past `size` are zero.
    bits = reference.unpack_mask(got, packed_nbytes(size) * 8)
    assert not bits[size:].any()


def test_pack_mask_large_tensor_uses_all_threads_and_matches():
    values = _randn(1_000_003, seed=1)
    threshold = torch.tensor(0.7)
    got = torch.ops.worm_fast.pack_mask(values, threshold)
    assert torch.equal(got, reference.pack_mask(values, threshold))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_mask_non_contiguous_values(dtype):
    base = _randn(37, 29, dtype=dtype, seed=3)
    threshold = torch.tensor(0.4)
    for values in (base.t(), base[:, ::3], base[::2].t()[5:]):
        assert not values.is_contiguous()
        assert torch.equal(
            torch.ops.worm_fast.pack_mask(values, threshold),
            reference.pack_mask(values, threshold),
        )


def test_pack_mask_special_values_and_threshold_dtypes():
    values = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 0.3, -0.3, 1e-30, 0.30000001]
    )
    for threshold in (
        torch.tensor(0.3),
        torch.tensor(0.3, dtype=torch.float64),  # rounded to float32, like the reference
        torch.tensor([0.0]),
        torch.tensor(-1.0, dtype=torch.bfloat16),
    ):
        assert torch.equal(
            torch.ops.worm_fast.pack_mask(values, threshold),
            reference.pack_mask(values, threshold),
        ), threshold
    # Integer values compare in float32, as in the reference.
    ints = torch.arange(-70, 70, dtype=torch.int32)
    assert torch.equal(
        torch.ops.worm_fast.pack_mask(ints, torch.tensor(9.5)),
        reference.pack_mask(ints, torch.tensor(9.5)),
    )


def test_pack_mask_float64_compares_in_float64():
    values = torch.tensor([0.1 + 1e-12, 0.1, 0.1 - 1e-12], dtype=torch.float64)
    threshold = torch.tensor(0.1, dtype=torch.float64)
    got = torch.ops.worm_fast.pack_mask(values, threshold)
    assert got[0].item() == 0b001
    assert torch.equal(got, reference.pack_mask(values, threshold))


def test_pack_mask_empty():
    got = torch.ops.worm_fast.pack_mask(torch.empty(0), torch.tensor(0.0))
    assert got.shape == (0,) and got.dtype == torch.uint8


@pytest.mark.parametrize("size", (0, *ODD_SIZES, 100_001))
def test_unpack_mask_matches_reference_and_round_trips(size):
    packed = _random_bytes(packed_nbytes(size), seed=size)
    got = torch.ops.worm_fast.unpack_mask(packed, size)
    assert got.dtype == torch.bool and got.shape == (size,)
    assert torch.equal(got, reference.unpack_mask(packed, size))
    values = _randn(size, seed=size)
    threshold = torch.tensor(0.5)
    round_trip = torch.ops.worm_fast.unpack_mask(
        torch.ops.worm_fast.pack_mask(values, threshold), size
    )
    assert torch.equal(round_trip, values.abs() > threshold)


def test_unpack_mask_prefix_and_non_contiguous_packed():
    packed = _random_bytes(64, seed=9)
    for numel in (0, 1, 13, 100, 512):
        assert torch.equal(
            torch.ops.worm_fast.unpack_mask(packed, numel), reference.unpack_mask(packed, numel)
        )
    strided = packed[::2]
    assert torch.equal(
        torch.ops.worm_fast.unpack_mask(strided, 200), reference.unpack_mask(strided, 200)
    )


def _bool_hamming(current, window, nbits):
    cur = reference.unpack_mask(current, nbits)
    return torch.stack([(reference.unpack_mask(row, nbits) != cur).sum() for row in window])


@pytest.mark.parametrize("nbytes", sorted({packed_nbytes(n) for n in ODD_SIZES} | {13, 200_008}))
@pytest.mark.parametrize("rows", (1, 5, 16))
def test_hamming_window_matches_bool_computation(nbytes, rows):
    current = _random_bytes(nbytes, seed=nbytes)
    window = _random_bytes(rows, nbytes, seed=nbytes + rows)
    window[0] = current  # distance 0
    if rows > 1:
        window[1] = ~current  # every bit differs
    got = torch.ops.worm_fast.hamming_window(current, window)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, reference.hamming_window(current, window))
    assert torch.equal(got, _bool_hamming(current, window, nbytes * 8))
    assert got[0] == 0
    if rows > 1:
        assert got[1] == nbytes * 8


def test_hamming_window_non_contiguous_and_empty():
    current = _random_bytes(40, seed=1)
    window = _random_bytes(10, 80, seed=2)[::2, ::2]  # strided rows and columns
    assert not window.is_contiguous()
    assert torch.equal(
        torch.ops.worm_fast.hamming_window(current, window),
        reference.hamming_window(current, window),
    )
    empty = torch.ops.worm_fast.hamming_window(current, window[:0])
    assert empty.shape == (0,) and empty.dtype == torch.int64
    zero_bytes = torch.ops.worm_fast.hamming_window(current[:0], window[:, :0])
    assert torch.equal(zero_bytes, torch.zeros(5, dtype=torch.int64))


def test_mask_ops_reject_bad_input():
    with pytest.raises(RuntimeError, match="threshold must have exactly one element"):
        torch.ops.worm_fast.pack_mask(torch.ones(4), torch.ones(2))
    with pytest.raises(RuntimeError, match="packed must be a uint8 mask"):
        torch.ops.worm_fast.unpack_mask(torch.ones(8, dtype=torch.bool), 8)
    with pytest.raises(RuntimeError, match="numel=65 needs at least 9 bytes"):
        torch.ops.worm_fast.unpack_mask(torch.zeros(8, dtype=torch.uint8), 65)
    with pytest.raises(RuntimeError, match="window rows have 16 bytes, current has 8"):
        torch.ops.worm_fast.hamming_window(
            torch.zeros(8, dtype=torch.uint8), torch.zeros(2, 16, dtype=torch.uint8)
        )
    with pytest.raises(RuntimeError, match="expected packed uint8 masks"):
        torch.ops.worm_fast.hamming_window(
            torch.zeros(8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64)
        )


# ---------------------------------------------------------------------------------------
# masked_sgd_step_.

DENSITIES = ("no_masks", "none_kept", "all_kept", "random", "mixed")


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=_hp_id)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_matches_reference(dtype, density, hp):
    case = _case(ODD_SIZES, dtype, density, seed=len(density))
    for first in (False, True):
        _assert_step_matches_reference(
            case, f"{dtype} {density} first={first}", **_step_kwargs(hp, is_first_step=first)
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_large_multi_tensor_list(dtype):
    # Past the serial threshold, with tensors that straddle the 16384-element work items.
    sizes = (100_003, 16_384, 16_385, 1, 40_000, 64, 65)
    case = _case(sizes, dtype, "mixed", seed=7)
    hp = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=5e-4, maximize=False)
    _assert_step_matches_reference(case, f"{dtype} large", **_step_kwargs(hp))
    _assert_step_matches_reference(
        case, f"{dtype} large nesterov", **_step_kwargs({**hp, "nesterov": True, "dampening": 0.0})
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_grad_scale(dtype):
    _check_grad_scale(dtype)


def _check_grad_scale(dtype):
    # Gradients 1024 times too large: a kernel that skipped the unscaling fails loudly.
    case = _case(ODD_SIZES, dtype, "random", seed=11)
    scale = torch.tensor(1024.0)
    scaled = (case[0], [(g.float() * 1024).to(dtype) for g in case[1]], case[2], case[3])
    hp = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False)
    _assert_step_matches_reference(
        scaled, f"{dtype} grad_scale", **_step_kwargs(hp, grad_scale=scale)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_found_inf(dtype):
    case = _case(ODD_SIZES, dtype, "random", seed=13)
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    skip_p, skip_b, skip_g = _step(
        torch.ops.worm_fast.masked_sgd_step_,
        case,
        **_step_kwargs(hp, found_inf=torch.tensor([1.0]), grad_scale=torch.tensor(2.0)),
    )
    for i in range(len(ODD_SIZES)):  # nothing changes, bit for bit
        assert torch.equal(skip_p[i], case[0][i])
        assert torch.equal(skip_b[i], case[2][i])
        assert torch.equal(skip_g[i], case[1][i])
    ran_p, ran_b, _ = _step(
        torch.ops.worm_fast.masked_sgd_step_, case, **_step_kwargs(hp, found_inf=torch.tensor(0.0))
    )
    plain_p, plain_b, _ = _step(torch.ops.worm_fast.masked_sgd_step_, case, **_step_kwargs(hp))
    for i in range(len(ODD_SIZES)):
        assert torch.equal(ran_p[i], plain_p[i])
        assert torch.equal(ran_b[i], plain_b[i])
    _assert_step_matches_reference(
        case, f"{dtype} found_inf=0", **_step_kwargs(hp, found_inf=torch.tensor(0.0))
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_lr_tensor_overrides_lr(dtype):
    case = _case(ODD_SIZES, dtype, "random", seed=17)
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    lr_tensor = torch.tensor(0.05, dtype=torch.float64)
    kwargs = _step_kwargs(hp, lr=123.0, lr_tensor=lr_tensor)
    _assert_step_matches_reference(case, f"{dtype} lr_tensor", **kwargs)
    with_tensor, _, _ = _step(torch.ops.worm_fast.masked_sgd_step_, case, **kwargs)
    with_float, _, _ = _step(
        torch.ops.worm_fast.masked_sgd_step_, case, **_step_kwargs(hp, lr=0.05)
    )
    for a, b in zip(with_tensor, with_float):
        assert torch.equal(a, b)


def test_masked_sgd_step_truncation_values_and_non_contiguous_grads():
    params = [_randn(6, 11, seed=1), _randn(130, seed=2)]
    grads = [_randn(11, 6, seed=3).t(), _randn(260, seed=4)[::2]]  # strided views
    assert not any(g.is_contiguous() for g in grads)
    masks = [_random_bytes(packed_nbytes(66), seed=5), _random_bytes(packed_nbytes(130), seed=6)]
    hp = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    for r in (0.0, 3e-3, 0.5, 1.0):
        _assert_step_matches_reference(
            (params, grads, [], masks), f"truncation={r}", **_step_kwargs(hp, truncation=r)
        )


def test_masked_sgd_step_with_r_one_equals_no_mask():
    case = _case(ODD_SIZES, torch.float32, "random", seed=19)
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    masked, masked_b, _ = _step(
        torch.ops.worm_fast.masked_sgd_step_, case, **_step_kwargs(hp, truncation=1.0)
    )
    unmasked_case = (case[0], case[1], case[2], [])
    plain, plain_b, _ = _step(
        torch.ops.worm_fast.masked_sgd_step_, unmasked_case, **_step_kwargs(hp)
    )
    for a, b in zip(masked + masked_b, plain + plain_b):
        assert torch.equal(a, b)


def test_masked_sgd_step_empty_lists_and_empty_tensors():
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    torch.ops.worm_fast.masked_sgd_step_([], [], [], [], **_step_kwargs(hp))
    empty = torch.empty(0)
    case = ([empty, _randn(5)], [empty, _randn(5, seed=1)], [empty, _randn(5, seed=2)], [])
    _assert_step_matches_reference(case, "empty tensor", **_step_kwargs(hp))


# Step for step against torch.optim.SGD (no mask): the fp32 rounding must be torch's.
SGD_CASES = [
    hp
    for hp in HYPERPARAMETERS
    if not (hp["nesterov"] and (hp["momentum"] == 0 or hp["dampening"]))
]


@pytest.mark.parametrize("foreach", (False, True))
@pytest.mark.parametrize("hp", SGD_CASES, ids=_hp_id)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_masked_sgd_step_matches_torch_sgd_over_ten_steps(dtype, hp, foreach):
    sizes = ODD_SIZES
    ours = [_randn(n, dtype=dtype, seed=i) for i, n in enumerate(sizes)]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    bufs = [torch.zeros_like(p) for p in ours]
    optimizer = torch.optim.SGD(theirs, lr=0.05, foreach=foreach, **hp)
    for step in range(10):
        grads = [_randn(n, dtype=dtype, seed=100 * step + i) for i, n in enumerate(sizes)]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.step()
        torch.ops.worm_fast.masked_sgd_step_(
            ours,
            grads,
            bufs if hp["momentum"] else [],
            [],
            lr=0.05,
            is_first_step=step == 0,
            truncation=1.0,
            **hp,
        )
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b.detach(), what=f"params[{i}] after 10 steps")
        if hp["momentum"]:
            assert_close(bufs[i], optimizer.state[b]["momentum_buffer"], what=f"buf[{i}]")


def test_masked_sgd_step_rejects_bad_input_without_touching_anything():
    params = [_randn(10, seed=1), _randn(70, seed=2)]
    grads = [_randn(10, seed=3), _randn(70, seed=4)]
    bufs = [_randn(10, seed=5), _randn(70, seed=6)]
    masks = [None, _random_bytes(packed_nbytes(70), seed=7)]
    hp = _step_kwargs(
        dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    )
    snapshot = [t.clone() for t in params + bufs]

    def call(p=params, g=grads, b=bufs, m=masks, **extra):
        torch.ops.worm_fast.masked_sgd_step_(p, g, b, m, **{**hp, **extra})

    bad = [
        (dict(m=[None, torch.zeros(8, dtype=torch.uint8)]), r"masks\[1\] has 8 bytes, expected 16"),
        (dict(m=[None, torch.zeros(16, dtype=torch.bool)]), r"masks\[1\] must be a packed uint8"),
        (dict(m=[None]), "masks must be empty or have one entry"),
        (dict(g=grads[:1]), "expected one grad per param"),
        (dict(b=[]), "needs one momentum buffer per param"),
        (dict(g=[grads[0], grads[1].double()]), r"grads\[1\] has dtype Double"),
        (dict(g=[grads[0], grads[1][:60]]), r"grads\[1\] has 60 elements"),
        (dict(g=[grads[0], grads[1].to_sparse()]), "sparse gradients are not supported"),
        (dict(b=[bufs[0], bufs[1][:69]]), r"momentum_buffers\[1\] has 69 elements"),
        (dict(p=[params[0], torch.zeros(70, 2)[:, 0]]), r"params\[1\] must be contiguous"),
        (dict(p=[params[0], torch.zeros(70, dtype=torch.int32)]), r"params\[1\] has dtype Int"),
        (dict(found_inf=torch.zeros(2)), "found_inf must have exactly one element"),
    ]
    for kwargs, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
    for before, after in zip(snapshot, params + bufs):
        assert torch.equal(before, after)


# ---------------------------------------------------------------------------------------
# masked_adamw_step_.

ADAMW_HYPERPARAMETERS = [
    dict(amsgrad=ams, weight_decay=wd, maximize=mx)
    for ams, wd, mx in itertools.product((False, True), (0.0, 1e-2), (False, True))
]


def _adamw_hp_id(hp):
    return "ams{amsgrad:d}-wd{weight_decay}-max{maximize:d}".format(**hp)


def _adamw_case(sizes, dtype, density, amsgrad, seed=0):
    """Params, grads, mid-training states (step counts 0, 1, 2, ... per tensor) and masks."""
    rng = [_gen(seed + 7 * i) for i in range(len(sizes))]
    params = [torch.randn(n, generator=g).to(dtype) for n, g in zip(sizes, rng)]
    grads = [torch.randn(n, generator=g).to(dtype) for n, g in zip(sizes, rng)]
    exp_avgs = [(0.1 * torch.randn(n, generator=g)).to(dtype) for n, g in zip(sizes, rng)]
    exp_avg_sqs = [(0.05 + torch.rand(n, generator=g)).to(dtype) for n, g in zip(sizes, rng)]
    # Larger or smaller than the new second moment, element by element.
    max_exp_avg_sqs = (
        [(0.05 + 1.5 * torch.rand(n, generator=g)).to(dtype) for n, g in zip(sizes, rng)]
        if amsgrad
        else []
    )
    steps = [torch.tensor(float(i % 4)) for i in range(len(sizes))]
    return [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps], _masks(
        sizes, density, seed
    )


def _adamw_kwargs(hp, **extra):
    kwargs = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, truncation=3e-3, **hp)
    kwargs.update(extra)
    return kwargs


ADAMW_STATES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


def _adamw_run(fn, case, masks, steps=1, **kwargs):
    """``steps`` steps of ``fn`` on copies of ``case`` (fresh grads from the 2nd step on);
    returns the tensor lists [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
    state_steps] after them."""
    lists = [[t.clone() for t in ts] for ts in case]
    for step in range(steps):
        if step:
            lists[1] = [
                torch.randn(g.shape, generator=_gen(100 * step + i)).to(g.dtype)
                for i, g in enumerate(lists[1])
            ]
        fn(*lists, masks, **kwargs)
    return lists


def _assert_adamw_matches_reference(case, masks, what, steps=3, **kwargs):
    dtype = case[0][0].dtype
    tol = _reference_tolerance(dtype)
    got = _adamw_run(torch.ops.worm_fast.masked_adamw_step_, case, masks, steps, **kwargs)
    expected = _adamw_run(reference.masked_adamw_step_, case, masks, steps, **kwargs)
    for k, name in zip((0, 2, 3, 4), ADAMW_STATES):
        for i, (a, e) in enumerate(zip(got[k], expected[k])):
            assert_close(a, e, what=f"{what}: {name}[{i}] after {steps} steps", **tol)
    for i, (a, e) in enumerate(zip(got[5], expected[5])):
        assert a.dtype == torch.float32 and a.item() == e.item() == case[5][i].item() + steps
    if steps == 1:
        for i, g in enumerate(got[1]):
            assert torch.equal(g, case[1][i]), f"{what}: grads[{i}] must not change"


@pytest.mark.parametrize("hp", ADAMW_HYPERPARAMETERS, ids=_adamw_hp_id)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_matches_reference(dtype, density, hp):
    case, masks = _adamw_case(ODD_SIZES, dtype, density, hp["amsgrad"], seed=len(density))
    _assert_adamw_matches_reference(case, masks, f"{dtype} {density}", **_adamw_kwargs(hp))
    _assert_adamw_matches_reference(
        case, masks, f"{dtype} {density} one step", steps=1, **_adamw_kwargs(hp)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_large_multi_tensor_list(dtype):
    # Past the serial threshold, with tensors that straddle the 16384-element work items.
    sizes = (100_003, 16_384, 16_385, 1, 40_000, 64, 65, 0)
    for amsgrad in (False, True):
        case, masks = _adamw_case(sizes, dtype, "mixed", amsgrad, seed=7)
        hp = dict(amsgrad=amsgrad, weight_decay=5e-4, maximize=False)
        _assert_adamw_matches_reference(case, masks, f"{dtype} large", **_adamw_kwargs(hp))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_grad_scale(dtype):
    case, masks = _adamw_case(ODD_SIZES, dtype, "random", amsgrad=True, seed=11)
    case[1] = [(g.float() * 1024).to(dtype) for g in case[1]]
    hp = dict(amsgrad=True, weight_decay=1e-2, maximize=True)
    _assert_adamw_matches_reference(
        case, masks, f"{dtype} grad_scale", steps=1,
        **_adamw_kwargs(hp, grad_scale=torch.tensor(1024.0)),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_found_inf_changes_nothing(dtype):
    case, masks = _adamw_case(ODD_SIZES, dtype, "random", amsgrad=True, seed=13)
    hp = dict(amsgrad=True, weight_decay=1e-2, maximize=False)
    skipped = _adamw_run(
        torch.ops.worm_fast.masked_adamw_step_, case, masks,
        **_adamw_kwargs(hp, found_inf=torch.tensor([1.0]), grad_scale=torch.tensor(2.0)),
    )  # fmt: skip
    for before, after in zip(case, skipped):  # bit for bit, the step counts too
        for i, (b, a) in enumerate(zip(before, after)):
            assert torch.equal(a, b), i
    ran = _adamw_run(
        torch.ops.worm_fast.masked_adamw_step_, case, masks,
        **_adamw_kwargs(hp, found_inf=torch.tensor(0.0)),
    )  # fmt: skip
    plain = _adamw_run(torch.ops.worm_fast.masked_adamw_step_, case, masks, **_adamw_kwargs(hp))
    for a_list, b_list in zip(ran, plain):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    _assert_adamw_matches_reference(
        case, masks, f"{dtype} found_inf=0", **_adamw_kwargs(hp, found_inf=torch.tensor(0.0))
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_lr_tensor_overrides_lr(dtype):
    case, masks = _adamw_case(ODD_SIZES, dtype, "random", amsgrad=False, seed=17)
    hp = dict(amsgrad=False, weight_decay=1e-2, maximize=False)
    kwargs = _adamw_kwargs(hp, lr=123.0, lr_tensor=torch.tensor(0.05, dtype=torch.float64))
    _assert_adamw_matches_reference(case, masks, f"{dtype} lr_tensor", **kwargs)
    fn = torch.ops.worm_fast.masked_adamw_step_
    with_tensor = _adamw_run(fn, case, masks, **kwargs)
    with_float = _adamw_run(fn, case, masks, **_adamw_kwargs(hp, lr=0.05))
    for a_list, b_list in zip(with_tensor, with_float):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_masked_adamw_step_other_betas_truncations_and_strided_grads():
    # beta1 < 0.5 takes torch's other lerp formula; r = 0 freezes the Adam update of
    # pruned elements; grads and masks may be strided views.
    params = [_randn(6, 11, seed=1), _randn(130, seed=2)]
    grads = [_randn(11, 6, seed=3).t(), _randn(260, seed=4)[::2]]
    assert not any(g.is_contiguous() for g in grads)
    masks = [_random_bytes(2 * packed_nbytes(66), seed=5)[::2], _random_bytes(24, seed=6)]
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(0.0), torch.tensor(41.0)]
    case = [params, grads, *states, steps]
    for beta1, beta2 in ((0.9, 0.999), (0.3, 0.5), (0.0, 0.0)):
        for r in (0.0, 3e-3, 0.5, 1.0):
            hp = dict(amsgrad=True, weight_decay=0.1, maximize=False)
            kwargs = _adamw_kwargs(hp, beta1=beta1, beta2=beta2, truncation=r, eps=1e-6)
            _assert_adamw_matches_reference(case, masks, f"betas {beta1} {beta2} r={r}", **kwargs)


def test_masked_adamw_step_with_r_one_equals_no_mask():
    case, masks = _adamw_case(ODD_SIZES, torch.float32, "random", amsgrad=True, seed=19)
    hp = dict(amsgrad=True, weight_decay=1e-2, maximize=False)
    fn = torch.ops.worm_fast.masked_adamw_step_
    masked = _adamw_run(fn, case, masks, **_adamw_kwargs(hp, truncation=1.0))
    plain = _adamw_run(fn, case, [], **_adamw_kwargs(hp))
    for a_list, b_list in zip(masked, plain):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_masked_adamw_step_empty_lists_and_empty_tensors():
    hp = dict(amsgrad=False, weight_decay=0.0, maximize=False)
    torch.ops.worm_fast.masked_adamw_step_([], [], [], [], [], [], [], **_adamw_kwargs(hp))
    empty = torch.empty(0)
    case = [
        [empty, _randn(5)], [empty, _randn(5, seed=1)], [empty, torch.zeros(5)],
        [empty, torch.zeros(5)], [], [torch.tensor(0.0), torch.tensor(0.0)],
    ]  # fmt: skip
    _assert_adamw_matches_reference(case, [], "empty tensor", **_adamw_kwargs(hp))
    # The empty tensor's step count advances too, as in torch.optim.AdamW.
    after = _adamw_run(torch.ops.worm_fast.masked_adamw_step_, case, [], **_adamw_kwargs(hp))
    assert [s.item() for s in after[5]] == [1.0, 1.0]


# Step for step against torch.optim.AdamW (no mask, state from zero). On x86-64 (torch's
# AVX2 / AVX-512 loops, whose lerp and addcmul are FMAs as ours are) the moments are bit
# for bit torch's, and so are the parameters, but for the few elements in a thousand
# where torch's CPU sqrt (MKL's vector sqrt) is an ulp off and ours is correctly rounded.
@pytest.mark.parametrize("hp", ADAMW_HYPERPARAMETERS, ids=_adamw_hp_id)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_masked_adamw_step_matches_torch_adamw(dtype, hp):
    sizes = (*ODD_SIZES, 50_000)
    ours = [_randn(n, dtype=dtype, seed=i) for i, n in enumerate(sizes)]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    states = [[torch.zeros_like(p) for p in ours] for _ in range(3)]
    steps = [torch.tensor(0.0) for _ in ours]
    optimizer = torch.optim.AdamW(theirs, lr=0.01, foreach=False, **hp)
    for step in range(5):
        grads = [_randn(n, dtype=dtype, seed=100 * step + i) for i, n in enumerate(sizes)]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.step()
        torch.ops.worm_fast.masked_adamw_step_(
            ours, grads, states[0], states[1], states[2] if hp["amsgrad"] else [], steps, [],
            lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, truncation=1.0, **hp,
        )  # fmt: skip
    bitwise = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    # Our kernels take IEEE square roots; torch's CPU sqrt is IEEE-exact on some machines
    # only (MKL's vsSqrt is not on AMD CPUs), so parameters agree bit for bit only there.
    params_bitwise = bitwise and _torch_sqrt_is_correctly_rounded()
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())
    differing = 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        state = optimizer.state[b]
        assert_close(a, b.detach(), what=f"params[{i}] after 5 steps")
        for k, key in enumerate(keys):
            assert_close(states[k][i], state[key], what=f"{key}[{i}] after 5 steps")
            assert not bitwise or torch.equal(states[k][i], state[key]), f"{key}[{i}]"
        assert steps[i].item() == state["step"].item() == 5.0
        differing += (a != b.detach()).sum().item()
    assert not params_bitwise or differing <= 0.005 * sum(sizes), differing


def _torch_sqrt_is_correctly_rounded() -> bool:
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    exact = x.double().sqrt().float()  # double rounding is exact for sqrt of floats
    return torch.equal(x.sqrt(), exact)


def test_masked_adamw_step_rejects_bad_input_without_touching_anything():
    case, masks = _adamw_case((10, 70), torch.float32, "mixed", amsgrad=True, seed=1)
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = case
    snapshot = [t.clone() for ts in case for t in ts]
    hp = _adamw_kwargs(dict(amsgrad=True, weight_decay=0.0, maximize=False))

    def call(p=params, g=grads, m=exp_avgs, v=exp_avg_sqs, vm=max_exp_avg_sqs, s=steps,
             mk=masks, **extra):  # fmt: skip
        torch.ops.worm_fast.masked_adamw_step_(p, g, m, v, vm, s, mk, **{**hp, **extra})

    bad = [
        (dict(mk=[None, torch.zeros(8, dtype=torch.uint8)]), r"masks\[1\] has 8 bytes"),
        (dict(mk=[None]), "masks must be empty or have one entry"),
        (dict(g=grads[:1]), "expected one grad per param"),
        (dict(m=exp_avgs[:1]), "expected one exp_avg per param"),
        (dict(s=steps[:1]), "expected one state_step per param"),
        (dict(vm=[]), "amsgrad=True needs one max_exp_avg_sq per param"),
        (dict(g=[grads[0], grads[1].double()]), r"grads\[1\] has dtype Double"),
        (dict(g=[grads[0], grads[1].to_sparse()]), "sparse gradients are not supported"),
        (dict(v=[exp_avg_sqs[0], exp_avg_sqs[1][:69]]), r"exp_avg_sqs\[1\] has 69 elements"),
        (dict(m=[exp_avgs[0], exp_avgs[1].half()]), r"exp_avgs\[1\] has dtype Half"),
        (dict(vm=[max_exp_avg_sqs[0], torch.zeros(70, 2)[:, 0]]),
         r"max_exp_avg_sqs\[1\] must be contiguous"),
        (dict(s=[steps[0], torch.tensor(1, dtype=torch.int64)]),
         r"state_steps\[1\] must be a float32 tensor of one element"),
        (dict(s=[steps[0], torch.zeros(2)]), r"state_steps\[1\] must be a float32 tensor"),
        (dict(p=[params[0], torch.zeros(70, dtype=torch.int32)]), r"params\[1\] has dtype Int"),
        (dict(found_inf=torch.zeros(2)), "masked_adamw_step_: found_inf must have exactly one"),
    ]  # fmt: skip
    for kwargs, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
    for before, after in zip(snapshot, [t for ts in case for t in ts]):
        assert torch.equal(before, after)


# ---------------------------------------------------------------------------------------
# opcheck, and the other instruction sets.


def _opcheck_cases():
    values = _randn(3, 70, seed=1)
    packed = torch.ops.worm_fast.pack_mask(values, torch.tensor(0.5))
    window = _random_bytes(4, packed.numel(), seed=2)
    params = [_randn(3, 70, seed=3), _randn(5, seed=4)]
    grads = [_randn(3, 70, seed=5), _randn(5, seed=6)]
    bufs = [torch.zeros(3, 70), torch.zeros(5)]
    masks = [packed, None]
    sgd_kwargs = dict(
        lr=0.1,
        weight_decay=1e-2,
        momentum=0.9,
        dampening=0.0,
        nesterov=True,
        maximize=False,
        is_first_step=True,
        truncation=3e-3,
        lr_tensor=torch.tensor(0.1),
        grad_scale=torch.tensor(2.0),
        found_inf=torch.tensor(0.0),
    )
    adamw_args = (
        params, grads, [torch.zeros(3, 70), torch.zeros(5)], [torch.ones(3, 70), torch.ones(5)],
        [torch.ones(3, 70), torch.ones(5)], [torch.tensor(0.0), torch.tensor(3.0)], masks,
    )  # fmt: skip
    adamw_kwargs = dict(
        lr=0.1, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=True,
        maximize=False, truncation=3e-3, lr_tensor=torch.tensor(0.1),
        grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0),
    )  # fmt: skip
    return {
        "pack_mask": ((values, torch.tensor(0.5)), {}),
        "unpack_mask": ((packed, 210), {}),
        "hamming_window": ((packed, window), {}),
        "magnitude_histogram": (([values, params[1]], torch.tensor([0, 7]), 19, 12, 2), {}),
        "masked_sgd_step_": ((params, grads, bufs, masks), sgd_kwargs),
        "masked_adamw_step_": (adamw_args, adamw_kwargs),
    }


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    args, kwargs = _opcheck_cases()[op]
    torch.library.opcheck(getattr(torch.ops.worm_fast, op).default, args, kwargs)


# One case per variant of the inner loop (momentum mode, nesterov, weight decay, maximize).
QUICK_SGD_CASES = [
    (dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False), False),
    (dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=True), False),
    (dict(momentum=0.9, dampening=0.25, nesterov=False, weight_decay=1e-2, maximize=False), False),
    (dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=True), False),
    (dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False), True),
    (dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False), True),
]


def _check_against_reference_quickly():
    """A compact pass over every op and dtype; run in subprocesses for other ISAs."""
    for dtype in DTYPES:
        for density in ("none_kept", "random"):
            threshold = torch.tensor(DENSITY_THRESHOLDS[density])
            values = _randn(4097, dtype=dtype, seed=1)
            assert torch.equal(
                torch.ops.worm_fast.pack_mask(values, threshold),
                reference.pack_mask(values, threshold),
            )
        for hp, first in QUICK_SGD_CASES:
            for density in ("no_masks", "random"):
                case = _case((1, 63, 65, 4097, 20_000), dtype, density)
                kwargs = _step_kwargs(hp, is_first_step=first)
                _assert_step_matches_reference(case, f"{dtype} {density} {hp}", **kwargs)
        _check_grad_scale(dtype)
        for hp in ADAMW_HYPERPARAMETERS[::3]:  # each of amsgrad, wd, maximize on and off
            for density in ("no_masks", "random"):
                case, masks = _adamw_case((1, 63, 65, 4097, 20_000), dtype, density, hp["amsgrad"])
                _assert_adamw_matches_reference(
                    case, masks, f"{dtype} {density} {hp}", **_adamw_kwargs(hp)
                )
        # The histogram's vector loop (AVX-512, 32-bit keys) and its generic one (the other
        # instruction sets, and 64-bit keys): a full pass, a narrow window, a sample.
        values = [_randn(4097, dtype=dtype, seed=2), _randn(65, dtype=dtype, seed=3)]
        values[0][::5] = float("nan")
        key = MAGNITUDE_KEYS[dtype]
        start = int(torch.tensor(0.5, dtype=dtype).view(key.storage))
        for lo, shift, bits, stride in (
            (torch.tensor([0]), key.bits - 12, 12, 1),
            (torch.tensor([start - 900, start]), 0, 14, 1),
            (torch.tensor([0]), key.bits - 10, 10, 3),
        ):
            assert torch.equal(
                torch.ops.worm_fast.magnitude_histogram(values, lo, shift, bits, stride),
                reference.magnitude_histogram(values, lo, shift, bits, stride),
            ), (dtype, shift, bits)
    packed = _random_bytes(packed_nbytes(4097), seed=3)
    assert torch.equal(
        torch.ops.worm_fast.unpack_mask(packed, 4097), reference.unpack_mask(packed, 4097)
    )
    # 9 rows: one pass over 8 rows, then one over the last (hamming_rows<1>).
    window = _random_bytes(9, packed.numel() + 3, seed=4)
    current = _random_bytes(packed.numel() + 3, seed=5)
    assert torch.equal(
        torch.ops.worm_fast.hamming_window(current, window),
        reference.hamming_window(current, window),
    )


@pytest.mark.parametrize("capability", ("AVX2", "DEFAULT"))
def test_other_instruction_sets_match_reference(capability):
    # The loops are compiled for AVX-512, AVX2 and the baseline ISA, and chosen from
    # torch's CPU capability; ATEN_CPU_CAPABILITY selects a narrower one.
    order = ("DEFAULT", "AVX2", "AVX512")
    here = torch.backends.cpu.get_cpu_capability()
    if here not in order or order.index(capability) > order.index(here):
        pytest.skip(f"this CPU runs at {here}, cannot run {capability} code")
    script = (
        "from worm_fast import _C\n"
        f"assert _C.CPU_ISA == {capability.lower()!r}, _C.CPU_ISA\n"
        "from tests.backends.test_cpp import _check_against_reference_quickly\n"
        "_check_against_reference_quickly()\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
