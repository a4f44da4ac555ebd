"""Recorded WORM-RL trajectories: one seed's search, measured once, replayed as episodes.

With the actions {continue, stop}, the training a search does never depends on the
policy, so a seed's whole search can be recorded once, with the features and the stop
reward of every check's candidate ticket, and replayed as many times as training the
policy needs (``worm_fast.rl.env.ReplaySearchEnv``).
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from worm_fast.experiments.config import RunConfig
from worm_fast.files import atomic_write_text
from worm_fast.rl.observation import CheckFeatures
from worm_fast.rl.session import DEFAULT_REWARD_STEPS, DEFAULT_VALIDATION_FRACTION, SearchSession

FORMAT = "worm-fast rl trajectory 1"


@dataclass
class Trajectory:
    """One seed's search: what each check measured and its ticket's validation accuracy."""

    seed: int
    max_checks: int
    features: list[CheckFeatures]
    ticket_accuracy: list[float]  # % on the validation split, after the reward budget
    config: dict  # the RunConfig it was recorded with
    reward_steps: int
    validation_fraction: float

    def reward(self, index: int, stop_penalty: float) -> float:
        """Stopping at check ``index`` (0-based): the ticket's validation accuracy (as a
        fraction) minus ``stop_penalty`` x the fraction of the epochs used."""
        return self.ticket_accuracy[index] / 100 - stop_penalty * (index + 1) / self.max_checks

    def eb_stop(self) -> int:
        """The check (0-based) where Early-Bird's rule stops: the first with a full window
        and d_max below the stop distance; the last check if none does."""
        window, stop = self.config["window"], self.config["stop_distance"]
        for index, check in enumerate(self.features):
            if check.check >= window and check.d_max is not None and check.d_max < stop:
                return index
        return len(self.features) - 1

    def workload(self) -> dict:
        """What the trajectory was recorded on, for a policy's metadata."""
        keys = ("task", "model", "dataset", "width", "train_subset", "max_epochs", "window",
                "stop_distance", "prune_ratio", "representative")  # fmt: skip
        return {key: self.config.get(key) for key in keys}

    def save(self, path: str | os.PathLike) -> Path:
        document = {"format": FORMAT, **asdict(self)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(document, indent=1, default=str))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        document = json.loads(Path(path).read_text())
        if document.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a trajectory written by `worm-fast rl record`")
        document["features"] = [CheckFeatures(**f) for f in document["features"]]
        return cls(**document)


def record(
    config: RunConfig,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    reward_steps: int = DEFAULT_REWARD_STEPS,
    progress: bool = False,
) -> Trajectory:
    """Run ``config``'s search for all its epochs, never stopping, and measure the ticket
    of every check (see :class:`~worm_fast.rl.session.SearchSession`)."""
    session = SearchSession(
        config, validation_fraction=validation_fraction, reward_steps=reward_steps,
        progress=progress,
    )  # fmt: skip
    accuracies = []
    while not session.done:
        session.advance()
        accuracies.append(session.ticket_accuracy())
    return Trajectory(
        seed=config.seed,
        max_checks=config.max_epochs,
        features=list(session.search.features),
        ticket_accuracy=accuracies,
        config=asdict(config),
        reward_steps=reward_steps,
        validation_fraction=validation_fraction,
    )


def trajectory_path(directory: str | os.PathLike, seed: int) -> Path:
    return Path(directory) / f"trajectory-seed{seed}.json"


def load_trajectories(directory: str | os.PathLike) -> list[Trajectory]:
    """Every trajectory in ``directory``, by seed."""
    paths = sorted(Path(directory).glob("trajectory-seed*.json"))
    if not paths:
        raise FileNotFoundError(
            f"no trajectory-seed*.json in {directory} (record some with `worm-fast rl record`)"
        )
    return sorted((Trajectory.load(p) for p in paths), key=lambda t: t.seed)
