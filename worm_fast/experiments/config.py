"""RunConfig: everything that determines one search → prune → retrain run.

A run trains a CNN from scratch on an image dataset (``dataset``, the default), or
fine-tunes a pretrained transformer on a text task (``task``). Fields left ``None`` take,
in this order, the values of the run's ``preset`` (``experiments.presets``: the paper's
settings, each sourced), then the defaults of its kind: the paper's search settings for
CNNs (Sections IV–V) or for transformers (Section VI), and training settings that make
the embedded demos run on a 2-core CPU.
"""

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch

from worm_fast import backends
from worm_fast._checks import ADAMW_TRUNCATE
from worm_fast.experiments.data import DATASETS, TEXT_TASKS
from worm_fast.experiments.models import EMBEDDED_MODEL, MODELS, NOT_CHANNEL_PRUNABLE
from worm_fast.experiments.models.text import model_name
from worm_fast.experiments.presets import RUN_PRESETS
from worm_fast.penalty import PenaltySettings
from worm_fast.presets import PAPER_CNN, PAPER_TRANSFORMER
from worm_fast.search import check_settings

# "none": the dense baseline (the search runs, its ticket is not applied; the same
# retraining follows), the paper's Table IV baseline on the same budget.
PRUNE_METHODS = ("unstructured", "structured", "none")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "linear")  # linear: to 0 over each phase's epochs, per step
RESTORE_KINDS = ("relative", "absolute")

_SEARCH_KEYS = ("stop_distance", "window", "trigger_margin", "representative")
CNN_DEFAULTS = dict(
    model="resnet20",
    dataset="mnist",
    batch_size=128,
    optimizer="sgd",
    lr=0.01,  # held constant, as in the paper
    weight_decay=1e-4,
    max_epochs=30,
    retrain_epochs=5,
    **{key: PAPER_CNN.kwargs()[key] for key in _SEARCH_KEYS},
)
# Fine-tuning: AdamW at a constant small learning rate. 5e-5 rather than BERT's usual
# 2e-5: MiniLM is small and a CPU demo sees few steps. One retrain epoch, as the
# paper's Tables IV–VI report.
TEXT_DEFAULTS = dict(
    batch_size=32,
    optimizer="adamw",
    lr=5e-5,
    weight_decay=0.01,
    max_epochs=10,
    retrain_epochs=1,
    **{key: PAPER_TRANSFORMER.kwargs()[key] for key in _SEARCH_KEYS},
)
# Both kinds, unless a preset says otherwise: the behaviour before presets existed (a
# check after every epoch, restoration to 90 % of the pre-pruned accuracy).
COMMON_DEFAULTS = dict(
    max_length=64,
    momentum=0.9,
    lr_schedule="constant",
    prune_ratio=PAPER_CNN.prune_ratio,
    truncation=PAPER_CNN.truncation,
    first_check="epoch",
    restore_target="relative:0.9",
)


def parse_restore_target(text: str) -> tuple[str, float]:
    """``relative:F`` (test accuracy >= F x the pre-pruned accuracy, 0 < F <= 1) or
    ``absolute:A`` (test accuracy >= A %, 0 < A <= 100) as (kind, value)."""
    kind, _, number = str(text).partition(":")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    top = 1.0 if kind == "relative" else 100.0
    if kind not in RESTORE_KINDS or not (math.isfinite(value) and 0 < value <= top):
        raise ValueError(
            f"restore_target (--restore-target) must be relative:F (0 < F <= 1, a fraction "
            f"of the pre-pruned accuracy) or absolute:A (0 < A <= 100, a test accuracy in "
            f"%), got {text!r}"
        )
    return kind, value


@dataclass
class RunConfig:
    """Everything that determines a run; ``None`` fields take the defaults of its kind
    (``CNN_DEFAULTS``, or ``TEXT_DEFAULTS`` when ``task`` is set)."""

    task: str | None = None  # text task (rt-polarity, sst2, mrpc, rte); None: images
    model: str | None = None  # CNN name; for text, set to the checkpoint's name
    model_path: str | None = None  # text: a local Hugging Face checkpoint; None: MiniLM
    width: float = 1.0  # CNN channel-width multiplier
    dataset: str | None = None  # image dataset; None for text runs
    data_dir: str | None = None  # CIFAR-10, or GLUE (<data_dir>/SST-2/train.tsv, …)
    # Seeded subset size; "all"; None: the task's default (rt-polarity: 2,000), else all.
    train_subset: int | str | None = None
    test_subset: int | None = None
    max_length: int | None = None  # text: tokens per sequence after truncation
    batch_size: int | None = None
    optimizer: str | None = None  # sgd (WormSGD) or adamw (WormAdamW)
    adamw_truncate: str = "update"  # adamw: truncate the Adam update or the raw gradient
    lr: float | None = None
    lr_schedule: str | None = None  # constant, or linear decay to 0 over each phase
    momentum: float | None = None  # SGD only
    weight_decay: float | None = None
    max_epochs: int | None = None  # N of Algorithm 1
    retrain_epochs: int | None = None
    mode: str = "worm"
    prune_ratio: float | None = None
    stop_distance: float | None = None
    window: int | None = None
    trigger_margin: float | None = None
    truncation: float | None = None
    scope: str = "global"
    ties: str = "early_bird"  # how magnitudes equal to the threshold are decided
    first_check: str | None = None  # "epoch" (after each epoch) or "init" (EB's code)
    representative: str | tuple[str, ...] | None = None  # preset or name patterns
    # Mode gradient (worm_fast.penalty): λ_d, λ_T per check, and the soft mask's width.
    distance_weight: float = PenaltySettings.distance_weight
    duration_weight: float = PenaltySettings.duration_weight
    temperature: float = PenaltySettings.temperature
    policy: str | None = None  # mode rl: a policy file written by `worm-fast rl train`
    prune: str = "unstructured"
    # Retrain epochs are counted until the test accuracy reaches this target.
    restore_target: str | None = None
    preset: str | None = None  # experiments.presets: paper-cnn or paper-bert
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    carbon_intensity: float | None = None  # g CO2eq/kWh; with pue, emissions are reported
    pue: float | None = None

    @property
    def is_text(self) -> bool:
        return self.task is not None

    def __post_init__(self) -> None:
        if self.is_text:
            self._check_text()
        else:
            self._check_images()
        preset = self._preset_values()
        kind = TEXT_DEFAULTS if self.is_text else CNN_DEFAULTS
        for values in (preset, kind, COMMON_DEFAULTS):
            for key, value in values.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        if isinstance(self.train_subset, str) and self.train_subset != "all":
            raise ValueError(
                f"train_subset must be an int, 'all' or None, got {self.train_subset!r}"
            )
        if isinstance(self.representative, list):
            self.representative = tuple(self.representative)
        self._check_numbers()
        check_settings(
            mode=self.mode, prune_ratio=self.prune_ratio, stop_distance=self.stop_distance,
            window=self.window, trigger_margin=self.trigger_margin, truncation=self.truncation,
            scope=self.scope, ties=self.ties, first_check=self.first_check,
        )  # fmt: skip
        check_device_and_backend(self.device, self.backend)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name, allowed in (("adamw_truncate", ADAMW_TRUNCATE), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_named(name)} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")  # fmt: skip
        parse_restore_target(self.restore_target)
        if self.prune not in PRUNE_METHODS:
            raise ValueError(f"prune must be one of {PRUNE_METHODS}, got {self.prune!r}")
        if self.prune == "structured" and self.model in NOT_CHANNEL_PRUNABLE:
            raise ValueError(
                f"model {self.model!r} has zero-padding (option-A) shortcuts, through which "
                f"channels cannot be removed; use prune 'unstructured' (the paper's) or model "
                f"'{self.model}_projection'"
            )
        self._check_search_mode()

    def _preset_values(self) -> dict:
        """The preset's settings; it must be one for this kind of run."""
        if self.preset is None:
            return {}
        if self.preset not in RUN_PRESETS:
            raise ValueError(
                f"unknown preset {self.preset!r} (--preset); known: {', '.join(RUN_PRESETS)}"
            )
        preset = RUN_PRESETS[self.preset]
        if (preset.kind == "text") != self.is_text:
            wanted = "a text task (--task)" if preset.kind == "text" else "an image dataset"
            raise ValueError(f"preset {self.preset!r} (--preset) is for runs on {wanted}")
        return preset.values()

    def _check_search_mode(self) -> None:
        if self.mode == "gradient":
            PenaltySettings(self.distance_weight, self.duration_weight, self.temperature)
        if self.mode == "rl" and self.policy is None:
            raise ValueError(
                "mode 'rl' stops when a learned policy says so: give the policy file "
                "(--policy PATH, written by `worm-fast rl train`)"
            )
        if self.policy is not None and not Path(self.policy).is_file():
            raise ValueError(
                f"policy {self.policy!r} is not a file (`worm-fast rl train` writes one)"
            )

    def _check_numbers(self) -> None:
        """Every numeric field in its range (the message names the field and its flag)."""
        at_least = dict(max_epochs=1, retrain_epochs=0, batch_size=1, max_length=2)
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{_named(name)} must be an integer >= {low}, got {value!r}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value not in (None, "all") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{_named(name)} must be a positive integer, got {value!r}")
        ranges = dict(  # name: (lowest, whether the lowest is allowed)
            width=(0.0, False), lr=(0.0, True), momentum=(0.0, True), weight_decay=(0.0, True),
            carbon_intensity=(0.0, True), pue=(1.0, True),
        )  # fmt: skip
        for name, (low, inclusive) in ranges.items():
            value = getattr(self, name)
            if value is None and name in ("carbon_intensity", "pue"):
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or not (value >= low if inclusive else value > low)
            ):
                bound = f"{'>=' if inclusive else '>'} {low:g}"
                raise ValueError(f"{_named(name)} must be a finite number {bound}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{_named('seed')} must be an integer >= 0, got {self.seed!r}")

    def _check_images(self) -> None:
        if self.model_path is not None:
            raise ValueError(
                "model_path (--model-path) names a Hugging Face checkpoint for text tasks; "
                "pass a task (--task rt-polarity, sst2, mrpc or rte) or drop it"
            )
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")

    def _check_text(self) -> None:
        if self.task not in TEXT_TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TEXT_TASKS)}")
        if self.dataset is not None:
            raise ValueError(
                f"a run has either a text task or an image dataset, got task {self.task!r} "
                f"and dataset {self.dataset!r}"
            )
        named = (EMBEDDED_MODEL, model_name(self.model_path))
        if self.model is not None and self.model not in named:
            known = "a CNN" if self.model in MODELS else "unknown"
            raise ValueError(
                f"model {self.model!r} is {known}; text tasks fine-tune the embedded "
                f"{EMBEDDED_MODEL} or a local checkpoint given as model_path (--model-path)"
            )
        if self.prune == "structured":
            raise ValueError(
                "text runs prune attention weights with unstructured masks; structured "
                f"pruning removes BatchNorm channels of CNNs (got prune={self.prune!r})"
            )
        self.model = model_name(self.model_path)
        if self.train_subset is None:
            self.train_subset = TEXT_TASKS[self.task].default_train_subset or "all"


def _named(field_name: str) -> str:
    """A RunConfig field as the CLI spells it, e.g. ``max_epochs (--epochs)``."""
    flag = {"max_epochs": "epochs"}.get(field_name, field_name).replace("_", "-")
    return f"{field_name} (--{flag})"


def check_device_and_backend(device: str, backend: str) -> None:
    """``device`` names a device this machine has, and ``backend`` runs on it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device (--device) {device!r} is not a torch device: {error}") from None
    if parsed.type == "meta":
        raise ValueError("device (--device) 'meta' holds no data; train on cpu or cuda")
    try:
        torch.empty(1, device=parsed)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"device (--device) {device!r} is not available here: {reason}") from None
    if backend == "auto":
        return
    try:
        backends.resolve(backend, parsed)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"backend (--backend): {error}") from None
