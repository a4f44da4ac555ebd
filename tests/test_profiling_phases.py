"""The per-phase report: phases add up to the total, CO2 only when asked, CSV/JSON/table."""

import csv
import json

import pynvml
import pytest

from worm_fast.profiling import phases
from worm_fast.profiling.energy import EnergyMeter
from worm_fast.profiling.op_costs import OpCost
from worm_fast.profiling.phases import PhaseProfiler

PACKAGE = "intel-rapl:0"


@pytest.fixture
def powercap(tmp_path):
    zone = tmp_path / "powercap" / PACKAGE
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("0\n")
    (zone / "max_energy_range_uj").write_text(f"{10**12}\n")
    return zone.parent


@pytest.fixture
def meter(powercap, monkeypatch):
    """RAPL from fake files; NVML missing, whatever this machine has."""

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    return EnergyMeter(powercap_root=powercap, poll_interval_s=3600)


def use_joules(powercap, joules):
    path = powercap / PACKAGE / "energy_uj"
    path.write_text(f"{int(path.read_text()) + round(joules * 1e6)}\n")


def run_phases(profiler, powercap):
    """search (twice, accumulating), prune, retrain; each uses a known energy and work."""
    step = OpCost(flops=30, bytes=200)
    for name, steps, joules in [
        ("search", 10, 360.0),
        ("prune", 0, 36.0),
        ("retrain", 20, 720.0),
        ("search", 5, 180.0),
    ]:
        with profiler.phase(name):
            use_joules(powercap, joules)
            profiler.add_steps(steps, model_flops_per_step=1000, optimizer_per_step=step)
            profiler.add_work(model_flops=7, mask_ops=OpCost(flops=3, bytes=11))


def test_phases_add_up_to_the_total(meter, powercap):
    profiler = PhaseProfiler(energy=meter, carbon_intensity=400.0, pue=1.5)
    run_phases(profiler, powercap)
    rows = profiler.report()
    assert [row.phase for row in rows] == ["search", "prune", "retrain", "total"]
    search, prune, retrain, total = rows

    assert (search.steps, search.model_flops, search.optimizer_flops) == (15, 15_014, 450)
    assert (search.mask_flops, search.mask_bytes, search.optimizer_bytes) == (6, 22, 3000)
    assert search.energy_joules == pytest.approx(540.0)
    assert retrain.cpu_energy == pytest.approx(720.0 / 3.6e6)

    phases_only = rows[:-1]
    for column in ("duration", "steps", "model_flops", "optimizer_flops", "optimizer_bytes",
                   "mask_flops", "mask_bytes", "energy_joules", "cpu_energy",
                   "energy_consumed", "emissions"):  # fmt: skip
        parts = sum(getattr(row, column) for row in phases_only)
        assert getattr(total, column) == pytest.approx(parts), column
    # Peaks do not add up: the total's is the largest phase's.
    assert total.peak_memory_bytes == max(row.peak_memory_bytes for row in phases_only)
    assert total.energy_joules == pytest.approx(1296.0)
    assert total.flops == sum(row.flops for row in phases_only)
    # kWh × PUE × g/kWh, in kg
    assert total.emissions == pytest.approx(1296.0 / 3.6e6 * 1.5 * 400.0 / 1e3)
    assert prune.duration > 0 and total.timestamp == search.timestamp


def test_unmeasured_energy_is_none_with_the_reason(meter, powercap):
    profiler = PhaseProfiler(energy=meter)
    run_phases(profiler, powercap)
    total = profiler.report()[-1]
    assert total.gpu_energy is None and total.ram_energy is None
    assert total.emissions is None  # no grid intensity given: no CO2
    assert total.energy_unavailable == {"nvml": "NVML Shared Library Not Found"}
    assert total.energy_sources["nvml"] is None

    off = PhaseProfiler(energy=False)
    with off.phase("search"):
        pass
    row = off.report()[0]
    assert row.energy_joules is None and row.cpu_energy is None
    assert "energy=False" in row.energy_unavailable["energy"]


def test_cpu_peak_memory_is_the_process_peak_within_each_phase():
    # Each phase reports the process's peak resident memory while it ran (Linux resets
    # the high-water mark as it begins), never 0: a phase that briefly holds 256 MiB more
    # than the next one reports about that much more; the total is the largest peak.
    profiler = PhaseProfiler(energy=False)
    if profiler.memory_unavailable is not None:
        pytest.skip(f"no per-phase peak resident memory here: {profiler.memory_unavailable}")
    size, page = 256 * 2**20, 4096
    with profiler.phase("search"):
        held = bytearray(size)  # mapped afresh (far above malloc's mmap threshold), and
        held[::page] = b"\x01" * (size // page)  # every page touched, so resident
        del held  # unmapped: the process shrinks back before the next phase
    with profiler.phase("prune"):
        pass
    search, prune, total = profiler.report()
    assert prune.peak_memory_bytes > 0
    assert search.peak_memory_bytes >= prune.peak_memory_bytes + 200 * 2**20
    assert total.peak_memory_bytes == search.peak_memory_bytes
    assert total.memory_measure == "process_peak_rss" and total.memory_unavailable is None


def test_cpu_peak_memory_where_linux_cannot_say_is_none_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(phases.PeakResidentMemory, "CLEAR_REFS", tmp_path / "absent" / "refs")
    profiler = PhaseProfiler(energy=False)
    with profiler.phase("search"):
        pass
    row = profiler.report()[-1]
    assert row.peak_memory_bytes is None and row.memory_measure == "n/a"
    assert "absent/refs" in row.memory_unavailable and "VmHWM" in row.memory_unavailable
    table = profiler.format_table()
    assert "| n/a |" in table and "Peak memory: not measured" in table


def test_csv_has_codecarbon_columns_and_empty_unmeasured_cells(meter, powercap, tmp_path):
    profiler = PhaseProfiler(energy=meter, carbon_intensity=50.0, pue=1.1)
    run_phases(profiler, powercap)
    profiler.to_csv(tmp_path / "emissions.csv")
    with open(tmp_path / "emissions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["phase"] for row in rows] == ["search", "prune", "retrain", "total"]
    for column in ("timestamp", "duration", "emissions", "cpu_energy", "gpu_energy",
                   "ram_energy", "energy_consumed", "pue", "flops"):  # fmt: skip
        assert column in rows[0], column
    total = rows[-1]
    assert float(total["energy_consumed"]) == pytest.approx(1296.0 / 3.6e6)
    assert total["gpu_energy"] == ""  # unmeasured, not 0
    assert total["energy_unavailable"] == "nvml: NVML Shared Library Not Found"
    assert total["energy_sources"] == "rapl/package-0=1296; nvml="


def test_dict_is_json_and_table_is_markdown(meter, powercap):
    profiler = PhaseProfiler(energy=meter)
    run_phases(profiler, powercap)
    report = json.loads(json.dumps(profiler.to_dict()))
    assert [row["phase"] for row in report["phases"]] == ["search", "prune", "retrain"]
    assert report["total"]["steps"] == 35
    assert report["energy_sources"] == ["rapl/package-0"]

    table = profiler.format_table()
    lines = table.splitlines()
    assert lines[0].startswith("| phase | time (s) | steps |")
    assert lines[5].startswith("| total |") and "| 35 |" in lines[5]
    assert "Energy measured by: rapl/package-0." in table
    assert "Not measured: nvml: NVML Shared Library Not Found." in table


def test_misuse_gets_a_clear_error():
    profiler = PhaseProfiler(energy=False)
    with pytest.raises(RuntimeError, match="outside a phase"):
        profiler.add_steps(1)
    with (
        profiler.phase("search"),
        pytest.raises(RuntimeError, match="do not nest"),
        profiler.phase("prune"),
    ):
        pass
    with pytest.raises(ValueError, match="sum row"), profiler.phase("total"):
        pass
    with pytest.raises(ValueError, match="both"):
        PhaseProfiler(energy=False, carbon_intensity=400.0)
    with pytest.raises(ValueError, match="pue"):
        PhaseProfiler(energy=False, carbon_intensity=400.0, pue=0.5)
