"""Energy used during a window of time, from every source this machine offers.

For each GPU the chain is: the NVML total-energy counter (mJ since the driver loaded;
Volta and newer), else NVML power (mW) polled by a background thread and integrated with
the trapezoid rule. For the CPU: Linux RAPL package and DRAM zones under
``/sys/class/powercap`` (µJ counters that wrap around). Every source is reported under its
name; one that cannot be read is ``None`` with the reason in words — never 0 J, since 0 J
is a measurement and "unknown" is not. For example::

    import torch
    from worm_fast.profiling import EnergyMeter

    meter = EnergyMeter()
    with meter:
        torch.randn(512, 512) @ torch.randn(512, 512)  # your training here
    print(meter.reading.joules, meter.reading.reasons)
"""

import threading
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import torch

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")


class _SourceError(Exception):
    """A source could not be read; the message says why, in words."""


@dataclass(frozen=True)
class EnergyReading:
    """Energy of one window: joules per source (``None`` = unavailable, see ``reasons``)."""

    joules: dict[str, float | None]
    reasons: dict[str, str]  # source name → why it gave no value
    components: dict[str, str]  # source name → "gpu", "cpu" or "ram"
    duration_s: float

    def component_joules(self, component: str) -> float | None:
        """Joules of the measured sources of one component; ``None`` if none was measured."""
        values = [
            joules
            for name, joules in self.joules.items()
            if self.components[name] == component and joules is not None
        ]
        return sum(values) if values else None

    @property
    def total_joules(self) -> float | None:
        """Joules of every measured source; ``None`` if none was measured."""
        values = [joules for joules in self.joules.values() if joules is not None]
        return sum(values) if values else None

    def __add__(self, other: "EnergyReading") -> "EnergyReading":
        """Two windows as one: a source is ``None`` unless both windows measured it."""
        names = dict.fromkeys([*self.joules, *other.joules])
        joules = {}
        for name in names:
            mine, theirs = self.joules.get(name), other.joules.get(name)
            joules[name] = None if mine is None or theirs is None else mine + theirs
        return EnergyReading(
            joules=joules,
            reasons={**self.reasons, **other.reasons},
            components={**self.components, **other.components},
            duration_s=self.duration_s + other.duration_s,
        )


# ------------------------------------------------------------------------------ sources
# Each source measures through begin(now), sample(now) from the polling thread when
# ``polled``, and end(now) → joules; each raises _SourceError when it cannot be read.


class _NvmlEnergyCounter:
    polled = False

    def __init__(self, name: str, handle, pynvml):
        self.name, self.component = name, "gpu"
        self._handle, self._nvml = handle, pynvml

    def _read_mj(self) -> int:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError as error:
            raise _SourceError(f"nvmlDeviceGetTotalEnergyConsumption: {error}") from error

    def begin(self, now: float) -> None:
        self._start_mj = self._read_mj()

    def end(self, now: float) -> float:
        return (self._read_mj() - self._start_mj) / 1e3


class _NvmlPowerIntegral:
    polled = True

    def __init__(self, name: str, handle, pynvml):
        self.name, self.component = name, "gpu"
        self._handle, self._nvml = handle, pynvml

    def _read_watts(self) -> float:
        try:
            return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3
        except self._nvml.NVMLError as error:
            raise _SourceError(f"nvmlDeviceGetPowerUsage: {error}") from error

    def begin(self, now: float) -> None:
        self._last = (now, self._read_watts())
        self._joules = 0.0

    def sample(self, now: float) -> None:
        watts = self._read_watts()
        then, last_watts = self._last
        self._joules += (watts + last_watts) / 2 * (now - then)
        self._last = (now, watts)

    def end(self, now: float) -> float:
        self.sample(now)
        return self._joules


class _RaplZone:
    # Polled so that a counter wrapping more than once in a long window is still counted
    # (the package counter of a busy server wraps in tens of minutes).
    polled = True

    def __init__(self, name: str, component: str, zone: Path):
        self.name, self.component = name, component
        self._energy_file = zone / "energy_uj"
        self._range_uj = _read_int(zone / "max_energy_range_uj")
        _read_int(self._energy_file)  # unreadable files are found now, not mid-run

    def begin(self, now: float) -> None:
        self._last_uj = _read_int(self._energy_file)
        self._total_uj = 0

    def sample(self, now: float) -> None:
        energy_uj = _read_int(self._energy_file)
        delta = energy_uj - self._last_uj
        if delta < 0:  # the counter wrapped past max_energy_range_uj
            delta += self._range_uj
        self._total_uj += delta
        self._last_uj = energy_uj

    def end(self, now: float) -> float:
        self.sample(now)
        return self._total_uj / 1e6


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as error:
        raise _SourceError(f"permission denied reading {path}") from error
    except (OSError, ValueError) as error:
        raise _SourceError(f"cannot read {path}: {error}") from error


# ---------------------------------------------------------------------------- discovery


def _rapl_sources(root: Path) -> tuple[list, dict[str, str]]:
    if not root.is_dir():
        return [], {"rapl": f"{root} absent"}
    # "intel-rapl:*" (also used for AMD) and not "intel-rapl-mmio:*", which repeats the
    # package zone through another interface and would count it twice.
    zones = sorted(root.glob("intel-rapl:*"))
    sources, unavailable = [], {}
    for zone in zones:
        try:
            kind = (zone / "name").read_text().strip()
        except OSError as error:
            unavailable[f"rapl/{zone.name}"] = f"cannot read {zone / 'name'}: {error}"
            continue
        socket = zone.name.split(":")[1]
        if kind.startswith("package"):
            name, component = f"rapl/{kind}", "cpu"
        elif kind == "dram":
            name, component = f"rapl/dram-{socket}", "ram"
        else:
            continue  # core and uncore are already inside their package
        try:
            sources.append(_RaplZone(name, component, zone))
        except _SourceError as error:
            unavailable[name] = str(error)
    if not sources and not unavailable:
        unavailable["rapl"] = f"no intel-rapl package zone under {root}"
    return sources, unavailable


def _nvml_sources(cuda_indices: list[int] | None) -> tuple[list, dict[str, str]]:
    try:
        import pynvml  # the official nvidia-ml-py package
    except ImportError:
        return [], {"nvml": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
        gpus, unavailable = _nvml_handles(pynvml, cuda_indices)
    except pynvml.NVMLError as error:
        return [], {"nvml": str(error)}
    sources = []
    for label, handle in gpus:
        for source in (
            _NvmlEnergyCounter(f"{label}/nvml-energy", handle, pynvml),
            _NvmlPowerIntegral(f"{label}/nvml-power", handle, pynvml),
        ):
            try:
                source.begin(0.0)  # a probe: can this source be read at all?
            except _SourceError as error:
                # Kept even when the next source works, so a report says why a GPU's
                # energy was polled rather than read from its counter.
                unavailable[source.name] = str(error)
                continue
            sources.append(source)
            break
    return sources, unavailable


def _nvml_handles(pynvml, cuda_indices: list[int] | None) -> tuple[list, dict[str, str]]:
    """(label, handle) per GPU to measure: every NVML GPU, or the CUDA devices found by
    UUID (CUDA and NVML number GPUs differently, e.g. under CUDA_VISIBLE_DEVICES)."""
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    if cuda_indices is None:
        if not handles:
            return [], {"nvml": "NVML sees no GPU"}
        return [(f"gpu{i}", handle) for i, handle in enumerate(handles)], {}
    by_uuid = {_plain_uuid(pynvml.nvmlDeviceGetUUID(handle)): handle for handle in handles}
    gpus, unavailable = [], {}
    for index in cuda_indices:
        uuid = _plain_uuid(str(torch.cuda.get_device_properties(index).uuid))
        label = f"cuda:{index}"
        if uuid in by_uuid:
            gpus.append((label, by_uuid[uuid]))
        else:
            unavailable[label] = f"no NVML device has the UUID {uuid} of {label}"
    return gpus, unavailable


def _cuda_index(device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"devices: expected CUDA devices, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def _plain_uuid(uuid: str) -> str:
    # NVML writes "GPU-<uuid>" (or "MIG-<uuid>"), CUDA the bare <uuid>.
    uuid = uuid.lower()
    for prefix in ("gpu-", "mig-"):
        uuid = uuid.removeprefix(prefix)
    return uuid


# -------------------------------------------------------------------------------- meter


class EnergyMeter:
    """Measures the energy of windows: ``start()`` … ``stop() -> EnergyReading``, or
    ``with meter: ...`` (then ``meter.reading``). One meter measures any number of
    windows, one at a time.

    ``devices``: the CUDA devices whose GPUs are measured (indices, "cuda:1" or
    ``torch.device``), ``None`` for every GPU NVML sees, ``[]`` for none.
    ``powercap_root``: where RAPL zones live (``None``: do not read RAPL).
    ``poll_interval_s``: how often power is sampled and RAPL counters are checked.
    """

    def __init__(
        self,
        devices=None,
        *,
        powercap_root: str | Path | None = DEFAULT_POWERCAP_ROOT,
        poll_interval_s: float = 0.1,
    ):
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.poll_interval_s = poll_interval_s
        self._cuda_indices = None if devices is None else [_cuda_index(d) for d in devices]
        self._sources: list = []
        self.unavailable: dict[str, str] = {}  # source name → why it cannot be read
        self._components: dict[str, str] = {}  # every source name → gpu / cpu / ram
        if self._cuda_indices != []:
            self._add(*_nvml_sources(self._cuda_indices), unavailable_component="gpu")
        if powercap_root is not None:
            self._add(*_rapl_sources(Path(powercap_root)), unavailable_component="cpu")
        self.reading: EnergyReading | None = None
        self._started_at: float | None = None
        self._failed: dict[str, str] = {}  # sources that failed during the open window
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()

    def _add(self, sources: list, unavailable: dict[str, str], *, unavailable_component):
        self._sources += sources
        self.unavailable.update(unavailable)
        self._components.update({source.name: source.component for source in sources})
        for name in unavailable:
            self._components[name] = "ram" if "/dram" in name else unavailable_component

    @property
    def sources(self) -> list[str]:
        """Names of the sources that can be read, in chain order."""
        return [source.name for source in self._sources]

    def describe(self) -> str:
        """One line: what is measured here, and why the rest is not."""
        measured = ", ".join(self.sources) or "nothing"
        missing = "; ".join(f"{name}: {why}" for name, why in self.unavailable.items())
        return f"measuring {measured}" + (f"; unavailable: {missing}" if missing else "")

    def start(self) -> None:
        if self._started_at is not None:
            raise RuntimeError("EnergyMeter.start() called while a window is open")
        self._sync_cuda()
        self._failed = {}
        now = perf_counter()
        for source in self._sources:
            self._guard(source, source.begin, now)
        self._started_at = now
        if any(source.polled for source in self._sources):
            self._stop_polling.clear()
            self._poller = threading.Thread(target=self._poll, name="EnergyMeter", daemon=True)
            self._poller.start()

    def stop(self) -> EnergyReading:
        if self._started_at is None:
            raise RuntimeError("EnergyMeter.stop() called without start()")
        self._sync_cuda()
        if self._poller is not None:
            self._stop_polling.set()
            self._poller.join()
            self._poller = None
        now = perf_counter()
        joules: dict[str, float | None] = {}
        for source in self._sources:
            joules[source.name] = self._guard(source, source.end, now)
        joules.update(dict.fromkeys(self.unavailable))
        self.reading = EnergyReading(
            joules=joules,
            reasons={**self.unavailable, **self._failed},
            components=dict(self._components),
            duration_s=now - self._started_at,
        )
        self._started_at = None
        return self.reading

    def __enter__(self) -> "EnergyMeter":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _poll(self) -> None:
        polled = [source for source in self._sources if source.polled]
        while not self._stop_polling.wait(self.poll_interval_s):
            now = perf_counter()
            for source in polled:
                self._guard(source, source.sample, now)

    def _guard(self, source, method, now: float) -> float | None:
        """Run one source's method; a failure makes that source ``None`` for the window."""
        if source.name in self._failed:
            return None
        try:
            return method(now)
        except _SourceError as error:
            self._failed[source.name] = str(error)
            return None

    def _sync_cuda(self) -> None:
        # Kernels still queued belong to the window that launched them.
        if not torch.cuda.is_initialized():
            return
        for index in self._cuda_indices or [torch.cuda.current_device()]:
            torch.cuda.synchronize(index)
