"""``--objective time``: the plan with the lowest predicted step time (placement/timemodel.py), not the most
co-located one at a given balance.

Candidates, all for the same GPUs, nodes and slots: contiguous, eplb, the affinity default (as balanced on unseen
prompts as eplb, then co-located; placement/solvers/balance_target.py) and affinity at a few fitted balances
(eplb's fitted tolerance, then ``TIME_BALANCES``), which trade balance for colocation further than the default.
Each is scored by ``forecast_time`` (a step of unseen prompts resampled from the prompt folds; the trace itself
without prompt ids) and the lowest predicted step time wins. The default gets the whole time limit (so it is the
plan ``moeplace plan`` would give, and the choice is never forecast slower than it); the fixed balances share
another half of the limit; after the first (eplb's fitted balance), those not started within 1.5 times the limit
are skipped (``balances_skipped``; at DeepSeek-V3 size an affinity solve overruns a short limit).

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

TIME_BALANCES = (0.1, 0.05, 0.2)  # tried in this order after eplb's fitted balance


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
    rows: list[dict[str, Any]] = []
    cands: list[tuple[str, SolveResult]] = []

    def add(name: str, res: SolveResult, started: float) -> None:
        plan = Plan(G, N, E, graph.meta.layers, res.phy2log_LP)
        summary = forecast_time(plan, graph, hw, dims, seed=spec.seed).summary()
        rows.append({"name": name, **summary, "solve_s": round(time.perf_counter() - started, 3)})
        cands.append((name, res))

    t1 = time.perf_counter()
    add("contiguous", SolveResult(contiguous_phy2log(load_LE, P, G), "contiguous", "heuristic"), t1)
    t1 = time.perf_counter()
    add("eplb", SolveResult(eplb_phy2log(load_LE, P, G, N), "eplb", "heuristic"), t1)
    t1 = time.perf_counter()
    try:
        add("affinity default", solve_auto(graph, replace(plain, auto_balance=True)), t1)
    except PlanError:
        pass
    fit_eps = eplb_fitted_eps(graph, spec)
    balances = (fit_eps, *(b for b in TIME_BALANCES if b > fit_eps + 0.01))
    t_fixed = time.perf_counter()
    skipped: list[float] = []
    for i, eps in enumerate(balances):
        if i and time.perf_counter() - t0 > 1.5 * limit:  # large models: the solves overran their share
            skipped.append(round(eps, 4))
            continue
        t1 = time.perf_counter()
        per = max((0.5 * limit - (t1 - t_fixed)) / (len(balances) - i), 0.02 * limit)
        try:
            res = solve_fixed(graph, replace(plain, balance_eps=eps), t1 + per)
        except PlanError:  # that balance is out of reach: not a candidate
            continue
        add(f"affinity balance {eps:.3g}", res, t1)
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
        "balances_skipped": skipped,
    }
    return replace(res, solve_seconds=time.perf_counter() - t0, info=info)
