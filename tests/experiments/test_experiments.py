"""The search → prune → retrain pipeline, variants from identical starts, and the CLI."""

import json

import pytest

from worm_fast import cli
from worm_fast.experiments import pipeline
from worm_fast.experiments.pipeline import RunConfig, run
from worm_fast.experiments.variants import compare_variants, run_variants, sweep_variants

TINY = dict(
    model="resnet20", width=0.25, train_subset=96, test_subset=64, batch_size=32,
    max_epochs=3, retrain_epochs=2, window=2, lr=0.05,
)  # fmt: skip
TINY_ARGS = [
    "--model", "resnet20", "--width", "0.25", "--train-subset", "96", "--test-subset", "64",
    "--batch-size", "32", "--epochs", "3", "--retrain-epochs", "1", "--window", "2",
    "--no-progress",
]  # fmt: skip


def test_restore_epochs():
    assert pipeline._restore_epochs(80.0, 75.0, [10.0]) == 0  # 75 >= 0.9 * 80 already
    assert pipeline._restore_epochs(80.0, 10.0, [50.0, 72.0, 79.0]) == 2
    assert pipeline._restore_epochs(80.0, 10.0, [50.0]) is None


def test_structured_run_shrinks_the_model_and_its_flops():
    config = dict(TINY, model="resnet20_projection")
    result = run(RunConfig(**config, prune="structured", prune_ratio=0.5, mode="worm"))
    metrics = result.metrics
    assert result.status == "complete"
    assert metrics["params_after"] < metrics["params_before"]
    assert [row["phase"] for row in result.rows][-3:] == ["prune", "retrain", "retrain"]
    phases = {row["phase"]: row for row in result.profile["phases"]}
    per_step = {name: phases[name]["model_flops"] / phases[name]["steps"]
                for name in ("search", "retrain")}  # fmt: skip
    assert per_step["retrain"] < per_step["search"]
    total = result.profile["total"]
    assert total["duration"] == pytest.approx(sum(p["duration"] for p in phases.values()))
    assert metrics["total_seconds"] == pytest.approx(total["duration"])


def test_structured_pruning_of_option_a_resnet20_is_refused_at_the_door():
    with pytest.raises(ValueError, match=r"zero-padding.*resnet20_projection"):
        RunConfig(**TINY, prune="structured")


def test_variants_start_identically_and_seeds_differ():
    document = run_variants(RunConfig(**TINY), compare_variants(), runs=2)
    runs = document["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [
        ("EB Train", 0), ("WORM", 0), ("EB Train", 1), ("WORM", 1),
    ]  # fmt: skip
    # Before any trigger (window 2: the earliest is the second check) both variants train
    # identically, from the same weights on the same batches.
    assert runs[0]["rows"][0]["batch_losses"] == runs[1]["rows"][0]["batch_losses"]
    assert runs[0]["rows"][0]["batch_losses"] != runs[2]["rows"][0]["batch_losses"]
    assert document["summary"]["WORM"]["runs"] == 2
    expected = (runs[1]["metrics"]["search_epochs"] + runs[3]["metrics"]["search_epochs"]) / 2
    assert document["summary"]["WORM"]["search_epochs"] == expected


def test_sweep_variants_follow_table_one():
    assert list(sweep_variants()) == ["r = 1", "r = 0.5", "r = 0.1", "r = 0.05", "r = 0.01"]
    assert sweep_variants([0.2])["r = 0.2"] == {"mode": "truncate", "truncation": 0.2}


def test_cli_compare_writes_results_and_prints_the_table(tmp_path, capsys):
    assert cli.main(["compare", *TINY_ARGS, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| EB Train |" in printed and "| WORM |" in printed and "Pre-Pruned Acc." in printed
    for name in ("results.json", "epochs.csv", "runs.csv", "phases.csv", "table.md",
                 "mask_distance.png", "loss.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    document = json.loads((tmp_path / "results.json").read_text())
    assert {r["status"] for r in document["runs"]} == {"complete"}
    assert document["environment"]["torch"]
    assert (tmp_path / "mask_distance.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_missing_cifar10_says_what_to_put_where(tmp_path, capsys):
    code = cli.main(["search", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


def test_interrupted_run_keeps_the_finished_epochs(tmp_path, monkeypatch, capsys):
    real_train_epoch = pipeline.train_epoch
    calls = []

    def interrupted_on_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_epoch", interrupted_on_third_epoch)
    code = cli.main(["search", *TINY_ARGS, "--window", "5", "--out", str(tmp_path)])
    assert code == 130
    assert "finished epochs" in capsys.readouterr().err
    document = json.loads((tmp_path / "results.json").read_text())
    (only,) = document["runs"]
    assert only["status"] == "interrupted"
    assert [row["epoch"] for row in only["rows"]] == [1, 2]
    assert len((tmp_path / "epochs.csv").read_text().splitlines()) == 3  # header + 2 epochs


def test_cnn_runs_share_the_loop_with_any_worm_optimizer():
    config = {**TINY, "max_epochs": 2, "retrain_epochs": 1, "optimizer": "adamw", "lr": 1e-3}
    result = run(RunConfig(**config))
    assert result.status == "complete"
    assert result.config["optimizer"] == "adamw"
    assert [row["phase"] for row in result.rows] == ["search", "search", "prune", "retrain"]


def test_cli_parses_subset_sizes_and_representative_presets():
    args = cli.build_parser().parse_args(
        ["compare", "--task", "rt-polarity", "--train-subset", "all", "--representative",
         "attention_qkv"]
    )  # fmt: skip
    config = cli._config(args)
    assert config.train_subset == "all" and config.representative == "attention_qkv"
    args = cli.build_parser().parse_args(["search", "--representative", "*.bn1.weight", "fc*"])
    assert cli._config(args).representative == ("*.bn1.weight", "fc*")


def test_cli_profile_prints_every_phase_and_why_energy_is_missing(tmp_path, capsys):
    assert cli.main(["profile", *TINY_ARGS, "--no-plots", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for phase in ("search", "prune", "retrain", "total"):
        assert f"| {phase} |" in printed
    assert "optimizer FLOPs" in printed and "Energy measured by:" in printed
    document = json.loads((tmp_path / "results.json").read_text())
    profile = document["runs"][0]["profile"]
    assert profile["total"]["optimizer_flops"] > 0
    if not profile["energy_sources"]:  # this machine: no NVML, no RAPL
        assert "Not measured:" in printed and profile["total"]["energy_joules"] is None
