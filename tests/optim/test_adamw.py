"""WormAdamW against torch.optim.AdamW (no mask) and an independent truncation oracle, on
every runnable (backend, device) where the test is about the step's numbers."""

import copy
import io

import pytest
import torch

from tests.utils import (
    ADAMW_HYPERPARAMETERS,
    DTYPES,
    ODD_SIZES,
    VS_TORCH_HALF_TOLERANCES,
    assert_close,
    fill_grads,
    interpreted,
    make_params,
    random_bool_masks,
    run_steps,
)
from worm_fast import WormAdamW

HYPERPARAMETERS = ADAMW_HYPERPARAMETERS
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def assert_same_adam_state(opt, ours, ref, theirs, what, **tol):
    for i, (a, e) in enumerate(zip(ours, theirs)):
        assert_close(a.detach(), e.detach().to(a.dtype), what=f"{what}: param {i}", **tol)
        for key in STATE_KEYS:
            assert (key in opt.state[a]) == (key in ref.state[e]), f"{what}: {key} presence"
            if key in ref.state[e]:
                expected = ref.state[e][key].to(a.dtype)
                assert_close(opt.state[a][key], expected, what=f"{what}: {key} {i}", **tol)
        assert float(opt.state[a]["step"]) == float(ref.state[e]["step"])


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=lambda hp: "-".join(map(str, hp.values())))
def test_matches_torch_adamw_without_mask(backend_device, hp):
    backend, device = backend_device
    for dtype in (torch.float32, torch.bfloat16) if interpreted(backend_device) else DTYPES:
        ours = make_params(ODD_SIZES, dtype, device=device)
        # fp16 AdamW in torch overflows (eps = 1e-8 is 0 in fp16): compare fp16 with fp32.
        theirs_dtype = torch.float32 if dtype == torch.float16 else dtype
        theirs = make_params(ODD_SIZES, theirs_dtype, device=device)
        opt = WormAdamW(ours, lr=0.01, backend=backend, **hp)
        ref = torch.optim.AdamW(theirs, lr=0.01, foreach=False, **hp)
        run_steps(opt, ours, steps=3)
        run_steps(ref, theirs, steps=3)
        tol = VS_TORCH_HALF_TOLERANCES.get(dtype, {})
        assert_same_adam_state(opt, ours, ref, theirs, f"{backend} {dtype} {hp}", **tol)


@pytest.mark.parametrize("density", (0.0, 1.0, 0.37))
def test_truncation_scales_the_adam_update(backend_device, density):
    """Gradients do not depend on the weights here, so the moments, and so each step's
    AdamW update u_t, are the same as torch's; truncation scales u_t of pruned elements:
    p_t = p_{t-1} (1 - lr wd) + (m + r (1 - m)) u_t."""
    backend, device = backend_device
    r, lr, wd = 3e-3, 0.01, 1e-2
    sizes, dtype = ODD_SIZES, torch.float64
    if interpreted(backend_device):
        sizes, dtype = (65, 7), torch.float32
    ours, theirs = (make_params(sizes, dtype, device=device) for _ in range(2))
    masks = random_bool_masks(ours, density)
    opt = WormAdamW(ours, lr=lr, weight_decay=wd, backend=backend)
    opt.set_truncation(masks, r)
    ref = torch.optim.AdamW(theirs, lr=lr, weight_decay=wd)
    expected = [p.detach().clone() for p in ours]
    for step in range(4):
        fill_grads(ours, step)
        fill_grads(theirs, step)
        before = [q.detach().clone() for q in theirs]
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            update = q.detach() - before[i] * (1 - lr * wd)
            factor = torch.full_like(update, r).masked_fill_(masks[p], 1.0)
            expected[i] = expected[i] * (1 - lr * wd) + factor * update
    for i, p in enumerate(ours):
        assert_close(p.detach(), expected[i], what=f"param {i}")


@pytest.mark.parametrize("density", (0.0, 1.0, 0.37))
def test_gradient_truncation_is_adamw_on_scaled_gradients(backend_device, density):
    """truncate="gradient" (the paper's rule): the step is torch's AdamW fed the gradients
    with those of pruned elements scaled by r; decoupled weight decay is not truncated."""
    backend, device = backend_device
    r, lr, wd = 3e-3, 0.01, 1e-2
    sizes, dtype = ODD_SIZES, torch.float64
    if interpreted(backend_device):
        sizes, dtype = (65, 7), torch.float32
    ours, theirs = (make_params(sizes, dtype, device=device) for _ in range(2))
    masks = random_bool_masks(ours, density)
    opt = WormAdamW(ours, lr=lr, weight_decay=wd, amsgrad=True, truncate="gradient",
                    backend=backend)  # fmt: skip
    opt.set_truncation(masks, r)
    ref = torch.optim.AdamW(theirs, lr=lr, weight_decay=wd, amsgrad=True, foreach=False)
    for step in range(4):
        fill_grads(ours, step)
        fill_grads(theirs, step)
        for p, q in zip(ours, theirs):
            q.grad = torch.where(masks[p], q.grad, q.grad * r)
        opt.step()
        ref.step()
    assert_same_adam_state(opt, ours, ref, theirs, f"{backend} truncate=gradient {density}")


def test_truncate_travels_in_state_dict_and_is_checked():
    params = make_params((65,), torch.float32)
    opt = WormAdamW(params, lr=0.01, truncate="gradient")
    run_steps(opt, params, steps=1)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["truncate"] == "gradient"
    # Into an optimizer built with the other site: the saved one wins, as lr would.
    other = WormAdamW(make_params((65,), torch.float32), lr=0.01)
    other.load_state_dict(copy.deepcopy(saved))
    assert other.param_groups[0]["truncate"] == "gradient"
    # torch.optim.AdamW's state (no such key) keeps this optimizer's setting.
    torch_opt = torch.optim.AdamW(make_params((65,), torch.float32), lr=0.01)
    run_steps(torch_opt, torch_opt.param_groups[0]["params"], steps=1)
    other.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert other.param_groups[0]["truncate"] == "gradient"
    with pytest.raises(ValueError, match="truncate must be one of"):
        WormAdamW(params, lr=0.01, truncate="weights")
    with pytest.raises(ValueError, match="truncate must be one of"):
        WormAdamW([{"params": params, "truncate": "weights"}], lr=0.01)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["truncate"] = "weights"
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="truncate must be one of"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


def test_state_dict_resume_gives_identical_trajectory():
    hp = dict(lr=0.01, weight_decay=1e-2, amsgrad=True)
    straight = make_params((63, 4097), torch.float32)
    opt = WormAdamW(straight, **hp)
    opt.set_truncation(random_bool_masks(straight, 0.5), 3e-3)
    run_steps(opt, straight, steps=6)

    resumed = make_params((63, 4097), torch.float32)
    first = WormAdamW(resumed, **hp)
    first.set_truncation(random_bool_masks(resumed, 0.5), 3e-3)
    for step in range(3):
        fill_grads(resumed, step)
        first.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in resumed], "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = [torch.nn.Parameter(p) for p in saved["params"]]
    second = WormAdamW(fresh, **hp)
    second.load_state_dict(saved["opt"])
    for step in range(3, 6):
        fill_grads(fresh, step)
        second.step()
    for a, e in zip(fresh, straight):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_torch_adamw_state_dict_loads_both_ways():
    ours, theirs = make_params((7, 65), torch.float32), make_params((7, 65), torch.float32)
    ref = torch.optim.AdamW(theirs, lr=0.01)
    run_steps(ref, theirs, steps=2)
    opt = WormAdamW(ours, lr=0.01)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    back = torch.optim.AdamW(make_params((7, 65), torch.float32), lr=0.01)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_steps(opt, ours, steps=2, seed=1)
    run_steps(ref, theirs, steps=2, seed=1)
    assert_same_adam_state(opt, ours, ref, theirs, "after loading torch AdamW state")


def test_grad_scaler_skips_inf_steps_and_their_step_count(backend_device):
    backend, device = backend_device
    ours, theirs = (make_params((65,), torch.float32, device=device) for _ in range(2))
    opt = WormAdamW(ours, lr=0.01, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=0.01)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        coefficients = torch.randn(65, generator=generator).to(device)
        if step == 1:
            coefficients[3] = float("inf")
        opt.zero_grad()
        scaler.scale((ours[0] * coefficients).sum()).backward()
        scaler.step(opt)
        scaler.update()
        if step != 1:
            theirs[0].grad = coefficients.clone()
            ref.step()
    assert_same_adam_state(opt, ours, ref, theirs, f"{backend} with GradScaler")


def test_bad_truncation_input_leaves_state_unchanged():
    params = make_params((65,), torch.float32)
    opt = WormAdamW(params, lr=0.01)
    run_steps(opt, params, steps=1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="packed uint8 mask of 16 bytes"):
        opt.set_truncation({params[0]: torch.zeros(3, dtype=torch.uint8)}, 0.1)
    with pytest.raises(ValueError, match=r"r must be in \[0, 1\]"):
        opt.set_truncation({}, 2.0)
    after = opt.state_dict()
    assert after["worm_truncation"] == before["worm_truncation"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(after["state"][0][key], before["state"][0][key])
