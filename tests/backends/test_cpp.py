"""The compiled extension ``worm_fast._C``: what only its kernels do or say.

Every op of ``_C`` is tested against the reference backend, with the other backends, in
``tests/ops/`` (``cpp`` on CPU tensors, and ``cuda`` on CUDA tensors when a GPU is
present). Here: the extension is built and registered (a missing ``_C`` is a failure,
not a skip: the Makefile builds it), the CPU loops follow torch's instruction set and
the narrower ones match the reference too; and, on every device ``_C`` runs on here,
what its kernels accept beyond the public ops (integer values, byte counts that are not
whole words), its argument checks and opcheck of ``torch.ops.worm_fast``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import worm_fast
from tests.ops import test_masked_adamw_step, test_masked_sgd_step
from tests.utils import (
    ADAMW_HYPERPARAMETERS,
    DENSITY_THRESHOLDS,
    DTYPES,
    RUNNABLE_BACKENDS,
    adamw_case,
    adamw_kwargs,
    describe,
    kernels_of,
    packed_masks,
    randn,
    random_bytes,
    sgd_case,
    sgd_kwargs,
)
from worm_fast._ops import MAGNITUDE_KEYS, OP_NAMES, packed_nbytes
from worm_fast.backends import cpp, reference

ROOT = Path(__file__).resolve().parents[2]
# The device types whose kernels come from _C: CPU (the cpp backend), and CUDA (the cuda
# backend) when the extension was built with CUDA and a GPU is present.
_C_DEVICES = [device for name, device in RUNNABLE_BACKENDS if name in ("cpp", "cuda")]


@pytest.fixture(params=_C_DEVICES)
def device(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------------
# The extension is there and registered.


def test_extension_is_built_and_registers_cpu_kernels():
    assert cpp.LOAD_ERROR is None, cpp.LOAD_ERROR
    assert cpp.status().available
    for op in OP_NAMES:
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


def test_extension_records_the_torch_it_was_built_against():
    from worm_fast import _C

    assert str(torch.__version__) == _C.TORCH_VERSION
    assert cpp.recorded_torch_version(_C.__file__) == _C.TORCH_VERSION


# Run in a copy of the package whose _C records another torch (or none): worm_fast must
# not load it, warn once naming both versions and the rebuild command, run the ops on the
# reference kernels, and `worm-fast backends` must say the same.
REFUSED_CHECK = """
import sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import worm_fast
import torch
from worm_fast import cli, ops
assert worm_fast.__file__.startswith(sys.argv[1]), worm_fast.__file__
assert "worm_fast._C" not in sys.modules
assert not torch._C._dispatch_has_kernel_for_dispatch_key("worm_fast::pack_mask", "CPU")
assert [w.category for w in caught] == [RuntimeWarning], [str(w.message) for w in caught]
print(caught[0].message)
assert ops.pack_mask(torch.tensor([1.0, 0.0, -2.0]), torch.tensor(0.5)).tolist()[0] == 5
cli.main(["backends"])
"""


@pytest.mark.parametrize("recorded", [b"0.0.0", None], ids=["another-torch", "unrecorded"])
def test_extension_built_against_another_torch_is_not_loaded(tmp_path, recorded):
    from worm_fast import _C

    package = tmp_path / "worm_fast"
    shutil.copytree(
        Path(worm_fast.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    extension = package / Path(_C.__file__).name
    data = extension.read_bytes()
    running = str(torch.__version__).encode()
    record = cpp.BUILD_RECORD + running
    assert data.count(record) == 1
    if recorded is None:  # as built by a worm_fast from before the record
        patched = b"x" * len(record)
    else:
        patched = cpp.BUILD_RECORD + recorded.ljust(len(running), b"\0")
    extension.write_bytes(data.replace(record, patched))

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", REFUSED_CHECK, str(package)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    warning, *table = result.stdout.splitlines()
    expected = (
        f"worm_fast._C was built against torch {(recorded or b'(unrecorded)').decode()} but "
        f"torch {torch.__version__} is running, so it is not loaded: the ops run on the "
        "reference (and Triton) backends instead. Rebuild it against this torch with "
        "`pip install --no-build-isolation"
    )
    assert warning.startswith(expected), warning
    rows = {line.split()[0]: line for line in table}
    assert rows["cpp"].split(maxsplit=2)[1:] == ["no", warning]
    assert rows["cuda"].split(maxsplit=2)[1:] == ["no", warning]
    assert rows["reference"].split()[1] == "yes"


# ---------------------------------------------------------------------------------------
# What the kernels of _C accept beyond the public ops.


def test_pack_mask_of_integer_values_compares_in_float32(device):
    ints = torch.arange(-70, 70, dtype=torch.int32, device=device)
    threshold = torch.tensor(9.5, device=device)
    assert torch.equal(
        torch.ops.worm_fast.pack_mask(ints, threshold), reference.pack_mask(ints, threshold)
    )


@pytest.mark.parametrize("rows", (1, 5, 16))
def test_hamming_window_of_a_byte_count_that_is_not_whole_words(device, rows):
    current = random_bytes(13, seed=13, device=device)
    window = random_bytes(rows, 13, seed=13 + rows, device=device)
    window[0] = current  # distance 0
    if rows > 1:
        window[1] = ~current  # every bit differs
    got = torch.ops.worm_fast.hamming_window(current, window)
    assert torch.equal(got, reference.hamming_window(current, window))
    bits = reference.unpack_mask(current, 13 * 8)
    expected = [(reference.unpack_mask(row, 13 * 8) != bits).sum().item() for row in window]
    assert got.tolist() == expected
    assert got[0] == 0
    if rows > 1:
        assert got[1] == 13 * 8


# ---------------------------------------------------------------------------------------
# Argument checks, on every device _C runs on: bad input raises before anything changes.


def test_mask_ops_reject_bad_input(device):
    with torch.device(device):
        _check_mask_ops_reject_bad_input()


def _check_mask_ops_reject_bad_input():
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


def test_masked_sgd_step_rejects_bad_input_without_touching_anything(device):
    params, grads, bufs, masks = sgd_case((10, 70), torch.float32, "mixed", device=device)
    hp = sgd_kwargs(momentum=0.9)
    snapshot = [t.clone() for t in params + bufs]

    def call(p=params, g=grads, b=bufs, m=masks, **extra):
        torch.ops.worm_fast.masked_sgd_step_(p, g, b, m, **{**hp, **extra})

    with torch.device(device):
        bad = [
            (
                dict(m=[None, torch.zeros(8, dtype=torch.uint8)]),
                r"masks\[1\] has 8 bytes, expected 16",
            ),
            (
                dict(m=[None, torch.zeros(16, dtype=torch.bool)]),
                r"masks\[1\] must be a packed uint8",
            ),
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
            (dict(truncation_tensor=torch.zeros(2)), "truncation_tensor must have exactly one"),
            # r on the host is read there, and checked like the float truncation.
            (dict(truncation_tensor=torch.tensor([1.5], device="cpu")),
             "truncation_tensor must be >= 0 and <= 1, got 1.5"),
        ]  # fmt: skip
    for kwargs, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
    for before, after in zip(snapshot, params + bufs):
        assert torch.equal(before, after)


def test_masked_adamw_step_rejects_bad_input_without_touching_anything(device):
    case = adamw_case((10, 70), torch.float32, amsgrad=True, seed=1, device=device)
    masks = packed_masks((10, 70), "mixed", device=device)
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = case
    snapshot = [t.clone() for ts in case for t in ts]
    hp = adamw_kwargs(amsgrad=True)

    def call(p=params, g=grads, m=exp_avgs, v=exp_avg_sqs, vm=max_exp_avg_sqs, s=steps,
             mk=masks, **extra):  # fmt: skip
        torch.ops.worm_fast.masked_adamw_step_(p, g, m, v, vm, s, mk, **{**hp, **extra})

    with torch.device(device):
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
            (dict(truncation_tensor=torch.tensor([-0.5], device="cpu")),
             "masked_adamw_step_: truncation_tensor must be >= 0 and <= 1, got -0.5"),
        ]  # fmt: skip
    for kwargs, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
    for before, after in zip(snapshot, [t for ts in case for t in ts]):
        assert torch.equal(before, after)


# ---------------------------------------------------------------------------------------
# opcheck, and the other instruction sets.


def _opcheck_cases(device):
    with torch.device(device):
        return _opcheck_arguments(device)


def _opcheck_arguments(device):
    values = randn(3, 70, seed=1, device=device)
    packed = torch.ops.worm_fast.pack_mask(values, torch.tensor(0.5))
    window = random_bytes(4, packed.numel(), seed=2, device=device)
    params = [randn(3, 70, seed=3, device=device), randn(5, seed=4, device=device)]
    grads = [randn(3, 70, seed=5, device=device), randn(5, seed=6, device=device)]
    bufs = [torch.zeros(3, 70), torch.zeros(5)]
    masks = [packed, None]
    sgd_arguments = dict(
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
    adamw_arguments = dict(
        lr=0.1, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=True,
        maximize=False, truncation=3e-3, lr_tensor=torch.tensor(0.1),
        grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0),
    )  # fmt: skip
    soft_values = [randn(3, 70, seed=7, device=device), randn(5, seed=8, device=device)]
    soft_window = random_bytes(2, packed.numel() + 8, seed=9, device=device)
    soft_constants = (torch.tensor([0.5, 0.3]), torch.tensor([0.1, 0.2]))
    return {
        "soft_mask_distance": ((soft_values, soft_window, *soft_constants), {}),
        "soft_mask_distance_backward": (
            (torch.tensor(1.0), soft_values, soft_window, *soft_constants),
            {},
        ),
        "pack_mask": ((values, torch.tensor(0.5)), {}),
        "unpack_mask": ((packed, 210), {}),
        "hamming_window": ((packed, window), {}),
        "magnitude_histogram": (([values, params[1]], torch.tensor([0, 7]), 19, 12, 2), {}),
        "masked_sgd_step_": ((params, grads, bufs, masks), sgd_arguments),
        "masked_adamw_step_": (adamw_args, adamw_arguments),
    }


@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck(op, device):
    args, kwargs = _opcheck_cases(device)[op]
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
    kernels = kernels_of(("cpp", "cpu"))
    sizes = (1, 63, 65, 4097, 20_000)
    for dtype in DTYPES:
        for density in ("none_kept", "random"):
            threshold = torch.tensor(DENSITY_THRESHOLDS[density])
            values = randn(4097, dtype=dtype, seed=1)
            assert torch.equal(
                kernels.pack_mask(values, threshold), reference.pack_mask(values, threshold)
            )
        for hp, first in QUICK_SGD_CASES:
            for mask_kind in ("no_masks", "random"):
                case = sgd_case(sizes, dtype, mask_kind)
                kwargs = sgd_kwargs(**hp, is_first_step=first)
                what = f"{dtype} {mask_kind} {describe(kwargs)}"
                test_masked_sgd_step.assert_matches_reference(kernels, "cpp", case, what, **kwargs)
        # Gradients 1024 times too large: a kernel that skipped the unscaling fails loudly.
        params, grads, bufs, masks = sgd_case(sizes, dtype, "random", seed=11)
        scaled = (params, [(g.float() * 1024).to(dtype) for g in grads], bufs, masks)
        kwargs = sgd_kwargs(momentum=0.9, nesterov=True, weight_decay=1e-2,
                            grad_scale=torch.tensor(1024.0))  # fmt: skip
        test_masked_sgd_step.assert_matches_reference(
            kernels, "cpp", scaled, f"{dtype} grad_scale", **kwargs
        )
        for hp in ADAMW_HYPERPARAMETERS[::3]:  # each of amsgrad, wd, maximize on and off
            for mask_kind in ("no_masks", "random"):
                case = adamw_case(sizes, dtype, hp["amsgrad"])
                test_masked_adamw_step.assert_matches_reference(
                    kernels, "cpp", case, mask_kind, f"{dtype} {mask_kind} {describe(hp)}",
                    **adamw_kwargs(**hp),
                )  # fmt: skip
        # The histogram's vector loop (AVX-512, 32-bit keys) and its generic one (the other
        # instruction sets, and 64-bit keys): a full pass, a narrow window, a sample.
        values = [randn(4097, dtype=dtype, seed=2), randn(65, dtype=dtype, seed=3)]
        values[0][::5] = float("nan")
        key = MAGNITUDE_KEYS[dtype]
        start = int(torch.tensor(0.5, dtype=dtype).view(key.storage))
        for lo, shift, bits, stride in (
            (torch.tensor([0]), key.bits - 12, 12, 1),
            (torch.tensor([start - 900, start]), 0, 14, 1),
            (torch.tensor([0]), key.bits - 10, 10, 3),
        ):
            assert torch.equal(
                kernels.magnitude_histogram(values, lo, shift, bits, stride),
                reference.magnitude_histogram(values, lo, shift, bits, stride),
            ), (dtype, shift, bits)
    packed = random_bytes(packed_nbytes(4097), seed=3)
    assert torch.equal(kernels.unpack_mask(packed, 4097), reference.unpack_mask(packed, 4097))
    # 9 rows: one pass over 8 rows, then one over the last (hamming_rows<1>).
    window = random_bytes(9, packed.numel() + 3, seed=4)
    current = random_bytes(packed.numel() + 3, seed=5)
    assert torch.equal(
        kernels.hamming_window(current, window), reference.hamming_window(current, window)
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
