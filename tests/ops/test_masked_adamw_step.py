"""masked_adamw_step_ on every runnable (backend, device) against the reference backend.

Several steps in a row over a list of every odd size, each tensor with a step count of
its own, for every dtype, every combination of amsgrad / weight decay / maximize, other
betas, masks of every kind (new ones each step), both truncation sites (the Adam update,
or the raw gradient), grad_scale, found_inf and lr_tensor;
and, without a mask, step for step against ``torch.optim.AdamW``. The Triton
interpreter is slow: it gets a representative subset (``tests.utils``).
"""

import itertools

import pytest
import torch

from tests.utils import (
    ADAMW_HYPERPARAMETERS,
    ADAMW_REPRESENTATIVE,
    ADAMW_STATES,
    DTYPES,
    MASK_KINDS,
    ODD_SIZES,
    adamw_case,
    adamw_cases,
    adamw_kwargs,
    adamw_step,
    assert_close,
    assert_lists_equal,
    clone_lists,
    describe,
    interpreted,
    kernel_tolerance,
    kernels_of,
    packed_masks,
    randn,
    random_bytes,
    skip_large_sizes_when_interpreted,
    skip_mask_kind_when_interpreted,
)
from worm_fast._ops import packed_nbytes
from worm_fast.backends import reference


def run(kernels, case, mask_kind, steps=1, **kwargs):
    """``steps`` steps of ``kernels`` on copies of ``case`` (lists of ``ADAMW_STATES``),
    with fresh grads from the second step on and masks of ``mask_kind`` drawn anew each
    step; returns the lists after them."""
    lists = clone_lists(case)
    sizes = [p.numel() for p in lists[0]]
    for i in range(steps):
        if i:
            lists[1] = [randn(g.shape, dtype=g.dtype, seed=100 * i + k, device=g.device)
                        for k, g in enumerate(lists[1])]  # fmt: skip
        masks = packed_masks(sizes, mask_kind, seed=i, device=lists[0][0].device)
        adamw_step(kernels, lists, masks, **kwargs)
    return lists


def assert_states_close(backend, got, expected, what):
    """The params and moments within ``backend``'s tolerance, the step counts equal."""
    for k in (0, 2, 3, 4):
        for i, (a, e) in enumerate(zip(got[k], expected[k])):
            assert a.dtype == e.dtype, f"{what}: {ADAMW_STATES[k]}[{i}] dtype"
            tol = kernel_tolerance(backend, a.dtype)
            assert_close(a, e, what=f"{what}: {ADAMW_STATES[k]}[{i}]", **tol)
    for i, (a, e) in enumerate(zip(got[5], expected[5])):
        assert a.dtype == torch.float32 and torch.equal(a, e), f"{what}: state_steps[{i}]"


def assert_matches_reference(kernels, backend, case, mask_kind, what, steps=3, **kwargs):
    got = run(kernels, case, mask_kind, steps, **kwargs)
    expected = run(reference, case, mask_kind, steps, **kwargs)
    assert_states_close(backend, got, expected, f"{what}, after {steps} steps")
    for i, a in enumerate(got[5]):
        assert a.item() == case[5][i].item() + steps, f"{what}: state_steps[{i}]"
    if steps == 1:
        assert_lists_equal(got[1], case[1], f"{what}: grads must not change")


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend_device, dtype, mask_kind):
    kernels = kernels_of(backend_device)
    skip_mask_kind_when_interpreted(backend_device, mask_kind)
    backend, device = backend_device
    for hp in adamw_cases(backend_device):
        kwargs = adamw_kwargs(**hp)
        case = adamw_case(ODD_SIZES, dtype, kwargs["amsgrad"], seed=len(mask_kind), device=device)
        what = f"{dtype} {mask_kind} {describe(hp)}"
        assert_matches_reference(kernels, backend, case, mask_kind, what, **kwargs)
        assert_matches_reference(
            kernels, backend, case, mask_kind, f"{what} one step", steps=1, **kwargs
        )


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_truncation_matches_reference(backend_device, dtype, mask_kind):
    # truncate="gradient": the raw gradient of pruned elements is scaled before the moments.
    kernels = kernels_of(backend_device)
    skip_mask_kind_when_interpreted(backend_device, mask_kind)
    backend, device = backend_device
    for hp in ADAMW_REPRESENTATIVE:
        kwargs = adamw_kwargs(**hp, truncate="gradient")
        case = adamw_case(ODD_SIZES, dtype, kwargs["amsgrad"], seed=len(mask_kind), device=device)
        what = f"{dtype} {mask_kind} {describe(hp)} truncate=gradient"
        assert_matches_reference(kernels, backend, case, mask_kind, what, **kwargs)


def test_truncation_sites_differ_only_on_pruned_elements(backend_device):
    # The reference (and every backend) changes pruned elements only: with every element
    # kept, or r = 1, the two sites give the same step, and with pruned elements they do
    # not. Guards against a backend that ignores `truncate`.
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    case = adamw_case(ODD_SIZES, torch.float64, amsgrad=False, seed=23, device=device)
    sizes = [p.numel() for p in case[0]]
    outcomes = {}
    for mask_kind, r in (("all_kept", 3e-3), ("random", 1.0), ("random", 3e-3)):
        masks = packed_masks(sizes, mask_kind, seed=1, device=device)
        for truncate in ("update", "gradient"):
            lists = clone_lists(case)
            for _ in range(2):
                adamw_step(kernels, lists, masks, **adamw_kwargs(truncation=r, truncate=truncate))
            outcomes[mask_kind, r, truncate] = lists
    for mask_kind, r in (("all_kept", 3e-3), ("random", 1.0)):
        for name, a, b in zip(ADAMW_STATES, outcomes[mask_kind, r, "update"],
                              outcomes[mask_kind, r, "gradient"]):  # fmt: skip
            assert_lists_equal(a, b, f"{mask_kind} r={r}: {name}")
    update, gradient = outcomes["random", 3e-3, "update"], outcomes["random", 3e-3, "gradient"]
    assert not torch.equal(torch.cat(update[2]), torch.cat(gradient[2])), "exp_avg"
    assert not torch.equal(torch.cat(update[0]), torch.cat(gradient[0])), "params"


def test_bad_truncate_is_refused_before_anything_changes(backend_device):
    kernels = kernels_of(backend_device)
    case = adamw_case((7, 65), torch.float32, amsgrad=False, seed=29, device=backend_device[1])
    lists = clone_lists(case)
    with pytest.raises((ValueError, RuntimeError), match="truncate"):
        adamw_step(kernels, lists, [], **adamw_kwargs(truncate="weights"))
    for name, a, b in zip(ADAMW_STATES, lists, case):
        assert_lists_equal(a, b, f"after a refused step: {name}")


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_multi_tensor_list(backend_device, dtype):
    # Past the C++ serial threshold, with tensors that straddle its 16384-element work
    # items and many GPU blocks.
    skip_large_sizes_when_interpreted(backend_device)
    kernels = kernels_of(backend_device)
    sizes = (100_003, 16_384, 16_385, 1, 40_000, 64, 65, 0)
    for amsgrad in (False, True):
        case = adamw_case(sizes, dtype, amsgrad, seed=7, device=backend_device[1])
        kwargs = adamw_kwargs(amsgrad=amsgrad, weight_decay=5e-4)
        assert_matches_reference(
            kernels, backend_device[0], case, "mixed", f"{dtype} large", **kwargs
        )


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("scalars", ["grad_scale", "lr_tensor", "both", "truncation_tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_scalars(backend_device, dtype, scalars):
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    case = adamw_case(ODD_SIZES, dtype, amsgrad=True, seed=11, device=device)
    hp = dict(amsgrad=True, weight_decay=1e-2, maximize=True)
    tensors = {}
    if scalars in ("grad_scale", "both"):
        tensors["grad_scale"] = torch.tensor(1024.0, device=device)
        case[1] = [(g.float() * 1024).to(dtype) for g in case[1]]
    if scalars in ("lr_tensor", "both"):  # overrides the float lr; fp64 or fp32
        lr_dtype = torch.float64 if scalars == "lr_tensor" else torch.float32
        tensors["lr_tensor"] = torch.tensor(0.05, dtype=lr_dtype, device=device)
        hp["lr"] = 123.0
    if scalars == "truncation_tensor":  # overrides the float r, at both truncation sites
        tensors["truncation_tensor"] = torch.tensor([3e-3], dtype=torch.float64, device=device)
        hp["truncation"] = 1.0
    what = f"{dtype} {scalars}"
    for truncate in ("update", "gradient") if "truncation_tensor" in tensors else ("update",):
        kwargs = adamw_kwargs(**hp, **tensors, truncate=truncate)
        for steps in (1, 2):  # one: the grads stay as they were
            assert_matches_reference(kernels, backend, case, "random", what, steps=steps, **kwargs)
        for name, float_name in (("lr_tensor", "lr"), ("truncation_tensor", "truncation")):
            if name in tensors:  # the same numbers as the float it replaces
                with_tensor = run(kernels, case, "random", **kwargs)
                value = tensors[name].item()  # rounded to the tensor's dtype
                plain = {key: v for key, v in kwargs.items() if key != name}
                with_float = run(kernels, case, "random", **dict(plain, **{float_name: value}))
                for state, a, b in zip(ADAMW_STATES, with_tensor, with_float):
                    assert_lists_equal(a, b, f"{what}: {state} with {name} vs float {float_name}")


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_found_inf_changes_nothing(backend_device, dtype):
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    case = adamw_case(ODD_SIZES, dtype, amsgrad=True, seed=13, device=device)
    hp = dict(amsgrad=True, weight_decay=1e-2)
    skip = torch.tensor([1.0], device=device)
    skipped = run(kernels, case, "mixed", found_inf=skip,
                  **adamw_kwargs(**hp, grad_scale=torch.tensor(2.0, device=device)))  # fmt: skip
    for name, before, after in zip(ADAMW_STATES, case, skipped):  # the step counts too
        assert_lists_equal(after, before, f"{dtype} found_inf=1: {name}")
    finite = torch.tensor(0.0, device=device)
    ran = run(kernels, case, "mixed", **adamw_kwargs(**hp, found_inf=finite))
    plain = run(kernels, case, "mixed", **adamw_kwargs(**hp))
    for name, a, b in zip(ADAMW_STATES, ran, plain):
        assert_lists_equal(a, b, f"{dtype} found_inf=0 vs none: {name}")
    assert_matches_reference(
        kernels,
        backend,
        case,
        "mixed",
        f"{dtype} found_inf=0",
        **adamw_kwargs(**hp, found_inf=finite),
    )


@pytest.mark.compares_with_reference
def test_trajectory_with_mixed_dtypes(backend_device):
    # One call over every dtype: each tensor gets the bias corrections of its own dtype.
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    sizes = (65, 7, 4097, 1)
    ours = adamw_case(sizes, DTYPES, amsgrad=True, device=device)
    theirs = clone_lists(ours)
    kwargs = adamw_kwargs(amsgrad=True, weight_decay=1e-2)
    for i in range(3):
        grads = [randn(n, dtype=d, seed=10 * i + k, device=device) for k, (n, d) in
                 enumerate(zip(sizes, DTYPES))]  # fmt: skip
        ours[1] = theirs[1] = grads
        threshold = torch.tensor(0.2 * i, device=device)
        masks = [reference.pack_mask(g, threshold) for g in grads]  # a new mask each step
        adamw_step(kernels, ours, masks, **kwargs)
        adamw_step(reference, theirs, masks, **kwargs)
    assert_states_close(backend, ours, theirs, "after 3 steps")


@pytest.mark.compares_with_reference
def test_other_betas_truncations_and_strided_grads_and_masks(backend_device):
    # beta1 < 0.5 takes torch's other lerp formula; r = 0 freezes the Adam update (or
    # zeroes the gradient) of pruned elements; grads and masks may be strided views.
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    params = [randn(6, 11, seed=1, device=device), randn(130, seed=2, device=device)]
    grads = [randn(11, 6, seed=3, device=device).t(), randn(260, seed=4, device=device)[::2]]
    assert not any(g.is_contiguous() for g in grads)
    masks = [random_bytes(2 * packed_nbytes(66), seed=5, device=device)[::2],
             random_bytes(24, seed=6, device=device)]  # fmt: skip
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(0.0, device=device), torch.tensor(41.0, device=device)]
    for beta1, beta2 in ((0.9, 0.999), (0.3, 0.5), (0.0, 0.0)):
        for r, truncate in itertools.product((0.0, 3e-3, 0.5, 1.0), ("update", "gradient")):
            kwargs = adamw_kwargs(amsgrad=True, weight_decay=0.1, beta1=beta1, beta2=beta2,
                                  truncation=r, eps=1e-6, truncate=truncate)  # fmt: skip
            # Fresh copies of the state; the strided grads themselves (steps leave them).
            ours, theirs = ([*clone_lists([params]), grads, *clone_lists([*states, steps])]
                            for _ in range(2))  # fmt: skip
            for _ in range(3):
                adamw_step(kernels, ours, masks, **kwargs)
                adamw_step(reference, theirs, masks, **kwargs)
            what = f"betas {beta1} {beta2} r={r} truncate={truncate}, after 3 steps"
            assert_states_close(backend_device[0], ours, theirs, what)


def test_r_one_equals_no_mask(backend_device):
    kernels = kernels_of(backend_device)
    case = adamw_case(ODD_SIZES, torch.float32, amsgrad=True, seed=19, device=backend_device[1])
    hp = dict(amsgrad=True, weight_decay=1e-2)
    masked = run(kernels, case, "random", **adamw_kwargs(**hp, truncation=1.0))
    plain = run(kernels, case, "no_masks", **adamw_kwargs(**hp))
    for name, a, b in zip(ADAMW_STATES, masked, plain):
        assert_lists_equal(a, b, name)


@pytest.mark.compares_with_reference
def test_empty_lists_and_empty_tensors(backend_device):
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    kwargs = adamw_kwargs(weight_decay=1e-2)
    kernels.masked_adamw_step_([], [], [], [], [], [], [], **kwargs)
    case = adamw_case((0, 65), torch.float32, amsgrad=False, device=device)  # steps 0 and 7
    masks = packed_masks((0, 65), "mixed", seed=1, device=device)  # a 0-byte mask, and none
    adamw_step(kernels, case, masks, found_inf=torch.tensor([1.0], device=device), **kwargs)
    assert [float(s) for s in case[5]] == [0.0, 7.0]
    # The empty tensor's step count advances too, as in torch.optim.AdamW.
    for step_masks in ([], masks):
        ours, theirs = clone_lists(case), clone_lists(case)
        adamw_step(kernels, ours, step_masks, **kwargs)
        adamw_step(reference, theirs, step_masks, **kwargs)
        assert_states_close(backend, ours, theirs, f"empty tensor, masks {step_masks}")
        assert [s.item() for s in ours[5]] == [1.0, 8.0]


# Step for step against torch.optim.AdamW (no mask, state from zero). On x86-64 (torch's
# AVX2 / AVX-512 loops, whose lerp and addcmul are FMAs as ours are) the C++ kernels'
# moments are bit for bit torch's, and so are the parameters, but for the few elements in
# a thousand where torch's CPU sqrt (MKL's vector sqrt) is an ulp off and ours is
# correctly rounded.
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_matches_torch_adamw(backend_device, dtype):
    if interpreted(backend_device):
        pytest.skip("tests/optim/test_adamw.py compares the interpreted kernels with torch")
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    sizes = (*ODD_SIZES, 50_000)
    bitwise = backend == "cpp" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    # Our kernels take IEEE square roots; torch's CPU sqrt is IEEE-exact on some machines
    # only (MKL's vsSqrt is not on AMD CPUs), so parameters agree bit for bit only there.
    params_bitwise = bitwise and _torch_sqrt_is_correctly_rounded()
    for hp in ADAMW_HYPERPARAMETERS:
        ours = [randn(n, dtype=dtype, seed=i, device=device) for i, n in enumerate(sizes)]
        theirs = [torch.nn.Parameter(p.clone()) for p in ours]
        states = [[torch.zeros_like(p) for p in ours] for _ in range(3)]
        steps = [torch.tensor(0.0, device=device) for _ in ours]
        optimizer = torch.optim.AdamW(theirs, lr=0.01, foreach=False, **hp)
        for i in range(5):
            grads = [randn(n, dtype=dtype, seed=100 * i + k, device=device)
                     for k, n in enumerate(sizes)]  # fmt: skip
            for p, g in zip(theirs, grads):
                p.grad = g.clone()
            optimizer.step()
            kernels.masked_adamw_step_(
                ours, grads, states[0], states[1], states[2] if hp["amsgrad"] else [], steps, [],
                **adamw_kwargs(**hp, truncation=1.0),
            )  # fmt: skip
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())
        differing = 0
        for k, (a, b) in enumerate(zip(ours, theirs)):
            state, what = optimizer.state[b], f"{describe(hp)}: {{}}[{k}] after 5 steps"
            assert_close(a, b.detach(), what=what.format("params"))
            for s, key in enumerate(keys):
                assert_close(states[s][k], state[key], what=what.format(key))
                assert not bitwise or torch.equal(states[s][k], state[key]), what.format(key)
            assert steps[k].item() == state["step"].item() == 5.0
            differing += (a != b.detach()).sum().item()
        assert not params_bitwise or differing <= 0.005 * sum(sizes), differing


def _torch_sqrt_is_correctly_rounded() -> bool:
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    exact = x.double().sqrt().float()  # double rounding is exact for sqrt of floats
    return torch.equal(x.sqrt(), exact)
