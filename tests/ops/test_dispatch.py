"""The public ops (``worm_fast.ops``): opcheck of the registered ops on every device that
runs here, clear errors for bad input before any kernel runs, and the choice of backend.
Each op's kernels are tested on every backend in ``test_<op>.py``."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import DEVICE_TYPES, randn, random_bytes
from worm_fast import backends, ops


@pytest.mark.parametrize("device", DEVICE_TYPES)
@pytest.mark.parametrize(
    "op, args",
    [
        ("pack_mask", lambda d: (randn(65, device=d), torch.tensor(0.5, device=d))),
        ("unpack_mask", lambda d: (random_bytes(16, device=d), 65)),
        ("hamming_window", lambda d: (random_bytes(16, device=d), random_bytes(3, 16, device=d))),
    ],
)  # fmt: skip
def test_opcheck(op, args, device):
    torch.library.opcheck(getattr(torch.ops.worm_fast, op), args(device))


@pytest.mark.parametrize("device", DEVICE_TYPES)
@pytest.mark.parametrize("r_as", ["float", "tensor"])
def test_opcheck_optimizer_steps(device, r_as):
    params = [randn(n, seed=n, device=device) for n in (7, 65)]
    grads = [randn(n, seed=n + 1, device=device) for n in (7, 65)]
    masks = [ops.pack_mask(p, 0.5) for p in params]
    r = dict(truncation=0.1)
    if r_as == "tensor":  # as the optimizers pass it (torch.compile takes it as an input)
        r = dict(truncation=1.0, truncation_tensor=torch.tensor([0.1], device=device))
    torch.library.opcheck(
        torch.ops.worm_fast.masked_sgd_step_,
        ([p.clone() for p in params], grads, [torch.zeros_like(p) for p in params], masks),
        dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=False,
             maximize=False, is_first_step=True, **r),
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.worm_fast.masked_adamw_step_,
        ([p.clone() for p in params], grads, [torch.zeros_like(p) for p in params],
         [torch.zeros_like(p) for p in params], [], [p.new_zeros(()) for p in params], masks),
        dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False,
             maximize=False, **r),
    )  # fmt: skip


class TestBadInput:
    def test_pack_rejects_integer_values(self):
        with pytest.raises(TypeError, match="floating point or bool"):
            ops.pack_mask(torch.arange(5), 1)

    def test_pack_rejects_a_tensor_threshold_of_many_values(self):
        with pytest.raises(ValueError, match="threshold must be a scalar"):
            ops.pack_mask(randn(5), torch.ones(2))

    def test_unpack_rejects_the_wrong_length(self):
        with pytest.raises(ValueError, match="packed mask of 16 bytes for 65 elements"):
            ops.unpack_mask(torch.zeros(8, dtype=torch.uint8), 65)

    def test_hamming_rejects_mismatched_widths(self):
        with pytest.raises(ValueError, match=r"window \[l, nbytes\]"):
            ops.hamming_window(
                torch.zeros(8, dtype=torch.uint8), torch.zeros(2, 16, dtype=torch.uint8)
            )

    def test_hamming_rejects_float_masks(self):
        with pytest.raises(TypeError, match="must be uint8"):
            ops.hamming_window(torch.zeros(8), torch.zeros(2, 8))

    def test_forcing_an_unavailable_backend_says_why(self, monkeypatch):
        monkeypatch.setenv(backends.ENV_VAR, "cuda")
        with pytest.raises(RuntimeError, match="backend 'cuda'"):
            ops.pack_mask(randn(5), 0.5)

    def test_environment_variable_forces_a_backend(self, monkeypatch):
        monkeypatch.setenv(backends.ENV_VAR, "reference")
        assert backends.resolve(None, torch.device("cpu")).__name__.endswith("reference")
        assert backends.resolve("cpp", torch.device("cpu")).__name__.endswith("cpp")


def test_auto_picks_cpp_on_cpu_and_reference_elsewhere():
    assert backends.resolve(None, torch.device("cpu")).__name__.endswith(".cpp")
    assert backends.resolve(None, torch.device("meta")).__name__.endswith(".reference")
    status = backends.available()
    assert status["reference"].available and status["cpp"].available, status["cpp"].reason


def test_without_triton_the_triton_backend_says_why_and_the_others_run():
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton raises ImportError\n"
        "import torch, worm_fast\n"
        "from worm_fast.backends import triton\n"
        "status = worm_fast.available()['triton']\n"
        "assert not status.available and 'triton is not installed' in status.reason, status\n"
        "try:\n"
        "    triton.pack_mask(torch.ones(3), torch.tensor(0.5))\n"
        "except RuntimeError as error:\n"
        "    assert 'the triton backend is not available' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "assert worm_fast.ops.pack_mask(torch.ones(3), 0.5).tolist()[0] == 7\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
