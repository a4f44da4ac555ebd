"""The cost formulas of worm_fast's ops and optimizer steps against hand calculations,
and the FLOPs ``FlopCounterMode`` counts for the ops."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import worm_fast._ops
import worm_fast.backends.reference  # registers the kernels
from worm_fast.profiling.op_costs import (
    OpCost,
    adamw_step_cost,
    bytes_moved,
    mask_check_cost,
    op_cost,
    sgd_step_cost,
)

ops = torch.ops.worm_fast


def _sgd_args(masked: bool):
    params = [torch.randn(10), torch.randn(3, 7)]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.randn_like(p) for p in params]
    mask = torch.zeros(worm_fast._ops.packed_nbytes(21), dtype=torch.uint8)
    masks = [None, mask] if masked else []
    return params, grads, buffers, masks


SGD_HYPER = dict(
    lr=0.1,
    weight_decay=1e-4,
    momentum=0.9,
    dampening=0.0,
    nesterov=True,
    maximize=False,
    truncation=3e-3,
)


@pytest.mark.parametrize(
    "is_first_step, per_element",
    [
        # update 2 + weight decay 2 + momentum 3 + nesterov 2; a first step skips momentum
        (False, 9),
        (True, 6),
    ],
)
def test_masked_sgd_step_flops_are_counted(is_first_step, per_element):
    args = _sgd_args(masked=True)
    with FlopCounterMode(display=False) as counter:
        ops.masked_sgd_step_(*args, **SGD_HYPER, is_first_step=is_first_step)
    truncation = 2  # select the factor by the mask bit, multiply
    expected = 10 * per_element + 21 * (per_element + truncation)
    assert counter.get_flop_counts()["Global"] == {ops.masked_sgd_step_: expected}


def test_masked_adamw_step_flops_and_step_cost_agree():
    params, grads, exp_avgs, masks = _sgd_args(masked=True)
    args = (params, grads, exp_avgs, [torch.rand_like(p) for p in params], [],
            [torch.zeros(()) for _ in params], masks)  # fmt: skip
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8,
                 amsgrad=False, maximize=False, truncation=3e-3)  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        ops.masked_adamw_step_(*args, **hyper)
    # lerp 2, second moment 3, sqrt/bias/eps/divide 4, update 2, weight decay 1; +2 masked
    expected = 10 * 12 + 21 * (12 + 2)
    assert counter.get_flop_counts()["Global"] == {ops.masked_adamw_step_: expected}
    step = adamw_step_cost(params, masked_numel=21, weight_decay=1e-2)
    assert step.flops == expected
    # read p, g, m, v; write p, m, v: 7 passes of 4 bytes, plus 21 mask bits (3 bytes)
    assert step.bytes == 31 * 4 * 7 + 3


def test_mask_op_flops_are_counted():
    values = torch.randn(100)
    with FlopCounterMode(display=False) as counter:
        packed = ops.pack_mask(values, torch.tensor(0.5))
        window = torch.stack([packed, packed, packed])
        ops.hamming_window(packed, window)
        ops.unpack_mask(packed, 100)
    assert counter.get_flop_counts()["Global"] == {
        ops.pack_mask: 2 * 100,  # |v|, compare
        ops.hamming_window: 2 * 3 * 16,  # xor and popcount per byte of 3 rows of 16 bytes
        ops.unpack_mask: 2 * 100,
    }


def test_masked_sgd_bytes_moved():
    args = _sgd_args(masked=True)
    fp32 = 4
    # read p, g, buffer; write p, buffer; read the 21 mask bits (3 bytes)
    expected = 31 * fp32 * 5 + 3
    assert bytes_moved(ops.masked_sgd_step_, *args, **SGD_HYPER, is_first_step=False) == expected
    # The first step writes the buffer without reading it.
    first = bytes_moved(ops.masked_sgd_step_, *args, **SGD_HYPER, is_first_step=True)
    assert first == expected - 31 * fp32


def test_sgd_step_cost_agrees_with_the_op_formulas():
    params, grads, buffers, masks = _sgd_args(masked=True)
    from_op = op_cost(
        ops.masked_sgd_step_, params, grads, buffers, masks, **SGD_HYPER, is_first_step=False
    )
    step = sgd_step_cost(params, momentum=0.9, weight_decay=1e-4, nesterov=True, masked_numel=21)
    assert step == from_op == OpCost(flops=321, bytes=623)
    # Plain SGD: 2 FLOPs and 12 bytes (read p, g; write p) per fp32 element.
    assert sgd_step_cost(params, momentum=0, masked_numel=0) == OpCost(62, 372)


def test_mask_check_cost():
    cost = mask_check_cost(1000, window=5)
    nbytes = 128  # 1000 bits padded to 16 int64 words
    pack = OpCost(flops=2 * 1000, bytes=4 * 1000 + nbytes)
    hamming = OpCost(flops=2 * 4 * nbytes, bytes=4 * nbytes + nbytes + 4 * 8)
    assert cost == pack + hamming
    assert cost * 3 == OpCost(3 * cost.flops, 3 * cost.bytes)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="masked_numel"):
        sgd_step_cost([torch.zeros(4)], momentum=0.9, masked_numel=5)
    with pytest.raises(ValueError, match="no cost formula"):
        bytes_moved(torch.ops.aten.add, torch.zeros(1), torch.zeros(1))
