"""Helpers shared by the tests: tolerances, assertions, and the backends that run here."""

import torch

import worm_fast


def runnable_backends() -> list[tuple[str, str]]:
    """Every (backend, device type) pair that can run on this machine."""
    device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return [
        (name, device_type)
        for name, status in worm_fast.available().items()
        if status.available
        for device_type in device_types
        if status.device_types is None or device_type in status.device_types
    ]


# Imported by conftest after it set TRITON_INTERPRET (the Triton backend's status reads it).
RUNNABLE_BACKENDS = runnable_backends()

# Tolerances against an oracle, by parameter dtype: a few ulps of O(1) operands, since
# fused kernels round differently (FMA, order) and updates can cancel (g + wd * p).
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}

# Half-precision parameters against torch.optim.SGD: torch rounds every intermediate to
# the half type, worm_fast computes in fp32 and rounds once, so results differ by a few
# half-precision ulps of the operands (which are O(1) in the tests).
VS_TORCH_HALF_TOLERANCES = {
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}

ODD_SIZES = (1, 7, 8, 63, 64, 65, 4097)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "", **tol):
    """torch.testing.assert_close with the dtype's tolerance and the first mismatches shown."""
    tol = tol or TOLERANCES.get(expected.dtype, {})
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as error:
        a, e = actual.detach().reshape(-1).double(), expected.detach().reshape(-1).double()
        bad = (~torch.isclose(a, e, **tol)).nonzero().reshape(-1)[:8].tolist()
        rows = ", ".join(f"[{i}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in bad)
        raise AssertionError(f"{what}: {error}\nfirst mismatches: {rows}") from None
