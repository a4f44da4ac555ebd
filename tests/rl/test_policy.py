"""WORM-RL's policy: trained with SB3's DQN on recorded trajectories, saved and loaded
like any SB3 model, refused when made for another observation layout, evaluated on
held-out seeds only, and used by EarlyBirdSearch(mode="rl")."""

import pytest
import torch
from stable_baselines3 import DQN
from torch import nn

from worm_fast import EarlyBirdSearch, WormSGD
from worm_fast.rl.env import ReplaySearchEnv
from worm_fast.rl.observation import STOP, TRIGGER, ObservationLayout
from worm_fast.rl.policy import METADATA, PolicyError, check_held_out, load_policy
from worm_fast.rl.train import evaluate, train_on_trajectories


@pytest.fixture(scope="module")
def policy_file(trajectories, tmp_path_factory):
    policy = train_on_trajectories(trajectories[:2], timesteps=200, stop_penalty=0.2)
    return policy.save(tmp_path_factory.mktemp("policy") / "policy")


def test_saved_policy_loads_with_its_layout_and_seeds(policy_file, trajectories):
    assert policy_file.suffix == ".zip"
    policy = load_policy(policy_file)
    assert policy.training_seeds == (100, 101) and policy.stop_penalty == 0.2
    assert policy.layout == ObservationLayout() and policy.actions == ("continue", "stop")
    assert DQN.load(policy_file).observation_space.shape == (policy.layout.size,)
    rows = evaluate(policy, trajectories[2:], stop_penalty=0.2)
    assert [row["seed"] for row in rows] == [102]
    assert 1 <= rows[0]["policy_check"] <= 3
    assert rows[0]["best_reward"] >= max(rows[0]["policy_reward"], rows[0]["eb_rule_reward"])


def test_held_out_seeds_only(policy_file):
    policy = load_policy(policy_file)
    check_held_out(policy, [102, 103])
    with pytest.raises(PolicyError, match=r"seeds \[101\] made trajectories"):
        check_held_out(policy, range(101, 104))


def test_policies_for_another_layout_are_refused(policy_file, trajectories, tmp_path):
    model = DQN.load(policy_file)
    getattr(model, METADATA)["observation"]["names"][0] = "something else"
    model.save(tmp_path / "renamed.zip")
    with pytest.raises(PolicyError, match="another observation layout"):
        load_policy(tmp_path / "renamed.zip")

    wider = DQN("MlpPolicy", ReplaySearchEnv(trajectories, layout=ObservationLayout(6)))
    metadata = {"observation": ObservationLayout().to_dict(), "actions": ["continue", "stop"]}
    setattr(wider, METADATA, metadata)
    wider.save(tmp_path / "wider.zip")
    with pytest.raises(PolicyError, match=r"takes observations of shape \(15,\)"):
        load_policy(tmp_path / "wider.zip")

    DQN("MlpPolicy", ReplaySearchEnv(trajectories)).save(tmp_path / "plain.zip")
    with pytest.raises(PolicyError, match="without worm-fast's observation layout"):
        load_policy(tmp_path / "plain.zip")
    (tmp_path / "junk.zip").write_text("not a zip")
    with pytest.raises(PolicyError, match="not a stable-baselines3 DQN file"):
        load_policy(tmp_path / "junk.zip")


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_search_stops_where_the_policy_says(policy_file):
    calls = []

    def stop_at_second_check(observation):
        calls.append(observation)
        return STOP if len(calls) == 2 else 0

    search = EarlyBirdSearch(tiny_model(), mode="rl", policy=stop_at_second_check, max_checks=5)
    assert not search.check(train_loss=1.0).converged
    record = search.check(train_loss=0.9)
    assert record.converged and search.converged and search.ticket.epoch == 2
    assert calls[1].shape == (ObservationLayout().size,) and calls[1][-3] == pytest.approx(0.4)
    loaded = EarlyBirdSearch(tiny_model(), mode="rl", policy=policy_file, max_checks=5)
    assert loaded.layout == ObservationLayout() and loaded.check(train_loss=1.0).epoch == 1


def test_trigger_action_switches_truncation_on():
    class Trigger:
        actions = ("continue", "stop", "trigger")

        def __call__(self, observation):
            return TRIGGER

    model = tiny_model()
    with pytest.raises(TypeError, match="needs an optimizer with set_truncation"):
        EarlyBirdSearch(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="rl",
                        policy=Trigger(), max_checks=3)  # fmt: skip
    optimizer = WormSGD(model.parameters(), lr=0.1)
    search = EarlyBirdSearch(model, optimizer, mode="rl", policy=Trigger(), max_checks=3)
    record = search.check(train_loss=1.0)
    assert record.triggered and search.triggered_at == 1 and optimizer.truncation == search.r < 1


def test_rl_mode_needs_max_checks_and_a_usable_policy(tmp_path):
    with pytest.raises(ValueError, match="mode='rl' needs max_checks"):
        EarlyBirdSearch(tiny_model(), mode="rl")
    with pytest.raises(FileNotFoundError, match="no policy file"):
        EarlyBirdSearch(tiny_model(), mode="rl", policy=tmp_path / "none.zip", max_checks=3)
    with pytest.raises(ValueError, match="belong to mode='rl'"):
        EarlyBirdSearch(tiny_model(), mode="eb", max_checks=3)
    search = EarlyBirdSearch(tiny_model(), mode="rl", max_checks=3)
    with pytest.raises(RuntimeError, match="run check\\(\\) first"):
        search.act(STOP)
