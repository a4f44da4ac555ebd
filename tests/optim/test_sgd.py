"""WormSGD against torch.optim.SGD (no mask) and the reference backend (with masks), on
every runnable (backend, device) where the test is about the step's numbers."""

import copy
import io
import itertools

import pytest
import torch

from tests.utils import (
    DTYPES,
    ODD_SIZES,
    TORCH_SGD_HYPERPARAMETERS,
    VS_TORCH_HALF_TOLERANCES,
    assert_close,
    fill_grads,
    interpreted,
    make_params,
    random_bool_masks,
    run_steps,
)
from worm_fast import WormSGD, ops

# Every valid combination of torch SGD's hyperparameters.
HYPERPARAMETERS = TORCH_SGD_HYPERPARAMETERS


def assert_same_state(actual_opt, actual, expected_opt, expected, what, **tol):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a.detach(), e.detach(), what=f"{what}: param {i}", **tol)
        buf_a = actual_opt.state[a].get("momentum_buffer")
        buf_e = expected_opt.state[e].get("momentum_buffer")
        assert (buf_a is None) == (buf_e is None), f"{what}: momentum buffer {i} presence"
        if buf_e is not None:
            assert buf_a.dtype == buf_e.dtype
            assert_close(buf_a, buf_e, what=f"{what}: momentum buffer {i}", **tol)


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=lambda hp: "-".join(map(str, hp.values())))
def test_matches_torch_sgd_without_mask(backend_device, hp):
    backend, device = backend_device
    dtypes = (torch.float32, torch.bfloat16) if interpreted(backend_device) else DTYPES
    for dtype in dtypes:
        ours, theirs = (
            make_params(ODD_SIZES, dtype, device=device),
            make_params(ODD_SIZES, dtype, device=device),
        )
        opt = WormSGD(ours, lr=0.05, backend=backend, **hp)
        ref = torch.optim.SGD(theirs, lr=0.05, foreach=False, **hp)
        run_steps(opt, ours, steps=3)
        run_steps(ref, theirs, steps=3)
        tol = VS_TORCH_HALF_TOLERANCES.get(dtype, {})
        assert_same_state(opt, ours, ref, theirs, f"{backend} {dtype} {hp}", **tol)


def test_r_equal_one_is_plain_sgd(backend_device):
    backend, device = backend_device
    ours, theirs = (make_params((65, 4097), torch.float32, device=device) for _ in range(2))
    opt = WormSGD(ours, lr=0.1, momentum=0.9, backend=backend)
    opt.set_truncation(random_bool_masks(ours, 0.5), r=1.0)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    run_steps(opt, ours)
    run_steps(ref, theirs)
    assert_same_state(opt, ours, ref, theirs, backend)


@pytest.mark.parametrize("density", (0.0, 1.0, 0.37))
def test_truncation_scales_the_raw_gradient(backend_device, density):
    """Independent oracle: torch SGD fed gradients already multiplied by m + r(1 - m)."""
    backend, device = backend_device
    r, hp = 3e-3, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    ours, theirs = (make_params(ODD_SIZES, torch.float64, device=device) for _ in range(2))
    masks = random_bool_masks(ours, density)
    opt = WormSGD(ours, backend=backend, **hp)
    opt.set_truncation(masks, r)
    ref = torch.optim.SGD(theirs, **hp)
    for step in range(4):
        fill_grads(ours, step)
        fill_grads(theirs, step)
        for p, q in zip(ours, theirs):
            q.grad.mul_(torch.full_like(q.grad, r).masked_fill_(masks[p], 1.0))
        opt.step()
        ref.step()
    assert_same_state(opt, ours, ref, theirs, f"{backend} density {density}")


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("density", (0.0, 1.0, 0.5))
def test_backends_match_reference_with_masks(backend_device, density):
    backend, device = backend_device
    dtypes = (torch.float32, torch.float16) if interpreted(backend_device) else DTYPES
    for dtype, hp in itertools.product(dtypes, HYPERPARAMETERS[::5]):
        ours, ref = (make_params(ODD_SIZES, dtype, device=device) for _ in range(2))
        opt = WormSGD(ours, lr=0.05, backend=backend, **hp)
        oracle = WormSGD(ref, lr=0.05, backend="reference", **hp)
        masks = random_bool_masks(ours, density, seed=3)
        opt.set_truncation(masks, 3e-3)
        oracle.set_truncation({q: masks[p] for p, q in zip(ours, ref)}, 3e-3)
        run_steps(opt, ours, steps=3)
        run_steps(oracle, ref, steps=3)
        assert_same_state(opt, ours, oracle, ref, f"{backend} {dtype} {hp}")


def test_state_dict_resume_gives_identical_trajectory():
    hp = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    straight = make_params((63, 4097), torch.float32)
    opt = WormSGD(straight, **hp)
    opt.set_truncation(random_bool_masks(straight, 0.5), 3e-3)
    run_steps(opt, straight, steps=6)

    resumed = make_params((63, 4097), torch.float32)
    first = WormSGD(resumed, **hp)
    first.set_truncation(random_bool_masks(resumed, 0.5), 3e-3)
    for step in range(3):
        fill_grads(resumed, step)
        first.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in resumed], "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    fresh = [torch.nn.Parameter(p) for p in saved["params"]]
    second = WormSGD(fresh, **hp)
    second.load_state_dict(saved["opt"])
    assert second.truncation == 3e-3 and len(second.truncation_masks) == 2
    for step in range(3, 6):
        fill_grads(fresh, step)
        second.step()
    for a, e in zip(fresh, straight):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_a_copy_of_the_optimizer_and_its_parameters_truncates_as_the_original():
    params = make_params((63, 4097), torch.float32)
    opt = WormSGD(params, lr=0.1, momentum=0.9, backend="reference")
    opt.set_truncation(random_bool_masks(params, 0.5), 3e-3)
    run_steps(opt, params, steps=2)
    copied_params, copied = copy.deepcopy((params, opt))  # one memo: the copy's own params
    assert copied.truncation == 3e-3 and copied.backend == "reference"
    assert set(copied.truncation_masks) == set(copied_params)
    for step in range(2, 4):
        fill_grads(params, step)
        opt.step()
        fill_grads(copied_params, step)
        copied.step()
    for a, e in zip(copied_params, params):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_torch_sgd_state_dict_loads_both_ways():
    ours, theirs = make_params((7, 65), torch.float32), make_params((7, 65), torch.float32)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    run_steps(ref, theirs, steps=2)
    opt = WormSGD(ours, lr=0.1, momentum=0.9)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # load aliases the tensors
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    back = torch.optim.SGD(make_params((7, 65), torch.float32), lr=0.1, momentum=0.9)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert back.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    run_steps(opt, ours, steps=2, seed=1)
    run_steps(ref, theirs, steps=2, seed=1)
    assert_same_state(opt, ours, ref, theirs, "after loading torch SGD state")


def test_grad_scaler_unscales_and_skips_inf_steps(backend_device):
    backend, device = backend_device
    hp = dict(lr=0.1, momentum=0.9)
    ours, theirs = (make_params((65,), torch.float32, device=device) for _ in range(2))
    opt = WormSGD(ours, backend=backend, **hp)
    ref = torch.optim.SGD(theirs, **hp)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        coefficients = torch.randn(65, generator=generator).to(device)  # d loss / d param
        if step == 1:  # an overflowing step: nothing may change
            coefficients[3] = float("inf")
        opt.zero_grad()
        scaler.scale((ours[0] * coefficients).sum()).backward()
        before = ours[0].detach().clone(), opt.state[ours[0]].get("momentum_buffer")
        before = before[0], None if before[1] is None else before[1].clone()
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert scaler.get_scale() == 512.0, "the scaler saw the inf"
            assert torch.equal(ours[0].detach(), before[0])
            assert torch.equal(opt.state[ours[0]]["momentum_buffer"], before[1])
        else:
            theirs[0].grad = coefficients.clone()
            ref.step()
    assert_same_state(opt, ours, ref, theirs, f"{backend} with GradScaler")


def test_tensor_lr_and_channels_last_params(backend_device):
    backend, device = backend_device
    conv = torch.nn.Conv2d(3, 5, 3).to(device=device, memory_format=torch.channels_last)
    twin = torch.nn.Conv2d(3, 5, 3).to(device)
    twin.load_state_dict(conv.state_dict())
    assert not conv.weight.is_contiguous()
    opt = WormSGD(conv.parameters(), lr=torch.tensor(0.05), momentum=0.9, backend=backend)
    ref = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        fill_grads(list(twin.parameters()), step)
        for p, q in zip(conv.parameters(), twin.parameters()):
            p.grad = q.grad.clone().to(memory_format=torch.preserve_format)
        opt.step()
        ref.step()
    twin_params = list(twin.parameters())
    assert_same_state(opt, list(conv.parameters()), ref, twin_params, f"{backend} channels_last")


def test_params_without_grad_are_skipped_and_get_no_state():
    params = make_params((7, 8), torch.float32)
    opt = WormSGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones(7)
    opt.step()
    assert "momentum_buffer" in opt.state[params[0]] and params[1] not in opt.state


class TestBadInput:
    def setup_method(self):
        self.params = make_params((65, 7), torch.float32)
        self.opt = WormSGD(self.params, lr=0.1, momentum=0.9)
        fill_grads(self.params, 0)
        self.opt.step()
        self.opt.set_truncation(random_bool_masks(self.params, 0.5), 0.5)
        self.snapshot = self._state()

    def _state(self):
        return (
            [p.detach().clone() for p in self.params],
            [self.opt.state[p]["momentum_buffer"].clone() for p in self.params],
            {p: m.clone() for p, m in self.opt.truncation_masks.items()},
            self.opt.truncation,
        )

    def _assert_unchanged(self):
        params, buffers, masks, r = self._state()
        old_params, old_buffers, old_masks, old_r = self.snapshot
        assert r == old_r and masks.keys() == old_masks.keys()
        for a, b in zip(
            params + buffers + list(masks.values()),
            old_params + old_buffers + list(old_masks.values()),
        ):
            assert torch.equal(a, b)

    @pytest.mark.parametrize(
        "mask, message",
        [
            (torch.zeros(8, dtype=torch.uint8), "packed uint8 mask of 16 bytes"),
            (torch.zeros(16, dtype=torch.int32), "packed uint8 mask of 16 bytes"),
            (torch.zeros(64, dtype=torch.bool), r"bool mask of shape \(64,\)"),
        ],
    )
    def test_wrong_mask(self, mask, message):
        with pytest.raises(ValueError, match=message):
            self.opt.set_truncation({self.params[0]: mask}, 0.1)
        self._assert_unchanged()

    @pytest.mark.parametrize("r", (-0.1, 1.5))
    def test_r_out_of_range(self, r):
        with pytest.raises(ValueError, match=r"r must be in \[0, 1\]"):
            self.opt.set_truncation({}, r)
        self._assert_unchanged()

    def test_mask_for_foreign_parameter(self):
        stranger = torch.nn.Parameter(torch.zeros(65))
        with pytest.raises(ValueError, match="does not hold"):
            self.opt.set_truncation({stranger: torch.ones(65, dtype=torch.bool)}, 0.1)
        self._assert_unchanged()

    def test_sparse_gradient(self):
        self.params[1].grad = torch.zeros(7).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            self.opt.step()
        self._assert_unchanged()

    def test_tensors_on_different_devices(self):
        grads = [p.grad for p in self.params]
        grads[1] = torch.empty(7, device="meta")
        buffers = [self.opt.state[p]["momentum_buffer"] for p in self.params]
        with pytest.raises(ValueError, match="grad 1 is on meta, expected cpu"):
            ops.masked_sgd_step_(self.params, grads, buffers, [], lr=0.1, momentum=0.9)
        self._assert_unchanged()

    def test_mask_on_other_device(self):
        with pytest.raises(ValueError, match="mask on meta"):
            self.opt.set_truncation(
                {self.params[0]: torch.empty(16, dtype=torch.uint8, device="meta")}, 0.1
            )
        self._assert_unchanged()

    def test_corrupt_state_dict_leaves_optimizer_intact(self):
        state = self.opt.state_dict()
        state["worm_truncation"]["masks"][0] = torch.zeros(3, dtype=torch.uint8)
        with pytest.raises(ValueError, match="16 bytes"):
            self.opt.load_state_dict(state)
        self._assert_unchanged()

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="unknown backend 'fastest'"):
            WormSGD(self.params, lr=0.1, backend="fastest")
