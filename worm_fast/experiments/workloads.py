"""What a run trains: its model, data loaders and optimizer, and how a batch goes through.

Image runs (``config.dataset``) train a CIFAR-style CNN from scratch on ``(images,
labels)`` batches. Text runs (``config.task``) fine-tune a pretrained transformer with a
new classification head on tokenized batches padded to their longest sequence. The
pipeline's search → prune → retrain loop is the same for both. Under torchrun the
loaders hold this rank's part of the data (:mod:`worm_fast.experiments.parallel`).
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from worm_fast.experiments.config import RunConfig
from worm_fast.experiments.data import (
    TokenizedText,
    load_dataset,
    load_text_task,
    random_subset,
)
from worm_fast.experiments.models import build_model, load_classifier, load_tokenizer
from worm_fast.experiments.parallel import SINGLE_PROCESS, DataParallel
from worm_fast.experiments.train import Forward, classify_images, classify_tokens
from worm_fast.optim import TruncatingOptimizer, WormAdamW, WormSGD

IMAGE_EVAL_BATCH_SIZE = 512
# Evaluation pads each batch to its longest sequence: small batches waste less on padding.
TEXT_EVAL_BATCH_SIZE = 64


@dataclass
class Workload:
    model: nn.Module
    train_loader: DataLoader
    eval_loader: DataLoader
    forward: Forward  # (model, batch, device) -> (logits, labels)
    # One sample as the model takes it (batch of 1), for FLOP counting and channel
    # pruning; for text, token ids of the training set's mean length.
    example_input: torch.Tensor
    train_samples: int
    eval_samples: int


def build_workload(
    config: RunConfig,
    *,
    initial_state: dict | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> Workload:
    """The run's model (initialized from ``config.seed``, or ``initial_state``) and data
    (``parallel``'s part of it: this rank's)."""
    torch.manual_seed(config.seed)
    workload = _text(config, parallel) if config.is_text else _images(config, parallel)
    if initial_state is not None:
        workload.model.load_state_dict(initial_state)
    workload.model.to(config.device)
    return workload


def initial_model(config: RunConfig) -> nn.Module:
    """The run's model with its initial weights for ``config.seed`` (for a text model, the
    pretrained body and the seeded new head)."""
    return build_workload(config).model


def make_optimizer(config: RunConfig, params) -> TruncatingOptimizer:
    if config.optimizer == "sgd":
        return WormSGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            backend=config.backend,
        )  # fmt: skip
    return WormAdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, truncate=config.adamw_truncate,
        backend=config.backend,
    )  # fmt: skip


def make_scheduler(
    config: RunConfig, optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int
) -> LambdaLR | None:
    """The learning-rate schedule of one phase (search, or retraining) of ``epochs``
    epochs: None for a constant lr, else linear decay from lr to 0 over the phase's steps
    (the Hugging Face Trainer's default, without warmup), stepped after every step."""
    if config.lr_schedule == "constant":
        return None
    total = max(1, epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))


def _train_size(config: RunConfig) -> int | None:
    return None if config.train_subset == "all" else config.train_subset


def _images(config: RunConfig, parallel: DataParallel) -> Workload:
    train_set, test_set, info = load_dataset(
        config.dataset, data_dir=config.data_dir, train_subset=_train_size(config),
        test_subset=config.test_subset, seed=config.seed,
    )  # fmt: skip
    model = build_model(
        config.model, num_classes=info.num_classes, in_channels=info.in_channels,
        width=config.width,
    )  # fmt: skip
    return Workload(
        model=model,
        train_loader=parallel.train_loader(train_set, config.batch_size, seed=config.seed),
        eval_loader=parallel.eval_loader(test_set, IMAGE_EVAL_BATCH_SIZE, seed=config.seed),
        forward=classify_images,
        example_input=test_set[0][0].unsqueeze(0),
        train_samples=len(train_set),
        eval_samples=len(test_set),
    )


def _text(config: RunConfig, parallel: DataParallel) -> Workload:
    from transformers import DataCollatorWithPadding  # only text runs need transformers

    train, dev, task = load_text_task(config.task, data_dir=config.data_dir)
    train = random_subset(train, _train_size(config), seed=config.seed, what="train_subset")
    dev = random_subset(dev, config.test_subset, seed=config.seed, what="test_subset")
    tokenizer = load_tokenizer(config.model_path)
    train_set = TokenizedText(train, tokenizer, config.max_length)
    dev_set = TokenizedText(dev, tokenizer, config.max_length)
    model = load_classifier(
        config.model_path, num_labels=task.num_classes, pad_token_id=tokenizer.pad_token_id
    )
    pad = DataCollatorWithPadding(tokenizer)
    # Token values do not change the FLOPs, only the length does.
    example = torch.zeros(1, round(train_set.mean_length()), dtype=torch.long)
    return Workload(
        model=model,
        train_loader=parallel.train_loader(
            train_set, config.batch_size, seed=config.seed, collate_fn=pad
        ),
        eval_loader=parallel.eval_loader(
            dev_set, TEXT_EVAL_BATCH_SIZE, seed=config.seed, collate_fn=pad
        ),
        forward=classify_tokens,
        example_input=example,
        train_samples=len(train_set),
        eval_samples=len(dev_set),
    )
