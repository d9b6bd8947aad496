"""Planner: the public entry point that runs a named solver on a routing graph and returns a ``Plan``.

Dimension key: L MoE layers, E experts, P physical slots, G GPUs.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import replace

from placement.graph import RoutingGraph
from placement.plan import Plan, PlanError
from placement.solvers.base import PlanSpec, SolveResult, capacity_lower_bound, relative_gap, topology_cost
from placement.solvers.robust import predict_unseen_imbalance

SolverFn = Callable[[RoutingGraph, PlanSpec], SolveResult]

# name -> "module:function"; imported lazily so that e.g. OR-Tools loads only when the ILP is asked for.
SOLVERS: dict[str, str] = {
    "contiguous": "placement.solvers.baselines:solve_contiguous",
    "round_robin": "placement.solvers.baselines:solve_round_robin",
    "eplb": "placement.solvers.baselines:solve_eplb",
    "ilp": "placement.solvers.ilp:solve_ilp",
    "affinity": "placement.solvers.affinity:solve_affinity",
}
SOLVER_NAMES = ("auto", *SOLVERS)
__all__ = ["SOLVERS", "SOLVER_NAMES", "get_solver", "make_plan", "pick_solver", "topology_cost"]


def get_solver(name: str) -> SolverFn:
    if name not in SOLVERS:
        raise PlanError(f"unknown solver {name!r}; choose one of {', '.join(SOLVER_NAMES)}")
    module, fn = SOLVERS[name].split(":")
    solver: SolverFn = getattr(importlib.import_module(module), fn)
    return solver


def pick_solver(graph: RoutingGraph, spec: PlanSpec) -> str:
    """``auto``: the exact ILP where it is known to prove optimality quickly (Mixtral size), else affinity
    (always affinity when the balance is asked for unseen prompts)."""
    if spec.options.get("unseen") or spec.auto_balance:
        return "affinity"  # the only solver that balances for unseen prompts
    small = graph.num_experts <= 16 and spec.num_redundant == 0 and spec.num_nodes == 1
    return "ilp" if small else "affinity"


def make_plan(graph: RoutingGraph, spec: PlanSpec, solver: str = "auto") -> Plan:
    """Solve placement for ``graph`` with ``solver`` and wrap the result as a validated ``Plan``."""
    spec.validate(graph.num_experts)
    name = pick_solver(graph, spec) if solver == "auto" else solver
    fn = get_solver(name)
    if spec.options.get("objective", "colocation") == "time":  # the lowest predicted step time among candidates
        if solver != "auto":
            raise PlanError(f"--objective time chooses among solvers itself; drop --solver {solver}")
        from placement.solvers.time_objective import solve_time

        fn = solve_time
    elif spec.auto_balance:
        from placement.solvers.balance_target import eplb_fitted_eps, solve_auto

        if name == "affinity":
            fn = solve_auto
        else:  # solvers without a forecast: EPLB's balance on the fitted trace
            spec = replace(spec, balance_eps=eplb_fitted_eps(graph, spec))
    t0 = time.perf_counter()
    res = fn(graph, spec)
    wall = time.perf_counter() - t0
    cost = topology_cost(res.phy2log_LP, graph, spec)
    if res.bound is None:  # heuristics: report the gap to the capacity bound
        bound = capacity_lower_bound(graph, spec)
        res = replace(res, objective=cost, bound=bound, gap=relative_gap(cost, bound))
    meta = graph.meta
    provenance = {
        "solver": res.solver,
        "requested_solver": solver,
        "status": res.status,
        "objective": res.objective,
        "bound": res.bound,
        "gap": res.gap,
        "solve_seconds": round(wall, 4),
        "topology_cost": cost,
        "trace_fingerprint": meta.fingerprint(),
        "trace_tokens": graph.num_tokens,
        "options": {
            "num_redundant": spec.num_redundant,
            "balance_eps": spec.balance_eps,
            "auto_balance": spec.auto_balance,
            "time_limit": spec.time_limit,
            "seed": spec.seed,
            "inter_node_cost": spec.inter_node_cost,
            **spec.options,
        },
        "info": res.info,
    }
    plan = Plan(
        num_gpus=spec.num_gpus,
        num_nodes=spec.num_nodes,
        num_experts=graph.num_experts,
        layers=meta.layers,
        phy2log=res.phy2log_LP,
        model_name=meta.model_name,
        provenance=provenance,
    )
    # forecast of imbalance_max on unseen prompts as many as the fitted ones (None without prompt folds)
    forecast = predict_unseen_imbalance(plan, graph.load_LE, graph.fold_load_SLE, seed=spec.seed)
    return replace(plan, provenance={**provenance, "unseen_imbalance": forecast})
