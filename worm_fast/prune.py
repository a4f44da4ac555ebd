"""Applying a ticket: unstructured masks, or physical removal of BatchNorm channels.

Masks follow ``torch.nn.utils.prune``: True = kept. Unstructured masks are keyed by
parameter name; channel masks are keyed by the name of a BatchNorm weight (gamma), as
the Early-Bird search produces them.
"""

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_mask(name: str, mask, shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask for {name!r} must be a bool tensor (True = kept), "
            f"got {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.shape != shape:
        raise ValueError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(shape)}"
        )
    return mask


def apply_unstructured(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Mask parameters in place with ``prune.custom_from_mask``; returns ``model``.

    ``masks`` maps names from ``model.named_parameters()`` to bool tensors of the
    parameter's shape. Every mask is checked before any is applied.
    """
    params = dict(model.named_parameters())
    targets = []
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(
                f"no parameter named {name!r} in {type(model).__name__}; keys must come "
                f"from model.named_parameters(), e.g. {', '.join(list(params)[:3])}"
            )
        mask = _check_mask(name, mask, params[name].shape)
        module_name, _, attr = name.rpartition(".")
        targets.append((model.get_submodule(module_name), attr, mask))
    for module, attr, mask in targets:
        prune.custom_from_mask(module, attr, mask.to(getattr(module, attr).device))
    return model


def _batchnorms(
    model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """``{key: (BatchNorm module, mask on the CPU)}``, each key checked."""
    found = {}
    for name, mask in masks.items():
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if attr != "weight" or not isinstance(module, _BATCHNORMS) or not module.affine:
            raise ValueError(
                f"{name!r} is not the weight of an affine BatchNorm in "
                f"{type(model).__name__}; channel masks are keyed like 'layer1.0.bn1.weight'. "
                "Only BatchNorm channels can be removed: GroupNorm and LayerNorm normalize "
                "across channels (removing one changes the others) and a fused attention "
                "weight has no channels of its own; apply such tickets with apply_unstructured"
            )
        found[name] = (module, _check_mask(name, mask, module.weight.shape).cpu())
    return found


def zero_pruned_channels(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """The masked equivalent of channel removal, in place: pruned channels' BatchNorm
    weight and bias set to 0, so they output exactly 0. Returns ``model``."""
    with torch.no_grad():
        for module, mask in _batchnorms(model, masks).values():
            pruned = ~mask.to(module.weight.device)
            module.weight[pruned] = 0
            module.bias[pruned] = 0
    return model


@dataclass
class StructuredPruneResult:
    model: nn.Module  # the smaller dense model (a copy; the input model is untouched)
    effective_masks: dict[str, torch.Tensor]  # per input key: channels kept (True) in fact
    params_before: int
    params_after: int


def prune_channels(
    model: nn.Module, masks: Mapping[str, torch.Tensor], example_inputs: torch.Tensor
) -> StructuredPruneResult:
    """Physically remove the BatchNorm channels that ``masks`` prune.

    Each channel goes together with the conv filters producing it and the input
    channels of the layers consuming it, following torch-pruning's dependency graph
    (traced with ``example_inputs``). BatchNorms joined by residual additions share
    channels: such a channel is removed only if every BatchNorm of the group prunes it,
    and a BatchNorm without a mask counts as keeping all its channels. Every group keeps
    at least one channel, the one whose largest |gamma| in the group is largest.

    ``effective_masks`` tells which channels were removed, so that
    ``zero_pruned_channels(model, effective_masks)`` computes what the pruned model does.
    """
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    by_key = _batchnorms(pruned, masks)
    mask_of = {id(module): mask for module, mask in by_key.values()}
    removed_of: dict[int, torch.Tensor] = {}

    # Tracing runs a forward pass through autograd (and switches the model to eval).
    # The explicit forward_fn stops torch-pruning from first trying model(*inputs),
    # which would unpack the batch into separate arguments.
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            pruned, example_inputs, forward_fn=lambda m, x: m(x), verbose=False
        )
    plans = []
    for group in graph.get_all_groups(root_module_types=_BATCHNORMS):
        root = group[0].dep.target.module
        size = root.num_features
        removable = torch.ones(size, dtype=torch.bool)
        magnitude = torch.zeros(size)
        members = []
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, _BATCHNORMS):
                continue
            idxs, roots = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
            if idxs.numel() and (idxs.max() >= module.num_features or roots.max() >= size):
                raise _untraceable(model)
            mask = mask_of.get(id(module))
            if mask is None:
                removable[roots] = False
            else:
                removable[roots] &= ~mask[idxs]
            if module.affine:
                gamma = module.weight.detach().abs().cpu()[idxs]
                magnitude[roots] = torch.maximum(magnitude[roots], gamma)
            members.append((module, idxs, roots))
        if removable.all():
            removable[magnitude.argmax()] = False
        for module, idxs, roots in members:
            removed_of[id(module)] = torch.zeros(module.num_features, dtype=torch.bool)
            removed_of[id(module)][idxs] = removable[roots]
        if removable.any():
            plans.append((root, removable.nonzero().flatten().tolist()))

    # Groups are disjoint, so pruning one leaves the others' channel indices valid.
    for root, idxs in plans:
        graph.get_pruning_group(root, tp.prune_batchnorm_out_channels, idxs).prune()
    pruned.train(was_training)

    effective = {}
    for key, (module, mask) in by_key.items():
        removed = removed_of.get(id(module), torch.zeros_like(mask))
        effective[key] = (~removed).to(masks[key].device)
    _check_equivalent(model, pruned, effective, example_inputs)
    return StructuredPruneResult(pruned, effective, _count_params(model), _count_params(pruned))


def _untraceable(model: nn.Module) -> ValueError:
    # torch-pruning maps channels only through the ops it knows; a zero-padding shortcut
    # (F.pad over channels) is not one of them.
    return ValueError(
        f"cannot remove channels of {type(model).__name__}: torch-pruning could not follow "
        "its channels through every connection (a zero-padding shortcut, as in He et al.'s "
        "option-A ResNets, is one such operation); apply the ticket as masks "
        "(prune.apply_unstructured) instead"
    )


@torch.no_grad()
def _check_equivalent(model, pruned, effective, example_inputs) -> None:
    """The smaller model must compute what the masked one does (eval mode, the example):
    the one check that catches a channel mapping torch-pruning got silently wrong."""
    masked = zero_pruned_channels(copy.deepcopy(model), effective).eval()
    was_training = pruned.training
    expected, got = masked(example_inputs), pruned.eval()(example_inputs)
    pruned.train(was_training)
    scale = expected.abs().max().clamp_min(1e-6)
    if got.shape != expected.shape or not torch.allclose(
        got, expected, rtol=1e-4, atol=1e-5 * scale
    ):
        raise _untraceable(model)
