"""GLUE TSV files as the downloads come (byte-order mark, CRLF line ends, a trailing blank
line), and precise errors for what cannot be read (the unlabeled test split, a short
row, another encoding)."""

import pytest

from worm_fast.experiments.data import load_text_task

MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
MRPC_ROWS = [
    ["1", "702876", "702977", 'He said "yes".', "He agreed."],
    ["0", "2108705", "2108831", "A cat sat.", "Dogs bark loudly."],
]


def write(path, lines, *, bom=False, newline="\n", encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = newline.join("\t".join(line) for line in lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))


@pytest.mark.parametrize("bom", (False, True), ids=("no-bom", "bom"))
@pytest.mark.parametrize("newline", ("\n", "\r\n"), ids=("lf", "crlf"))
def test_mrpc_as_downloaded(tmp_path, bom, newline):
    for split in ("train", "dev"):
        write(tmp_path / "MRPC" / f"{split}.tsv", [MRPC_HEADER, *MRPC_ROWS, []], bom=bom,
              newline=newline)  # fmt: skip
    train, dev, task = load_text_task("mrpc", data_dir=tmp_path)
    assert [(e.text, e.pair, e.label) for e in train] == [
        ('He said "yes".', "He agreed.", 1),
        ("A cat sat.", "Dogs bark loudly.", 0),
    ]
    assert len(dev) == 2 and task.sentence_pair


def test_the_unlabeled_test_split_is_named_as_such(tmp_path):
    write(tmp_path / "RTE" / "train.tsv", [["index", "sentence1", "sentence2"], ["0", "a", "b"]])
    with pytest.raises(ValueError, match=r"no label column 'label'.*unlabeled test split"):
        load_text_task("rte", data_dir=tmp_path)


def test_a_short_row_names_the_file_and_line(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["fine", "1"], ["dull"]])
    with pytest.raises(ValueError, match=r"train\.tsv, line 3: 1 tab-separated fields"):
        load_text_task("sst2", data_dir=tmp_path)


def test_another_encoding_is_named(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["café", "1"]],
          encoding="latin-1")  # fmt: skip
    with pytest.raises(ValueError, match=r"train\.tsv is not UTF-8 text \(byte 0xe9"):
        load_text_task("sst2", data_dir=tmp_path)


def test_a_header_without_examples_is_refused(tmp_path):
    for split in ("train", "dev"):
        write(tmp_path / "SST-2" / f"{split}.tsv", [["sentence", "label"]])
    with pytest.raises(ValueError, match="has a header but no examples"):
        load_text_task("sst2", data_dir=tmp_path)
