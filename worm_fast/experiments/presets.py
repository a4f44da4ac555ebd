"""The ``--preset`` bundles: every setting of a run the paper fixes, each with its source.

The WORM paper states its search settings and a few training ones; where it is silent,
the number comes from the original Early-Bird code (GATECH-EIC/Early-Bird-Tickets,
``main.py``) for CNNs, and from BERT's GLUE fine-tuning conventions (Devlin et al. 2019;
Hugging Face's ``run_glue.py`` and ``Trainer``) for transformers. A preset fills only
the settings a run leaves unset: explicit options override it. It does not choose the
model or data (CIFAR-10 and GLUE are read from ``--data-dir``).
"""

from dataclasses import dataclass

from worm_fast.presets import PAPER_CNN, PAPER_TRANSFORMER


@dataclass(frozen=True)
class Setting:
    value: object
    source: str  # where the number comes from: the paper first, then the conventions


@dataclass(frozen=True)
class RunPreset:
    name: str
    kind: str  # "cnn" (an image dataset) or "text" (a text task)
    settings: dict[str, Setting]  # RunConfig field → value and source

    def values(self) -> dict:
        return {field: setting.value for field, setting in self.settings.items()}

    def describe(self) -> str:
        """One line per setting: ``field value (source)``, for help texts and docs."""
        return "; ".join(f"{f} {s.value} ({s.source})" for f, s in self.settings.items())


_EB_CODE = "Early-Bird code, main.py; the paper is silent"
_SEARCH_CNN = "paper §IV–V.A, the Early-Bird settings"

RUN_PRESETS = {
    "paper-cnn": RunPreset(
        "paper-cnn",
        "cnn",
        {
            "optimizer": Setting("sgd", "paper §V.A: stochastic gradient descent"),
            "lr": Setting(0.01, "paper §V.A: α = 0.01"),
            "lr_schedule": Setting("constant", "paper §V.A: held statically"),
            "momentum": Setting(0.9, _EB_CODE),
            "weight_decay": Setting(1e-4, _EB_CODE),
            "batch_size": Setting(64, _EB_CODE),
            "prune_ratio": Setting(PAPER_CNN.prune_ratio, _SEARCH_CNN),
            "stop_distance": Setting(PAPER_CNN.stop_distance, _SEARCH_CNN),
            "window": Setting(PAPER_CNN.window, _SEARCH_CNN),
            "trigger_margin": Setting(PAPER_CNN.trigger_margin, "paper §V: δ"),
            "truncation": Setting(PAPER_CNN.truncation, "paper §V: r"),
            "first_check": Setting(
                PAPER_CNN.first_check,
                "Early-Bird code: a mask before every epoch, the initialization included",
            ),
            "restore_target": Setting(
                "absolute:90",
                "Tables II/III fit epochs until 90 % test accuracy, not 90 % of the "
                "pre-pruned accuracy (ResNet-18 EB: 84.67 % after one epoch, 3.3 epochs)",
            ),
        },
    ),
    "paper-bert": RunPreset(
        "paper-bert",
        "text",
        {
            "optimizer": Setting("adamw", "BERT fine-tuning convention (Devlin et al.)"),
            "lr": Setting(2e-5, "BERT's GLUE grid and run_glue.py; the paper is silent"),
            "lr_schedule": Setting("linear", "BERT and the HF Trainer: linear decay to 0"),
            "weight_decay": Setting(0.01, "BERT (Devlin et al.)"),
            "batch_size": Setting(32, "BERT's GLUE fine-tuning and run_glue.py"),
            "max_length": Setting(
                128, "run_glue.py's max_seq_length; 64 truncates many MRPC/RTE pairs"
            ),
            "prune_ratio": Setting(PAPER_TRANSFORMER.prune_ratio, "paper §VI.A"),
            "stop_distance": Setting(PAPER_TRANSFORMER.stop_distance, "paper §VI.A"),
            "window": Setting(PAPER_TRANSFORMER.window, "paper §VI.A"),
            "trigger_margin": Setting(PAPER_TRANSFORMER.trigger_margin, "paper §VI.B: δ"),
            "truncation": Setting(PAPER_TRANSFORMER.truncation, "paper §VI.B: r"),
            "representative": Setting(
                PAPER_TRANSFORMER.representative, "paper §VI.A, Table V: query and key"
            ),
            "first_check": Setting(
                PAPER_TRANSFORMER.first_check, "the Early-Bird code's convention"
            ),
            "retrain_epochs": Setting(1, "paper Tables IV–VI: one epoch of retraining"),
        },
    ),
}
