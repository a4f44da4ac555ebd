"""Assertion helpers shared by the tests."""

import torch

# Tolerances for comparing a backend or optimizer against its oracle, by parameter dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=2e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
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
