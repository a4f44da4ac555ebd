"""Where the time, work and energy of a run went, phase by phase (search, prune, retrain).

For example (a step's costs are computed once, then counted per step)::

    import torch
    from worm_fast import WormSGD
    from worm_fast.profiling import PhaseProfiler, model_flops, sgd_step_cost

    model = torch.nn.Linear(32, 10)
    optimizer = WormSGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, labels = torch.randn(64, 32), torch.randint(0, 10, (64,))
    flops = model_flops(model, (inputs,))
    cost = sgd_step_cost(model.parameters(), momentum=0.9, masked_numel=0)

    profiler = PhaseProfiler("cpu")
    with profiler.phase("search"):
        for _ in range(10):  # your training steps
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
        profiler.add_steps(10, model_flops_per_step=flops.train_step, optimizer_per_step=cost)
    print(profiler.format_table())

Each phase records wall time (CUDA synchronized at its edges), steps, the model FLOPs and
the optimizer and mask-op FLOPs and bytes the caller adds (computed once with
``profiling.flops`` and ``profiling.op_costs`` and multiplied, never counted live),
energy per source from an ``EnergyMeter``, and peak memory: on a CUDA device the
allocator's peak, elsewhere the process's peak resident memory during the phase (Linux:
the kernel's high-water mark, reset when the phase begins; where that cannot be read,
None with the reason, never 0). The report has a row per phase and a "total" row that
is the sum of the phases (for peak memory, their maximum). CO2 is reported only when
the grid's carbon intensity and the data centre's PUE are both given.
"""

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter

import torch

from worm_fast.profiling.energy import EnergyMeter, EnergyReading
from worm_fast.profiling.op_costs import OpCost

JOULES_PER_KWH = 3.6e6
TOTAL = "total"


@dataclass(frozen=True)
class PhaseRow:
    """One row of the report; the names (and units) of CodeCarbon's emissions.csv where it
    has the quantity: duration in s, ``*_energy`` and ``energy_consumed`` in kWh,
    ``emissions`` in kg CO2eq. ``None`` means not measured, never zero.

    ``peak_memory_bytes`` is, per ``memory_measure``, the CUDA ``max_memory_allocated``
    within the phase, or the process's peak resident memory within it
    (``process_peak_rss``); None when it could not be measured (``memory_unavailable``
    says why).
    """

    phase: str
    timestamp: str  # when the phase was first entered, ISO 8601 UTC
    duration: float
    steps: int
    model_flops: int
    optimizer_flops: int
    optimizer_bytes: int
    mask_flops: int
    mask_bytes: int
    cpu_energy: float | None
    gpu_energy: float | None
    ram_energy: float | None
    energy_consumed: float | None
    energy_joules: float | None
    emissions: float | None
    carbon_intensity: float | None  # g CO2eq / kWh, as given
    pue: float | None
    peak_memory_bytes: int | None
    memory_measure: str
    memory_unavailable: str | None  # why peak_memory_bytes is None
    energy_sources: dict[str, float | None]  # J per source
    energy_unavailable: dict[str, str]  # source → why it gave no value

    @property
    def flops(self) -> int:
        return self.model_flops + self.optimizer_flops + self.mask_flops


@dataclass
class _Tally:
    """What one phase has accumulated; ``merge`` adds a re-entry, or phases into the total."""

    timestamp: str
    duration: float = 0.0
    steps: int = 0
    model_flops: int = 0
    optimizer: OpCost = field(default_factory=OpCost)
    mask: OpCost = field(default_factory=OpCost)
    energy: EnergyReading | None = None
    peak_memory: int | None = None

    def merge(self, other: "_Tally") -> "_Tally":
        energy = None if self.energy is None else self.energy + other.energy
        peaks = [peak for peak in (self.peak_memory, other.peak_memory) if peak is not None]
        return _Tally(
            timestamp=min(self.timestamp, other.timestamp),
            duration=self.duration + other.duration,
            steps=self.steps + other.steps,
            model_flops=self.model_flops + other.model_flops,
            optimizer=self.optimizer + other.optimizer,
            mask=self.mask + other.mask,
            energy=energy,
            peak_memory=max(peaks) if peaks else None,  # a peak of peaks is their maximum
        )


class PhaseProfiler:
    """Per-phase accounting of one run; phases may repeat (they accumulate), not nest.

    ``device``: where the model runs. A CUDA device: CUDA peak memory and that GPU's
    energy; anything else: the process's peak resident memory per phase (resetting
    Linux's per-process high-water mark, ``VmHWM``, as each phase begins) and every GPU
    NVML sees (the machine's draw, labelled per GPU, so a CPU run on a GPU host still
    says what its GPUs used).
    ``energy``: ``True`` for such an ``EnergyMeter`` (plus RAPL), ``False`` for none, or
    a meter of your own.
    ``carbon_intensity`` (g CO2eq per kWh of the grid) and ``pue`` (the data centre's power
    usage effectiveness, ≥ 1): both or neither; with both, emissions = kWh × PUE × intensity.
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        *,
        energy: EnergyMeter | bool = True,
        carbon_intensity: float | None = None,
        pue: float | None = None,
    ):
        if (carbon_intensity is None) != (pue is None):
            raise ValueError(
                "carbon_intensity (g/kWh) and pue go together: give both for CO2, or neither"
            )
        if carbon_intensity is not None and carbon_intensity < 0:
            raise ValueError(f"carbon_intensity must be >= 0 g/kWh, got {carbon_intensity}")
        if pue is not None and pue < 1:
            raise ValueError(f"pue must be >= 1, got {pue}")
        self.device = torch.device("cpu") if device is None else _as_device(device)
        self._on_cuda = self.device.type == "cuda"
        if energy is True:
            energy = EnergyMeter(devices=[self.device] if self._on_cuda else None)
        self.meter: EnergyMeter | None = energy or None
        self.carbon_intensity = carbon_intensity
        self.pue = pue
        self._rss = None if self._on_cuda else PeakResidentMemory()
        self.memory_unavailable = None if self._rss is None else self._rss.unavailable
        if self._on_cuda:
            self.memory_measure = "cuda_max_allocated"
        else:
            self.memory_measure = "process_peak_rss" if self._rss.unavailable is None else "n/a"
        self._phases: dict[str, _Tally] = {}
        self._current: _Tally | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Account everything inside the ``with`` block to phase ``name``."""
        if name == TOTAL:
            raise ValueError(f"{TOTAL!r} is the report's sum row, not a phase name")
        if self._current is not None:
            raise RuntimeError(f"phase {name!r} entered inside another phase; phases do not nest")
        tally = _Tally(timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._current = tally
        self._sync()
        self._memory_mark()
        if self.meter is not None:
            self.meter.start()
        started = perf_counter()
        try:
            yield
        finally:
            self._sync()
            tally.duration = perf_counter() - started
            if self.meter is not None:
                tally.energy = self.meter.stop()
            tally.peak_memory = self._memory_peak()
            self._current = None
            previous = self._phases.get(name)
            self._phases[name] = tally if previous is None else previous.merge(tally)

    def add_steps(
        self,
        n: int,
        *,
        model_flops_per_step: int = 0,
        optimizer_per_step: OpCost | None = None,
    ) -> None:
        """Count ``n`` training steps of the current phase, each costing
        ``model_flops_per_step`` (``FlopCount.train_step``) and one optimizer step."""
        tally = self._active("add_steps")
        tally.steps += n
        tally.model_flops += n * model_flops_per_step
        if optimizer_per_step is not None:
            tally.optimizer += optimizer_per_step * n

    def add_work(self, *, model_flops: int = 0, mask_ops: OpCost | None = None) -> None:
        """Count other work of the current phase: forward-only passes (evaluation), and
        mask computations (``mask_check_cost`` × checks)."""
        tally = self._active("add_work")
        tally.model_flops += model_flops
        if mask_ops is not None:
            tally.mask += mask_ops

    def report(self) -> list[PhaseRow]:
        """A row per phase, in the order first entered, then the "total" row."""
        rows = [self._row(name, tally) for name, tally in self._phases.items()]
        if self._phases:
            tallies = list(self._phases.values())
            total = tallies[0]
            for tally in tallies[1:]:
                total = total.merge(tally)
            rows.append(self._row(TOTAL, total))
        return rows

    def to_dict(self) -> dict:
        """The report as plain data for a results JSON."""
        rows = [asdict(row) | {"flops": row.flops} for row in self.report()]
        return {
            "phases": rows[:-1],
            "total": rows[-1] if rows else None,
            "energy_sources": self.meter.sources if self.meter else [],
            "energy_unavailable": self._unavailable(),
        }

    def to_csv(self, path: str | Path) -> None:
        """Write the report, one row per phase plus "total"; empty cells are unmeasured."""
        columns = [f.name for f in fields(PhaseRow)]
        columns.insert(columns.index("cpu_energy"), "flops")
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            for row in self.report():
                cells = asdict(row) | {"flops": row.flops}
                cells["energy_sources"] = "; ".join(
                    f"{name}={'' if joules is None else f'{joules:.6g}'}"
                    for name, joules in row.energy_sources.items()
                )
                cells["energy_unavailable"] = "; ".join(
                    f"{name}: {why}" for name, why in row.energy_unavailable.items()
                )
                writer.writerow(cells)

    def format_table(self) -> str:
        """The report as a Markdown table, with the energy sources underneath."""
        header = ["phase", "time (s)", "steps", "model FLOPs", "optimizer FLOPs",
                  "optimizer bytes", "mask FLOPs", "energy (J)", "energy (kWh)", "CO2 (g)",
                  "peak memory"]  # fmt: skip
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.report():
            cells = [
                row.phase,
                f"{row.duration:.2f}",
                str(row.steps),
                _si(row.model_flops),
                _si(row.optimizer_flops),
                _si(row.optimizer_bytes, "B"),
                _si(row.mask_flops),
                _or_na(row.energy_joules, "{:.1f}"),
                _or_na(row.energy_consumed, "{:.3g}"),
                _or_na(None if row.emissions is None else row.emissions * 1e3, "{:.3g}"),
                "n/a" if row.peak_memory_bytes is None else _si(row.peak_memory_bytes, "B"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        sources = ", ".join(self.meter.sources) if self.meter and self.meter.sources else "none"
        lines.append("")
        lines.append(f"Energy measured by: {sources}.")
        if unavailable := self._unavailable():
            lines.append(
                "Not measured: " + "; ".join(f"{n}: {why}" for n, why in unavailable.items()) + "."
            )
        if self.memory_unavailable is None:
            lines.append(f"Peak memory: {self.memory_measure}.")
        else:
            lines.append(f"Peak memory: not measured ({self.memory_unavailable}).")
        return "\n".join(lines)

    # ------------------------------------------------------------------------ internals

    def _active(self, method: str) -> _Tally:
        if self._current is None:
            raise RuntimeError(
                f"{method}() outside a phase; call it inside `with profiler.phase(name):`"
            )
        return self._current

    def _unavailable(self) -> dict[str, str]:
        if self.meter is None:
            return {"energy": "not measured (PhaseProfiler(energy=False))"}
        return dict(self.meter.unavailable)

    def _row(self, name: str, tally: _Tally) -> PhaseRow:
        energy = tally.energy
        joules = None if energy is None else energy.total_joules
        kwh = None if joules is None else joules / JOULES_PER_KWH
        emissions = None
        if kwh is not None and self.carbon_intensity is not None:
            emissions = kwh * self.pue * self.carbon_intensity / 1e3  # g → kg
        return PhaseRow(
            phase=name,
            timestamp=tally.timestamp,
            duration=tally.duration,
            steps=tally.steps,
            model_flops=tally.model_flops,
            optimizer_flops=tally.optimizer.flops,
            optimizer_bytes=tally.optimizer.bytes,
            mask_flops=tally.mask.flops,
            mask_bytes=tally.mask.bytes,
            cpu_energy=_component_kwh(energy, "cpu"),
            gpu_energy=_component_kwh(energy, "gpu"),
            ram_energy=_component_kwh(energy, "ram"),
            energy_consumed=kwh,
            energy_joules=joules,
            emissions=emissions,
            carbon_intensity=self.carbon_intensity,
            pue=self.pue,
            peak_memory_bytes=tally.peak_memory,
            memory_measure=self.memory_measure,
            memory_unavailable=self.memory_unavailable,
            energy_sources={} if energy is None else dict(energy.joules),
            energy_unavailable=self._unavailable() if energy is None else dict(energy.reasons),
        )

    def _sync(self) -> None:
        if self._on_cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device)

    def _memory_mark(self) -> None:
        if self._on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss.reset()

    def _memory_peak(self) -> int | None:
        if self._on_cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return self._rss.peak()


class PeakResidentMemory:
    """The process's peak resident memory since the last ``reset()``, from Linux's
    per-process high-water mark: writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM``
    (in ``/proc/self/status``) to the current resident size (Linux >= 4.0). Elsewhere,
    or where /proc refuses, ``unavailable`` says why and ``peak()`` is None.

    The mark is the process's: a reset also lowers what ``resource.getrusage``'s
    ``ru_maxrss`` reports from then on.
    """

    CLEAR_REFS = Path("/proc/self/clear_refs")
    STATUS = Path("/proc/self/status")

    def __init__(self) -> None:
        self.unavailable: str | None = None
        try:
            self.reset()
            self._read()
        except (OSError, ValueError) as error:
            self.unavailable = (
                f"the process's peak resident memory needs Linux's {self.CLEAR_REFS} and "
                f"VmHWM in {self.STATUS} ({error})"
            )

    def reset(self) -> None:
        if self.unavailable is None:
            self.CLEAR_REFS.write_text("5")

    def peak(self) -> int | None:
        return None if self.unavailable is not None else self._read()

    def _read(self) -> int:
        for line in self.STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                kib, unit = line.split()[1:3]
                if unit != "kB":
                    raise ValueError(f"VmHWM in {unit!r}, expected kB")
                return int(kib) * 1024
        raise ValueError(f"no VmHWM line in {self.STATUS}")


def _as_device(device: torch.device | str | int) -> torch.device:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _component_kwh(energy: EnergyReading | None, component: str) -> float | None:
    joules = None if energy is None else energy.component_joules(component)
    return None if joules is None else joules / JOULES_PER_KWH


def _or_na(value: float | None, template: str) -> str:
    return "n/a" if value is None else template.format(value)


_SI_PREFIXES = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def _si(value: float, unit: str = "") -> str:
    """1234567 → "1.23 M"; keeps tables readable across FLOP counts spanning 10^3–10^18."""
    for prefix, scale in _SI_PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


__all__ = ["TOTAL", "PeakResidentMemory", "PhaseProfiler", "PhaseRow"]
