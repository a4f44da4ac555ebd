"""`worm-fast merge`: one experiment's seeds run by several commands join into the result of
one command over all of them, and folders that are not one experiment are refused."""

import copy
import json

import pytest

from tests.experiments.test_experiments import TINY_ARGS
from worm_fast import cli
from worm_fast.experiments.merge import MergeError, load_document, merge_documents

ARGS = ["compare", *TINY_ARGS, "--no-plots"]


def _timeless(metrics: dict) -> dict:
    """A run's metrics without its wall times, which no two runs share."""
    return {k: v for k, v in metrics.items() if "seconds" not in k}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    runs = {"whole": ["--runs", "2"], "seed0": ["--runs", "1"], "seed1": ["--seed", "1"]}
    for name, extra in runs.items():
        assert cli.main([*ARGS, *extra, "--out", str(root / name)]) == 0
    return root


def test_halves_merge_into_the_whole_experiment(folders, capsys):
    out = folders / "merged"
    # the later seeds' folder first: the joined runs are in seed order all the same
    code = cli.main(["merge", str(folders / "seed1"), str(folders / "seed0"), "--out", str(out),
                     "--no-plots"])  # fmt: skip
    assert code == 0
    assert "| EB Train |" in capsys.readouterr().out
    whole, merged = load_document(folders / "whole"), load_document(out)
    assert merged["base_config"] == whole["base_config"]
    assert [(r["variant"], r["seed"]) for r in merged["runs"]] == [
        (r["variant"], r["seed"]) for r in whole["runs"]
    ]
    for ours, theirs in zip(merged["runs"], whole["runs"], strict=True):
        assert _timeless(ours["metrics"]) == _timeless(theirs["metrics"])
    for variant, means in whole["summary"].items():
        assert _timeless(merged["summary"][variant]) == _timeless(means)
    assert [part["seeds"] for part in merged["merged_from"]] == [[1], [0]]
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 4
    assert "paired by seed" in (out / "table.md").read_text()


def test_folders_of_other_settings_are_refused_naming_the_setting(folders):
    seed0, seed1 = load_document(folders / "seed0"), load_document(folders / "seed1")
    seed1["base_config"]["lr"] = 0.5
    with pytest.raises(MergeError, match=r"lr: .* vs 0\.5.*only the seeds may differ"):
        merge_documents([seed0, seed1], ["a", "b"])
    seed1 = load_document(folders / "seed1")
    seed1["variants"].pop("WORM")
    with pytest.raises(MergeError, match="variants"):
        merge_documents([seed0, seed1])


def test_a_finished_seed_supersedes_its_unfinished_attempt_and_equals_its_rerun(folders):
    seed0 = load_document(folders / "seed0")
    killed = copy.deepcopy(seed0)
    killed["runs"][0]["status"], killed["runs"][1]["status"] = "running", "interrupted"
    for documents in ([killed, seed0], [seed0, killed]):
        merged = merge_documents(documents)
        assert merged["runs"] == seed0["runs"]
    # the same seed run twice is one result (wall times aside) ...
    rerun = load_document(folders / "seed0")
    rerun["runs"][0]["metrics"]["total_seconds"] += 100.0
    assert merge_documents([seed0, rerun])["runs"] == seed0["runs"]
    # ... unless the two runs disagree
    rerun["runs"][0]["metrics"]["pre_pruned_accuracy"] += 1.0
    with pytest.raises(MergeError, match=r"'EB Train' seed 0 finished in both a and b with "
                       r"different results \(pre_pruned_accuracy\)"):  # fmt: skip
        merge_documents([seed0, rerun], ["a", "b"])
    with pytest.raises(MergeError, match="at least two"):
        merge_documents([seed0])


def test_bad_folders_are_refused_and_nothing_is_written(folders, tmp_path, capsys):
    seed0 = folders / "seed0"
    before = (seed0 / "results.json").read_bytes()
    assert cli.main(["merge", str(seed0), str(folders / "seed1"), "--out", str(seed0)]) == 2
    assert "is one of the folders to join" in capsys.readouterr().err
    assert (seed0 / "results.json").read_bytes() == before

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert cli.main(["merge", str(seed0), str(empty), "--out", str(out)]) == 2
    assert f"{empty} has no results.json" in capsys.readouterr().err
    assert not out.exists()

    (empty / "results.json").write_text(json.dumps([1, 2]))
    assert cli.main(["merge", str(seed0), str(empty), "--out", str(out)]) == 2
    assert "is not a worm-fast results document" in capsys.readouterr().err
    (empty / "results.json").write_text("{not json")
    assert cli.main(["merge", str(seed0), str(empty), "--out", str(out)]) == 2
    assert "is not a readable results document" in capsys.readouterr().err
    assert not out.exists()
