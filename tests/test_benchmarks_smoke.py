"""The benchmark code runs end to end (``--quick``: tiny sizes), and ``gpu_check``'s
plumbing. Speed is not checked: benchmarks are not tests (DESIGN §4)."""

import csv
import json

import pytest
import torch

from benchmarks import gpu_check, results, roofline
from benchmarks.run import main


def test_quick_run_writes_json_and_upserts_csv(tmp_path):
    main(["--quick", "--out", str(tmp_path)])

    payload = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "threads", "torch", "date"} <= payload["machine"].keys()
    rows = payload["rows"]
    benchmarks = {row["benchmark"] for row in rows}
    assert benchmarks == {
        "stream", "sgd_step", "adamw_step", "compile_step", "hamming_window", "threshold",
        "check", "penalty",
    }  # fmt: skip
    providers = {row["provider"] for row in rows if row["benchmark"] == "sgd_step"}
    assert {"torch_sgd_fused", "torch_sgd_foreach+foreach_mul", "worm_sgd_cpp+trunc"} <= providers
    providers = {row["provider"] for row in rows if row["benchmark"] == "adamw_step"}
    assert {"torch_adamw_fused", "worm_adamw_cpp+trunc"} <= providers
    compiled = {row["provider"]: row for row in rows if row["benchmark"] == "compile_step"}
    assert {"worm_sgd_cpp+trunc@compile", "torch_sgd_fused@compile"} <= compiled.keys()
    assert compiled["worm_sgd_cpp+trunc@compile"]["vs_eager"] > 0
    assert "compiled in" in compiled["torch_sgd_fused@compile"]["note"]
    providers = {row["provider"] for row in rows if row["benchmark"] == "check"}
    assert providers == {"check_kthvalue", "check_radix_select", "torch_sum_read"}
    assert {t["target"] for t in payload["targets"]} >= {"BERT-base Q/K check, ms (<= 30)"}
    assert all(row["median_ms"] > 0 and row["gbps"] > 0 for row in rows)

    # A second write of the same keys replaces those rows instead of appending.
    again = [results.Row(**{**rows[0], "median_ms": 123.0})]
    results.write(again, payload["machine"], [], tmp_path)
    with (tmp_path / "results.csv").open(newline="") as file:
        table = list(csv.DictReader(file))
    assert len(table) == len(rows)
    assert [float(r["median_ms"]) for r in table if r["provider"] == rows[0]["provider"]] == [123.0]


def test_device_roofline_kernels_run_on_any_device():
    stream = roofline.DeviceStream(1 << 16, torch.device("cpu"))
    timings = stream.measure(warmup=1, reps=5, budget_s=None)
    assert set(timings) == {"copy@cpu", "triad@cpu", "dot@cpu"}
    assert stream.bytes("triad@cpu") == 12 * (1 << 16)
    assert all(t.median > 0 for t in timings.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_succeeds(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_gpu_check_reads_the_test_report(tmp_path):
    report = tmp_path / "tests.xml"
    report.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.ops.test_pack_mask" name="test_a[cuda-cuda]"/>'
        '<testcase classname="tests.ops.test_pack_mask" name="test_b[cuda-cuda]">'
        "<failure>boom</failure></testcase>"
        '<testcase classname="t" name="c"><skipped/></testcase><testcase classname="t" name="d"/>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check._junit_counts(report)
    assert counts == {
        "tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
        "failed": ["tests.ops.test_pack_mask::test_b[cuda-cuda]"],
    }  # fmt: skip
