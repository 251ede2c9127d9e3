"""The planner: which devices take part and which units each runs. Pure and deterministic."""

from meshshard.planner.cost import Cost, Stage, evaluate
from meshshard.planner.dp import Objective, Plan, solve
from meshshard.planner.instance import Device, Instance, InstanceError, Link, Unit, load_instance

__all__ = [
    "Cost",
    "Device",
    "Instance",
    "InstanceError",
    "Link",
    "Objective",
    "Plan",
    "Stage",
    "Unit",
    "evaluate",
    "load_instance",
    "solve",
]
