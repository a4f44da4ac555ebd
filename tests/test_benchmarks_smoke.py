"""The benchmark code runs end to end (``--quick``: tiny sizes). Speed is not checked:
benchmarks are not tests (DESIGN §4)."""

import csv
import json

from benchmarks import results
from benchmarks.run import main


def test_quick_run_writes_json_and_upserts_csv(tmp_path):
    main(["--quick", "--out", str(tmp_path)])

    payload = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "threads", "torch", "date"} <= payload["machine"].keys()
    rows = payload["rows"]
    benchmarks = {row["benchmark"] for row in rows}
    assert benchmarks == {
        "stream", "sgd_step", "adamw_step", "hamming_window", "threshold", "check"
    }  # fmt: skip
    providers = {row["provider"] for row in rows if row["benchmark"] == "sgd_step"}
    assert {"torch_sgd_fused", "torch_sgd_foreach+foreach_mul", "worm_sgd_cpp+trunc"} <= providers
    providers = {row["provider"] for row in rows if row["benchmark"] == "adamw_step"}
    assert {"torch_adamw_fused", "worm_adamw_cpp+trunc"} <= providers
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
