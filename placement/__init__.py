"""moeplace placement: routing traces in, expert -> GPU plans out.

The pipeline, one subpackage or module per stage (docs/architecture.md):
trace/ (schema, Parquet datasets, importers) -> graph (routing-dependency graph) -> solvers/ + planner (plans)
-> plan (the Plan record) -> metrics (evaluate) -> runtime/ (EP apply) | deploy/ (exports) | report -> cli/.

The main entry points import lazily, so ``import placement`` stays light (no torch, numba or solvers)::

    from placement import open_trace, build_graph, make_plan, PlanSpec, Plan, evaluate
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from placement.graph import RoutingGraph, build_graph
    from placement.metrics import evaluate
    from placement.plan import Plan, PlanError
    from placement.planner import make_plan
    from placement.solvers.base import PlanSpec
    from placement.trace.dataset import open_trace
    from placement.trace.schema import TraceError

# public name -> module that defines it
_EXPORTS = {
    "open_trace": "placement.trace.dataset",
    "TraceError": "placement.trace.schema",
    "build_graph": "placement.graph",
    "RoutingGraph": "placement.graph",
    "PlanSpec": "placement.solvers.base",
    "make_plan": "placement.planner",
    "Plan": "placement.plan",
    "PlanError": "placement.plan",
    "evaluate": "placement.metrics",
}

__all__ = [
    "Plan",
    "PlanError",
    "PlanSpec",
    "RoutingGraph",
    "TraceError",
    "build_graph",
    "evaluate",
    "make_plan",
    "open_trace",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'placement' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
