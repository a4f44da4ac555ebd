"""The WORM-RL environment: a ``gymnasium.Env`` whose episode is one Early-Bird search.

At each step the agent sees the observation of the latest check
(:class:`~worm_fast.rl.observation.ObservationLayout`) and acts:

* ``continue``: the search trains another epoch and checks again; reward 0;
* ``stop``: the check's newest mask is the ticket and the episode ends, with reward =
  the ticket's validation accuracy after a short fixed retraining (a fraction in
  [0, 1]) - ``stop_penalty`` x epochs used / maximum epochs;
* ``trigger`` (online only): switch WORM's truncation on from now, then continue.

At the last epoch the search has no more to train: any action there ends the episode
with the stop reward of that check's ticket.

``ReplaySearchEnv`` replays recorded trajectories (actions continue and stop, which do
not change the training); ``OnlineSearchEnv`` trains for real at every step, which the
trigger action needs.
"""

from dataclasses import replace
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from worm_fast.experiments.config import RunConfig
from worm_fast.rl.observation import ACTIONS, STOP, TRIGGER, ObservationLayout
from worm_fast.rl.policy import DEFAULT_STOP_PENALTY
from worm_fast.rl.record import Trajectory
from worm_fast.rl.session import DEFAULT_REWARD_STEPS, DEFAULT_VALIDATION_FRACTION, SearchSession


def observation_space(layout: ObservationLayout) -> spaces.Box:
    # Distances are in [0, 1] or PAD (-1); the trend in [-1, 1]; fraction, density [0, 1].
    return spaces.Box(-1.0, 1.0, shape=(layout.size,), dtype=np.float32)


def _check_penalty(stop_penalty: float) -> float:
    if not 0 <= stop_penalty < float("inf"):
        raise ValueError(f"stop_penalty must be a finite number >= 0, got {stop_penalty}")
    return float(stop_penalty)


class ReplaySearchEnv(gym.Env):
    """Episodes replayed from recorded trajectories, one drawn at random per reset
    (``reset(options={"trajectory": i})`` picks one)."""

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(
        self,
        trajectories: list[Trajectory],
        *,
        layout: ObservationLayout | None = None,
        stop_penalty: float = DEFAULT_STOP_PENALTY,
    ) -> None:
        if not trajectories:
            raise ValueError("ReplaySearchEnv needs at least one recorded trajectory")
        self.trajectories = list(trajectories)
        self.layout = layout or ObservationLayout()
        self.stop_penalty = _check_penalty(stop_penalty)
        self.observation_space = observation_space(self.layout)
        self.action_space = spaces.Discrete(2)  # continue, stop
        self.trajectory = self.trajectories[0]
        self.index = 0

    def _observation(self) -> np.ndarray:
        checks = self.trajectory.features[: self.index + 1]
        return self.layout.observe(checks, self.trajectory.max_checks)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        chosen = (options or {}).get("trajectory")
        if chosen is None:
            chosen = int(self.np_random.integers(len(self.trajectories)))
        self.trajectory, self.index = self.trajectories[chosen], 0
        return self._observation(), {"seed": self.trajectory.seed, "check": 1}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (continue) or 1 (stop), got {action!r}")
        last = self.index + 1 >= len(self.trajectory.features)
        if int(action) == STOP or last:
            reward = self.trajectory.reward(self.index, self.stop_penalty)
            info = {"seed": self.trajectory.seed, "check": self.index + 1, "stopped": True,
                    "ticket_accuracy": self.trajectory.ticket_accuracy[self.index]}  # fmt: skip
            return self._observation(), reward, True, False, info
        self.index += 1
        info = {"seed": self.trajectory.seed, "check": self.index + 1}
        return self._observation(), 0.0, False, False, info


class OnlineSearchEnv(gym.Env):
    """Episodes that train for real: each reset starts a new search on ``config`` with
    the next of ``seeds`` (or ``reset(options={"seed": s})``); actions continue, stop and,
    with ``trigger=True``, trigger truncation."""

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(
        self,
        config: RunConfig,
        seeds: list[int],
        *,
        layout: ObservationLayout | None = None,
        stop_penalty: float = DEFAULT_STOP_PENALTY,
        trigger: bool = True,
        validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
        reward_steps: int = DEFAULT_REWARD_STEPS,
    ) -> None:
        if not seeds:
            raise ValueError("OnlineSearchEnv needs at least one seed")
        self.config = config
        self.seeds = list(seeds)
        self.layout = layout or ObservationLayout()
        self.stop_penalty = _check_penalty(stop_penalty)
        self.session_options = dict(validation_fraction=validation_fraction,
                                    reward_steps=reward_steps)  # fmt: skip
        self.observation_space = observation_space(self.layout)
        self.action_space = spaces.Discrete(len(ACTIONS) if trigger else 2)
        self.session: SearchSession | None = None
        self._next = 0

    def _observation(self) -> np.ndarray:
        return self.layout.observe(self.session.search.features, self.config.max_epochs)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        run_seed = (options or {}).get("seed")
        if run_seed is None:
            run_seed = self.seeds[self._next % len(self.seeds)]
            self._next += 1
        self.session = SearchSession(replace(self.config, seed=run_seed), **self.session_options)
        self.session.advance()
        return self._observation(), {"seed": run_seed, "check": 1}

    def step(self, action):
        if self.session is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an index of {ACTIONS[: self.action_space.n]}")
        session, action = self.session, int(action)
        info = {"seed": session.config.seed, "check": session.checks}
        last = session.checks >= self.config.max_epochs
        if action == STOP or last:
            accuracy = session.ticket_accuracy()
            used = session.checks / self.config.max_epochs
            reward = accuracy / 100 - self.stop_penalty * used
            info = {**info, "stopped": True, "ticket_accuracy": accuracy}
            return self._observation(), reward, True, False, info
        if action == TRIGGER:
            session.search.act(TRIGGER)
        session.advance()
        return self._observation(), 0.0, False, False, {**info, "check": session.checks}
