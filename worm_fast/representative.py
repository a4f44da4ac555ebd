"""Which parameters are representative: the ones whose masks the Early-Bird search tracks
and whose gradients WORM truncates.

* ``"batchnorm"``: BatchNorm weights (γ), the channel importances of CNNs (default).
* ``"attention"``: attention query and key projection weights; ``"attention_qkv"`` adds
  value. Found by name: BERT-family ``query``/``key``/``value`` and decoder LLM
  ``q_proj``/``k_proj``/``v_proj`` linear layers.
* a list of name patterns (``fnmatch`` style, e.g. ``"layer*.bn1.weight"``), or a list /
  mapping of parameters.
"""

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

PRESETS = ("batchnorm", "attention", "attention_qkv")
_QK_NAMES = ("query", "key", "q_proj", "k_proj")
_V_NAMES = ("value", "v_proj")


def batchnorm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None
    }


def attention_weights(model: nn.Module, *, include_value: bool = False) -> dict[str, nn.Parameter]:
    leaf_names = _QK_NAMES + (_V_NAMES if include_value else ())
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in leaf_names
    }


def matching(model: nn.Module, patterns: Iterable[str]) -> dict[str, nn.Parameter]:
    patterns = list(patterns)
    return {
        name: param
        for name, param in model.named_parameters()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }


def select(
    model_or_params: nn.Module | Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    representative: str | Iterable[str] = "batchnorm",
) -> dict[str, torch.Tensor]:
    """The representative parameters, by name, in a stable order.

    Given a module, ``representative`` is a preset or a list of name patterns; given
    parameters directly (a list or a name → parameter mapping), they are all used.
    """
    if isinstance(model_or_params, Mapping):
        chosen = dict(model_or_params)
    elif not isinstance(model_or_params, nn.Module):
        chosen = {f"param{i}": p for i, p in enumerate(model_or_params)}
    elif representative == "batchnorm":
        chosen = batchnorm_weights(model_or_params)
    elif representative in ("attention", "attention_qkv"):
        chosen = attention_weights(model_or_params, include_value=representative == "attention_qkv")
    elif isinstance(representative, str):
        raise ValueError(
            f"unknown representative preset {representative!r}; expected one of {PRESETS} "
            "or a list of parameter-name patterns"
        )
    else:
        chosen = matching(model_or_params, representative)
    if not chosen:
        raise ValueError(
            f"no representative parameters found for {representative!r}; the model has "
            "none of that kind (pass name patterns, e.g. ['*.bn*.weight'])"
        )
    return chosen
