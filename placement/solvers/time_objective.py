"""``--objective time``: the plan with the lowest predicted step time (placement/timemodel.py), not the most
co-located one at a given balance.

Candidates, all for the same GPUs, nodes and slots: contiguous, eplb, the affinity default (as balanced on unseen
prompts as eplb, then co-located; placement/solvers/balance_target.py) and affinity at a few fitted balances
(eplb's fitted tolerance, then ``TIME_BALANCES``), which trade balance for colocation further than the default.
Each is scored by ``forecast_time`` (a step of unseen prompts resampled from the prompt folds; the trace itself
without prompt ids) and the lowest predicted step time wins. The default takes half the time limit, the fixed
balances share the rest.

Dimension key: L layers, P slots.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from placement.graph import RoutingGraph
from placement.plan import Plan, PlanError
from placement.solvers.base import PlanSpec, SolveResult
from placement.timemodel import HardwarePreset, ModelDims, check_topology, forecast_time

TIME_BALANCES = (0.05, 0.1, 0.2)


def time_inputs(spec: PlanSpec) -> tuple[HardwarePreset, ModelDims]:
    """The hardware and model dims that the CLI put into ``spec.options`` (as JSON)."""
    hw_json, dims_json = spec.options.get("hardware"), spec.options.get("model_dims")
    if not isinstance(hw_json, str) or not isinstance(dims_json, str):
        raise PlanError("--objective time needs options 'hardware' and 'model_dims' (HardwarePreset / ModelDims JSON)")
    return HardwarePreset.from_json(hw_json), ModelDims.from_json(dims_json)


def solve_time(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    """The candidate plan with the lowest forecast step time; see the module docstring. ``info["time"]`` lists
    every candidate's predicted per-layer mean and max and step total (seconds)."""
    from placement.solvers.affinity import solve_fixed
    from placement.solvers.balance_target import eplb_fitted_eps, solve_auto
    from placement.solvers.baselines import contiguous_phy2log, eplb_phy2log

    t0 = time.perf_counter()
    hw, dims = time_inputs(spec)
    check_topology(spec.num_gpus, spec.num_nodes, hw)
    G, N, E = spec.num_gpus, spec.num_nodes, graph.num_experts
    P = E + spec.num_redundant
    load_LE = graph.load_LE.astype(np.float64)
    limit = float(spec.time_limit)
    plain = replace(spec, auto_balance=False, options={**spec.options, "unseen": False, "kappa": 0.0})
    cands: list[tuple[str, SolveResult]] = [
        ("contiguous", SolveResult(contiguous_phy2log(load_LE, P, G), "contiguous", "heuristic")),
        ("eplb", SolveResult(eplb_phy2log(load_LE, P, G, N), "eplb", "heuristic")),
    ]
    try:
        auto = solve_auto(graph, replace(plain, auto_balance=True, time_limit=0.5 * limit))
        cands.append(("affinity default", auto))
    except PlanError:
        pass
    fit_eps = eplb_fitted_eps(graph, spec)
    balances = (fit_eps, *(b for b in TIME_BALANCES if b > fit_eps + 0.01))
    for i, eps in enumerate(balances):
        left = limit - (time.perf_counter() - t0)
        per = max(left / (len(balances) - i), 0.05 * limit)
        try:
            res = solve_fixed(graph, replace(plain, balance_eps=eps), time.perf_counter() + per)
        except PlanError:  # that balance is out of reach: not a candidate
            continue
        cands.append((f"affinity balance {eps:.3g}", res))
    rows: list[dict[str, Any]] = []
    for name, res in cands:
        plan = Plan(G, N, E, graph.meta.layers, res.phy2log_LP)
        rows.append({"name": name, **forecast_time(plan, graph, hw, dims, seed=spec.seed).summary()})
    best = min(range(len(cands)), key=lambda k: rows[k]["step_s"])
    name, res = cands[best]
    info = {
        "objective": "time",
        "chosen_info": res.info,
        "time_choice": name,
        "time": rows,
        "hardware": hw.name,
        "model_dims": {"hidden_size": dims.hidden_size, "expert_ffn_size": dims.expert_ffn_size, "source": dims.source},
        "tokens_per_step": dims.step_tokens(G),
    }
    return replace(res, solve_seconds=time.perf_counter() - t0, info=info)
