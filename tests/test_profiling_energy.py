"""Energy sources faked: NVML through monkeypatched pynvml, RAPL through sysfs-like files."""

import itertools
import pathlib
import time
from types import SimpleNamespace

import pynvml
import pytest
import torch

from worm_fast.profiling import energy
from worm_fast.profiling.energy import EnergyMeter

NO_POLLING = 3600.0  # the polling thread only wakes up when the window closes


def nvml_error(code):
    return pynvml.NVMLError(code)  # NVMLError picks the subclass for the code


class FakeNvml:
    """pynvml's calls for a few GPUs; energy in mJ and power in mW, from iterators."""

    def __init__(self, monkeypatch, uuids=("GPU-0a0a",), energy_mj=None, power_mw=None):
        self.power_calls = 0
        self.energy_handles = []
        self._energy, self._power = energy_mj, power_mw
        for name, fake in {
            "nvmlInit": lambda: None,
            "nvmlDeviceGetCount": lambda: len(uuids),
            "nvmlDeviceGetHandleByIndex": lambda i: f"handle{i}",
            "nvmlDeviceGetUUID": lambda handle: uuids[int(handle.removeprefix("handle"))],
            "nvmlDeviceGetTotalEnergyConsumption": self._read_energy,
            "nvmlDeviceGetPowerUsage": self._read_power,
        }.items():
            monkeypatch.setattr(pynvml, name, fake)

    def _read_energy(self, handle):
        self.energy_handles.append(handle)
        if self._energy is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return next(self._energy)

    def _read_power(self, handle):
        self.power_calls += 1
        return next(self._power)


def fake_clock(monkeypatch, *times):
    ticks = itertools.chain(times, itertools.repeat(times[-1]))
    monkeypatch.setattr(energy, "perf_counter", lambda: next(ticks))


def test_missing_nvml_library_gives_the_reason_and_none(monkeypatch, tmp_path):
    def no_library():
        raise nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    meter = EnergyMeter(powercap_root=tmp_path / "powercap")
    with meter:
        pass
    reading = meter.reading
    assert meter.sources == []
    assert reading.joules == {"nvml": None, "rapl": None}
    assert reading.reasons == {
        "nvml": "NVML Shared Library Not Found",
        "rapl": f"{tmp_path / 'powercap'} absent",
    }
    assert reading.total_joules is None and reading.component_joules("gpu") is None
    assert "nvml: NVML Shared Library Not Found" in meter.describe()


def test_energy_counter_is_read_at_the_window_edges(monkeypatch):
    FakeNvml(monkeypatch, energy_mj=iter([7, 1_000_000, 1_250_500]))  # probe, start, stop
    meter = EnergyMeter(powercap_root=None, poll_interval_s=NO_POLLING)
    meter.start()
    reading = meter.stop()
    assert reading.joules == {"gpu0/nvml-energy": pytest.approx(250.5)}
    assert reading.reasons == {}
    assert reading.component_joules("gpu") == pytest.approx(250.5)


def test_unsupported_counter_falls_back_to_integrated_power(monkeypatch):
    # Probe, window start, window end: 100 W then 300 W, 2 s apart → trapezoid 400 J.
    nvml = FakeNvml(monkeypatch, power_mw=iter([1, 100_000, 300_000]))
    fake_clock(monkeypatch, 10.0, 12.0)
    meter = EnergyMeter(powercap_root=None, poll_interval_s=NO_POLLING)
    meter.start()
    reading = meter.stop()
    assert meter.sources == ["gpu0/nvml-power"]
    assert reading.joules == {"gpu0/nvml-energy": None, "gpu0/nvml-power": 400.0}
    assert reading.reasons == {
        "gpu0/nvml-energy": "nvmlDeviceGetTotalEnergyConsumption: Not Supported"
    }
    assert reading.duration_s == 2.0 and reading.total_joules == 400.0
    assert nvml.power_calls == 3


def test_power_is_polled_in_the_background(monkeypatch):
    nvml = FakeNvml(monkeypatch, power_mw=itertools.repeat(50_000))
    meter = EnergyMeter(powercap_root=None, poll_interval_s=0.005)
    with meter:
        time.sleep(0.1)
    reading = meter.reading
    assert nvml.power_calls > 5  # probe, start, stop, and samples in between
    assert reading.joules["gpu0/nvml-power"] == pytest.approx(50 * reading.duration_s)


def test_cuda_devices_are_matched_to_nvml_by_uuid(monkeypatch):
    nvml = FakeNvml(monkeypatch, uuids=("GPU-0A0A", "GPU-1B1B"), energy_mj=itertools.count())
    uuids = {0: "1b1b", 1: "ffff"}  # CUDA's view: no "GPU-" prefix, NVML's order differs
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[i])
    )
    meter = EnergyMeter(devices=[0, "cuda:1"], powercap_root=None, poll_interval_s=NO_POLLING)
    assert meter.sources == ["cuda:0/nvml-energy"]
    assert meter.unavailable == {"cuda:1": "no NVML device has the UUID ffff of cuda:1"}
    meter.start()
    reading = meter.stop()
    assert set(nvml.energy_handles) == {"handle1"}
    assert reading.joules == {"cuda:0/nvml-energy": 0.001, "cuda:1": None}


def make_zone(root: pathlib.Path, directory: str, name: str, energy_uj: int, max_uj: int):
    zone = root / directory
    zone.mkdir(parents=True)
    (zone / "name").write_text(f"{name}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


@pytest.fixture
def powercap(tmp_path):
    """A package zone, its core and DRAM subzones, and an MMIO twin of the package."""
    make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000, 10**12)
    make_zone(tmp_path, "intel-rapl:0:0", "core", 5, 10**12)
    make_zone(tmp_path, "intel-rapl:0:2", "dram", 9_000_000, 10_000_000)
    make_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0, 10**12)
    return tmp_path


def set_energy(root, directory, energy_uj):
    # Replaced whole, as sysfs does: the poller must never see a half-written file.
    staged = root / directory / "energy_uj.new"
    staged.write_text(f"{energy_uj}\n")
    staged.replace(root / directory / "energy_uj")


def test_rapl_package_and_dram_with_wraparound(powercap):
    meter = EnergyMeter(devices=[], powercap_root=powercap, poll_interval_s=NO_POLLING)
    assert meter.sources == ["rapl/package-0", "rapl/dram-0"]  # core and mmio not counted
    with meter:
        set_energy(powercap, "intel-rapl:0", 3_500_000)
        set_energy(powercap, "intel-rapl:0:2", 500_000)  # wrapped past 10 J
    reading = meter.reading
    assert reading.joules == {"rapl/package-0": 2.5, "rapl/dram-0": 1.5}
    assert reading.component_joules("cpu") == 2.5
    assert reading.component_joules("ram") == 1.5
    assert reading.component_joules("gpu") is None
    assert reading.total_joules == 4.0


def test_rapl_wraps_are_caught_between_polls(powercap):
    meter = EnergyMeter(devices=[], powercap_root=powercap, poll_interval_s=0.002)
    # DRAM goes round its 10 J range twice in 1 J steps; reading only the edges would
    # see 0 J. Each value is held long enough for the poller to see it.
    with meter:
        for step in range(1, 21):
            set_energy(powercap, "intel-rapl:0:2", (9_000_000 + step * 1_000_000) % 10_000_000)
            time.sleep(0.02)
    assert meter.reading.joules["rapl/dram-0"] == pytest.approx(20.0)


def deny(monkeypatch, zone: str):
    """Reading ``zone``'s energy_uj raises PermissionError (tests run as root, so chmod
    would not stop them)."""
    read_text = pathlib.Path.read_text

    def guarded(path, *args, **kwargs):
        if path.name == "energy_uj" and path.parent.name == zone:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", guarded)


def test_rapl_permission_error_gives_the_reason(powercap, monkeypatch):
    deny(monkeypatch, "intel-rapl:0:2")
    meter = EnergyMeter(devices=[], powercap_root=powercap, poll_interval_s=NO_POLLING)
    with meter:
        set_energy(powercap, "intel-rapl:0", 2_000_000)
    reading = meter.reading
    denied = powercap / "intel-rapl:0:2" / "energy_uj"
    assert reading.reasons == {"rapl/dram-0": f"permission denied reading {denied}"}
    assert reading.joules == {"rapl/package-0": 1.0, "rapl/dram-0": None}
    assert reading.component_joules("ram") is None


def test_a_source_failing_mid_window_is_none_not_zero(powercap, monkeypatch):
    meter = EnergyMeter(devices=[], powercap_root=powercap, poll_interval_s=NO_POLLING)
    meter.start()
    deny(monkeypatch, "intel-rapl:0")
    reading = meter.stop()
    assert reading.joules == {"rapl/package-0": None, "rapl/dram-0": 0.0}
    assert reading.reasons["rapl/package-0"].startswith("permission denied reading")
    # The next window starts afresh.
    monkeypatch.undo()
    meter.start()
    assert meter.stop().joules["rapl/package-0"] == 0.0


def test_zero_length_window(powercap, monkeypatch):
    FakeNvml(monkeypatch, power_mw=itertools.repeat(70_000))
    fake_clock(monkeypatch, 5.0)
    meter = EnergyMeter(powercap_root=powercap, poll_interval_s=NO_POLLING)
    meter.start()
    reading = meter.stop()
    assert reading.duration_s == 0.0
    # Nothing elapsed, nothing used: measured zeros, not unknowns.
    assert reading.joules == {
        "gpu0/nvml-power": 0.0,
        "rapl/package-0": 0.0,
        "rapl/dram-0": 0.0,
        "gpu0/nvml-energy": None,
    }


def test_windows_must_alternate(powercap):
    meter = EnergyMeter(devices=[], powercap_root=powercap, poll_interval_s=NO_POLLING)
    with pytest.raises(RuntimeError, match="without start"):
        meter.stop()
    meter.start()
    with pytest.raises(RuntimeError, match="window is open"):
        meter.start()
    meter.stop()


def test_readings_add_up(powercap):
    meter = EnergyMeter(devices=[], powercap_root=powercap, poll_interval_s=NO_POLLING)
    with meter:
        set_energy(powercap, "intel-rapl:0", 2_000_000)
    first = meter.reading
    with meter:
        set_energy(powercap, "intel-rapl:0", 5_000_000)
    both = first + meter.reading
    assert both.joules["rapl/package-0"] == 4.0
    assert both.duration_s == first.duration_s + meter.reading.duration_s
