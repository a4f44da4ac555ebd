"""A search over a model wrapped by torch.compile, DDP or DataParallel names the bare
model's parameters: the same names, the same parameter objects, so its records, state and
ticket apply to the bare model and back."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from worm_fast import WormSGD, prune
from worm_fast.representative import named_parameters, select
from worm_fast.search import EarlyBirdSearch


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(6, 6)
        self.key = nn.Linear(6, 6)
        self.value = nn.Linear(6, 6)

    def forward(self, x):
        weights = (self.query(x) @ self.key(x).transpose(-1, -2)).softmax(-1)
        return weights @ self.value(x)


class Net(nn.Module):
    """BatchNorm and attention, with a submodule to wrap on its own."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.attn = SelfAttention()

    def forward(self, x):
        return self.attn(self.features(x)).mean()


def bare_names(model: nn.Module, representative) -> list[str]:
    return list(select(model, representative))


REPRESENTATIVE = ["batchnorm", "attention", ["attn.*.weight", "features.1.*"]]


@pytest.fixture
def single_process_group(tmp_path):
    """A gloo group of one process (DDP needs one), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)  # fmt: skip
    yield
    dist.destroy_process_group()


def wrappings(model: nn.Module, ddp: bool) -> dict[str, nn.Module]:
    compiled_part = Net()
    compiled_part.load_state_dict(model.state_dict())
    compiled_part.attn = torch.compile(compiled_part.attn, backend="eager")
    found = {
        "compile": torch.compile(model, backend="eager"),
        "DataParallel": nn.DataParallel(model),
        "submodule compiled": compiled_part,
    }
    if ddp:
        found["DDP"] = nn.parallel.DistributedDataParallel(model)
        found["compile(DDP)"] = torch.compile(found["DDP"], backend="eager")
        found["DDP(compile)"] = nn.parallel.DistributedDataParallel(found["compile"])
    return found


def check_same_names(ddp: bool) -> None:
    torch.manual_seed(0)
    model = Net()
    bare = dict(model.named_parameters())
    for how, wrapped in wrappings(model, ddp).items():
        assert list(dict(named_parameters(wrapped))) == list(bare), how
        for representative in REPRESENTATIVE:
            chosen = select(wrapped, representative)
            assert list(chosen) == bare_names(model, representative), (how, representative)
            if how != "submodule compiled":  # a copy of the model: equal, not the same
                assert all(param is bare[name] for name, param in chosen.items()), how


def test_compile_and_data_parallel_are_looked_through():
    check_same_names(ddp=False)


def test_ddp_is_looked_through(single_process_group):
    check_same_names(ddp=True)


def test_a_bare_model_with_a_child_named_module_keeps_its_names():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.BatchNorm1d(3)

    assert list(select(Holder(), "batchnorm")) == ["module.weight"]


def trained_search(model: nn.Module, params, epochs: int = 3) -> EarlyBirdSearch:
    """A WORM search over ``model``, checked after each of ``epochs`` short epochs; the
    optimizer steps ``params`` (the bare model's)."""
    optimizer = WormSGD(params, lr=0.5, momentum=0.9)
    search = EarlyBirdSearch(
        model, optimizer, representative="attention", window=2, stop_distance=0.01,
        trigger_margin=0.5, prune_ratio=0.5,
    )  # fmt: skip
    data = torch.randn(epochs, 8, 4, 6, generator=torch.Generator().manual_seed(1))
    for epoch in range(epochs):
        for x in data[epoch]:
            optimizer.zero_grad()
            model(x).backward()
            optimizer.step()
        search.check()
    return search


def test_search_over_a_compiled_model_equals_one_over_the_bare_model():
    torch.manual_seed(0)
    bare = Net()
    twin = Net()
    twin.load_state_dict(bare.state_dict())
    compiled = torch.compile(twin, backend="eager")
    expected = trained_search(bare, bare.parameters())
    found = trained_search(compiled, twin.parameters())
    assert list(found.params) == list(expected.params)
    assert found.records == expected.records
    for name, mask in expected.candidate().packed.items():
        assert torch.equal(found.candidate().packed[name], mask), name
    # The compiled search's state loads into a search over the bare model, and back;
    # its ticket prunes the bare model.
    expected.load_state_dict(found.state_dict())
    found.load_state_dict(expected.state_dict())
    masks = found.candidate().bool_masks()
    prune.apply_unstructured(bare, masks)
    for name in ("attn.query.weight", "attn.key.weight"):
        weight = bare.get_submodule(name.rpartition(".")[0]).weight
        assert not weight[~masks[name]].any() and (weight[masks[name]] != 0).all(), name
