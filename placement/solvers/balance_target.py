"""The default balance: as balanced on unseen prompts as EPLB, then as co-located as possible.

Without ``--balance`` (``PlanSpec.auto_balance``) nobody has to guess a tolerance. The slowest GPU sets every
layer's pace, so balance on traffic the plan has not seen comes first and colocation second:

1. EPLB's plan for the same trace, GPUs, nodes and slots is the reference. Its imbalance_max on unseen prompts
   is forecast from the prompt folds (placement/solvers/robust.py ``predict_unseen_imbalance``, median); the
   target is that forecast less the optimism of a searched plan's forecast (``forecast_optimism``).
2. Candidates: the affinity plan at EPLB's own fitted balance (which affinity always reaches,
   ``never_below_eplb``), and the most co-located plan whose forecast meets the target with the fitted prompts
   held to it too (``solve_for_unseen``: regula falsi on the robustness kappa; its solves skip affinity's eplb
   floor, ``never_below_eplb``, since step 3 keeps EPLB's plan at hand), and, with redundant slots, the hub
   plan (placement/solvers/hub_copies.py: extra copies make the busiest experts whole on every GPU, the rest
   is packed by load, its GPU labels chosen along the layers, its worst layers polished at robustness
   ``HUB_KAPPA`` only while it misses the target; seconds at DeepSeek-V3 size, 0.3 of the time limit at
   most). The most co-located of those that
   meet the target wins; if none does, the one with the lowest forecast. Where layers depend weakly on each
   other (the DeepSeek-V3 shape of docs/benchmarks.md) the hub plan is the only one that meets EPLB's
   forecast, at 1.26x its colocation; where they depend strongly (DeepSeek-V2-Lite) the search co-locates
   far more.
3. If that forecast is still above EPLB's own, EPLB's plan is used with its second copies on one GPU replaced
   by copies of other experts (``distinct_copies``), or, when that forecasts above EPLB's, moved to other GPUs
   (``eplb_start``), whichever forecasts lower.
   Without prompt ids there is no forecast and the plan is the one at EPLB's fitted balance. The default never
   fails on a valid trace.

``forecast_optimism``: a plan searched for a low variance on the folds sees its forecast too low, while EPLB,
which never looks at the folds, does not. Measured on the DeepSeek-V2-Lite dev trace, G = 8, 5-fold over the
prompts with 3 shuffles (15 fits on 80 % of the prompts, held-out imbalance_max on the other 20 %,
benchmarks/bench_placement.py ``v2-lite-kfold``): held-out minus forecast, searched plan minus EPLB's, was
+0.016 to +0.019 for the kappa 2-2.5 plans that meet the target without redundant slots, and +0.005 to +0.007
for the kappa 1.5-2 plans that meet it with 8 (standard error about 0.007). It is not the forecast resampling
the folds the search saw: plans searched against half of the folds and forecast on the other half were as
optimistic, and less co-located. Picking each fold's most co-located candidate whose forecast is within
EPLB's less ``FORECAST_OPTIMISM`` = 0.01 (R = 0) gave held-out imbalance_max -0.001 against EPLB's at
colocation 0.262 (with 0: +0.015 at 0.276); less ``FORECAST_OPTIMISM_REDUNDANT`` = 0 (R = 8), +0.004 at 0.305
(with 0.005: -0.007 at 0.276). The default itself, on those folds: +0.010 at 0.262 (R = 0), -0.002 at 0.299
(R = 8); off the tuned instance, 10 folds each: G = 4, R = 8 -0.003 and G = 16, R = 16 -0.019.

Dimension key: L layers, E experts, P slots, G GPUs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from placement.graph import RoutingGraph
from placement.plan import Plan, PlanError
from placement.solvers.affinity import eplb_start, solve_fixed, solve_for_unseen
from placement.solvers.base import PlanSpec, SolveResult
from placement.solvers.baselines import eplb_phy2log
from placement.solvers.hub_copies import hub_packing, polish_worst_layers, relabel_chain
from placement.solvers.replicate import distinct_copies
from placement.solvers.robust import LoadModel, predict_unseen_imbalance

FORECAST_OPTIMISM = 0.01
FORECAST_OPTIMISM_REDUNDANT = 0.0
HUB_KAPPA = 2.0  # robustness of the hub plan's polish (the standard deviations its worst layers are judged by)


def forecast_optimism(spec: PlanSpec) -> float:
    """How far below EPLB's forecast the default aims (module docstring): less with redundant slots."""
    return FORECAST_OPTIMISM_REDUNDANT if spec.num_redundant else FORECAST_OPTIMISM


def eplb_reference(graph: RoutingGraph, spec: PlanSpec) -> tuple[np.ndarray, float, float | None]:
    """(EPLB's phy2log [L, P], its imbalance_max on the fitted trace, its forecast median on unseen prompts or
    None without prompt folds)."""
    from placement.metrics import imbalance

    G, N, E = spec.num_gpus, spec.num_nodes, graph.num_experts
    phy_LP = eplb_phy2log(graph.load_LE.astype(np.float64), E + spec.num_redundant, G, N)
    plan = Plan(G, N, E, graph.meta.layers, phy_LP)
    fc = predict_unseen_imbalance(plan, graph.load_LE, graph.fold_load_SLE, seed=spec.seed)
    return phy_LP, imbalance(plan, graph)[1], None if fc is None else float(fc["p50"])


def eplb_fitted_eps(graph: RoutingGraph, spec: PlanSpec) -> float:
    """The tolerance EPLB reaches on the fitted trace (what solvers without a forecast are held to by default)."""
    return max(eplb_reference(graph, spec)[1] - 1.0, 0.0) + 1e-9


def solve_auto(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    """Affinity placement at the default balance; see the module docstring."""
    t0 = time.perf_counter()
    limit = float(spec.time_limit)
    phy_LP, fit_imb, eplb_fc = eplb_reference(graph, spec)
    fit_eps = max(fit_imb - 1.0, 0.0) + 1e-9
    info: dict[str, Any] = {"eplb_fit_imbalance": round(fit_imb, 4), "eplb_forecast": eplb_fc}
    fixed = replace(spec, auto_balance=False, options={**spec.options, "unseen": False, "kappa": 0.0})
    target = None if eplb_fc is None else eplb_fc - forecast_optimism(spec)
    hub = None if target is None else _hub_candidate(graph, spec, target, t0 + 0.3 * limit)  # seconds at V3 size
    # At EPLB's own fitted balance (always reached): where layers depend weakly on each other it is often
    # already as balanced on unseen prompts as EPLB, and more co-located than a robustness search.
    try:
        at_eplb = solve_fixed(graph, replace(fixed, balance_eps=fit_eps), t0 + (0.25 if eplb_fc else 1.0) * limit)
    except PlanError:  # eplb's balance rests on a doubled copy (an idle slot), which our plans never have
        start_LP = eplb_start(phy_LP, graph, spec.num_gpus, 1.0 + fit_eps)
        at_eplb = SolveResult(start_LP, "affinity", "heuristic", info={"from_eplb": True})
    if eplb_fc is None or target is None:
        info["balance"] = "eplb fitted"
        return replace(at_eplb, solve_seconds=time.perf_counter() - t0, info={**at_eplb.info, **info})
    info["unseen_target"] = round(target, 4)
    best, best_fc, how = at_eplb, _forecast(at_eplb.phy2log_LP, graph, spec), "eplb fitted"
    sub = replace(fixed, balance_eps=max(target - 1.0, fit_eps), options={**fixed.options, "eplb_floor": False})
    try:
        if time.perf_counter() - t0 > 0.5 * limit:  # one solve took half the limit: no time for a search
            raise PlanError("no time left for the robustness search")
        budget = max(limit - (time.perf_counter() - t0), 0.3 * limit)
        found = solve_for_unseen(graph, sub, target=target, budget=budget, closest=True)
    except PlanError:
        info["unseen_target_missed"] = True
    else:
        found_fc = _forecast(found.phy2log_LP, graph, spec)
        info["unseen_target_missed"] = min(found_fc, best_fc) > target
        if _better(found, found_fc, best, best_fc, target, graph, spec):
            best, best_fc, how = found, found_fc, "unseen forecast"
    if hub is not None and _better(*hub, best, best_fc, target, graph, spec):
        (best, best_fc), how = hub, "hub copies"
        info["unseen_target_missed"] = best_fc > target
    if best_fc > eplb_fc:  # keep the forecast no worse than eplb's: else eplb's own plan, copies apart
        start_LP = distinct_copies(phy_LP, graph.load_LE.astype(np.float64), spec.num_gpus)
        start_fc = _forecast(start_LP, graph, spec)
        if start_fc > eplb_fc:  # new copies for the doubled ones cost balance: try moving the doubled ones instead
            moved_LP = eplb_start(phy_LP, graph, spec.num_gpus, 1.0 + fit_eps)
            moved_fc = _forecast(moved_LP, graph, spec)
            start_LP, start_fc = (moved_LP, moved_fc) if moved_fc < start_fc else (start_LP, start_fc)
        if start_fc < best_fc:
            best, how = replace(best, phy2log_LP=start_LP), "eplb plan"
    info["balance"] = how
    return replace(best, solve_seconds=time.perf_counter() - t0, info={**best.info, **info})


def _hub_candidate(
    graph: RoutingGraph, spec: PlanSpec, target: float, deadline: float
) -> tuple[SolveResult, float] | None:
    """(plan, forecast median): hub copies packed by load, GPU labels chosen along the layers
    (placement/solvers/hub_copies.py); while that forecast misses ``target``, its 8, then 24, then all worst
    layers are polished at robustness ``HUB_KAPPA`` (least co-located traffic lost first) and relabelled: balance
    beyond the target is not needed, colocation is. None without redundant slots or where more copies are asked
    than fit one per GPU."""
    G, R = spec.num_gpus, spec.num_redundant
    if R == 0 or G == 1 or R > graph.num_experts * (G - 1):
        return None
    t0 = time.perf_counter()
    packed_LP = hub_packing(graph.load_LE.astype(np.float64), G, R)
    trans = graph.trans_LEE.astype(np.float64)
    with threadpool_limits(limits=1, user_api="blas"):  # small products; threaded BLAS is slower on a busy machine
        phy_LP = relabel_chain(packed_LP, trans, G, spec.num_nodes, deadline=t0 + 0.4 * (deadline - t0))
        fc = _forecast(phy_LP, graph, spec)
        lm = LoadModel.from_graph(graph, kappa=HUB_KAPPA) if fc > target else None
        for layers in (8, 24, graph.num_layers):  # a few worst layers first, more while the target is missed
            if lm is None or fc <= target or time.perf_counter() > deadline:
                break
            polished_LP = polish_worst_layers(phy_LP, trans, lm, G, deadline, layers)
            polished_LP = relabel_chain(polished_LP, trans, G, spec.num_nodes, sweeps=1, deadline=deadline)
            polished_fc = _forecast(polished_LP, graph, spec)
            if polished_fc < fc:
                phy_LP, fc = polished_LP, polished_fc
    return SolveResult(phy_LP, "affinity", "heuristic", info={"hub_copies": True}), fc


def _better(
    cand: SolveResult,
    cand_fc: float,
    best: SolveResult,
    best_fc: float,
    target: float,
    graph: RoutingGraph,
    spec: PlanSpec,
) -> bool:
    """Whether a candidate beats the best so far: meeting the target, the more co-located; else the lower
    forecast."""
    if cand_fc <= target:
        return best_fc > target or _colocation(cand, graph, spec) > _colocation(best, graph, spec)
    return best_fc > target and cand_fc < best_fc


def _colocation(res: SolveResult, graph: RoutingGraph, spec: PlanSpec) -> float:
    from placement.metrics import colocation

    return colocation(Plan(spec.num_gpus, spec.num_nodes, graph.num_experts, graph.meta.layers, res.phy2log_LP), graph)


def _forecast(phy2log_LP: np.ndarray, graph: RoutingGraph, spec: PlanSpec) -> float:
    plan = Plan(spec.num_gpus, spec.num_nodes, graph.num_experts, graph.meta.layers, phy2log_LP)
    fc = predict_unseen_imbalance(plan, graph.load_LE, graph.fold_load_SLE, seed=spec.seed)
    return float("inf") if fc is None else float(fc["p50"])
