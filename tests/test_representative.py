"""Representative attention layers: found by structure and name in BERT, Llama, Gemma and
Mistral (tiny random configs, no downloads), the embedded MiniLM, and by user patterns."""

import pytest
import torch
from torch import nn

from worm_fast import WormAdamW
from worm_fast.presets import PAPER_TRANSFORMER
from worm_fast.representative import select
from worm_fast.search import EarlyBirdSearch

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, vocab_size=100,
)  # fmt: skip


def tiny_decoder(family: str) -> nn.Module:
    torch.manual_seed(0)
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    extra = dict(head_dim=8) if family == "Gemma" else {}
    return model_class(config_class(**TINY, **extra))


@pytest.fixture(scope="module")
def minilm():
    from worm_fast.experiments.models import load_classifier

    try:
        return load_classifier(num_labels=2, pad_token_id=0)
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_minilm_query_and_key_by_default_value_on_request(minilm):
    qk = select(minilm, "attention")
    assert list(qk) == [
        f"bert.encoder.layer.{i}.attention.self.{kind}.weight"
        for i in range(6)
        for kind in ("query", "key")
    ]
    assert all(param.shape == (384, 384) for param in qk.values())
    qkv = select(minilm, "attention_qkv")
    assert len(qkv) == 18
    assert set(qkv) - set(qk) == {
        f"bert.encoder.layer.{i}.attention.self.value.weight" for i in range(6)
    }
    # The representative tensors are the model's own parameters, not copies.
    params = dict(minilm.named_parameters())
    assert all(param is params[name] for name, param in qkv.items())


@pytest.mark.parametrize("family", ["Llama", "Gemma", "Mistral"])
def test_decoder_llms_q_and_k_projections(family):
    model = tiny_decoder(family)
    qk = select(model, "attention")
    assert list(qk) == [
        f"model.layers.{i}.self_attn.{kind}_proj.weight" for i in range(2) for kind in ("q", "k")
    ]
    qkv = select(model, "attention_qkv")
    assert [name for name in qkv if name not in qk] == [
        f"model.layers.{i}.self_attn.v_proj.weight" for i in range(2)
    ]
    assert not any("o_proj" in name or "mlp" in name for name in qkv)


class KeyValueMemory(nn.Module):
    """Has a Linear named ``key`` that is not attention."""

    def __init__(self):
        super().__init__()
        self.key = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)


class ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.key = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.memory = KeyValueMemory()
        self.attn = ToyAttention()


def test_attention_found_by_structure_not_by_name_alone():
    assert list(select(Toy(), "attention")) == ["attn.query.weight", "attn.key.weight"]
    assert list(select(Toy(), "attention_qkv")) == [
        "attn.query.weight", "attn.key.weight", "attn.value.weight",
    ]  # fmt: skip


def test_user_patterns_select_exactly_what_they_match():
    model = tiny_decoder("Llama")
    chosen = select(model, ["*.q_proj.weight"])
    assert list(chosen) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]


def test_no_attention_error_says_what_was_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"no representative parameters found.*q_proj.*patterns"):
        select(model, "attention")
    with pytest.raises(ValueError, match="unknown representative preset 'attn'"):
        select(model, "attn")


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_search_over_a_decoder_with_paper_transformer_settings(scope):
    model = tiny_decoder("Gemma")
    optimizer = WormAdamW(model.parameters(), lr=1e-3)
    settings = dict(PAPER_TRANSFORMER.kwargs(), mode="truncate", scope=scope)
    search = EarlyBirdSearch(model, optimizer, **settings)
    assert settings["stop_distance"] == 0.01 and settings["window"] == 3
    record = search.check()
    assert record.r == pytest.approx(3e-3)  # truncate: from the first check
    masks = search.candidate().bool_masks()
    params = dict(model.named_parameters())
    assert set(masks) == set(select(model, "attention"))
    for name, mask in masks.items():
        assert mask.shape == params[name].shape
        if scope == "per_tensor":
            assert mask.float().mean().item() == pytest.approx(0.5, abs=0.02)
    # The optimizer truncates exactly the representative parameters.
    assert {id(p) for p in optimizer.truncation_masks} == {id(params[n]) for n in masks}
