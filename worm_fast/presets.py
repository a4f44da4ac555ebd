"""The paper's search settings: the one place they are written down.

Sections IV–V of the WORM paper search CNN tickets with the original Early-Bird
settings (prune ratio p = 0.5, stop distance s = 0.1, window l = 5) plus WORM's trigger
margin δ = 0.05 and truncation r = 3e-3, over BatchNorm γ. Section VI fine-tunes a
pretrained BERT, whose masks move far less, so it stops at s = 0.01 over a window of 3
with δ = 0.005, over the attention query and key weights (Table V drops value). Both
take the first mask at initialization, as the original Early-Bird code does
(``first_check="init"``: check once before training, then after every epoch);
``EarlyBirdSearch`` itself defaults to a check after every epoch.
"""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SearchSettings:
    """Hyperparameters of Algorithm 1 (``EarlyBirdSearch`` keyword arguments)."""

    prune_ratio: float  # p
    stop_distance: float  # s
    window: int  # l
    trigger_margin: float  # δ
    truncation: float  # r once triggered
    representative: str  # preset of worm_fast.representative
    first_check: str  # "init": a check before training, then after every epoch

    def kwargs(self) -> dict:
        return asdict(self)


PAPER_CNN = SearchSettings(
    prune_ratio=0.5, stop_distance=0.1, window=5, trigger_margin=0.05, truncation=3e-3,
    representative="batchnorm", first_check="init",
)  # fmt: skip
PAPER_TRANSFORMER = SearchSettings(
    prune_ratio=0.5, stop_distance=0.01, window=3, trigger_margin=0.005, truncation=3e-3,
    representative="attention", first_check="init",
)  # fmt: skip
