"""Test-wide setup.

* Triton runs on CPU tensors in its interpreter when no GPU is present; the variable must
  be set before triton is first imported, so it is set here.
* Under pytest-xdist the workers share the cores: each gets its share of torch threads,
  since oversubscribed OpenMP threads spin and make every test several times slower
  (``OMP_NUM_THREADS``, when set, wins).
* ``backend_device``: every (backend, device type) pair that ``worm_fast.available()``
  reports as runnable here, so that each op test runs every kernel that can run — the
  CUDA and Triton kernels included, the day a GPU is present. A test marked
  ``compares_with_reference`` gets every pair but the reference's own: compared with
  itself, the oracle could not fail.
* Every test that runs on CUDA tensors (a ``backend_device`` or ``device`` parameter of
  "cuda") is marked ``gpu``, so that ``make gpu-check`` can select them (``-m gpu``);
  without a GPU there are none.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(
    int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // _workers)
)

from tests.utils import RUNNABLE_BACKENDS  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_generate_tests(metafunc):
    """``backend_device``: ``(backend name, device type)``, e.g. ``("cpp", "cpu")``."""
    if "backend_device" not in metafunc.fixturenames:
        return
    pairs = RUNNABLE_BACKENDS
    if metafunc.definition.get_closest_marker("compares_with_reference"):
        pairs = [pair for pair in pairs if pair[0] != "reference"]
    metafunc.parametrize("backend_device", pairs, ids=[f"{b}-{d}" for b, d in pairs])


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        backend_device = params.get("backend_device", (None, None))
        if "cuda" in (backend_device[1], params.get("device")):
            item.add_marker(pytest.mark.gpu)
