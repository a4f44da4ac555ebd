"""Masks, the sliding window and Algorithm 1, against plain implementations."""

import io

import pytest
import torch
from torch import nn

from worm_fast import WormSGD, ops
from worm_fast.masks import MaskWindow, compute_masks, global_threshold
from worm_fast.search import EarlyBirdSearch


# -- the original Early-Bird code's formulas, written plainly (bool masks, host) -------
def eb_mask(tensors, percent):
    weights = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
    threshold = torch.sort(weights).values[int(weights.numel() * percent)]
    return weights > threshold


def eb_distances(masks):
    """1 - agreement between the newest mask and each older one (oldest first)."""
    newest = masks[-1]
    return [1 - float((newest == older).sum()) / newest.numel() for older in masks[:-1]]


def test_threshold_and_masks_match_early_bird_code():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=generator) for n in (64, 7, 130)]
    for percent in (0.0, 0.3, 0.5, 0.9):
        threshold = global_threshold(tensors, percent)
        expected = eb_mask(tensors, percent)
        packed = compute_masks(tensors, percent)
        got = torch.cat([ops.unpack_mask(m, t.numel()) for m, t in zip(packed, tensors)])
        assert threshold.dim() == 0
        assert torch.equal(got, expected), percent


def test_per_tensor_scope_thresholds_each_tensor():
    tensors = [torch.arange(10.0), torch.arange(10.0) * 100]
    packed = compute_masks(tensors, 0.5, scope="per_tensor")
    for mask, tensor in zip(packed, tensors):
        assert torch.equal(ops.unpack_mask(mask, 10), eb_mask([tensor], 0.5))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("scope", ("global", "per_tensor"))
def test_threshold_is_exact_in_the_parameters_dtype(dtype, scope):
    generator = torch.Generator().manual_seed(2)
    tensors = [torch.randn(n, generator=generator).to(dtype) for n in (64, 7, 130)]
    groups = [tensors] if scope == "global" else [[t] for t in tensors]
    packed = compute_masks(tensors, 0.5, scope=scope)
    got = [ops.unpack_mask(m, t.numel()) for m, t in zip(packed, tensors)]
    for group in groups:
        magnitudes = torch.cat([t.abs().reshape(-1) for t in group])
        expected = magnitudes.kthvalue(int(magnitudes.numel() * 0.5) + 1).values
        threshold = global_threshold(group, 0.5)
        assert threshold.dtype == dtype and torch.equal(threshold, expected)
    assert torch.equal(torch.cat(got), eb_mask(tensors, 0.5) if scope == "global" else
                       torch.cat([eb_mask([t], 0.5) for t in tensors]))  # fmt: skip


def test_float64_threshold_separates_values_float32_cannot():
    # 1 + i * 2**-40 all round to 1.0 in float32: a float32 threshold would keep none.
    values = 1.0 + torch.arange(10, dtype=torch.float64) * 2.0**-40
    threshold = global_threshold([values], 0.5)
    assert threshold.item() == values[5].item()
    kept = ops.unpack_mask(compute_masks([values], 0.5)[0], 10)
    assert kept.tolist() == [False] * 6 + [True] * 4


def test_masks_refuse_nan():
    with pytest.raises(ValueError, match="NaN values found"):
        compute_masks([torch.tensor([1.0, float("nan"), 2.0])], 0.5)


@pytest.mark.parametrize("bad", (-0.1, 1.0))
def test_prune_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match=r"prune_ratio must be in \[0, 1\)"):
        compute_masks([torch.ones(3)], bad)


def test_window_distances_match_early_bird_code():
    generator = torch.Generator().manual_seed(1)
    sizes = (37, 64, 5)
    window = MaskWindow(5, sum(sizes))
    history = []
    for _ in range(9):
        tensors = [torch.randn(n, generator=generator) for n in sizes]
        window.push(compute_masks(tensors, 0.5))
        history.append(eb_mask(tensors, 0.5))
        expected = eb_distances(history[-5:])
        got = window.distances().tolist()
        assert got == pytest.approx(expected, abs=1e-7)
    assert window.full and window.distances().numel() == 4


def test_window_rejects_a_mask_of_another_size():
    window = MaskWindow(3, 10)
    window.push(torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected 8 packed uint8 bytes"):
        window.push(torch.zeros(16, dtype=torch.uint8))


# -- Algorithm 1 on scripted masks ---------------------------------------------------
# With prune_ratio 0 the threshold is min |w|, so weights in {0, 1} (some 0) make the
# mask exactly the weights' ones: the test scripts every check's mask.
N = 100


def scripted(flips):
    mask = torch.zeros(N, dtype=torch.bool)
    mask[:50] = True
    mask[list(flips)] = ~mask[list(flips)]
    return mask


# Window 3, s = 0.1, δ = 0.05. Distances newest-vs-older per check:
# 1: —   2: [.20]   3: [.10, .10] (full; d_avg .10 < .15: WORM triggers; d_max not < .1)
# 4: [.11, .01]   5: [.01, .00] → converged.
SEQUENCE = [
    scripted([]),
    scripted(range(0, 20)),
    scripted(range(10, 20)),
    scripted([*range(10, 20), 50]),
    scripted([*range(10, 20), 50]),
]


def make_search(mode, sequence_param, **overrides):
    opt = WormSGD([sequence_param], lr=0.1) if mode != "eb" else None
    kwargs = dict(mode=mode, prune_ratio=0.0, stop_distance=0.1, window=3, trigger_margin=0.05)
    kwargs.update(overrides)
    return EarlyBirdSearch({"w": sequence_param}, opt, **kwargs), opt


def run_sequence(search, param, sequence):
    records = []
    for mask in sequence:
        with torch.no_grad():
            param.copy_(mask.float())
        records.append(search.check())
        if records[-1].converged:
            break
    return records


@pytest.mark.parametrize(
    "mode, trigger_epoch, r_per_epoch",
    [
        ("eb", None, [1, 1, 1, 1, 1]),
        ("truncate", 1, [3e-3] * 5),
        ("worm", 3, [1, 1, 3e-3, 3e-3, 3e-3]),
    ],
)
def test_algorithm_1_on_scripted_masks(mode, trigger_epoch, r_per_epoch):
    param = nn.Parameter(torch.zeros(N))
    search, opt = make_search(mode, param)
    records = run_sequence(search, param, SEQUENCE)

    assert [r.epoch for r in records] == [1, 2, 3, 4, 5]
    assert [r.converged for r in records] == [False] * 4 + [True]
    assert [r.r for r in records] == r_per_epoch
    assert [r.epoch for r in records if r.triggered] == ([trigger_epoch] if trigger_epoch else [])
    assert [r.window_full for r in records] == [False, False, True, True, True]
    assert records[0].d_max is None
    assert records[1].d_max == pytest.approx(0.2)
    assert (records[2].d_max, records[2].d_avg) == pytest.approx((0.1, 0.1))
    assert (records[3].d_max, records[3].d_avg) == pytest.approx((0.11, 0.06))
    assert records[4].d_max == pytest.approx(0.01)
    assert torch.equal(search.ticket.bool_masks()["w"], SEQUENCE[4])
    assert search.ticket.epoch == 5 and search.ticket.density == pytest.approx(0.41)
    if opt is not None:
        # The optimizer holds the newest mask with the r in force.
        assert opt.truncation == r_per_epoch[-1]
        held = opt.truncation_masks[param]
        assert torch.equal(ops.unpack_mask(held, N), SEQUENCE[4])


def test_truncation_mask_is_refreshed_every_check_after_the_trigger():
    param = nn.Parameter(torch.zeros(N))
    search, opt = make_search("worm", param)
    for epoch, mask in enumerate(SEQUENCE[:4], start=1):
        with torch.no_grad():
            param.copy_(mask.float())
        search.check()
        if epoch < 3:
            assert opt.truncation == 1.0 and not opt.truncation_masks
        else:
            assert torch.equal(ops.unpack_mask(opt.truncation_masks[param], N), mask)


def test_no_stop_before_the_window_is_full():
    param = nn.Parameter(torch.zeros(N))
    search, _ = make_search("eb", param, window=4)
    records = run_sequence(search, param, [SEQUENCE[0]] * 5)
    assert [r.d_max for r in records[1:]] == [0.0, 0.0, 0.0]
    assert [r.converged for r in records] == [False, False, False, True]


def test_convergence_takes_precedence_over_the_trigger():
    # Identical masks: the first full window has d_max = d_avg = 0, below both lines.
    param = nn.Parameter(torch.zeros(N))
    search, opt = make_search("worm", param)
    records = run_sequence(search, param, [SEQUENCE[0]] * 3)
    assert records[-1].converged and not any(r.triggered for r in records)
    assert opt.truncation == 1.0 and not opt.truncation_masks


def test_check_after_convergence_is_refused():
    param = nn.Parameter(torch.zeros(N))
    search, _ = make_search("eb", param)
    run_sequence(search, param, SEQUENCE)
    with pytest.raises(RuntimeError, match="converged at check 5"):
        search.check()


def test_truncating_modes_need_a_truncating_optimizer():
    model = nn.BatchNorm1d(4)
    with pytest.raises(TypeError, match="needs an optimizer with set_truncation"):
        EarlyBirdSearch(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="worm")
    EarlyBirdSearch(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="eb")


def test_model_without_batchnorm_gets_a_clear_error():
    with pytest.raises(ValueError, match="no representative parameters"):
        EarlyBirdSearch(nn.Linear(3, 3), mode="eb")


# -- resume ------------------------------------------------------------------------
def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip


def train_epoch(model, opt, epoch):
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(3):
        x = torch.randn(16, 1, 8, 8, generator=generator)
        y = torch.randint(0, 2, (16,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def search_setup():
    model = tiny_cnn()
    opt = WormSGD(model.parameters(), lr=0.5, momentum=0.9)
    search = EarlyBirdSearch(model, opt, mode="worm", window=3, stop_distance=0.01,
                             trigger_margin=0.3)  # fmt: skip
    return model, opt, search


def test_resume_from_state_dict_gives_identical_records():
    model, opt, search = search_setup()
    for epoch in range(6):
        train_epoch(model, opt, epoch)
        if search.check().converged:
            break
    straight = search.records

    model, opt, search = search_setup()
    for epoch in range(3):
        train_epoch(model, opt, epoch)
        search.check()
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "search": search.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer)
    model, opt, search = search_setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    search.load_state_dict(saved["search"])
    for epoch in range(3, 6):
        train_epoch(model, opt, epoch)
        if search.check().converged:
            break
    assert search.records == straight
    assert any(r.triggered for r in straight), "the scenario should exercise the trigger"


def test_load_state_dict_of_another_configuration_is_refused():
    _, _, search = search_setup()
    state = search.state_dict()
    state["config"]["window"] = 5
    with pytest.raises(ValueError, match="different configuration"):
        search.load_state_dict(state)


def _settled_search(**options) -> EarlyBirdSearch:
    """A search over a layer of small and a layer of large magnitudes whose masks never
    move, so it converges at the second check."""
    params = {
        "small.weight": nn.Parameter(torch.tensor([0.1, 0.2, 0.3, 0.4])),
        "large.weight": nn.Parameter(torch.tensor([1.1, 1.2, 1.3, 1.4])),
    }
    search = EarlyBirdSearch(params, mode="eb", window=2, **options)
    search.check()
    return search


def test_a_ticket_that_prunes_a_whole_layer_says_so():
    search = _settled_search()  # the global threshold falls between the two layers
    with pytest.warns(RuntimeWarning, match=r"every element of small\.weight \(layer collapse\)"):
        assert search.check().converged
    assert search.ticket.collapsed() == ["small.weight"]
    assert search.ticket.density == 3 / 8  # the Early-Bird rule prunes the threshold, 1.1, too


def test_a_ticket_that_keeps_part_of_every_layer_is_not_collapsed(recwarn):
    search = _settled_search(scope="per_tensor")
    assert search.check().converged
    assert search.ticket.collapsed() == []
    assert not [w for w in recwarn if "layer collapse" in str(w.message)]
