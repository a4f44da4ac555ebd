"""One epoch of supervised training, and evaluation (top-1 and top-k), for any classifier.

A ``forward(model, batch, device) -> (logits, labels)`` says how a batch goes through
the model: ``classify_images`` for ``(images, labels)`` batches, ``classify_tokens`` for
the dict batches of Hugging Face sequence classifiers. Losses and correct counts
accumulate on the device; the host reads them once per epoch, so the loop never waits
on the GPU between batches. Under torchrun (``parallel``) each rank trains and evaluates
on its part of the data, and the sums are taken over all ranks in one collective, so
every rank reports the whole run's numbers.
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from worm_fast.experiments.parallel import SINGLE_PROCESS, DataParallel


@dataclass
class EpochResult:
    loss: float  # mean training loss over the epoch's samples
    accuracy: float  # training accuracy in % (with the model in train mode)
    seconds: float
    steps: int
    batch_losses: list[float]  # for loss trajectories (the paper's Figure 2)


Forward = Callable[[nn.Module, object, torch.device], tuple[torch.Tensor, torch.Tensor]]


def classify_images(model: nn.Module, batch, device: torch.device):
    """``(images, labels)`` batches: the model maps images to logits."""
    inputs, labels = batch
    inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return model(inputs), labels


def classify_tokens(model: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device):
    """Dict batches (``input_ids``, ``attention_mask``, …, ``labels``) of a Hugging Face
    sequence classifier; the loss is computed here, as for images."""
    inputs = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    labels = inputs.pop("labels")
    return model(**inputs).logits, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    forward: Forward = classify_images,
    progress: bool = False,
    description: str = "train",
    penalty: Callable[[], torch.Tensor] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> EpochResult:
    """One pass over ``loader``. ``penalty`` (e.g. WORM-gradient's ``search.penalty``) is
    added to each step's loss; the losses reported are the task's alone. ``scheduler``
    steps after every optimizer step. Under torchrun the loss and accuracy are over
    every rank's samples, and each batch loss is the global batch's."""
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    samples, batch_losses, batch_sizes = 0, [], []
    for batch in tqdm(loader, desc=description, leave=False, disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        logits, labels = forward(model, batch, device)
        loss = nn.functional.cross_entropy(logits, labels)
        (loss if penalty is None else loss + penalty()).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch_losses.append(loss.detach())
        batch_sizes.append(labels.numel())
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.argmax(dim=1) == labels).sum()
        samples += labels.numel()
    if samples == 0:
        raise ValueError("the training loader yielded no batches")
    # Per step, loss x samples in float64 (exact), so that one process reads back its
    # own losses and ranks add up to the global batch's mean.
    sizes = torch.tensor(batch_sizes, dtype=torch.float64, device=device)
    weighted = torch.stack(batch_losses).double() * sizes
    weighted, sizes, loss_sum, correct = parallel.sum(weighted, sizes, loss_sum, correct)
    samples = int(sizes.sum().item())
    _sync(device)
    return EpochResult(
        loss=loss_sum.item() / samples,
        accuracy=100.0 * correct.item() / samples,
        seconds=time.perf_counter() - start,
        steps=len(batch_losses),
        batch_losses=(weighted / sizes).tolist(),
    )


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    forward: Forward = classify_images,
    parallel: DataParallel = SINGLE_PROCESS,
) -> float:
    """Top-1 accuracy in % over ``loader``, with the model in eval mode."""
    return accuracies(model, loader, device=device, forward=forward, ks=(1,), parallel=parallel)[1]


@torch.no_grad()
def accuracies(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    forward: Forward = classify_images,
    ks: tuple[int, ...] = (1, 5),
    parallel: DataParallel = SINGLE_PROCESS,
) -> dict[int, float]:
    """Top-k accuracy in % over ``loader`` for each k of ``ks`` (a sample counts when its
    label is among the k largest logits; top-1 is the argmax, ties to the first class),
    in one pass with the model in eval mode. Under torchrun ``loader`` is this rank's
    shard, ``model`` the unwrapped module, evaluated with rank 0's buffers, and the
    counts are summed over the ranks."""
    parallel.share_buffers(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(ks), dtype=torch.int64, device=device)
    samples = 0
    for batch in loader:
        logits, labels = forward(model, batch, device)
        hits = []
        for k in ks:
            if k == 1:
                hits.append((logits.argmax(dim=1) == labels).sum())
            else:
                top = logits.topk(min(k, logits.shape[1]), dim=1).indices
                hits.append((top == labels.unsqueeze(1)).any(dim=1).sum())
        correct += torch.stack(hits)
        samples += labels.numel()
    model.train(was_training)
    correct, total = parallel.sum(correct, torch.tensor(samples, device=device))
    samples = int(total.item())
    if samples == 0:
        raise ValueError("the evaluation loader yielded no batches")
    return {k: 100.0 * count / samples for k, count in zip(ks, correct.tolist())}
