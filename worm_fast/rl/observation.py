"""What the WORM-RL stopping policy sees at a check, and what it can do.

An observation is a flat float32 vector, in this order (``ObservationLayout.names``):

* ``d_max`` of the last ``history`` checks, oldest first, then their ``d_avg``; a check
  with fewer than two masks so far (no distance yet), or one before the first check,
  reads ``PAD`` (-1, outside the [0, 1] of real distances);
* the epoch fraction: checks run / the search's maximum;
* the training-loss trend: the relative change of the training loss over the last
  ``history`` checks, clipped to [-1, 1] (0 until two losses are known);
* the candidate ticket's density: the fraction of representative elements its newest
  mask keeps.

Only numpy here: the search builds observations without gymnasium or SB3 installed.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

ACTIONS = ("continue", "stop", "trigger")
CONTINUE, STOP, TRIGGER = range(len(ACTIONS))
PAD = -1.0


@dataclass(frozen=True)
class CheckFeatures:
    """The raw measurements of one check, from which observations are built."""

    check: int  # 1-based
    d_max: float | None
    d_avg: float | None
    train_loss: float | None  # mean training loss of the epoch before the check
    density: float  # fraction of representative elements the newest mask keeps


@dataclass(frozen=True)
class ObservationLayout:
    """How features become an observation vector; saved with every policy."""

    history: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.history, int) and self.history >= 1):
            raise ValueError(f"history must be an int >= 1, got {self.history!r}")

    @property
    def names(self) -> list[str]:
        back = range(self.history - 1, -1, -1)
        return [
            *(f"d_max[t-{i}]" for i in back),
            *(f"d_avg[t-{i}]" for i in back),
            "epoch_fraction",
            "loss_trend",
            "density",
        ]

    @property
    def size(self) -> int:
        return 2 * self.history + 3

    def to_dict(self) -> dict:
        return {**asdict(self), "names": self.names}

    @classmethod
    def from_dict(cls, saved: dict) -> "ObservationLayout":
        layout = cls(history=saved["history"])
        if saved.get("names") != layout.names:
            raise ValueError(
                f"observation layout {saved.get('names')} is not this version's {layout.names}"
            )
        return layout

    def observe(self, checks: Sequence[CheckFeatures], max_checks: int) -> np.ndarray:
        """The observation after the last of ``checks`` (all checks so far, in order)."""
        if not checks:
            raise ValueError("no check has run yet, so there is nothing to observe")
        if max_checks < 1:
            raise ValueError(f"max_checks must be >= 1, got {max_checks}")
        recent = list(checks[-self.history :])
        padding = [None] * (self.history - len(recent))
        d_max = [PAD if c is None or c.d_max is None else c.d_max for c in padding + recent]
        d_avg = [PAD if c is None or c.d_avg is None else c.d_avg for c in padding + recent]
        losses = [c.train_loss for c in checks[-self.history - 1 :] if c.train_loss is not None]
        trend = 0.0
        if len(losses) >= 2 and losses[0] > 0:
            trend = float(np.clip((losses[-1] - losses[0]) / losses[0], -1.0, 1.0))
        fraction = min(len(checks) / max_checks, 1.0)
        vector = [*d_max, *d_avg, fraction, trend, checks[-1].density]
        return np.asarray(vector, dtype=np.float32)
