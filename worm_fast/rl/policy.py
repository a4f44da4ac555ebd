"""WORM-RL's stopping policy: a stable-baselines3 DQN, saved and loaded like any SB3
model, with what worm-fast needs to use it correctly stored inside the same file.

``DQN.save`` keeps the model's attributes, so the policy's observation layout, its
actions, the seeds whose trajectories trained it (never to be evaluated on) and the
workload they came from travel in the attribute ``worm_fast`` of the zip.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from worm_fast.rl.observation import ACTIONS, ObservationLayout

METADATA = "worm_fast"  # the SB3 model attribute holding the dict below

# Training defaults: λ of the reward (ticket accuracy - λ x epochs used / max epochs), and
# DQN steps (replayed checks), enough for a few dozen trajectories of 15-30 checks.
DEFAULT_STOP_PENALTY = 0.1
DEFAULT_TIMESTEPS = 20_000


class PolicyError(ValueError):
    """A policy file that cannot be used here, or used on the seeds it was trained on."""


@dataclass
class StopPolicy:
    """A trained DQN and what it was trained on; ``policy(observation) -> action``."""

    model: object  # stable_baselines3.DQN
    layout: ObservationLayout
    actions: tuple[str, ...] = ACTIONS[:2]
    training_seeds: tuple[int, ...] = ()
    stop_penalty: float = 0.0
    workload: dict = field(default_factory=dict)

    def __call__(self, observation: np.ndarray) -> int:
        action, _ = self.model.predict(observation, deterministic=True)
        return int(action)

    def metadata(self) -> dict:
        return {
            "observation": self.layout.to_dict(),
            "actions": list(self.actions),
            "training_seeds": list(self.training_seeds),
            "stop_penalty": self.stop_penalty,
            "workload": self.workload,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Save as an SB3 zip (``DQN.load`` reads it too); returns the file's path."""
        setattr(self.model, METADATA, self.metadata())
        path = Path(path)
        if path.suffix != ".zip":  # SB3 appends .zip to any other name
            path = path.with_name(path.name + ".zip")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.model.save(path)
        return path


def _dqn():
    try:
        from stable_baselines3 import DQN
    except ImportError as error:
        raise ImportError(
            "WORM-RL needs stable-baselines3 and gymnasium: pip install 'worm_fast[rl]'"
        ) from error
    return DQN


def load_policy(path: str | os.PathLike) -> StopPolicy:
    """The policy saved at ``path`` by ``worm-fast rl train`` (or ``StopPolicy.save``).

    Raises PolicyError when the file is not such a policy, or was made for an
    observation layout or action set that this version does not build.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path} (train one with `worm-fast rl train`)")
    try:
        model = _dqn().load(path, device="cpu")
    except Exception as error:  # SB3 raises whatever unzipping or unpickling raised
        raise PolicyError(f"{path} is not a stable-baselines3 DQN file: {error}") from error
    saved = getattr(model, METADATA, None)
    if not isinstance(saved, dict) or "observation" not in saved:
        raise PolicyError(
            f"{path} is a DQN without worm-fast's observation layout: it was not trained by "
            "`worm-fast rl train`, so what its inputs mean is unknown"
        )
    try:
        layout = ObservationLayout.from_dict(saved["observation"])
    except (KeyError, TypeError, ValueError) as error:
        raise PolicyError(f"{path} was trained for another observation layout: {error}") from error
    shape = tuple(getattr(model.observation_space, "shape", ()) or ())
    if shape != (layout.size,):
        raise PolicyError(
            f"{path} takes observations of shape {shape}, but its layout "
            f"({layout.history} checks of history) builds ({layout.size},)"
        )
    actions = tuple(saved.get("actions", ()))
    n = getattr(model.action_space, "n", None)
    if actions not in (ACTIONS[:2], ACTIONS) or n != len(actions):
        raise PolicyError(
            f"{path} has actions {actions} over {n} outputs; expected {ACTIONS[:2]} or {ACTIONS}"
        )
    return StopPolicy(
        model=model,
        layout=layout,
        actions=actions,
        training_seeds=tuple(saved.get("training_seeds", ())),
        stop_penalty=float(saved.get("stop_penalty", 0.0)),
        workload=dict(saved.get("workload", {})),
    )


def check_held_out(policy: StopPolicy, seeds) -> None:
    """Raise unless every seed in ``seeds`` is one the policy was not trained on."""
    seen = sorted(set(seeds) & set(policy.training_seeds))
    if seen:
        raise PolicyError(
            f"seeds {seen} made trajectories this policy was trained on "
            f"({list(policy.training_seeds)}); evaluate it on held-out seeds only (--seed)"
        )
