"""Every common architecture, on tiny models built from configs (nothing downloaded):
fused attention projections (nn.MultiheadAttention, torchvision ViT and Swin, GPT-2,
GPT-NeoX, BLOOM, Falcon, DeBERTa, Phi-3, ModernBERT), renamed split projections
(DistilBERT, DeBERTa-v2) and the ``norm`` preset (ConvNeXt's LayerNorm, GroupNorm).

For each: the representative parts found (checked against what the model computes: the
selected elements are exactly those that move its attention probabilities), one full
search check whose packed masks obey the contract of a selection, and one truncated
optimizer step on every (backend, device) that runs here (``backend_device``), in which
only the selection's pruned elements are scaled by ``r``.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.utils import randn
from worm_fast import WormSGD, ops, prune
from worm_fast.representative import ATTENTION_LAYOUTS, layout_of, representatives, select
from worm_fast.search import EarlyBirdSearch
from worm_fast.selection import Representative, Selection

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

R = 3e-3
IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    preset: str
    names: list[str]  # the representative parameters, in order
    # The attention probabilities of the probed representative's layer (None: not probed).
    probs: Callable[[nn.Module], torch.Tensor] | None = None
    probed: int = 0  # which representative the probe checks


def first_softmax(run: Callable[[], object]) -> torch.Tensor:
    """The output of the first ``F.softmax`` of a forward pass: layer 0's attention
    probabilities in every model here (eager attention)."""
    captured = []
    real = F.softmax

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if not captured:
            captured.append(out.detach().clone())
        return out

    with mock.patch.object(F, "softmax", spy), torch.no_grad():
        run()
    assert captured, "the forward pass ran no softmax"
    return captured[0]


def hf(family: str, model_class: str = "Model", **config) -> Callable[[], nn.Module]:
    def build():
        torch.manual_seed(0)
        settings = dict(vocab_size=50, attn_implementation="eager", **config)
        model_config = getattr(transformers, f"{family}Config")(**settings)
        return getattr(transformers, f"{family}{model_class}")(model_config).eval()

    return build


def hf_probs(model):
    return first_softmax(lambda: model(input_ids=IDS))


def mha_probs(mha: nn.MultiheadAttention, key_dim: int) -> torch.Tensor:
    x = randn(2, 5, mha.embed_dim, seed=1)
    kv = randn(2, 5, key_dim, seed=2)
    with torch.no_grad():
        return mha(x, kv, kv, need_weights=True, average_attn_weights=False)[1]


def mha(**kwargs) -> Callable[[], nn.Module]:
    def build():
        torch.manual_seed(0)
        return nn.MultiheadAttention(16, 2, batch_first=True, **kwargs)

    return build


def transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def tiny_vit():
    """torchvision's vit_b_16 architecture (nn.MultiheadAttention in EncoderBlock), tiny."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def tiny_swin():
    """torchvision's swin_t architecture (ShiftedWindowAttention.qkv), tiny."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [2, 2], stochastic_depth_prob=0.0).eval()


def swin_probs(model):
    return first_softmax(lambda: model(randn(1, 3, 16, 16, seed=3)))


def randomized_norms(model: nn.Module) -> nn.Module:
    """γ as after some training (all 1 at initialization, every one tied)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in select(model, "norm").values():
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def tiny_convnext():
    """torchvision's convnext_tiny architecture (LayerNorm2d, channels-last LayerNorm)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    return randomized_norms(ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]))


class MixedNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm2d(8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.ln_chw = nn.LayerNorm([8, 6, 6])  # one γ per element, not per channel

    def forward(self, x):
        return self.ln_chw(self.inorm(self.bn(self.gn(self.conv(x)))))


def mixed_norms():
    torch.manual_seed(0)
    return randomized_norms(MixedNorms())


def tiny_conformer():
    torch.manual_seed(0)
    config = transformers.Wav2Vec2ConformerConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=3, vocab_size=50,
        position_embeddings_type="relative", attn_implementation="eager",
    )  # fmt: skip
    return transformers.Wav2Vec2ConformerModel(config).eval()


def layers(pattern: str, count: int) -> list[str]:
    return [pattern.format(i) for i in range(count)]


BERT_LIKE = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, hidden_size=16)
FALCON = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=4)
FALCON_NAME = ["h.0.self_attention.query_key_value.weight"]

CASES = {
    "nn.MultiheadAttention": Case(
        mha(), "attention", ["in_proj_weight"], lambda m: mha_probs(m, 16)
    ),
    "nn.MultiheadAttention(kdim)": Case(
        mha(kdim=8, vdim=8), "attention", ["q_proj_weight", "k_proj_weight"],
        lambda m: mha_probs(m, 8),
    ),
    "nn.TransformerEncoder": Case(
        transformer_encoder, "attention", layers("layers.{}.self_attn.in_proj_weight", 2)
    ),
    "torchvision ViT": Case(
        tiny_vit, "attention",
        layers("encoder.layers.encoder_layer_{}.self_attention.in_proj_weight", 2),
    ),
    "torchvision Swin": Case(
        tiny_swin, "attention", ["features.1.0.attn.qkv.weight", "features.3.0.attn.qkv.weight"],
        swin_probs,
    ),
    "GPT-2": Case(
        hf("GPT2", n_embd=16, n_layer=2, n_head=2, n_positions=16), "attention",
        layers("h.{}.attn.c_attn.weight", 2), hf_probs,
    ),
    "GPT-2 cross-attention": Case(
        hf("GPT2", n_embd=16, n_layer=1, n_head=2, n_positions=16, add_cross_attention=True),
        "attention", ["h.0.attn.c_attn.weight", "h.0.crossattention.q_attn.weight",
                      "h.0.crossattention.c_attn.weight"],
        lambda m: m(input_ids=IDS, encoder_hidden_states=randn(2, 4, 16, seed=4),
                    output_attentions=True).cross_attentions[0].detach(),
        probed=2,
    ),
    "BERT": Case(
        hf("Bert", **BERT_LIKE), "attention",
        [f"encoder.layer.{i}.attention.self.{p}.weight" for i in range(2)
         for p in ("query", "key")], hf_probs,
    ),
    "Llama (grouped-query)": Case(
        hf("Llama", **BERT_LIKE, num_key_value_heads=1), "attention",
        [f"layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qk"], hf_probs,
    ),
    "T5": Case(
        hf("T5", d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8), "attention",
        [f"{part}.block.0.layer.{layer}.{kind}.{p}.weight"
         for part, attentions in (("encoder", ["SelfAttention"]),
                                  ("decoder", ["SelfAttention", "EncDecAttention"]))
         for layer, kind in enumerate(attentions) for p in "qk"],
        lambda m: first_softmax(lambda: m(input_ids=IDS, decoder_input_ids=IDS)),
    ),
    "Wav2Vec2-Conformer": Case(
        tiny_conformer, "attention",
        [f"encoder.layers.0.self_attn.linear_{p}.weight" for p in "qk"],
        lambda m: first_softmax(lambda: m(randn(1, 400, seed=7))),
    ),
    "DistilBERT": Case(
        hf("DistilBert", dim=16, n_layers=2, n_heads=2, hidden_dim=32), "attention",
        [f"transformer.layer.{i}.attention.{p}_lin.weight" for i in range(2) for p in "qk"],
        hf_probs,
    ),
    "DeBERTa-v2": Case(
        hf("DebertaV2", **BERT_LIKE), "attention",
        [f"encoder.layer.{i}.attention.self.{p}_proj.weight" for i in range(2)
         for p in ("query", "key")], hf_probs,
    ),
    "DeBERTa": Case(
        hf("Deberta", **BERT_LIKE), "attention",
        layers("encoder.layer.{}.attention.self.in_proj.weight", 2), hf_probs,
    ),
    "GPT-NeoX": Case(
        hf("GPTNeoX", **BERT_LIKE), "attention",
        layers("layers.{}.attention.query_key_value.weight", 2), hf_probs,
    ),
    "BLOOM": Case(
        hf("Bloom", hidden_size=16, n_layer=2, n_head=2), "attention",
        layers("h.{}.self_attention.query_key_value.weight", 2), hf_probs,
    ),
    "Falcon": Case(hf("Falcon", **FALCON), "attention", FALCON_NAME, hf_probs),
    "Falcon multi-query": Case(
        hf("Falcon", multi_query=True, **FALCON), "attention", FALCON_NAME, hf_probs
    ),
    "Falcon new decoder": Case(
        hf("Falcon", new_decoder_architecture=True, num_kv_heads=2, **FALCON), "attention",
        FALCON_NAME, hf_probs,
    ),
    "Phi-3": Case(
        hf("Phi3", hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=32, pad_token_id=0),
        "attention", ["layers.0.self_attn.qkv_proj.weight"], hf_probs,
    ),
    "ModernBERT": Case(
        hf("ModernBert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           cls_token_id=1, sep_token_id=2),
        "attention", ["layers.0.attn.Wqkv.weight"], hf_probs,
    ),
    "ConvNeXt (norm)": Case(
        tiny_convnext, "norm",
        ["features.0.1.weight", "features.1.0.block.2.weight", "features.2.0.weight",
         "features.3.0.block.2.weight", "classifier.0.weight"],
    ),
    "GroupNorm, BatchNorm, InstanceNorm (norm)": Case(
        mixed_norms, "norm", ["gn.weight", "bn.weight", "inorm.weight"]
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """Each case's model, built once; tests that change one work on a copy."""
    return {name: case.build() for name, case in CASES.items()}


def selected_bool(part: Representative) -> torch.Tensor:
    """Which elements of the parameter the selection names, built from its ranges alone."""
    selected = torch.zeros(part.param.shape, dtype=torch.bool, device=part.param.device)
    if part.selection is None:
        return selected.fill_(True)
    for start, stop in part.selection.ranges:
        index = [slice(None)] * 2
        index[part.selection.dim] = slice(start, stop)
        selected[tuple(index)] = True
    return selected


# -- discovery ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_discovery_finds_every_layer(case, models):
    found = representatives(models[case], CASES[case].preset)
    assert list(found) == CASES[case].names
    params = dict(models[case].named_parameters())
    assert all(part.param is params[name] for name, part in found.items())


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case.probs])
def test_selection_is_exactly_what_moves_the_attention_probabilities(case, models):
    """Changing the unselected elements (value) leaves the probed layer's attention
    probabilities as they were; changing any one selected row or column (query or key)
    changes them: the selection is the layout the model computes with."""
    model = copy.deepcopy(models[case])
    probs = CASES[case].probs
    name, part = list(representatives(model, CASES[case].preset).items())[CASES[case].probed]
    weight, selected = part.param, selected_bool(part)
    dim = 0 if part.selection is None else part.selection.dim
    original, base = weight.detach().clone(), probs(model)
    with torch.no_grad():
        weight.add_(randn(*weight.shape, seed=5) * ~selected)
    assert torch.equal(probs(model), base), f"{name}: an unselected element moved them"
    for index in range(weight.shape[dim]):
        if not selected.select(dim, index).any():
            continue
        with torch.no_grad():
            weight.copy_(original)
            weight.select(dim, index).add_(randn(weight.shape[1 - dim], seed=index))
        assert not torch.allclose(probs(model), base), f"{name}: index {index} did not"


def test_the_full_size_torchvision_models():
    """vit_b_16, swin_t and convnext_tiny as torchvision builds them (weights=None)."""
    models = torchvision.models
    vit = representatives(models.vit_b_16(weights=None), "attention")
    assert len(vit) == 12 and all(
        part.param.shape == (2304, 768) and part.selection == Selection(0, ((0, 1536),))
        for part in vit.values()
    )
    swin = representatives(models.swin_t(weights=None), "attention")
    assert len(swin) == 12 and all(
        part.selection == Selection(0, ((0, 2 * part.param.shape[1]),)) for part in swin.values()
    )
    convnext = models.convnext_tiny(weights=None)
    norms = representatives(convnext, "norm")
    assert len(norms) == 23 and all(part.param.dim() == 1 for part in norms.values())
    with pytest.raises(ValueError, match=r"'batchnorm'.*the 'norm' preset"):
        representatives(convnext, "batchnorm")


def test_attention_qkv_takes_the_whole_fused_weight_and_the_value_projections(models):
    assert all(
        part.selection is None
        for part in representatives(models["GPT-NeoX"], "attention_qkv").values()
    )
    cross = representatives(models["GPT-2 cross-attention"], "attention_qkv")
    assert [part.selection for part in cross.values()] == [None] * 3
    split = select(models["DistilBERT"], "attention_qkv")
    assert list(split)[:3] == [f"transformer.layer.0.attention.{p}_lin.weight" for p in "qkv"]


def test_norm_preset_takes_per_channel_norms_and_batchnorm_stays_the_papers(models):
    assert list(select(models["GroupNorm, BatchNorm, InstanceNorm (norm)"], "batchnorm")) == [
        "bn.weight"
    ]
    norms = representatives(models["ConvNeXt (norm)"], "norm")
    assert all(isinstance(p.param, nn.Parameter) and p.selection is None for p in norms.values())


# -- one search check and one truncated step, on every backend ------------------------


@pytest.mark.parametrize("case", CASES)
def test_one_check_and_one_truncated_step(case, backend_device, models):
    backend, device = backend_device
    model = copy.deepcopy(models[case]).to(device)
    optimizer = WormSGD(model.parameters(), lr=1.0, backend=backend)
    search = EarlyBirdSearch(
        model, optimizer, mode="truncate", truncation=R, prune_ratio=0.5,
        representative=CASES[case].preset, backend=backend,
    )  # fmt: skip
    record = search.check()
    assert record.r == R
    parts = search.representatives

    # The search ranks the selected elements only, in the parameter's row-major order.
    selected = {name: selected_bool(part) for name, part in parts.items()}
    values = {name: part.param.detach()[selected[name]] for name, part in parts.items()}
    every = torch.cat(list(values.values())).abs()
    threshold = every.sort().values[int(every.numel() * 0.5)]
    ticket = search.candidate()
    masks = ticket.bool_masks()
    for name, part in parts.items():
        kept = ops.unpack_mask(ticket.packed[name], part.numel)
        assert torch.equal(kept, values[name].abs() > threshold), name
        assert ticket.packed[name].numel() == ops.packed_nbytes(part.numel)
        # The whole-parameter masks, the ticket's and the optimizer's: unselected kept.
        expected = torch.ones(part.param.shape, dtype=torch.bool, device=device)
        expected[selected[name]] = kept
        assert torch.equal(masks[name], expected), name
        held = optimizer.truncation_masks[part.param]
        assert torch.equal(
            ops.unpack_mask(held, part.param.numel()).view(part.param.shape), expected
        ), name
    total_kept = sum(int(mask.sum()) for mask in masks.values())
    unselected = sum(int((~s).sum()) for s in selected.values())
    assert ticket.density == pytest.approx((total_kept - unselected) / every.numel())
    assert 0 < ticket.density < 1

    # One step at lr 1: every element moves by -g, but the selection's pruned ones by -r g.
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    for i, param in enumerate(params.values()):
        param.grad = randn(*param.shape, seed=10 + i, device=device)
    optimizer.step()
    for name, param in params.items():
        factor = torch.ones(param.shape, device=device)
        if name in masks:
            factor[~masks[name]] = R
        torch.testing.assert_close(param.detach(), before[name] - param.grad * factor, msg=name)


# -- what else follows the selection --------------------------------------------------


def test_pruning_acts_on_the_selection_only(models):
    model = copy.deepcopy(models["GPT-NeoX"])
    search = EarlyBirdSearch(model, mode="eb", representative="attention")
    search.check()
    masks = search.candidate().bool_masks()
    # Channel removal is BatchNorm's: a fused weight or a LayerNorm has no such channels.
    with pytest.raises(ValueError, match="not the weight of an affine BatchNorm"):
        prune.prune_channels(model, masks, IDS)
    name = "layers.0.attention.query_key_value.weight"
    part = search.representatives[name]
    before, selected = part.param.detach().clone(), selected_bool(part)
    assert masks[name][~selected].all() and not masks[name][selected].all()
    prune.apply_unstructured(model, masks)
    # The pruned weight (prune keeps the parameter, unchanged, as weight_orig).
    after = model.layers[0].attention.query_key_value.weight.detach()
    assert torch.equal(after, before * masks[name])  # value rows untouched
    convnext = copy.deepcopy(models["ConvNeXt (norm)"])
    norm_search = EarlyBirdSearch(convnext, mode="eb", representative="norm")
    norm_search.check()
    with pytest.raises(ValueError, match="GroupNorm and LayerNorm normalize across channels"):
        prune.prune_channels(convnext, norm_search.candidate().bool_masks(), randn(1, 3, 32, 32))


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_penalty_and_scopes_see_the_selection_only(scope, models):
    model = copy.deepcopy(models["GPT-2"])
    search = EarlyBirdSearch(model, mode="gradient", representative="attention", scope=scope)
    search.check()
    if scope == "per_tensor":  # half of each selection, whatever the value columns hold
        for name, part in search.representatives.items():
            kept = int(ops.unpack_mask(search.candidate().packed[name], part.numel).sum())
            assert kept == part.numel - int(part.numel * 0.5) - 1  # |w| > the threshold
    with torch.no_grad():
        for part in search.representatives.values():
            part.param.add_(randn(*part.param.shape, seed=6) * 0.1)
    search.penalty().backward()
    for part in search.representatives.values():
        grad, selected = part.param.grad, selected_bool(part)
        assert grad[selected].abs().sum() > 0
        assert torch.count_nonzero(grad[~selected]) == 0  # value columns get no penalty


def test_search_state_and_ticket_round_trip_with_selections(models, tmp_path):
    model = copy.deepcopy(models["Falcon new decoder"])
    optimizer = WormSGD(model.parameters(), lr=0.1)
    search = EarlyBirdSearch(model, optimizer, mode="truncate", representative="attention")
    search.check()
    torch.save(search.state_dict(), tmp_path / "search.pt")
    resumed_optimizer = WormSGD(model.parameters(), lr=0.1)
    resumed = EarlyBirdSearch(model, resumed_optimizer, mode="truncate", representative="attention")
    resumed.load_state_dict(torch.load(tmp_path / "search.pt", weights_only=True))
    for name, mask in search.candidate().bool_masks().items():
        assert torch.equal(resumed.candidate().bool_masks()[name], mask)
    param = next(iter(search.params.values()))
    assert torch.equal(resumed_optimizer.truncation_masks[param], optimizer.truncation_masks[param])
    assert resumed.candidate().selections == search.candidate().selections != {}


def test_huggingface_callback_saves_a_ticket_over_fused_projections(tmp_path):
    from worm_fast.integrations.huggingface import WormCallback, load_ticket, worm_adamw

    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=50, pad_token_id=0
    )
    model = transformers.GPT2ForSequenceClassification(config)
    ids = torch.randint(1, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    train = [dict(input_ids=ids[i], labels=int(ids[i, 0] > 25)) for i in range(16)]
    args = transformers.TrainingArguments(
        str(tmp_path / "trainer"), num_train_epochs=3, per_device_train_batch_size=8,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True,
    )  # fmt: skip
    callback = WormCallback(mode="worm", stop_distance=0.9, window=2, save_dir=tmp_path / "t")
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, callbacks=[callback],
        optimizer_cls_and_kwargs=worm_adamw(args),
    )  # fmt: skip
    trainer.train()
    ticket = load_ticket(tmp_path / "t" / "ticket.pt")
    assert ticket.selections == callback.search.ticket.selections
    assert set(ticket.selections) == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    for name, mask in ticket.bool_masks().items():
        assert torch.equal(mask, callback.search.ticket.bool_masks()[name])
        assert mask[:, 32:].all()  # value columns kept


# -- errors -----------------------------------------------------------------------------


class WeirdAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wo = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)


def test_an_unknown_attention_module_lists_its_weights_and_how_to_name_them():
    model = nn.Sequential(nn.Linear(4, 4), WeirdAttention())
    message = (
        r"attention module '1' \(WeirdAttention\) has projection weights wq.weight \[4, 4\], "
        r"wk.weight \[4, 4\], wo.weight \[4, 4\].*representative=\['\*.1.wq.weight', "
        r"'\*.1.wk.weight'\].*q_lin.weight, k_lin.weight \(DistilBERT"
    )
    with pytest.raises(ValueError, match=message):
        representatives(model, "attention")
    assert list(select(model, ["*.wq.weight", "*.wk.weight"])) == ["1.wq.weight", "1.wk.weight"]
    with pytest.raises(ValueError, match=r"representative=\['wq.weight', 'wk.weight'\]"):
        representatives(WeirdAttention(), "attention")  # the model is the attention module


def test_a_weight_shared_by_two_attention_modules_is_searched_once():
    first, second = mha()(), mha()()
    second.in_proj_weight = first.in_proj_weight
    assert list(representatives(nn.ModuleList([first, second]), "attention")) == [
        "0.in_proj_weight"
    ]


def test_a_layout_that_contradicts_the_config_is_refused(models):
    model = copy.deepcopy(models["GPT-NeoX"])
    model.config.num_attention_heads = 5  # 48 rows are not 5 heads of [q; k; v]
    with pytest.raises(ValueError, match=r"GPTNeoXAttention rows interleaved per head \(5 heads"):
        representatives(model, "attention")


def test_every_layout_of_the_table_is_tested_here(models):
    covered = {
        layout_of(module) for name, model in models.items() if CASES[name].preset == "attention"
        for module in model.modules()
    }  # fmt: skip
    assert [layout for layout in ATTENTION_LAYOUTS if layout not in covered] == []


def test_selections_are_checked():
    with pytest.raises(ValueError, match="overlap"):
        Selection(0, ((0, 4), (2, 6)))
    with pytest.raises(ValueError, match="0 <= start < stop"):
        Selection(1, ((3, 3),))
    with pytest.raises(ValueError, match="must be 0 \\(rows\\) or 1"):
        Selection(2, ((0, 1),))
    assert Selection(0, ((4, 6), (0, 2), (2, 4))).ranges == ((0, 6),)
    weight = nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match="at least 8 rows, got shape \\(6, 4\\)"):
        Representative(weight, Selection(0, ((0, 8),)), name="w")
    assert Representative(weight, Selection(0, ((0, 6),))).selection is None  # all of it
    with pytest.raises(ValueError, match="'a' and 'b' are the same tensor"):
        representatives({"a": weight, "b": weight})


def test_a_block_of_rows_is_read_in_place_and_other_selections_are_gathered():
    weight = torch.arange(24.0).view(6, 4)
    rows = Representative(weight, Selection(0, ((2, 4),)))
    assert rows.values().data_ptr() == weight[2].data_ptr()
    columns = Representative(weight, Selection(1, ((0, 1), (3, 4))))
    assert torch.equal(columns.values(), weight[:, [0, 3]])
    kept = torch.tensor([True, False] * 6)
    whole = ops.unpack_mask(columns.whole_mask(ops.pack_mask(kept, 0.5)), 24).view(6, 4)
    assert torch.equal(whole[:, [1, 2]], torch.ones(6, 2, dtype=torch.bool))
    assert torch.equal(whole[:, [0, 3]].reshape(-1), kept)  # row-major over the selection
