"""Planner: the public entry point that runs a named solver on a routing graph and returns a ``Plan``.

``make_plan`` keeps ``spec.time_limit`` for everything it does: the solver gets the limit less
``post_solve_reserve`` (the topology cost and capacity bound, O(L E^2), and the unseen-imbalance forecast,
O(draws L E G), unless the solver returns its own in ``info["unseen_imbalance"]``, as the default does), so a
solver that keeps its own limit keeps the planner's. Measured at the DeepSeek-V3 shape (58 x 256, 32 GPUs, 256
draws) on a busy 2-core machine: 0.40 s of cost and bound, 0.49 s of forecast; the reserve is twice that.

Dimension key: L MoE layers, E experts, P physical slots, G GPUs, D forecast draws.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import replace

from threadpoolctl import threadpool_limits

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
__all__ = ["SOLVERS", "SOLVER_NAMES", "get_solver", "make_plan", "pick_solver", "post_solve_reserve", "topology_cost"]

# Seconds per unit of the work after the solver, twice those measured (module docstring): per transition entry
# (L E^2: topology cost and capacity bound) and per forecast entry (D L E G).
RESERVE_S_PER_PAIR = 2e-7
RESERVE_S_PER_DRAW = 8e-9
FORECAST_DRAWS = 256  # predict_unseen_imbalance's default
MAX_RESERVE_SHARE = 0.25  # of the time limit at most
MIN_SOLVE_SHARE = 0.25  # of the time limit the solver keeps, however long the trace took to read


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


def post_solve_reserve(graph: RoutingGraph, spec: PlanSpec, forecast: bool = True) -> float:
    """Seconds of ``spec.time_limit`` that ``make_plan`` keeps for its work after the solver (module docstring):
    the topology cost and bound, and the forecast when ``forecast`` (and the trace has prompt folds), at most
    ``MAX_RESERVE_SHARE`` of the limit."""
    L, E = graph.num_layers, graph.num_experts
    seconds = RESERVE_S_PER_PAIR * L * E * E
    if forecast and graph.fold_load_SLE is not None:
        seconds += RESERVE_S_PER_DRAW * FORECAST_DRAWS * L * E * spec.num_gpus
    return min(seconds, MAX_RESERVE_SHARE * float(spec.time_limit))


def make_plan(graph: RoutingGraph, spec: PlanSpec, solver: str = "auto", started: float | None = None) -> Plan:
    """Solve placement for ``graph`` with ``solver`` and wrap the result as a validated ``Plan``, all within
    ``spec.time_limit`` counted from ``started`` (``time.perf_counter()``; default now: the CLI passes its own
    start, so that reading the trace counts too, the solver keeping ``MIN_SOLVE_SHARE`` of the limit at least;
    module docstring)."""
    started = time.perf_counter() if started is None else started
    spec.validate(graph.num_experts)
    name = pick_solver(graph, spec) if solver == "auto" else solver
    fn = get_solver(name)
    own_forecast = None  # the solver that returns the chosen plan's forecast itself
    if spec.options.get("objective", "colocation") == "time":  # the lowest predicted step time among candidates
        if solver != "auto":
            raise PlanError(f"--objective time chooses among solvers itself; drop --solver {solver}")
        from placement.solvers.time_objective import solve_time

        fn = solve_time
    elif spec.auto_balance:
        from placement.solvers.balance_target import eplb_fitted_eps, solve_auto

        if name == "affinity":
            fn = own_forecast = solve_auto
        else:  # solvers without a forecast: EPLB's balance on the fitted trace
            spec = replace(spec, balance_eps=eplb_fitted_eps(graph, spec))
    t0 = time.perf_counter()
    budget = float(spec.time_limit) - (t0 - started) - post_solve_reserve(graph, spec, forecast=fn is not own_forecast)
    res = fn(graph, replace(spec, time_limit=max(budget, MIN_SOLVE_SHARE * float(spec.time_limit))))
    wall = time.perf_counter() - t0
    with threadpool_limits(limits=1, user_api="blas"):  # small products; threaded BLAS is slower on a busy machine
        return _wrap(graph, spec, solver, res, wall)


def _wrap(graph: RoutingGraph, spec: PlanSpec, solver: str, res: SolveResult, wall: float) -> Plan:
    """The solver's result as a ``Plan`` with its provenance, cost, bound and unseen-imbalance forecast."""
    forecast = res.info.get("unseen_imbalance")  # the default's own (same seed): not forecast again
    if forecast is not None:
        res = replace(res, info={k: v for k, v in res.info.items() if k != "unseen_imbalance"})
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
    if forecast is None:
        forecast = predict_unseen_imbalance(plan, graph.load_LE, graph.fold_load_SLE, seed=spec.seed)
    return replace(plan, provenance={**provenance, "unseen_imbalance": forecast})
