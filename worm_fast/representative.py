"""Which parameters are representative: the ones whose masks the Early-Bird search tracks
and whose gradients WORM truncates. A representative is a parameter, or some rows or
columns of one (a fused attention projection), see :mod:`worm_fast.selection`.

* ``"batchnorm"``: BatchNorm weights (γ), the channel importances of CNNs (the paper's
  rule, the default).
* ``"norm"``: the per-channel scale (γ) of every affine normalization whose weight has
  one entry per channel: BatchNorm, GroupNorm, InstanceNorm and LayerNorm over one
  dimension (the channels of ConvNeXt's ``LayerNorm2d`` and of its channels-last
  blocks). An extension of the paper's BatchNorm rule to CNNs normalized otherwise.
* ``"attention"``: the query and key projection weights of every attention layer, the
  paper's choice for transformers; ``"attention_qkv"`` adds the value projections.
  Found by module structure: an attention module is one whose class name contains
  ``Attention``, and :data:`ATTENTION_LAYOUTS` says where its query, key and value
  weights are. An attention module with projection weights that no layout describes is
  an error that lists them (name them with patterns instead); a layer named ``key``
  outside attention is never picked.
* a list of name patterns (``fnmatch`` style, e.g. ``"layer*.bn1.weight"``), or a list /
  mapping of parameters (or of :class:`~worm_fast.selection.Representative` parts).

Names are those of the original model: the wrappers of ``torch.compile``
(``_orig_mod.``), ``DistributedDataParallel`` and ``DataParallel`` (``module.``) are
looked through wherever they sit, so a search (its records, state and ticket) over a
wrapped model names the same parameters as one over the bare model, and patterns are
written for the bare model.
"""

import fnmatch
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from worm_fast.selection import Representative, Selection

PRESETS = ("batchnorm", "norm", "attention", "attention_qkv")

# -- normalizations -------------------------------------------------------------------

# One scale per channel whatever the input's size (LayerNorm: over one dimension only).
_PER_CHANNEL_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
)


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


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The γ of every per-channel affine normalization (the ``norm`` preset), in module
    order."""
    return {
        f"{name}.weight" if name else "weight": module.weight
        for name, module in named_modules(model)
        if isinstance(module, _PER_CHANNEL_NORMS)
        and isinstance(module.weight, nn.Parameter)
        and module.weight.dim() == 1
    }


# -- attention ------------------------------------------------------------------------

# Q, K, V selections of a fused weight, from the attention module and that weight's shape.
Blocks = Callable[[nn.Module, torch.Size], tuple[Selection | None, ...]]


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention module keeps its query, key and value weights."""

    models: str  # who uses this layout (for the docs and errors)
    weights: tuple[str, str, str]  # query, key, value weights within the attention module
    # Fused weights: the Q, K, V parts of each (None: the whole weight). Split: None.
    blocks: Blocks | None = None
    # Only attention modules of these classes (or their subclasses): a name that alone
    # does not fix the layout. Empty: any attention module holding the weights.
    classes: tuple[str, ...] = ()


def _grouped(
    dim: int, shape: torch.Size, groups: int, sizes: tuple[int, int, int], what: str
) -> tuple[Selection, Selection, Selection]:
    """Q, K, V of a weight whose rows (or columns) are ``groups`` repeats of ``sizes``
    consecutive query, key and value indices."""
    q, k, v = sizes
    if groups < 1 or min(sizes) < 1 or groups * (q + k + v) != shape[dim]:
        raise ValueError(
            f"{what}: expected {groups} groups of {q} query + {k} key + {v} value "
            f"{'rows' if dim == 0 else 'columns'}, but the weight has shape {tuple(shape)}"
        )
    step = q + k + v
    starts = [g * step for g in range(groups)]
    return tuple(
        Selection(dim, tuple((s + offset, s + offset + size) for s in starts))
        for offset, size in ((0, q), (q, k), (q + k, v))
    )


def _stacked(module: nn.Module, shape: torch.Size) -> tuple[Selection, ...]:
    """``[Q; K; V]`` stacked rows: sizes from the model's config (grouped-query attention,
    e.g. Phi-3's ``qkv_proj``), else three equal blocks (timm, torchvision, ModernBERT)."""
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if heads and kv_heads:
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // heads
        sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    else:
        sizes = (shape[0] // 3,) * 3
    return _grouped(0, shape, 1, sizes, f"{type(module).__name__} [Q; K; V] rows")


def _in_proj(module: nn.Module, shape: torch.Size) -> tuple[Selection, ...]:
    embed = module.embed_dim
    return _grouped(0, shape, 1, (embed,) * 3, "nn.MultiheadAttention.in_proj_weight")


def _per_head(heads: int, module: nn.Module, shape: torch.Size) -> tuple[Selection, ...]:
    """Rows interleaved per head: ``[q_h; k_h; v_h]`` for each head ``h``."""
    head_dim = shape[0] // (3 * heads) if heads else 0
    what = f"{type(module).__name__} rows interleaved per head ({heads} heads)"
    return _grouped(0, shape, heads, (head_dim,) * 3, what)


def _falcon(module: nn.Module, shape: torch.Size) -> tuple[Selection, ...]:
    """Falcon's three layouts, as ``FalconAttention._split_heads`` reads them."""
    config, head_dim = module.config, module.head_dim
    heads = config.num_attention_heads
    what = (
        f"FalconAttention (new_decoder_architecture={config.new_decoder_architecture}, "
        f"multi_query={config.multi_query})"
    )
    if config.new_decoder_architecture:  # per key/value head: its query heads, K, V
        groups = config.num_kv_heads
        return _grouped(0, shape, groups, ((heads // groups) * head_dim, head_dim, head_dim), what)
    if config.multi_query:  # every query head, then the one key and value head
        return _grouped(0, shape, 1, (heads * head_dim, head_dim, head_dim), what)
    return _grouped(0, shape, heads, (head_dim,) * 3, what)


def _gpt2_columns(module: nn.Module, shape: torch.Size) -> tuple[Selection, ...]:
    """GPT-2's ``Conv1D`` keeps its weight as ``[in, out]``: Q, K, V are column blocks."""
    return _grouped(1, shape, 1, (shape[0],) * 3, "GPT-2 c_attn columns")


def _gpt2_cross(module: nn.Module, shape: torch.Size) -> tuple[Selection | None, ...]:
    """GPT-2 cross-attention: query in ``q_attn``; ``c_attn``'s columns are K then V."""
    embed = shape[0]
    if shape[1] != 2 * embed:
        raise ValueError(
            f"GPT-2 cross-attention c_attn: expected {embed} key + {embed} value columns, "
            f"but the weight has shape {tuple(shape)}"
        )
    return None, Selection(1, ((0, embed),)), Selection(1, ((embed, 2 * embed),))


_GPT2 = ("GPT2Attention", "ImageGPTAttention", "DecisionTransformerGPT2Attention")

# Tried in order; the first layout whose query and key weights an attention module holds
# (as 2-D parameters) is its layout.
ATTENTION_LAYOUTS = (
    AttentionLayout("BERT, RoBERTa, ALBERT, ELECTRA",
                    ("query.weight", "key.weight", "value.weight")),
    AttentionLayout("Llama, Gemma, Mistral, Qwen2, BART, OPT, CLIP, Whisper, HF ViT",
                    ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
    AttentionLayout("T5, MPNet", ("q.weight", "k.weight", "v.weight")),
    AttentionLayout("DistilBERT, XLM, FlauBERT", ("q_lin.weight", "k_lin.weight", "v_lin.weight")),
    AttentionLayout("DeBERTa-v2, SEW-D, ProphetNet",
                    ("query_proj.weight", "key_proj.weight", "value_proj.weight")),
    AttentionLayout("Conformer (Wav2Vec2-Conformer, SeamlessM4T)",
                    ("linear_q.weight", "linear_k.weight", "linear_v.weight")),
    AttentionLayout("nn.MultiheadAttention (kdim, vdim != embed_dim)",
                    ("q_proj_weight", "k_proj_weight", "v_proj_weight"),
                    classes=("MultiheadAttention",)),
    AttentionLayout("nn.MultiheadAttention (nn.Transformer*, torchvision ViT): rows",
                    ("in_proj_weight",) * 3, _in_proj, classes=("MultiheadAttention",)),
    AttentionLayout("torchvision Swin, timm ViT, BLIP, SAM: [Q; K; V] rows",
                    ("qkv.weight",) * 3, _stacked),
    AttentionLayout("ModernBERT, MPT: [Q; K; V] rows", ("Wqkv.weight",) * 3, _stacked),
    AttentionLayout("Phi-3: [Q; K; V] rows, sizes from the config",
                    ("qkv_proj.weight",) * 3, _stacked),
    AttentionLayout("GPT-2 cross-attention: q_attn, then c_attn columns [K, V]",
                    ("q_attn.weight", "c_attn.weight", "c_attn.weight"), _gpt2_cross,
                    classes=_GPT2),
    AttentionLayout("GPT-2, ImageGPT, Decision Transformer: c_attn columns [Q, K, V]",
                    ("c_attn.weight",) * 3, _gpt2_columns, classes=_GPT2),
    AttentionLayout("GPT-NeoX: rows [q; k; v] per head (config.num_attention_heads)",
                    ("query_key_value.weight",) * 3,
                    lambda m, s: _per_head(m.config.num_attention_heads, m, s),
                    classes=("GPTNeoXAttention",)),
    AttentionLayout("BLOOM: rows [q; k; v] per head (config.n_head)",
                    ("query_key_value.weight",) * 3, lambda m, s: _per_head(m.num_heads, m, s),
                    classes=("BloomAttention",)),
    AttentionLayout("Falcon: rows per head or per key/value group, from the config",
                    ("query_key_value.weight",) * 3, _falcon, classes=("FalconAttention",)),
    AttentionLayout("DeBERTa: in_proj rows [q; k; v] per head",
                    ("in_proj.weight",) * 3,
                    lambda m, s: _per_head(m.num_attention_heads, m, s),
                    classes=("DisentangledSelfAttention",)),
)  # fmt: skip


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _weight(module: nn.Module, path: str) -> nn.Parameter | None:
    """The 2-D parameter at ``path`` in ``module``, if there is one."""
    try:
        weight = module.get_parameter(path)
    except AttributeError:
        return None
    return weight if isinstance(weight, nn.Parameter) and weight.dim() == 2 else None


def layout_of(module: nn.Module) -> AttentionLayout | None:
    """The first layout of :data:`ATTENTION_LAYOUTS` that ``module`` holds, if any."""
    classes = {cls.__name__ for cls in type(module).__mro__}
    for layout in ATTENTION_LAYOUTS:
        if layout.classes and not classes.intersection(layout.classes):
            continue
        if all(_weight(module, path) is not None for path in layout.weights[:2]):
            return layout
    return None


def _projections(module: nn.Module) -> dict[str, nn.Parameter]:
    """The 2-D weights an attention module holds itself or in its direct children."""
    found = {name: p for name, p in module.named_parameters(recurse=False) if p.dim() == 2}
    for child_name, child in module.named_children():
        weight = getattr(child, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            found[f"{child_name}.weight"] = weight
    return found


def _unknown_attention(name: str, module: nn.Module, weights: Mapping) -> ValueError:
    listed = ", ".join(f"{path} {list(w.shape)}" for path, w in weights.items())
    prefix = f"*.{name.rpartition('.')[2]}." if name else ""
    first, second = list(weights)[:2]
    known = "; ".join(f"{', '.join(layout.weights[:2])} ({layout.models})"
                      for layout in ATTENTION_LAYOUTS)  # fmt: skip
    return ValueError(
        f"attention module {name!r} ({type(module).__name__}) has projection weights "
        f"{listed}, but no layout of worm_fast.representative.ATTENTION_LAYOUTS says which "
        f"are query and key. Name them with patterns over model.named_parameters(), e.g. "
        f"representative=['{prefix}{first}', '{prefix}{second}'] if those are its query "
        f"and key. Known query, key weights: {known}"
    )


def attention_parts(model: nn.Module, *, include_value: bool = False) -> dict[str, Representative]:
    """Query and key (and with ``include_value`` value) weights or parts of weights, by
    parameter name, in module order; one entry per parameter (a fused weight's Q and K
    parts are one selection)."""
    found: dict[str, Representative] = {}
    roles = slice(0, 3 if include_value else 2)
    for name, module in named_modules(model):
        if not _is_attention(module):
            continue
        layout = layout_of(module)
        if layout is None:
            weights = _projections(module)
            if len(weights) >= 2:  # one weight or none: a container or a pooling module
                raise _unknown_attention(name, module, weights)
            continue
        key_shape = _weight(module, layout.weights[1]).shape
        blocks = layout.blocks(module, key_shape) if layout.blocks else (None,) * 3
        parts: dict[str, Selection | None] = {}
        for path, block in zip(layout.weights[roles], blocks[roles]):
            if _weight(module, path) is None:
                continue  # no value projection (keys double as values)
            if path in parts:
                parts[path] = None if parts[path] is None or block is None else parts[path] | block
            else:
                parts[path] = block
        for path, selection in parts.items():
            full_name = f"{name}.{path}" if name else path
            found[full_name] = Representative(_weight(module, path), selection, name=full_name)
    return found


# -- choosing -------------------------------------------------------------------------


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
            "modules whose class name contains 'Attention' holding the query and key "
            "weights of a layout in worm_fast.representative.ATTENTION_LAYOUTS (e.g. "
            "query/key/value, q_proj/k_proj/v_proj, a fused qkv or in_proj_weight); for "
            "other layouts pass name patterns, e.g. ['*.attn.wq.weight', '*.attn.wk.weight']"
        )
    elif representative == "batchnorm":
        looked_for = (
            "affine BatchNorm layers; for GroupNorm or LayerNorm (e.g. ConvNeXt) use the "
            "'norm' preset, or pass name patterns, e.g. ['*.bn*.weight']"
        )
    elif representative == "norm":
        looked_for = (
            "affine BatchNorm, GroupNorm, InstanceNorm or one-dimensional LayerNorm layers; "
            "pass name patterns, e.g. ['*.norm*.weight']"
        )
    else:
        looked_for = "pass name patterns that match model.named_parameters(), e.g. ['*.bn*.weight']"
    return ValueError(
        f"no representative parameters found for {representative!r} in "
        f"{type(model).__name__}: {looked_for}"
    )


def representatives(
    model_or_params: nn.Module | Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    representative: str | Iterable[str] = "batchnorm",
) -> dict[str, Representative]:
    """The representative parameters and the elements of each that are searched, by
    name, in a stable order.

    Given a module, ``representative`` is a preset or a list of name patterns (a
    parameter shared by several modules counts once, under its first name); given
    parameters directly (a list, or a name → parameter or ``Representative`` mapping),
    they are all used, and none may be given twice.
    """
    if isinstance(model_or_params, Mapping):
        chosen = dict(model_or_params)
    elif not isinstance(model_or_params, nn.Module):
        chosen = {f"param{i}": p for i, p in enumerate(model_or_params)}
    elif representative == "batchnorm":
        chosen = batchnorm_weights(model_or_params)
    elif representative == "norm":
        chosen = norm_weights(model_or_params)
    elif representative in ("attention", "attention_qkv"):
        include_value = representative == "attention_qkv"
        chosen = attention_parts(model_or_params, include_value=include_value)
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
    parts, seen = {}, {}
    for name, part in chosen.items():
        part = part if isinstance(part, Representative) else Representative(part, name=name)
        if id(part.param) in seen:
            if isinstance(model_or_params, nn.Module):
                continue  # shared between modules: searched and truncated once
            raise ValueError(
                f"representative parameters {seen[id(part.param)]!r} and {name!r} are the same "
                "tensor; give each parameter once (a Selection names several blocks of one)"
            )
        parts[name], seen[id(part.param)] = part, name
    return parts


def select(
    model_or_params: nn.Module | Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    representative: str | Iterable[str] = "batchnorm",
) -> dict[str, torch.Tensor]:
    """The parameters that hold representative elements, by name, in a stable order
    (:func:`representatives` also says which of their elements)."""
    return {
        name: part.param for name, part in representatives(model_or_params, representative).items()
    }
