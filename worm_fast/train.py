"""One epoch of supervised training, and evaluation.

Losses and correct counts accumulate on the device; the host reads them once per
epoch, so the loop never waits on the GPU between batches.
"""

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@dataclass
class EpochResult:
    loss: float  # mean training loss over the epoch's samples
    accuracy: float  # training accuracy in % (with the model in train mode)
    seconds: float
    steps: int
    batch_losses: list[float]  # for loss trajectories (the paper's Figure 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    progress: bool = False,
    description: str = "train",
) -> EpochResult:
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    samples, batch_losses = 0, []
    for inputs, labels in tqdm(loader, desc=description, leave=False, disable=not progress):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        batch_losses.append(loss.detach())
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.argmax(dim=1) == labels).sum()
        samples += labels.numel()
    if samples == 0:
        raise ValueError("the training loader yielded no batches")
    _sync(device)
    return EpochResult(
        loss=loss_sum.item() / samples,
        accuracy=100.0 * correct.item() / samples,
        seconds=time.perf_counter() - start,
        steps=len(batch_losses),
        batch_losses=torch.stack(batch_losses).tolist(),
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device) -> float:
    """Top-1 accuracy in % over ``loader``, with the model in eval mode."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    samples = 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        correct += (model(inputs).argmax(dim=1) == labels).sum()
        samples += labels.numel()
    model.train(was_training)
    if samples == 0:
        raise ValueError("the evaluation loader yielded no batches")
    return 100.0 * correct.item() / samples
