"""The WORM-RL environments pass gymnasium's checker, and their rewards are the
recorded tickets' validation accuracy minus the price of the epochs used."""

from dataclasses import replace

import pytest
from gymnasium.utils.env_checker import check_env

from tests.rl.conftest import TINY
from worm_fast.rl.env import OnlineSearchEnv, ReplaySearchEnv
from worm_fast.rl.observation import CONTINUE, STOP, TRIGGER


def test_replay_env_passes_the_checker(trajectories):
    check_env(ReplaySearchEnv(trajectories), skip_render_check=True)


def test_replay_rewards(trajectories):
    env = ReplaySearchEnv(trajectories, stop_penalty=0.3)
    trajectory = trajectories[1]
    _, info = env.reset(options={"trajectory": 1})
    assert info == {"seed": trajectory.seed, "check": 1}
    _, reward, terminated, _, info = env.step(CONTINUE)
    assert (reward, terminated, info["check"]) == (0.0, False, 2)
    _, reward, terminated, _, info = env.step(STOP)
    assert terminated and info["stopped"]
    assert reward == pytest.approx(trajectory.ticket_accuracy[1] / 100 - 0.3 * 2 / 3)
    # At the last check the search has no epoch left: continuing ends it there too.
    env.reset(options={"trajectory": 0})
    env.step(CONTINUE)
    _, _, terminated, _, info = env.step(CONTINUE)
    assert not terminated and info["check"] == 3
    _, reward, terminated, _, info = env.step(CONTINUE)
    assert terminated and info["check"] == 3
    assert reward == pytest.approx(trajectories[0].reward(2, 0.3))


def test_replay_env_rejects_bad_input(trajectories):
    with pytest.raises(ValueError, match="at least one recorded trajectory"):
        ReplaySearchEnv([])
    with pytest.raises(ValueError, match="stop_penalty must be"):
        ReplaySearchEnv(trajectories, stop_penalty=-1)
    env = ReplaySearchEnv(trajectories)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="0 \\(continue\\) or 1 \\(stop\\)"):
        env.step(TRIGGER)


def test_online_env_trains_for_real_and_triggers(trajectories):
    env = OnlineSearchEnv(TINY, [100], reward_steps=2)
    check_env(env, skip_render_check=True)
    observation, info = env.reset(options={"seed": 100})
    # The same seed and actions as the recording: the same first check.
    assert observation.tolist() == pytest.approx(
        env.layout.observe(trajectories[0].features[:1], 3).tolist()
    )
    env.step(TRIGGER)
    assert env.session.search.triggered_at == 1 and env.session.optimizer.truncation < 1
    _, reward, terminated, _, info = env.step(STOP)
    assert terminated and info["check"] == 2 and -1 <= reward <= 1


def test_a_session_refuses_a_check_at_initialization():
    # The policy sees the fraction of epochs run, counted one check per trained epoch.
    from worm_fast.rl.session import SearchSession

    with pytest.raises(ValueError, match="first_check='init' is not supported"):
        SearchSession(replace(TINY, first_check="init"))
