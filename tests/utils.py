"""Helpers shared by the tests: the backends that run here, builders of tensors, packed
masks and optimizer cases, tolerances and assertions.

Every builder takes a ``device``, so one test runs each (backend, device type) pair of
the ``backend_device`` fixture (``conftest.py``) on that pair's tensors.
"""

import itertools
import os
from types import ModuleType

import pytest
import torch

import worm_fast
from worm_fast import backends
from worm_fast._ops import packed_nbytes


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
DEVICE_TYPES = tuple(sorted({device for _, device in RUNNABLE_BACKENDS}))

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ODD_SIZES = (1, 7, 8, 63, 64, 65, 4097)


def kernels_of(backend_device: tuple[str, str]) -> ModuleType:
    """The backend module of a ``backend_device`` pair; its functions have the signatures
    of ``backends.reference`` (the oracle)."""
    name, device_type = backend_device
    return backends.resolve(name, torch.device(device_type))


def interpreted(backend_device: tuple[str, str]) -> bool:
    """Triton kernels run in the interpreter (no GPU): ~10 ms per program, so their
    tests take the representative subsets below instead of full products."""
    return backend_device[0] == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def skip_mask_kind_when_interpreted(backend_device: tuple[str, str], mask_kind: str) -> None:
    if interpreted(backend_device) and mask_kind != "mixed":
        pytest.skip("the interpreter runs the mixed masks, which hold every other kind")


def skip_large_sizes_when_interpreted(backend_device: tuple[str, str]) -> None:
    if interpreted(backend_device):
        pytest.skip(
            "the interpreter runs the same Triton code at the odd sizes; large sizes run "
            "compiled on a GPU"
        )


# --------------------------------------------------------------------------- tensors


def generator(seed: int) -> torch.Generator:
    """A seeded CPU generator: every builder draws on the CPU, then moves the values."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, device="cpu") -> torch.Tensor:
    """Standard normal values, drawn on the CPU (the same values on every device)."""
    values = torch.randn(*shape, generator=generator(seed), device="cpu")
    return values.to(dtype=dtype, device=device)


def random_bytes(*shape, seed=0, device="cpu") -> torch.Tensor:
    """Uniform uint8 values: random packed masks."""
    bytes_ = torch.randint(
        0, 256, shape, generator=generator(seed), dtype=torch.uint8, device="cpu"
    )
    return bytes_.to(device)


# Thresholds giving masks of 0 %, random and 100 % density (|x| > -1 always holds).
DENSITY_THRESHOLDS = {"none_kept": float("inf"), "random": 0.5, "all_kept": -1.0}
# Masks of a multi-tensor step: none at all, one per tensor of a density, or "mixed":
# no mask, 0 %, random and 100 % in turn (a list may mix masked and unmasked tensors).
MASK_KINDS = ("no_masks", "none_kept", "all_kept", "random", "mixed")
_MIXED = ("no_mask", "none_kept", "random", "all_kept")


def packed_masks(sizes, kind: str, seed=0, device="cpu") -> list[torch.Tensor | None]:
    """One packed mask per size, of ``kind`` (``MASK_KINDS``); ``seed`` also rotates the
    kinds of a "mixed" list, so successive steps mask each tensor differently.

    All-kept masks have their padding bits set too: kernels must ignore them.
    """
    if kind == "no_masks":
        return []
    kinds = [kind] * len(sizes)
    if kind == "mixed":
        kinds = [_MIXED[(seed + i) % len(_MIXED)] for i in range(len(sizes))]
    masks = []
    for i, (size, mask_kind) in enumerate(zip(sizes, kinds)):
        nbytes = packed_nbytes(size)
        if mask_kind == "no_mask":
            masks.append(None)
        elif mask_kind == "none_kept":
            masks.append(torch.zeros(nbytes, dtype=torch.uint8, device=device))
        elif mask_kind == "all_kept":
            masks.append(torch.full((nbytes,), 255, dtype=torch.uint8, device=device))
        elif mask_kind == "random":
            masks.append(random_bytes(nbytes, seed=seed + i, device=device))
        else:
            raise ValueError(f"unknown mask kind {mask_kind!r}; expected one of {MASK_KINDS}")
    return masks


def _per_tensor(dtypes, sizes) -> list[torch.dtype]:
    return list(dtypes) if isinstance(dtypes, (list, tuple)) else [dtypes] * len(sizes)


# ---------------------------------------------------------------- masked_sgd_step_


def sgd_case(sizes, dtypes, mask_kind: str, seed=0, device="cpu"):
    """``(params, grads, momentum_buffers, masks)`` for one ``masked_sgd_step_`` call;
    ``dtypes`` is one dtype or one per tensor."""
    dtypes = _per_tensor(dtypes, sizes)
    params, grads, buffers = (
        [randn(n, dtype=d, seed=seed + 3 * i + k, device=device) for i, (n, d) in
         enumerate(zip(sizes, dtypes))]
        for k in range(3)
    )  # fmt: skip
    return params, grads, buffers, packed_masks(sizes, mask_kind, seed, device)


def sgd_kwargs(**overrides) -> dict:
    """Every hyperparameter of ``masked_sgd_step_``: plain SGD, r = 3e-3, with overrides."""
    defaults = dict(
        lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
        maximize=False, is_first_step=False, truncation=3e-3,
    )  # fmt: skip
    return {**defaults, **overrides}


# Every combination of momentum / dampening / nesterov / weight decay / maximize (the
# kernels accept nesterov without momentum, which torch's SGD refuses).
SGD_HYPERPARAMETERS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product(
        (0.0, 0.9), (0.0, 0.25), (False, True), (0.0, 1e-2), (False, True)
    )
]
# The combinations torch.optim.SGD accepts (nesterov needs momentum and no dampening).
TORCH_SGD_HYPERPARAMETERS = [
    hp
    for hp in SGD_HYPERPARAMETERS
    if not (hp["nesterov"] and (hp["momentum"] == 0 or hp["dampening"]))
]
# A representative subset of the product with both first-step values: every flag both
# ways, and each with and without momentum's other terms.
SGD_REPRESENTATIVE = [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=1e-2, maximize=True),
    dict(momentum=0.9, is_first_step=True),
    dict(momentum=0.9, dampening=0.1, weight_decay=5e-4),
    dict(momentum=0.9, dampening=0.1, is_first_step=True, maximize=True),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, nesterov=True, is_first_step=True, maximize=True, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.5, maximize=True),
]


def sgd_cases(backend_device) -> list[dict]:
    """The SGD hyperparameter sets (``sgd_kwargs`` overrides) to test a backend on: the
    whole product with both first-step values, or the subset when interpreted."""
    if interpreted(backend_device):
        return SGD_REPRESENTATIVE
    return [dict(hp, is_first_step=first) for hp in SGD_HYPERPARAMETERS for first in (False, True)]


def describe(hp: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in hp.items())


# ---------------------------------------------------------------- masked_adamw_step_

ADAMW_STATES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


def adamw_case(sizes, dtypes, amsgrad: bool, seed=0, device="cpu") -> list[list[torch.Tensor]]:
    """The lists of one ``masked_adamw_step_`` call but the masks (``ADAMW_STATES``):
    mid-training moments, and a step count of its own per tensor (0, 7, 14, ...), so
    that a mixed-up count shows in the bias corrections."""
    dtypes = _per_tensor(dtypes, sizes)
    rng = [generator(seed + 7 * i) for i in range(len(sizes))]

    def draw(scale=1.0, shift=0.0, uniform=False):
        sample = torch.rand if uniform else torch.randn
        return [
            (shift + scale * sample(n, generator=g, device="cpu")).to(dtype=d, device=device)
            for n, d, g in zip(sizes, dtypes, rng)
        ]

    params, grads, exp_avgs = draw(), draw(), draw(0.1)
    exp_avg_sqs = draw(1.0, 0.05, uniform=True)
    # Larger or smaller than the new second moment, element by element.
    max_exp_avg_sqs = draw(1.5, 0.05, uniform=True) if amsgrad else []
    steps = [torch.tensor(float(7 * i), device=device) for i in range(len(sizes))]
    return [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps]


def adamw_kwargs(**overrides) -> dict:
    """Every hyperparameter of ``masked_adamw_step_``: AdamW's defaults, lr 0.01,
    r = 3e-3, with overrides."""
    defaults = dict(
        lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
        maximize=False, truncation=3e-3,
    )  # fmt: skip
    return {**defaults, **overrides}


ADAMW_HYPERPARAMETERS = [
    dict(amsgrad=ams, weight_decay=wd, maximize=mx)
    for ams, wd, mx in itertools.product((False, True), (0.0, 1e-2), (False, True))
]
# Other betas: 1 - beta1 >= 0.5 takes torch.lerp's second formula.
ADAMW_BETAS = [
    dict(maximize=True, weight_decay=0.1, beta1=0.3, beta2=0.9, eps=1e-6),
    dict(amsgrad=True, beta1=0.5, beta2=0.5, lr=1e-3),
]
# A representative subset: every flag both ways, and both kinds of betas.
ADAMW_REPRESENTATIVE = [
    dict(),
    dict(weight_decay=1e-2),
    dict(amsgrad=True),
    dict(amsgrad=True, weight_decay=1e-2, maximize=True),
    *ADAMW_BETAS,
]


def adamw_cases(backend_device) -> list[dict]:
    """The AdamW hyperparameter sets (``adamw_kwargs`` overrides) to test a backend on."""
    if interpreted(backend_device):
        return ADAMW_REPRESENTATIVE
    return ADAMW_HYPERPARAMETERS + ADAMW_BETAS


def adamw_step(module, state, masks, **kwargs) -> None:
    """One ``module.masked_adamw_step_`` over the lists of ``adamw_case``, in place."""
    module.masked_adamw_step_(*state, masks, **kwargs)


def clone_lists(lists):
    return [[t.clone() for t in tensors] for tensors in lists]


# ------------------------------------------------------------ optimizers (optim/ tests)


def make_params(sizes, dtype, seed=0, device="cpu") -> list[torch.nn.Parameter]:
    gen = generator(seed)
    return [
        torch.nn.Parameter(
            torch.randn(n, generator=gen, dtype=torch.float64, device="cpu").to(
                dtype=dtype, device=device
            )
        )
        for n in sizes
    ]


def fill_grads(params, step, seed=0) -> None:
    """Gradients of step ``step``: the same values for any parameters of the same shapes."""
    gen = generator(seed * 1000 + step)
    for p in params:
        grad = torch.randn(p.shape, generator=gen, dtype=torch.float64, device="cpu")
        p.grad = grad.to(dtype=p.dtype, device=p.device)


def random_bool_masks(params, density, seed=0) -> dict:
    gen = generator(seed)
    return {
        p: (torch.rand(p.shape, generator=gen, device="cpu") < density).to(p.device) for p in params
    }


def run_steps(optimizer, params, steps=4, seed=0) -> None:
    for step in range(steps):
        fill_grads(params, step, seed)
        optimizer.step()


# ------------------------------------------------------------ tolerances and assertions

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

# Backends whose optimizer kernels round like torch.optim (add(alpha=) as one FMA); the
# reference rounds every product separately.
_ROUND_LIKE_TORCH = ("cpp", "cuda")


def kernel_tolerance(backend: str, dtype: torch.dtype) -> dict:
    """A backend's tolerance against the reference's optimizer step. Near cancellation a
    kernel that rounds like torch differs from the reference by an ulp of the operands
    rather than of the result, so it is allowed a few ulps of O(1) values absolutely."""
    tol = dict(TOLERANCES[dtype])
    if backend in _ROUND_LIKE_TORCH:
        tol["atol"] = max(tol["atol"], 8 * torch.finfo(dtype).eps)
    return tol


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


def assert_lists_equal(actual, expected, what: str = "") -> None:
    """Bit for bit, tensor by tensor."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{what}: tensor {i} differs"


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` for the test; the returned list gets a 1 per call."""
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls
