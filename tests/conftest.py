"""Test-wide setup. Triton runs on CPU tensors in its interpreter when no GPU is present;
the variable must be set before triton is first imported, so it is set here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
