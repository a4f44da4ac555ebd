"""The command line at the door: bad options are refused before any training (exit 2,
``worm-fast: …``), a diverged run fails loudly (exit 1, status ``failed``, valid JSON),
and one results folder belongs to one live run at a time."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from worm_fast import cli, files
from worm_fast.experiments import pipeline

TINY = [
    "--model", "resnet20", "--width", "0.25", "--train-subset", "96", "--test-subset", "64",
    "--batch-size", "32", "--epochs", "2", "--retrain-epochs", "1", "--window", "2",
    "--no-progress", "--no-plots",
]  # fmt: skip


def strict_json(path):
    """Parse as strict JSON: the NaN / Infinity literals Python writes are refused."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def no_training(monkeypatch):
    """Training must never start: the test fails if an epoch begins."""

    def started(*args, **kwargs):
        raise AssertionError("training started before the options were checked")

    monkeypatch.setattr(pipeline, "train_epoch", started)


BAD_OPTIONS = [
    (["--window", "1"], "window must be an integer >= 2"),
    (["--prune-ratio", "1.5"], r"prune_ratio must be in \[0, 1\)"),
    (["--width", "0"], r"width \(--width\) must be a finite number > 0"),
    (["--train-subset", "0"], r"train_subset \(--train-subset\) must be a positive integer"),
    (["--test-subset", "-3"], r"test_subset \(--test-subset\) must be a positive integer"),
    (["--lr", "-1"], r"lr \(--lr\) must be a finite number >= 0"),
    (["--lr", "nan"], r"lr \(--lr\) must be a finite number >= 0"),
    (["--momentum", "-0.5"], r"momentum \(--momentum\) must be"),
    (["--weight-decay", "inf"], r"weight_decay \(--weight-decay\) must be"),
    (["--truncation", "2"], r"truncation must be in \[0, 1\]"),
    (["--stop-distance", "nan"], "stop_distance must be a finite number > 0"),
    (["--trigger-margin", "-1"], "trigger_margin must be a finite number >= 0"),
    (["--epochs", "0"], r"max_epochs \(--epochs\) must be an integer >= 1"),
    (["--batch-size", "0"], r"batch_size \(--batch-size\) must be an integer >= 1"),
    (["--retrain-epochs", "-1"], r"retrain_epochs \(--retrain-epochs\) must be"),
    (["--pue", "0.5"], r"pue \(--pue\) must be a finite number >= 1"),
    (["--seed", "-1"], r"seed \(--seed\) must be an integer >= 0"),
    (["--device", "foo"], r"device \(--device\) 'foo' is not a torch device"),
    (["--device", "meta"], "holds no data"),
    (["--representative", "*.no_such_layer.weight"], "no representative parameters found"),
    (["--train-subset", "70000"], r"train_subset must be an int in \[1, 60000\]"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS += [
        (["--device", "cuda"], r"device \(--device\) 'cuda' is not available here"),
        (["--backend", "cuda"], r"backend \(--backend\): backend 'cuda' is not available"),
    ]


@pytest.mark.parametrize(
    "options, message", BAD_OPTIONS, ids=[" ".join(options) for options, _ in BAD_OPTIONS]
)
def test_bad_options_are_refused_before_training(tmp_path, capsys, no_training, options, message):
    code = cli.main(["search", *TINY, *options, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("worm-fast: ")
    assert len(error.strip().splitlines()) == 1, "one line, no traceback"
    assert re.search(message, error), error
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    "command, options, message",
    [
        ("compare", ["--runs", "0"], "--runs must be at least 1"),
        ("sweep", ["--truncations", "0.5", "2"], r"--truncations must be in \[0, 1\], got 2"),
    ],
)
def test_command_options_are_refused_before_training(
    tmp_path, capsys, no_training, command, options, message
):
    code = cli.main([command, *TINY, *options, "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("worm-fast: ")
    assert re.search(message, error), error


def test_options_argparse_cannot_read_exit_2(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["search", "--window", "2.5"])
    assert raised.value.code == 2
    assert "invalid int value: '2.5'" in capsys.readouterr().err


def test_an_unusable_out_is_refused(tmp_path, capsys, no_training):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "below"):
        assert cli.main(["search", *TINY, "--out", str(out)]) == 2
        assert f"--out {out} cannot hold the results" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"


# -- a diverged run ---------------------------------------------------------------------


def test_a_diverged_run_fails_with_status_and_valid_json(tmp_path, capsys):
    # The example: `worm-fast search --lr 1e30` exited 0 with an empty ticket.
    code = cli.main(["search", *TINY, "--lr", "1e30", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 1, error
    assert "worm-fast: run failed" in error and "NaN or inf" in error
    document = strict_json(tmp_path / "results.json")
    (only,) = document["runs"]
    assert only["status"] == "failed" and "diverged" in only["error"]
    assert only["metrics"] == {}  # no ticket, no density, no pruning
    assert [row["phase"] for row in only["rows"]] == ["search"]  # the epoch that diverged
    assert "runs/0/rows/0/loss" in document["non_finite_values"]
    assert only["rows"][0]["loss"] is None


def test_results_json_writes_non_finite_numbers_as_null_with_the_reason(tmp_path):
    text = files.json_text({"a": [1.0, math.nan], "b": {"c": -math.inf}, "d": "x"})
    document = json.loads(text, parse_constant=lambda c: pytest.fail(f"literal {c}"))
    assert document["a"] == [1.0, None] and document["b"]["c"] is None
    assert document["non_finite_values"] == {"a/1": "nan", "b/c": "-inf"}
    assert "non_finite_values" not in json.loads(files.json_text({"a": 1.0}))


# -- one live run per results folder ----------------------------------------------------


def test_a_folder_held_by_a_live_run_is_refused(tmp_path, capsys, no_training):
    with files.exclusive_folder(tmp_path):
        code = cli.main(["search", *TINY, "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2
    assert f"{tmp_path} is being written by another run (pid {os.getpid()}" in error


# Holds the lock until killed; loads files.py alone (standard library only), not torch.
HOLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("files", sys.argv[2])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
with files.exclusive_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_the_lock_of_a_live_process_blocks_and_of_a_killed_one_does_not(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), files.__file__], stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = pytest.raises(files.FolderInUseError, match=f"pid {holder.pid}")
        with refused, files.exclusive_folder(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup code runs
        holder.wait(timeout=30)
    with files.exclusive_folder(tmp_path) as folder:  # the kernel released the dead lock
        assert folder == tmp_path
