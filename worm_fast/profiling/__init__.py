"""FLOP, bytes and energy accounting of worm_fast runs, phase by phase.

* ``flops``: model FLOPs per step (counted once on the meta device) and the FLOPs and
  bytes of worm_fast's ops (formulas registered with ``FlopCounterMode``).
* ``energy``: ``EnergyMeter``, energy of a window from NVML and RAPL, or why not.
* ``phases``: ``PhaseProfiler``, the per-phase report (JSON, CSV, Markdown).
"""

from worm_fast.profiling.energy import EnergyMeter, EnergyReading
from worm_fast.profiling.flops import (
    FlopCount,
    OpCost,
    adamw_step_cost,
    bytes_moved,
    mask_check_cost,
    model_flops,
    op_cost,
    optimizer_step_cost,
    penalty_step_cost,
)
from worm_fast.profiling.phases import PhaseProfiler, PhaseRow

__all__ = [
    "EnergyMeter",
    "EnergyReading",
    "FlopCount",
    "OpCost",
    "PhaseProfiler",
    "PhaseRow",
    "adamw_step_cost",
    "bytes_moved",
    "mask_check_cost",
    "model_flops",
    "op_cost",
    "optimizer_step_cost",
    "penalty_step_cost",
]
