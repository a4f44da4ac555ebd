"""worm_fast.distributed in one process: the checksum that proves replicas' masks equal,
the refusal of replaced parameters, and how a search chooses its placement (a gloo group
of one process where torch.distributed must be initialized)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.distributed.scenarios import TOWER_SEARCH, Tower, counted_collectives
from worm_fast import distributed as wdist
from worm_fast.search import EarlyBirdSearch


@pytest.fixture
def single_process_group(tmp_path):
    """A gloo group of one process, destroyed after the test."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_checksum_changes_with_every_single_bit():
    row = torch.randint(
        0, 256, (64,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    original = int(wdist.mask_checksum(row))
    assert 0 <= original < 2**62
    assert int(wdist.mask_checksum(row.clone())) == original
    for bit in range(row.numel() * 8):
        flipped = row.clone()
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert int(wdist.mask_checksum(flipped)) != original, bit


def test_a_parameter_replaced_after_the_search_was_built_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    search = EarlyBirdSearch(model, mode="eb")
    search.check()
    model[1].weight = nn.Parameter(model[1].weight.detach().clone())
    with pytest.raises(ValueError, match=r"'1.weight' was replaced in the model after the search"):
        search.check()
    assert len(search.records) == 1


def test_process_group_must_be_a_group_none_or_world():
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed ProcessGroup"):
        EarlyBirdSearch(nn.BatchNorm1d(3), mode="eb", process_group="default")


def test_without_torch_distributed_the_search_is_local():
    assert not dist.is_initialized()
    assert isinstance(EarlyBirdSearch(nn.BatchNorm1d(3), mode="eb").placement, wdist.Local)


def test_process_group_none_communicates_nothing(single_process_group):
    replicated = EarlyBirdSearch(nn.BatchNorm1d(3), mode="eb")
    assert isinstance(replicated.placement, wdist.Replicated)  # the default: the world
    search = EarlyBirdSearch(nn.BatchNorm1d(3), mode="eb", process_group=None)
    assert isinstance(search.placement, wdist.Local)
    with counted_collectives(calls := []):
        search.check()
        search.check()
    assert calls == []


def sharded_tower(**fully_shard_kwargs) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tower()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)), **fully_shard_kwargs)
    return model


def test_one_shard_searches_as_one_process(single_process_group):
    torch.manual_seed(0)
    bare = Tower()
    sharded = sharded_tower()
    search = EarlyBirdSearch(sharded, **TOWER_SEARCH)
    reference = EarlyBirdSearch(bare, process_group=None, **TOWER_SEARCH)
    assert isinstance(search.placement, wdist.Sharded)
    for _ in range(2):
        with torch.no_grad():
            for (_, p), (_, q) in zip(sharded.named_parameters(), bare.named_parameters()):
                noise = torch.randn(q.shape)
                q.add_(noise)
                p.to_local().add_(noise)
        search.check()
        reference.check()
    assert search.records == reference.records
    ticket = wdist.gather_ticket(search, search.candidate())
    for name, mask in reference.candidate().packed.items():
        assert torch.equal(ticket.packed[name], mask), name


def test_sharded_and_plain_representative_parameters_are_refused(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Tower()
    fully_shard(model.a, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match=r"'a.weight' is a DTensor \(sharded\) but 'norm.weight'"):
        EarlyBirdSearch(model, **TOWER_SEARCH)


def test_placements_other_than_shard_0_are_refused(single_process_group):
    from torch.distributed.tensor import Shard

    model = sharded_tower(shard_placement_fn=lambda param: Shard(param.dim() - 1))
    with pytest.raises(ValueError, match=r"placed \(Shard\(dim=1\),\).*supports FSDP2's default"):
        EarlyBirdSearch(model, **TOWER_SEARCH)


def test_parts_of_fused_weights_over_shards_are_refused(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match=r"parts of fused weights .* not searched over sharded"):
        EarlyBirdSearch(model, mode="eb", representative="attention")
