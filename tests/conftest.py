"""Test-wide setup.

* Triton runs on CPU tensors in its interpreter when no GPU is present; the variable must
  be set before triton is first imported, so it is set here.
* Under pytest-xdist the workers share the cores: each gets its share of torch threads,
  since oversubscribed OpenMP threads spin and make every test several times slower.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
