"""The Triton backend: what only its kernels do or say.

Its kernels are tested against the reference backend, with the other backends, in
``tests/ops/`` (``triton`` on CUDA tensors when a GPU is present; without one, on CPU
tensors in Triton's interpreter, as ``conftest`` sets ``TRITON_INTERPRET=1``). Here: the
backend's status, its argument checks, opcheck of the ``worm_fast::triton_*`` ops,
``torch.compile`` through them, that every kernel compiles for a GPU (no GPU needed),
and large tensors on a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ops.test_masked_adamw_step import assert_states_close
from tests.ops.test_masked_sgd_step import assert_matches_reference
from tests.utils import (
    DTYPES,
    RUNNABLE_BACKENDS,
    adamw_case,
    adamw_kwargs,
    adamw_step,
    clone_lists,
    kernel_tolerance,
    packed_masks,
    randn,
    random_bytes,
    sgd_case,
    sgd_kwargs,
)
from worm_fast.backends import reference
from worm_fast.backends import triton as backend

STATUS = backend.status()
pytestmark = pytest.mark.skipif(not STATUS.available, reason=STATUS.reason)

# Where the Triton kernels run here: CUDA with a GPU, else CPU in the interpreter.
_DEVICES = [device for name, device in RUNNABLE_BACKENDS if name == "triton"]


@pytest.fixture(params=_DEVICES)
def device(request) -> str:
    return request.param


def test_status_matches_environment():
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert STATUS.device_types == (("cpu", "cuda") if interpreted else ("cuda",))


def test_masked_sgd_step_rejects_bad_input_before_changing_anything(device):
    params, grads, buffers, masks = sgd_case((65, 7), torch.float32, "mixed", device=device)
    before = [t.clone() for t in params + buffers]
    hyperparameters = sgd_kwargs(momentum=0.9)
    short_mask = [masks[0], masks[1][:-8]]
    with pytest.raises(ValueError, match=r"masks\[1\] has 0 elements, expected 8"):
        backend.masked_sgd_step_(params, grads, buffers, short_mask, **hyperparameters)
    with pytest.raises(TypeError, match=r"masks\[1\] must be a uint8"):
        backend.masked_sgd_step_(params, grads, buffers, [None, masks[1].bool()], **hyperparameters)
    with pytest.raises(ValueError, match=r"momentum_buffers\[1\] has 6 elements"):
        backend.masked_sgd_step_(
            params, grads, [buffers[0], buffers[1][:6]], masks, **hyperparameters
        )
    with pytest.raises(ValueError, match="needs one buffer per param"):
        backend.masked_sgd_step_(params, grads, buffers[:1], masks, **hyperparameters)
    strided = [params[0], torch.zeros(14, device=device)[::2]]
    with pytest.raises(ValueError, match=r"params\[1\] must be contiguous"):
        backend.masked_sgd_step_(strided, grads, buffers, masks, **hyperparameters)
    for got, expected in zip(params + buffers, before):
        assert torch.equal(got, expected)


def test_mask_ops_reject_bad_input(device):
    with pytest.raises(ValueError, match="holds 8 bits, asked for 9"):
        backend.unpack_mask(random_bytes(1, device=device), 9)
    # Any byte count, as on every backend (the packed-mask padding is ops.py's rule).
    current = random_bytes(4, device=device)
    window = random_bytes(2, 4, seed=1, device=device)
    assert torch.equal(
        backend.hamming_window(current, window), reference.hamming_window(current, window)
    )
    with pytest.raises(TypeError, match="window must be a uint8"):
        backend.hamming_window(random_bytes(8, device=device), randn(2, 8, device=device))
    with pytest.raises(ValueError, match="threshold must have one element"):
        backend.pack_mask(randn(8, device=device), randn(2, device=device))


def test_masked_adamw_step_rejects_bad_input_before_changing_anything(device):
    sizes = (65, 7)
    state = adamw_case(sizes, torch.float32, amsgrad=True, device=device)
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = state
    masks = packed_masks(sizes, "mixed", seed=2, device=device)
    before = clone_lists(state)
    hyperparameters = adamw_kwargs(amsgrad=True)

    def step(**changes):
        args = dict(
            params=params,
            grads=grads,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            max_exp_avg_sqs=max_exp_avg_sqs,
            state_steps=steps,
            masks=masks,
        )
        backend.masked_adamw_step_(**{**args, **hyperparameters, **changes})

    with pytest.raises(ValueError, match=r"masks\[1\] has 0 elements, expected 8"):
        step(masks=[masks[0], masks[1][:-8]])
    with pytest.raises(ValueError, match="amsgrad needs one max_exp_avg_sq per param"):
        step(max_exp_avg_sqs=[])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\] has 6 elements"):
        step(exp_avg_sqs=[exp_avg_sqs[0], exp_avg_sqs[1][:6]])
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] must be contiguous"):
        step(exp_avgs=[exp_avgs[0], torch.zeros(14, device=device)[::2]])
    with pytest.raises(TypeError, match=r"state_steps\[1\] must be float32"):
        step(state_steps=[steps[0], steps[1].double()])
    with pytest.raises(ValueError, match="as many grads, exp_avgs"):
        step(state_steps=steps[:1])
    with pytest.raises(ValueError, match="beta1 must be >= 0"):
        step(beta1=-0.5)
    for got, expected in zip(state, before):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def _opcheck(op, args, kwargs=None):
    result = torch.library.opcheck(op, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_mask_ops(device):
    values = randn(65, device=device)
    threshold = torch.tensor(0.5, device=device)
    packed = reference.pack_mask(values, threshold)
    _opcheck(torch.ops.worm_fast.triton_pack_mask.default, (values, threshold))
    _opcheck(torch.ops.worm_fast.triton_unpack_mask.default, (packed, 65))
    window = random_bytes(3, packed.numel(), device=device)
    _opcheck(torch.ops.worm_fast.triton_hamming_window.default, (packed, window))
    for lo in (torch.tensor([0], device=device), torch.tensor([0, 7], device=device)):
        _opcheck(
            torch.ops.worm_fast.triton_magnitude_histogram.default,
            ([values, randn(7, device=device)], lo, 19, 12, 2),
        )


def _scalars(found_inf, device):
    """lr_tensor, grad_scale, found_inf: positional in the triton ops' schemas."""
    return tuple(torch.tensor([x], device=device) for x in (0.05, 2.0, found_inf))


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_opcheck_masked_sgd_step(device, found_inf):
    case = sgd_case((65, 7), (torch.float32, torch.float64), "mixed", device=device)
    _opcheck(
        torch.ops.worm_fast.triton_masked_sgd_step_.default,
        (*case, *_scalars(found_inf, device)),
        sgd_kwargs(momentum=0.9, nesterov=True, weight_decay=1e-2),
    )


@pytest.mark.parametrize(("found_inf", "amsgrad"), [(0.0, True), (1.0, False)])
def test_opcheck_masked_adamw_step(device, found_inf, amsgrad):
    sizes, dtypes = (65, 7), (torch.float32, torch.float64)
    state = adamw_case(sizes, dtypes, amsgrad, device=device)
    masks = packed_masks(sizes, "mixed", seed=2, device=device)
    _opcheck(
        torch.ops.worm_fast.triton_masked_adamw_step_.default,
        (*state, masks, *_scalars(found_inf, device)),
        adamw_kwargs(amsgrad=amsgrad, weight_decay=1e-2, maximize=True),
    )


def _compile_backend() -> str:
    # Under the interpreter the ops stay opaque to AOT tracing (see ops.py); on a GPU
    # Inductor compiles through them.
    return "aot_eager" if os.environ.get("TRITON_INTERPRET") == "1" else "inductor"


def test_torch_compile_runs_the_ops(device):
    params, grads, buffers, masks = sgd_case((65, 4097), torch.float32, "random", device=device)
    hyperparameters = sgd_kwargs(momentum=0.9, weight_decay=1e-2)
    expected_params, expected_buffers = [p.clone() for p in params], [b.clone() for b in buffers]
    threshold = torch.tensor(0.5, device=device)

    @torch.compile(backend=_compile_backend(), fullgraph=True)
    def step_and_pack(params, grads, buffers):
        backend.masked_sgd_step_(params, grads, buffers, masks, **hyperparameters)
        return backend.pack_mask(params[1], threshold)

    packed = step_and_pack(params, grads, buffers)
    reference.masked_sgd_step_(expected_params, grads, expected_buffers, masks, **hyperparameters)
    for k, (got, expected) in enumerate(zip(params + buffers, expected_params + expected_buffers)):
        torch.testing.assert_close(
            got, expected, **kernel_tolerance("triton", got.dtype), msg=str(k)
        )
    assert torch.equal(packed, reference.pack_mask(params[1], threshold))


def test_torch_compile_runs_the_adamw_step(device):
    sizes = (65, 4097)
    hyperparameters = adamw_kwargs(amsgrad=True, weight_decay=1e-2)
    ours = adamw_case(sizes, torch.float32, amsgrad=True, device=device)
    theirs = clone_lists(ours)
    masks = packed_masks(sizes, "mixed", seed=2, device=device)

    @torch.compile(backend=_compile_backend(), fullgraph=True)
    def step(state):
        adamw_step(backend, state, masks, **hyperparameters)

    for _ in range(2):
        step(ours)
        adamw_step(reference, theirs, masks, **hyperparameters)
    assert_states_close("triton", ours, theirs, "compiled, after 2 steps")


# Compiling the kernels for a GPU needs no GPU: this proves that the compiled Triton
# frontend (stricter than the interpreter) and ptxas accept each kernel in each dtype,
# with every optional input present and absent.
_COMPILE_FOR_GPU = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from worm_fast.backends.triton import kernels

target = GPUTarget("cuda", 90, 32)

def compile(kernel, signature, constexprs):
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs)
    triton.compile(source, target=target)

compile(kernels._unpack_mask_kernel, {"packed_ptr": "*u8", "out_ptr": "*i1", "numel": "i64"},
        {"BLOCK": 2048})
compile(kernels._hamming_window_kernel, {"current_ptr": "*i64", "window_ptr": "*i64",
        "out_ptr": "*i64", "nwords": "i32", "rows": "i32", "row_stride": "i32"}, {"BLOCK": 1024})
bits = dict.fromkeys(["lr_bits", "weight_decay_bits", "momentum_bits",
                      "one_minus_dampening_bits", "truncation_bits"], "i64")
adamw_bits = dict.fromkeys(["step_index", "lr_bits", "decay_bits", "weight_decay_bits",
                            "one_minus_beta1_bits", "beta2_bits", "one_minus_beta2_bits",
                            "log_beta1_bits", "log_beta2_bits", "eps_bits", "truncation_bits"],
                           "i64")
infs = {"fp32": 0x7F800000, "fp64": 0x7FF0000000000000, "fp16": 0x7C00, "bf16": 0x7F80}
for dtype in ("fp32", "fp64", "fp16", "bf16"):
    for histogram_bits in (12, 18):  # per-program counts, and one atomic per key
        compile(kernels._magnitude_histogram_kernel,
                {"values_ptr": f"*{dtype}", "lo_ptr": "*i64", "counts_ptr": "*i64",
                 "numel": "i64", "shift": "i32", "stride": "i64"},
                {"INF": infs[dtype], "BITS": histogram_bits, "BLOCKS": 32})
    compile(kernels._pack_mask_kernel, {"values_ptr": f"*{dtype}", "threshold_ptr": "*fp32",
            "out_ptr": "*u8", "numel": "i32", "nbytes": "i32"}, {"BLOCK_BYTES": 256})
    tensors = dict(param_ptr=f"*{dtype}", grad_ptr=f"*{dtype}", buf_ptr=f"*{dtype}",
                   mask_ptr="*u8", lr_ptr="*fp32", grad_scale_ptr="*fp32",
                   found_inf_ptr="*fp32", truncation_ptr="*fp64", numel="i32")
    flags = dict(HAS_WEIGHT_DECAY=True, NESTEROV=True, MAXIMIZE=True, FIRST_STEP=False,
                 BLOCK=1024)
    compile(kernels._masked_sgd_step_kernel, {**tensors, **bits}, flags)
    absent = ("buf_ptr", "mask_ptr", "lr_ptr", "grad_scale_ptr", "found_inf_ptr",
              "truncation_ptr")
    compile(kernels._masked_sgd_step_kernel,
            {k: v for k, v in {**tensors, **bits}.items() if k not in absent},
            {**flags, **dict.fromkeys(absent), "FIRST_STEP": True})
    tensors = dict(param_ptr=f"*{dtype}", grad_ptr=f"*{dtype}", exp_avg_ptr=f"*{dtype}",
                   exp_avg_sq_ptr=f"*{dtype}", max_exp_avg_sq_ptr=f"*{dtype}", mask_ptr="*u8",
                   lr_ptr="*fp64", grad_scale_ptr="*fp32", found_inf_ptr="*fp32",
                   truncation_ptr="*fp64", old_steps_ptr="*fp32", step_ptr="*fp32",
                   numel="i32")
    for truncate_gradient in (False, True):
        flags = dict(HAS_WEIGHT_DECAY=True, MAXIMIZE=True, TRUNCATE_GRADIENT=truncate_gradient,
                     BLOCK=1024)
        compile(kernels._masked_adamw_step_kernel, {**tensors, **adamw_bits}, flags)
    absent = ("max_exp_avg_sq_ptr", "mask_ptr", "lr_ptr", "grad_scale_ptr", "found_inf_ptr",
              "truncation_ptr")
    compile(kernels._masked_adamw_step_kernel,
            {k: v for k, v in {**tensors, **adamw_bits}.items() if k not in absent},
            {**dict.fromkeys(absent), "HAS_WEIGHT_DECAY": False, "MAXIMIZE": False,
             "TRUNCATE_GRADIENT": False, "BLOCK": 1024})
"""


def test_kernels_compile_for_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_GPU],
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensors_on_gpu(dtype):
    device, size = "cuda", (1 << 22) + 3
    values = randn(size, dtype=dtype, device=device)
    threshold = torch.tensor(0.5, device=device)
    packed = backend.pack_mask(values, threshold)
    assert torch.equal(packed, reference.pack_mask(values, threshold))
    assert torch.equal(backend.unpack_mask(packed, size), reference.unpack_mask(packed, size))
    window = random_bytes(5, packed.numel(), device=device)
    assert torch.equal(
        backend.hamming_window(packed, window), reference.hamming_window(packed, window)
    )
    case = sgd_case((size,), dtype, "random", device=device)
    case[3][0] = packed
    hyperparameters = sgd_kwargs(momentum=0.9, nesterov=True)
    assert_matches_reference(backend, "triton", case, f"{dtype} large", **hyperparameters)
    ours = adamw_case((size,), dtype, amsgrad=True, device=device)
    theirs = clone_lists(ours)
    hyperparameters = adamw_kwargs(amsgrad=True, weight_decay=1e-2)
    adamw_step(backend, ours, [packed], **hyperparameters)
    adamw_step(reference, theirs, [packed], **hyperparameters)
    assert_states_close("triton", ours, theirs, f"{dtype} large")
