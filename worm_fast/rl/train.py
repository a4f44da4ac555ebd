"""Training WORM-RL's stopping policy with stable-baselines3's DQN, and evaluating it on
held-out seeds against Early-Bird's rule and the best stop in hindsight."""

from collections.abc import Sequence

import gymnasium as gym
from stable_baselines3 import DQN

from worm_fast.rl.env import ReplaySearchEnv
from worm_fast.rl.observation import ACTIONS, STOP, ObservationLayout
from worm_fast.rl.policy import DEFAULT_STOP_PENALTY, DEFAULT_TIMESTEPS, StopPolicy
from worm_fast.rl.record import Trajectory

# Small episodes (tens of steps) with the whole reward at the end: no discount (the
# reward already prices time), a small network, exploration over the first third.
DQN_SETTINGS = dict(
    learning_rate=1e-3,
    buffer_size=50_000,
    learning_starts=500,
    batch_size=64,
    gamma=1.0,
    train_freq=1,
    target_update_interval=250,
    exploration_fraction=0.3,
    exploration_final_eps=0.05,
    policy_kwargs=dict(net_arch=[64, 64]),
)


def train_policy(
    env: gym.Env,
    *,
    training_seeds: Sequence[int],
    timesteps: int = DEFAULT_TIMESTEPS,
    seed: int = 0,
    workload: dict | None = None,
    **dqn_overrides,
) -> StopPolicy:
    """A DQN trained on ``env`` (a ``ReplaySearchEnv`` or ``OnlineSearchEnv``) for
    ``timesteps`` steps; ``training_seeds`` are the runs its episodes came from."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    settings = {**DQN_SETTINGS, **dqn_overrides}
    settings["learning_starts"] = min(settings["learning_starts"], max(1, timesteps // 4))
    model = DQN("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **settings)
    model.learn(total_timesteps=timesteps)
    return StopPolicy(
        model=model,
        layout=env.layout,
        actions=ACTIONS[: env.action_space.n],
        training_seeds=tuple(int(s) for s in training_seeds),
        stop_penalty=env.stop_penalty,
        workload=workload or {},
    )


def train_on_trajectories(
    trajectories: Sequence[Trajectory],
    *,
    layout: ObservationLayout | None = None,
    stop_penalty: float = DEFAULT_STOP_PENALTY,
    timesteps: int = DEFAULT_TIMESTEPS,
    seed: int = 0,
) -> StopPolicy:
    """A policy trained by replaying ``trajectories`` (actions continue and stop)."""
    env = ReplaySearchEnv(list(trajectories), layout=layout, stop_penalty=stop_penalty)
    return train_policy(
        env, training_seeds=[t.seed for t in trajectories], timesteps=timesteps, seed=seed,
        workload=trajectories[0].workload(),
    )  # fmt: skip


def evaluate(
    policy: StopPolicy, trajectories: Sequence[Trajectory], stop_penalty: float
) -> list[dict]:
    """Per trajectory: where the policy stops, where Early-Bird's rule stops and where
    the best stop in hindsight is, each with its reward and ticket accuracy."""
    rows = []
    for trajectory in trajectories:
        index = 0
        while index + 1 < len(trajectory.features):
            observation = policy.layout.observe(
                trajectory.features[: index + 1], trajectory.max_checks
            )
            if policy(observation) == STOP:
                break
            index += 1
        stops = {
            "policy": index,
            "eb_rule": trajectory.eb_stop(),
            "best": max(range(len(trajectory.features)),
                        key=lambda i: trajectory.reward(i, stop_penalty)),
            "last": len(trajectory.features) - 1,
        }  # fmt: skip
        row = {"seed": trajectory.seed}
        for name, stop in stops.items():
            row[f"{name}_check"] = stop + 1
            row[f"{name}_reward"] = trajectory.reward(stop, stop_penalty)
            row[f"{name}_accuracy"] = trajectory.ticket_accuracy[stop]
        rows.append(row)
    return rows
