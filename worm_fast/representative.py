"""Which parameters are representative: the ones whose masks the Early-Bird search tracks
and whose gradients WORM truncates.

* ``"batchnorm"``: BatchNorm weights (γ), the channel importances of CNNs (default).
* ``"attention"``: the query and key projection weights of every attention layer, the
  paper's choice for transformers; ``"attention_qkv"`` adds the value projections.
  Found by module structure and name: a projection is a direct child with a 2-D weight
  of a module whose class name contains ``Attention``, named ``query``/``key``/``value``
  (BERT family), ``q_proj``/``k_proj``/``v_proj`` (Llama, Gemma, Mistral, …) or
  ``q``/``k``/``v`` (T5). A layer named ``key`` outside attention is never picked.
* a list of name patterns (``fnmatch`` style, e.g. ``"layer*.bn1.weight"``), or a list /
  mapping of parameters.

Names are those of the original model: the wrappers of ``torch.compile``
(``_orig_mod.``), ``DistributedDataParallel`` and ``DataParallel`` (``module.``) are
looked through wherever they sit, so a search (its records, state and ticket) over a
wrapped model names the same parameters as one over the bare model, and patterns are
written for the bare model.
"""

import fnmatch
import sys
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

PRESETS = ("batchnorm", "attention", "attention_qkv")
_QK_NAMES = ("query", "key", "q_proj", "k_proj", "q", "k")
_V_NAMES = ("value", "v_proj", "v")


def unwrapped(module: nn.Module) -> nn.Module:
    """The module inside any wrappers of ``torch.compile``, DDP or DataParallel."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
            continue
        # Loaded by torch.compile, so a model it wrapped implies it (importing it costs ~1 s).
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
            module = module._orig_mod
            continue
        return module


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` under the original model's names: wrappers looked through."""
    seen = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        module = unwrapped(module)
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    return walk(model, "")


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` under the original model's names."""
    seen = set()
    for prefix, module in named_modules(model):
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{prefix}.{name}" if prefix else name), param


def batchnorm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{name}.weight": module.weight
        for name, module in named_modules(model)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None
    }


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__


def attention_weights(model: nn.Module, *, include_value: bool = False) -> dict[str, nn.Parameter]:
    """Query and key (and with ``include_value`` value) projection weights, in module order."""
    leaf_names = _QK_NAMES + (_V_NAMES if include_value else ())
    found = {}
    for name, module in named_modules(model):
        if not _is_attention(module):
            continue
        for child_name, child in module.named_children():
            weight = getattr(child, "weight", None)
            if child_name in leaf_names and isinstance(weight, nn.Parameter) and weight.dim() == 2:
                found[f"{name}.{child_name}.weight" if name else f"{child_name}.weight"] = weight
    return found


def matching(model: nn.Module, patterns: Iterable[str]) -> dict[str, nn.Parameter]:
    patterns = list(patterns)
    return {
        name: param
        for name, param in named_parameters(model)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }


def _none_found(model: nn.Module, representative) -> ValueError:
    if representative in ("attention", "attention_qkv"):
        looked_for = (
            "Linear layers named query/key/value (BERT), q_proj/k_proj/v_proj (Llama, Gemma, "
            "Mistral) or q/k/v (T5) directly inside a module whose class name contains "
            "'Attention'; for other layouts (e.g. a fused qkv projection) pass name patterns, "
            "e.g. ['*.attn.c_attn.weight']"
        )
    else:
        looked_for = "pass name patterns that match model.named_parameters(), e.g. ['*.bn*.weight']"
    return ValueError(
        f"no representative parameters found for {representative!r} in "
        f"{type(model).__name__}: {looked_for}"
    )


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
        if isinstance(model_or_params, nn.Module):
            raise _none_found(model_or_params, representative)
        raise ValueError("no representative parameters were given")
    return chosen
