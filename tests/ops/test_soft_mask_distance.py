"""worm_fast.ops.soft_mask_distance (WORM-gradient's mask distance) on every runnable
backend: the value and gradient against the reference on odd sizes and every dtype,
the reference's explicit backward against torch's autograd of its forward, gradcheck in
fp64, opcheck, and clear errors for bad input."""

import pytest
import torch

from tests.utils import ODD_SIZES, TOLERANCES, assert_close
from worm_fast import ops
from worm_fast.backends import reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Sums over thousands of terms, and gradients with a 1/tau factor: a few ulps of the
# compute dtype, relative to the largest value.
VALUE_TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=0), torch.float32: dict(rtol=2e-6, atol=0)}


def _inputs(sizes, dtype, device, *, rows=3, density=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(n, generator=generator).to(dtype).to(device) for n in sizes]
    nbytes = sum(ops.packed_nbytes(n) for n in sizes)
    if density is None:
        window = torch.randint(0, 256, (rows, nbytes), dtype=torch.uint8, generator=generator)
    else:  # every bit set (1.0) or none (0.0)
        window = torch.full((rows, nbytes), 255 if density else 0, dtype=torch.uint8)
    thresholds = torch.rand(len(sizes), generator=generator, dtype=torch.float64) + 0.2
    temperatures = torch.rand(len(sizes), generator=generator, dtype=torch.float64) * 0.3 + 0.02
    return values, window.to(device), thresholds.to(device), temperatures.to(device)


def _value_and_grads(backend, values, window, thresholds, temperatures):
    leaves = [v.detach().clone().requires_grad_() for v in values]
    distance = ops.soft_mask_distance(leaves, window, thresholds, temperatures, backend=backend)
    distance.backward()
    return distance.detach(), [leaf.grad for leaf in leaves]


def _check_against_reference(backend, inputs):
    dtype = inputs[0][0].dtype
    got, got_grads = _value_and_grads(backend, *inputs)
    want, want_grads = _value_and_grads("reference", *inputs)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, want, what="distance", **VALUE_TOLERANCE[got.dtype])
    scale = max(g.abs().max().item() for g in want_grads if g.numel()) or 1.0
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.dtype == dtype and g.shape == w.shape
        tolerance = TOLERANCES[dtype]
        assert_close(
            g.float() / scale,
            w.float() / scale,
            what=f"grad {k}",
            rtol=tolerance["rtol"],
            atol=max(tolerance["atol"], tolerance["rtol"]),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", ODD_SIZES)
def test_matches_reference_on_odd_sizes(backend_device, dtype, size):
    backend, device = backend_device
    _check_against_reference(backend, _inputs((size,), dtype, device, seed=size))


@pytest.mark.parametrize("density", (0.0, 1.0, None))
@pytest.mark.parametrize("rows", (1, 2, 5, 9))
def test_several_tensors_every_density_and_window_length(backend_device, density, rows):
    backend, device = backend_device
    inputs = _inputs((7, 65, 1, 130, 64), torch.float32, device, rows=rows, density=density)
    _check_against_reference(backend, inputs)


def test_a_tensor_without_elements_among_others(backend_device):
    backend, device = backend_device
    _check_against_reference(backend, _inputs((9, 0, 70), torch.float32, device))


def test_closed_form_for_a_window_of_identical_rows(backend_device):
    backend, device = backend_device
    values = torch.tensor([0.1, -2.0, 3.0, -0.4, 0.0], device=device)
    kept = values.abs() > 1.0
    window = ops.pack_mask(kept.float(), 0.5).to(device).expand(4, -1).contiguous()
    threshold, temperature = 1.0, 0.25
    soft = torch.sigmoid((values.abs() - threshold) / temperature)
    expected = (soft - kept.float()).abs().mean()
    got = ops.soft_mask_distance([values], window, [threshold], [temperature], backend=backend)
    assert_close(got.cpu(), expected.cpu(), what="distance")


def test_reference_backward_formula_equals_autograd_of_its_forward():
    values, window, thresholds, temperatures = _inputs((7, 65, 300), torch.float64, "cpu", rows=4)
    leaves = [v.clone().requires_grad_() for v in values]
    reference.soft_mask_distance(leaves, window, thresholds, temperatures).backward()
    formula = reference.soft_mask_distance_backward(
        torch.tensor(1.0, dtype=torch.float64), values, window, thresholds, temperatures
    )
    for leaf, grad in zip(leaves, formula):
        assert_close(grad, leaf.grad, what="explicit backward")


def test_gradcheck_fp64(backend_device):
    backend, device = backend_device
    values, window, thresholds, temperatures = _inputs((5, 70), torch.float64, device, rows=3)
    leaves = [v.clone().requires_grad_() for v in values]

    def distance(*tensors):
        return ops.soft_mask_distance(list(tensors), window, thresholds, temperatures,
                                      backend=backend)  # fmt: skip

    assert torch.autograd.gradcheck(distance, leaves, eps=1e-6, atol=1e-8)


def test_opcheck():
    values, window, thresholds, temperatures = _inputs((7, 65), torch.float64, "cpu")
    leaves = [v.clone().requires_grad_() for v in values]
    torch.library.opcheck(
        torch.ops.worm_fast.soft_mask_distance, (leaves, window, thresholds, temperatures)
    )
    grad = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.worm_fast.soft_mask_distance_backward,
        (grad, values, window, thresholds, temperatures),
    )


def test_opcheck_triton():
    pytest.importorskip("triton")
    from worm_fast.backends import triton as triton_backend

    if not triton_backend.status().available:
        pytest.skip(triton_backend.status().reason)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values, window, thresholds, temperatures = _inputs((7, 65), torch.float64, device)
    leaves = [v.clone().requires_grad_() for v in values]
    torch.library.opcheck(
        torch.ops.worm_fast.triton_soft_mask_distance, (leaves, window, thresholds, temperatures)
    )


def test_strided_values_and_constants_as_floats(backend_device):
    backend, device = backend_device
    matrix = torch.randn(9, 7, device=device)
    window = ops.pack_mask(matrix.t().contiguous(), 0.5).to(device)[None]
    got = ops.soft_mask_distance([matrix.t()], window, [0.5], [0.1], backend=backend)
    want = reference.soft_mask_distance(
        [matrix.t().contiguous()], window, torch.tensor([0.5]), torch.tensor([0.1])
    )
    assert_close(got.cpu(), want.cpu(), what="distance")


class TestBadInput:
    def setup_method(self):
        self.values, self.window, self.thresholds, self.temperatures = _inputs(
            (7, 65), torch.float32, "cpu"
        )

    def call(self, **changes):
        args = dict(values=self.values, window=self.window, thresholds=self.thresholds,
                    temperatures=self.temperatures)  # fmt: skip
        return ops.soft_mask_distance(**{**args, **changes})

    def test_no_values(self):
        with pytest.raises(ValueError, match="at least one tensor"):
            self.call(values=[])

    def test_integer_values(self):
        with pytest.raises(TypeError, match="floating point"):
            self.call(values=[torch.arange(7), torch.arange(65)])

    def test_mixed_dtypes(self):
        with pytest.raises(ValueError, match="one dtype and device"):
            self.call(values=[self.values[0].double(), self.values[1]])

    def test_window_of_the_wrong_width(self):
        with pytest.raises(ValueError, match=r"uint8 \[rows, 24\]"):
            self.call(window=self.window[:, :16])

    def test_empty_window(self):
        with pytest.raises(ValueError, match="no mask"):
            self.call(window=self.window[:0])

    def test_one_threshold_for_two_tensors(self):
        with pytest.raises(ValueError, match="thresholds must be 2 floats"):
            self.call(thresholds=torch.tensor([0.5]))

    def test_the_compiled_kernel_checks_too(self):
        with pytest.raises(RuntimeError, match="window rows have 16 bytes"):
            torch.ops.worm_fast.soft_mask_distance(
                self.values, self.window[:, :16].contiguous(), self.thresholds, self.temperatures
            )


def test_compiled_kernels_are_registered():
    from worm_fast import _C

    keys = ("CPU", "CUDA") if _C.WITH_CUDA else ("CPU",)
    for op in ("soft_mask_distance", "soft_mask_distance_backward"):
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"worm_fast::{op}", key), key
