"""Model FLOPs per step, counted on the ``meta`` device.

``torch.utils.flop_counter.FlopCounterMode`` counts a forward and backward pass of a copy
of the model on the ``meta`` device (shapes only, no arithmetic), once per architecture
and input shape; the caller multiplies by the steps it takes. Counting live would slow
training several-fold. worm_fast's own ops are costed in ``profiling.op_costs``.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward and one backward pass of a model on one batch."""

    forward: int
    backward: int

    @property
    def train_step(self) -> int:
        """Forward + backward: the model FLOPs of one training step."""
        return self.forward + self.backward


_model_flops_cache: dict[tuple, FlopCount] = {}


def model_flops(
    model: torch.nn.Module,
    example_inputs,
    *,
    loss_fn: Callable[[object], torch.Tensor] | None = None,
) -> FlopCount:
    """Forward and backward FLOPs of ``model(*example_inputs)``, counted on the meta device.

    ``example_inputs`` is one tensor or a tuple of positional arguments (tensors, or
    anything else passed through). ``loss_fn`` maps the model's output to the scalar that
    is back-propagated (it runs on meta tensors: make targets on ``output.device``); by
    default the sum of every floating-point output. The result is
    cached per architecture (module structure, parameter and buffer shapes, train/eval
    mode), input shapes and ``loss_fn``; a structurally pruned model is a new architecture.
    The model itself is not touched: its parameters are not copied, only their shapes.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    key = (_architecture_signature(model), _inputs_signature(inputs), loss_fn)
    if key not in _model_flops_cache:
        _model_flops_cache[key] = _count_on_meta(model, inputs, loss_fn)
    return _model_flops_cache[key]


def _architecture_signature(model: torch.nn.Module) -> tuple:
    # repr() carries the layer hyperparameters (strides, kernel sizes) that shapes do not.
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return (
        type(model),
        repr(model),
        model.training,
        tuple((name, tuple(t.shape), t.dtype) for name, t in tensors),
    )


def _inputs_signature(inputs: tuple) -> tuple:
    leaves, spec = tree_flatten(inputs)
    return (
        str(spec),
        tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in leaves
        ),
    )


def _count_on_meta(model: torch.nn.Module, inputs: tuple, loss_fn) -> FlopCount:
    # Pre-seeding deepcopy's memo with meta twins copies the module tree without copying a
    # single weight, so counting a large model on a full GPU costs no device memory.
    memo = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(
            param.detach().to("meta"), requires_grad=param.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to("meta")
    # Tensors held as plain attributes are derived ones, recomputed before every forward:
    # torch.nn.utils.prune's masked weight (weight_orig * weight_mask). After a forward
    # with autograd on it is a graph tensor that deepcopy refuses, so a meta twin stands
    # in for it too, whatever ran last.
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = value.detach().to("meta")
    meta_inputs = tree_map(
        lambda x: x.detach().to("meta") if isinstance(x, torch.Tensor) else x, inputs
    )
    try:
        meta_model = copy.deepcopy(model, memo)
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            output = meta_model(*meta_inputs)
            forward = counter.get_total_flops()
            loss = loss_fn(output) if loss_fn is not None else _sum_outputs(output)
            if loss.requires_grad:
                loss.backward()
            total = counter.get_total_flops()
    except (NotImplementedError, RuntimeError, TypeError) as error:
        raise RuntimeError(
            f"counting the FLOPs of {type(model).__name__} on the meta device failed "
            f"(a module that cannot be deep-copied, or an op without a meta kernel?): {error}"
        ) from error
    return FlopCount(forward=forward, backward=total - forward)


def _sum_outputs(output) -> torch.Tensor:
    leaves = [
        x for x in tree_flatten(output)[0] if isinstance(x, torch.Tensor) and x.is_floating_point()
    ]
    if not leaves:
        raise ValueError(
            "model_flops: the model returned no floating-point tensor; pass loss_fn= to say "
            "what to back-propagate"
        )
    return sum(x.sum() for x in leaves)


__all__ = ["FlopCount", "model_flops"]
