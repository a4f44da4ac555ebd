"""FLOP, bytes and energy accounting of worm_fast runs, phase by phase.

* ``flops``: model FLOPs per step, counted once on the meta device.
* ``op_costs``: FLOPs and bytes of worm_fast's ops (formulas registered with
  ``FlopCounterMode``) and of one optimizer step (``sgd_step_cost``, ``adamw_step_cost``).
* ``energy``: ``EnergyMeter``, energy of a window from NVML and RAPL, or why not.
* ``phases``: ``PhaseProfiler``, the per-phase report (JSON, CSV, Markdown).
"""

from worm_fast.profiling.energy import EnergyMeter, EnergyReading
from worm_fast.profiling.flops import FlopCount, model_flops
from worm_fast.profiling.op_costs import (
    OpCost,
    adamw_step_cost,
    bytes_moved,
    mask_check_cost,
    op_cost,
    penalty_step_cost,
    sgd_step_cost,
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
    "penalty_step_cost",
    "sgd_step_cost",
]
