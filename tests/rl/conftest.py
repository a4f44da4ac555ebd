"""Recorded trajectories of a tiny search, shared by the WORM-RL tests (recorded once)."""

from dataclasses import replace

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from worm_fast.experiments.config import RunConfig
from worm_fast.rl.record import record

TINY = RunConfig(
    model="resnet20", width=0.25, train_subset=96, test_subset=64, batch_size=32, lr=0.05,
    max_epochs=3, retrain_epochs=1, window=2,
)  # fmt: skip
TINY_ARGS = [
    "--model", "resnet20", "--width", "0.25", "--train-subset", "96", "--test-subset", "64",
    "--batch-size", "32", "--lr", "0.05", "--epochs", "3", "--retrain-epochs", "1",
    "--window", "2", "--no-progress",
]  # fmt: skip
SEEDS = (100, 101, 102)


@pytest.fixture(scope="session")
def trajectories():
    return [record(replace(TINY, seed=seed), reward_steps=2) for seed in SEEDS]
