"""What the harness measures against what the paper reports: when the first mask is taken,
the presets, restoration targets and time to restoration, the dense baseline, top-5
accuracy, and tables and figures that never read better than the runs were (censored
counts, impossible triggers, late epochs over fewer runs)."""

import csv
import json

import pytest
import torch

from tests.experiments.test_experiments import TINY, TINY_ARGS
from worm_fast import cli
from worm_fast.experiments import report
from worm_fast.experiments.config import RunConfig
from worm_fast.experiments.pipeline import _restore_epochs, run
from worm_fast.experiments.presets import RUN_PRESETS
from worm_fast.experiments.train import accuracies
from worm_fast.experiments.variants import (
    DENSE_LABEL,
    compare_variants,
    run_variants,
    summarize,
    sweep_variants,
)
from worm_fast.experiments.workloads import make_scheduler
from worm_fast.profiling import PhaseProfiler

# -- when the first mask is taken ---------------------------------------------------------


@pytest.mark.parametrize("first_check", ["epoch", "init"])
def test_epochs_are_trained_epochs_in_both_conventions(first_check):
    result = run(RunConfig(**TINY, first_check=first_check, stop_distance=1e-9))
    search = [row for row in result.rows if row["phase"] == "search"]
    trained = [row for row in search if "loss" in row]
    assert [row["epoch"] for row in trained] == [1, 2, 3]
    assert result.metrics["search_epochs"] == 3 and not result.metrics["converged"]
    if first_check == "init":  # the untrained model's check: epoch 0, no training columns
        assert search[0]["epoch"] == 0 and "loss" not in search[0]
        assert search[0]["d_max"] is None and not search[0]["window_full"]
    # Window 2: full at the second check, i.e. one trained epoch sooner with "init".
    first_full = next(row["epoch"] for row in search if row["window_full"])
    assert first_full == (1 if first_check == "init" else 2)


# -- presets ------------------------------------------------------------------------------


def test_presets_fill_what_is_unset_and_explicit_settings_win():
    cnn = RunConfig(preset="paper-cnn")
    expected = RUN_PRESETS["paper-cnn"].values()
    assert {key: getattr(cnn, key) for key in expected} == expected
    assert (cnn.lr, cnn.lr_schedule, cnn.batch_size, cnn.first_check) == (
        0.01, "constant", 64, "init",
    )  # fmt: skip
    mine = RunConfig(preset="paper-cnn", lr=0.02, first_check="epoch", window=3)
    assert (mine.lr, mine.first_check, mine.window, mine.stop_distance) == (0.02, "epoch", 3, 0.1)
    bert = RunConfig(task="rt-polarity", preset="paper-bert")
    assert (bert.lr, bert.lr_schedule, bert.max_length, bert.optimizer) == (
        2e-5, "linear", 128, "adamw",
    )  # fmt: skip
    assert (bert.stop_distance, bert.window, bert.trigger_margin) == (0.01, 3, 0.005)
    assert RunConfig().first_check == "epoch" and RunConfig().max_length == 64  # no preset
    every_setting = [s for p in RUN_PRESETS.values() for s in p.settings.values()]
    assert all(setting.source for setting in every_setting)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(preset="paper-bert"), "is for runs on a text task"),
        (dict(preset="paper-cnn", task="rt-polarity"), "is for runs on an image dataset"),
        (dict(preset="paper-gpt"), "unknown preset"),
        (dict(restore_target="absolute:120"), "restore_target"),
        (dict(restore_target="90"), "relative:F"),
        (dict(lr_schedule="cosine"), "lr_schedule"),
        (dict(adamw_truncate="weights"), "adamw_truncate"),
        (dict(first_check="before"), "first_check"),
    ],
)
def test_bad_settings_are_refused_with_what_was_expected(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**options)


def test_linear_schedule_decays_to_zero_over_the_phase():
    config = RunConfig(lr_schedule="linear", lr=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config.lr)
    scheduler = make_scheduler(config, optimizer, epochs=2, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1 * (1 - step / 10) for step in range(10)])
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert make_scheduler(RunConfig(), optimizer, epochs=2, steps_per_epoch=5) is None


def test_cli_preset_and_adamw_truncation_reach_the_run(tmp_path):
    args = cli.build_parser().parse_args(
        ["compare", "--preset", "paper-cnn", "--lr", "0.05", "--optimizer", "adamw",
         "--adamw-truncate", "gradient", "--restore-target", "absolute:85"]
    )  # fmt: skip
    config = cli._config(args)
    assert (config.preset, config.lr, config.batch_size, config.first_check) == (
        "paper-cnn", 0.05, 64, "init",
    )  # fmt: skip
    assert (config.adamw_truncate, config.restore_target) == ("gradient", "absolute:85")


# -- restoration ----------------------------------------------------------------------------


def test_restoration_targets_relative_and_absolute():
    # The paper's ResNet-18 EB row: 84.67 % after one retrain epoch, yet 3.3 epochs to 90 %.
    retrained = [84.67, 88.0, 90.5]
    assert _restore_epochs(81.67, 10.0, retrained, ("relative", 0.9)) == 1
    assert _restore_epochs(81.67, 10.0, retrained, ("absolute", 90.0)) == 3
    assert _restore_epochs(81.67, 10.0, retrained[:2], ("absolute", 90.0)) is None
    assert _restore_epochs(95.0, 91.0, [], ("absolute", 90.0)) == 0


def test_a_run_reports_both_restoration_counts_and_the_time_to_restoration():
    result = run(RunConfig(**TINY, restore_target="relative:0.01"))
    metrics = result.metrics
    assert metrics["restore_target"] == "relative:0.01"
    assert metrics["restore_epochs"] == 0  # 1 % of the pre-pruned accuracy: at once
    for key in ("restore_90_relative_epochs", "restore_90_absolute_epochs"):
        assert key in metrics
    pruned_at = metrics["search_seconds"] + metrics["prune_seconds"]
    assert metrics["time_to_restore_seconds"] == pytest.approx(pruned_at)
    assert metrics["time_to_restore_seconds"] < metrics["total_seconds"]
    never = run(RunConfig(**TINY, restore_target="absolute:100")).metrics
    assert never["restore_epochs"] is None and never["time_to_restore_seconds"] is None


# -- the dense baseline and top-5 -------------------------------------------------------


def test_dense_baseline_trains_the_same_budget_without_pruning():
    document = run_variants(RunConfig(**TINY), compare_variants(modes=("eb",), with_dense=True))
    eb, dense = document["runs"]
    assert dense["variant"] == DENSE_LABEL and dense["config"]["prune"] == "none"
    searched = eb["metrics"]["search_epochs"]
    assert [row["phase"] for row in dense["rows"]] == ["search"] * searched + ["retrain"] * 2
    assert dense["metrics"]["pruned_accuracy"] is None
    assert dense["metrics"]["params_after"] == dense["metrics"]["params_before"]
    # EB's search decides the budget: the two runs are identical until EB prunes.
    eb_search = [row for row in eb["rows"] if row["phase"] == "search"]
    dense_search = [row for row in dense["rows"] if row["phase"] == "search"]
    assert [r["batch_losses"] for r in eb_search] == [r["batch_losses"] for r in dense_search]
    assert dense["metrics"]["search_epochs"] == eb["metrics"]["search_epochs"]
    assert "– |" in report.paper_table(document)  # its Post-Prune Acc. cell


def test_top_k_accuracy_counts_labels_among_the_k_largest_logits():
    logits = torch.tensor(
        [[5.0, 4, 3, 2, 1, 0, -1], [0.0, 1, 2, 3, 4, 5, 6], [1.0, 1, 1, 1, 1, 1, 1]]
    )
    labels = torch.tensor([0, 1, 0])  # top-1 hit; rank 6; a tie (argmax: the first class)
    loader = [(logits, labels)]

    def forward(model, batch, device):
        return batch

    got = accuracies(torch.nn.Identity(), loader, device=torch.device("cpu"), forward=forward)
    assert got == {1: pytest.approx(200 / 3), 5: pytest.approx(200 / 3)}


def test_cnn_runs_report_top5_beside_top1():
    result = run(RunConfig(**TINY))
    for row in result.rows:
        if "test_accuracy" in row:
            assert row["test_top5_accuracy"] >= row["test_accuracy"]
    metrics = result.metrics
    assert metrics["pre_pruned_top5_accuracy"] >= metrics["pre_pruned_accuracy"]
    assert metrics["retrain_top5_accuracy_1"] >= metrics["retrain_accuracy_1"]


# -- tables that never read better than the runs ------------------------------------------


def _profile() -> dict:
    profiler = PhaseProfiler(energy=False)
    with profiler.phase("search"):
        pass
    return profiler.to_dict()


def _entry(variant, mode="worm", truncation=3e-3, retrain_epochs=2, seed=0, **metrics):
    base = dict(
        converged=True, search_epochs=4, trigger_epoch=None,
        trigger_possible=mode in ("worm", "truncate") and truncation < 1,
        pre_pruned_accuracy=90.0, pruned_accuracy=10.0, retrain_accuracy_1=80.0,
        restore_epochs=1, time_to_restore_seconds=50.0, total_seconds=60.0,
    )  # fmt: skip
    config = dict(mode=mode, truncation=truncation, retrain_epochs=retrain_epochs)
    return dict(variant=variant, seed=seed, status="complete", config=config,
                metrics={**base, **metrics}, rows=[], profile=_profile())  # fmt: skip


def _document(runs):
    base = dict(RunConfig(**TINY).__dict__)
    variants = {run["variant"]: {} for run in runs}
    return dict(base_config=base, variants=variants, runs=runs, summary=summarize(runs))


def test_censored_counts_are_lower_bounds_with_how_many_runs_got_there(tmp_path):
    runs = [
        _entry("WORM", trigger_epoch=2),
        _entry("WORM", converged=False, search_epochs=6, restore_epochs=None,
               time_to_restore_seconds=None),
        _entry("Unconverged", converged=False, search_epochs=6),
        _entry("EB Train", mode="eb", trigger_possible=False),
        _entry("r = 1", mode="truncate", truncation=1.0, trigger_epoch=None),
    ]  # fmt: skip
    document = _document(runs)
    worm = document["summary"]["WORM"]
    assert (worm["converged_runs"], worm["restored_runs"], worm["triggered_runs"]) == (1, 1, 1)
    assert worm["search_epochs_bound"] == 5.0 and worm["restore_epochs_bound"] == 1.5
    table = report.paper_table(document)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "≥ 5 (1/2 converged)" in rows["WORM"]
    assert "≥ 1.5 (1/2 restored)" in rows["WORM"] and "≥ 55s (1/2 restored)" in rows["WORM"]
    assert "2 (1/2 triggered)" in rows["WORM"]
    assert "≥ 6 (0/1 converged)" in rows["Unconverged"]
    for variant in ("EB Train", "r = 1"):  # nothing is ever truncated: no trigger epoch
        trigger_cell = rows[variant].split(" | ")[2]
        assert trigger_cell == "–", variant
    assert "Epochs are trained epochs" in table and "--restore-target relative:0.9" in table
    report.write_results(tmp_path, document)
    with open(tmp_path / "summary.csv", newline="") as file:
        summary = {row["variant"]: row for row in csv.DictReader(file)}
    assert summary["WORM"]["converged_runs"] == "1" and summary["WORM"]["runs"] == "2"
    assert summary["WORM"]["search_epochs_bound"] == "5.0"


def test_paired_effects_say_whether_an_effect_exceeds_the_seed_to_seed_spread():
    runs = [
        *(_entry("EB Train", mode="eb", seed=seed, search_epochs=epochs, total_seconds=60.0 + seed)
          for seed, epochs in enumerate((6, 7, 6))),
        *(_entry("WORM", seed=seed, search_epochs=epochs, total_seconds=60.0 - seed)
          for seed, epochs in enumerate((5, 6, 5))),
    ]  # fmt: skip
    lines = report.paired_effects(_document(runs)).splitlines()
    rows = {line.split(" | ")[1]: line for line in lines[2:]}
    assert rows["Ticket Search Epoch Count"].endswith("| -1 | 0 | 3 | yes |")
    assert rows["Pre-Pruned Acc."].endswith("| no |")  # no difference at all
    assert rows["Total Time"].endswith("| -2s | 2s | 3 | no |")  # -2 ± 2 s: within the spread
    assert report.paired_effects(_document(runs[:1] + runs[3:4])) == ""  # one seed: no spread


def test_text_tables_count_converged_runs_and_bound_censored_epochs():
    runs = [_entry("EB Train", mode="eb"), _entry("EB Train", mode="eb", converged=False,
                                                  search_epochs=10)]  # fmt: skip
    document = _document(runs)
    document["base_config"].update(task="rt-polarity", model="MiniLM")
    table = report.paper_table(document)
    assert "| Ticket Converged | 1/2 |" in table
    assert "| Epochs to Prune | ≥ 7 (1/2 converged) |" in table


def test_sweep_r_one_shows_no_trigger_epoch():
    config = RunConfig(**{**TINY, "max_epochs": 2, "retrain_epochs": 0})
    document = run_variants(config, sweep_variants([1.0, 0.5]))
    r_one, r_half = document["runs"]
    assert r_one["metrics"]["trigger_epoch"] is None and not r_one["metrics"]["trigger_possible"]
    assert r_half["metrics"]["trigger_epoch"] == 1  # truncation from the first check
    rows = report.paper_table(document).splitlines()
    assert rows[2].split(" | ")[2] == "–" and rows[3].split(" | ")[2] == "1"


def test_figure_one_uses_full_windows_and_means_only_where_every_run_is():
    def search_run(points):  # (epoch, d_max, window_full)
        rows = [dict(phase="search", epoch=e, d_max=d, d_avg=d, window_full=f)
                for e, d, f in points]  # fmt: skip
        return dict(variant="WORM", rows=rows)

    short = search_run([(1, None, False), (2, 0.4, False), (3, 0.3, True), (4, 0.1, True)])
    long = search_run([(1, None, False), (2, 0.6, False), (3, 0.5, True), (4, 0.3, True),
                       (5, 0.2, True)])  # fmt: skip
    assert report.full_window_series(short, "d_max") == ([3, 4], [0.3, 0.1])
    epochs, means = report.shared_mean([short, long], "d_max")
    assert epochs == [3, 4] and means == pytest.approx([0.4, 0.2])  # epoch 5: one run only


# -- reports of the command line -------------------------------------------------------------


def test_cli_profile_prints_a_cpu_peak_memory_or_why_not(tmp_path, capsys):
    assert cli.main(["profile", *TINY_ARGS, "--no-plots", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    document = json.loads((tmp_path / "results.json").read_text())
    total = document["runs"][0]["profile"]["total"]
    if total["memory_unavailable"] is None:
        assert total["peak_memory_bytes"] > 0
        assert "Peak memory: process_peak_rss" in printed
    else:
        assert total["peak_memory_bytes"] is None and "Peak memory not measured" in printed
    for phase in document["runs"][0]["profile"]["phases"]:
        assert phase["peak_memory_bytes"] != 0
