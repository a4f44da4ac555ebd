"""The parameter sets the optimizer step is measured on: name → list of (name, shape).

Only shapes matter to an optimizer step, so the models are never run or downloaded:
ResNet-18 is the project's own CIFAR-style net built on the meta device, BERT-base is
written out from its architecture.
"""

import math

import torch

from worm_fast.experiments.models import resnet18

Shapes = list[tuple[str, tuple[int, ...]]]


def resnet18_cifar() -> Shapes:
    """CIFAR-style ResNet-18 (10 classes), as ``experiments.models.resnet18`` builds it."""
    with torch.device("meta"):
        model = resnet18(num_classes=10)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def bert_base(vocab: int = 30522, hidden: int = 768, layers: int = 12, labels: int = 2) -> Shapes:
    """BERT-base for sequence classification, in Hugging Face's parameter order."""
    ffn = 4 * hidden
    shapes: Shapes = [
        ("embeddings.word_embeddings.weight", (vocab, hidden)),
        ("embeddings.position_embeddings.weight", (512, hidden)),
        ("embeddings.token_type_embeddings.weight", (2, hidden)),
        ("embeddings.LayerNorm.weight", (hidden,)),
        ("embeddings.LayerNorm.bias", (hidden,)),
    ]
    for i in range(layers):
        layer = f"encoder.layer.{i}"
        for proj in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            shapes += [
                (f"{layer}.{proj}.weight", (hidden, hidden)),
                (f"{layer}.{proj}.bias", (hidden,)),
            ]
        shapes += [
            (f"{layer}.attention.output.LayerNorm.weight", (hidden,)),
            (f"{layer}.attention.output.LayerNorm.bias", (hidden,)),
            (f"{layer}.intermediate.dense.weight", (ffn, hidden)),
            (f"{layer}.intermediate.dense.bias", (ffn,)),
            (f"{layer}.output.dense.weight", (hidden, ffn)),
            (f"{layer}.output.dense.bias", (hidden,)),
            (f"{layer}.output.LayerNorm.weight", (hidden,)),
            (f"{layer}.output.LayerNorm.bias", (hidden,)),
        ]
    shapes += [
        ("pooler.dense.weight", (hidden, hidden)),
        ("pooler.dense.bias", (hidden,)),
        ("classifier.weight", (labels, hidden)),
        ("classifier.bias", (labels,)),
    ]
    return shapes


def single(numel: int) -> Shapes:
    return [("weight", (numel,))]


def representative(shapes: Shapes) -> set[str]:
    """The tensors that get a truncation mask: every other one in order of size.

    Taking the 1st, 3rd, 5th, ... largest tensor covers about half of the elements with
    a mix of large and small tensors, as a real split (e.g. alternate layers) would; a
    set of one tensor masks that tensor.
    """
    by_size = sorted(shapes, key=lambda item: -math.prod(item[1]))
    return {name for name, _ in by_size[::2]}


def for_run(quick: bool) -> dict[str, Shapes]:
    """The benchmarked sets; ``quick`` swaps in small stand-ins for a smoke run."""
    if quick:
        return {
            "bert-tiny": bert_base(vocab=1000, hidden=64, layers=2),
            "tensor-64K": single(1 << 16),
        }
    return {"resnet18": resnet18_cifar(), "bert-base": bert_base(), "tensor-16M": single(1 << 24)}
