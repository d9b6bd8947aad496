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
   (``eplb_start``), whichever forecasts lower, its GPU labels chosen along the layers (free colocation).
   Without prompt ids there is no forecast and the plan is the one at EPLB's fitted balance. The default never
   fails on a valid trace.

All of it runs within ``spec.time_limit`` (``solve_auto``): the solves of step 2 stop at one hard deadline
(placement/solvers/deadline.py) early enough for the forecasts and step 3 after them; a solve cut there is no
candidate, and with none left the plan is step 3's, copies apart, ``info["stopped"]`` saying why (docs/
benchmarks.md: 19.7 s of wall for the whole ``moeplace plan`` at ``--time-limit 20`` on the DeepSeek-V3 shape).

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

Those fits had about 75 effective prompts (``REFERENCE_PROMPTS``; graph.effective_prompts, the folds counted by
token mass). On fewer the optimism grows: the fold covariance the search drives down is estimated from fewer
prompts, so the search finds more directions whose variance it underestimates. Fitted on one window of 125
DeepSeek-V2-Lite prompts (10-24 effective), G = 8, and tested on the next 7 windows of the five prompt orders of
benchmarks/bench_replan.py, the default at a flat 0.01 ran 0.005-0.065 above EPLB's plan of the same window
(mean +0.046); the offset at which it matched EPLB grew about as 1 / effective prompts (0.038 at 24, 0.058 at
15). So the optimism is ``FORECAST_OPTIMISM`` (or the redundant one) plus ``SMALL_TRACE_OPTIMISM`` * (1 / n_eff
- 1 / ``REFERENCE_PROMPTS``) below the reference size. With 1.0 the same windows ran at EPLB's balance on the mean
(-0.008, two orders above); with 1.5 below it (-0.041, a rerun -0.045) at 1.4-2.0x its colocation; 1.25 is between
(-0.028 in the run of the rerun, 1.4-2.1x). 1.25 is kept because the plan it gives is where a re-planning service
starts (``moeplace serve --plan``): later decisions correct balance on the traffic they see, while the starting
plan's colocation stays: on the replay of benchmarks/bench_replan.py (five prompt orders, two paired runs) the
service's policy after a 1.25 INIT kept the next-window imbalance within EPLB recompute's on all ten at 1.45-1.78x
its colocation (after 1.5: 1.29-1.68x); through the real service the issue's bar held on 3-5 of 7 orders per run
with 1.25 (three runs), on 3 with 1.5 (one run) (docs/benchmarks.md, "INIT coefficient 1.25").
Traces of ``REFERENCE_PROMPTS`` effective prompts or more (the whole dev file: 90) keep the measured values.

Dimension key: L layers, E experts, P slots, G GPUs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from placement.graph import RoutingGraph, effective_prompts
from placement.plan import Plan, PlanError
from placement.solvers.affinity import eplb_start, solve_fixed, solve_for_unseen
from placement.solvers.base import PlanSpec, SolveResult
from placement.solvers.baselines import eplb_phy2log
from placement.solvers.deadline import SolveTimeout, deadline_left, hard_deadline
from placement.solvers.hub_copies import hub_packing, polish_worst_layers, relabel_chain
from placement.solvers.replicate import distinct_copies
from placement.solvers.robust import LoadModel, predict_unseen_imbalance

FORECAST_OPTIMISM = 0.01
FORECAST_OPTIMISM_REDUNDANT = 0.0
# Small traces: the optimism grows as 1 / (effective prompts) below the size it was measured at (module docstring).
SMALL_TRACE_OPTIMISM = 1.25
REFERENCE_PROMPTS = 75.0  # effective prompts (graph.effective_prompts) of the k-fold fits the optimism is from
# Forecasts after the solves (a candidate's, EPLB's plan's, its moved copies'), in units of EPLB's reference (one
# packing and one forecast, timed at the start): the solves' hard deadline is that much before the limit.
FORECASTS_AFTER = 4.0
HUB_KAPPA = 2.0  # robustness of the hub plan's polish (the standard deviations its worst layers are judged by)


def forecast_optimism(spec: PlanSpec, graph: RoutingGraph | None = None) -> float:
    """How far below EPLB's forecast the default aims (module docstring): less with redundant slots, more on a
    trace of fewer effective prompts than ``REFERENCE_PROMPTS`` (``graph``'s folds; None: the reference size)."""
    base = FORECAST_OPTIMISM_REDUNDANT if spec.num_redundant else FORECAST_OPTIMISM
    n_eff = REFERENCE_PROMPTS if graph is None else effective_prompts(graph.fold_load_SLE)
    if n_eff <= 0.0:
        return base
    return base + SMALL_TRACE_OPTIMISM * max(1.0 / n_eff - 1.0 / REFERENCE_PROMPTS, 0.0)


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
    """Affinity placement at the default balance; see the module docstring. Everything runs within
    ``spec.time_limit`` (or a caller's earlier hard deadline, placement/solvers/deadline.py): the solves under a
    hard deadline that leaves ``FORECASTS_AFTER`` times what EPLB's reference took (one packing and one forecast)
    for the forecasts and EPLB's plan after them; a solve still running then stops and is no candidate. With no
    candidate left the result is EPLB's plan with its copies apart (``distinct_copies``) and ``info["stopped"]``
    says why: the default never raises. ``info["unseen_imbalance"]`` is the chosen plan's forecast (the planner
    reports it without forecasting again)."""
    t0 = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):  # small products; threaded BLAS is slower on a busy machine
        phy_LP, fit_imb, eplb_fc = eplb_reference(graph, spec)
        end = t0 + float(spec.time_limit)
        outer = deadline_left()  # a caller's earlier hard deadline (--objective time) holds too
        end = end if outer is None else min(end, time.perf_counter() + outer)
        stop = end - FORECASTS_AFTER * (time.perf_counter() - t0)
        with hard_deadline(end):  # the solves stop at ``stop``, EPLB's plan and the forecasts at ``end``
            return _solve_auto(graph, spec, t0, stop, phy_LP, fit_imb, eplb_fc)


def _solve_auto(
    graph: RoutingGraph,
    spec: PlanSpec,
    t0: float,
    stop: float,
    phy_LP: np.ndarray,
    fit_imb: float,
    eplb_fc: float | None,
) -> SolveResult:
    limit = float(spec.time_limit)
    fit_eps = max(fit_imb - 1.0, 0.0) + 1e-9
    info: dict[str, Any] = {"eplb_fit_imbalance": round(fit_imb, 4), "eplb_forecast": eplb_fc}
    stopped: list[str] = []  # the steps cut at the hard deadline
    fixed = replace(spec, auto_balance=False, options={**spec.options, "unseen": False, "kappa": 0.0})
    target = None if eplb_fc is None else eplb_fc - forecast_optimism(spec, graph)
    hub = None
    if target is not None and time.perf_counter() < stop:  # seconds at V3 size
        with hard_deadline(stop):
            hub = _hub_candidate(graph, spec, target, min(t0 + 0.3 * limit, stop))
    # At EPLB's own fitted balance (always reached): where layers depend weakly on each other it is often
    # already as balanced on unseen prompts as EPLB, and more co-located than a robustness search.
    at_eplb: SolveResult | None = None
    try:
        with hard_deadline(stop):
            at_deadline = min(t0 + (0.25 if eplb_fc else 1.0) * limit, stop)
            at_eplb = solve_fixed(graph, replace(fixed, balance_eps=fit_eps), at_deadline)
    except SolveTimeout as exc:
        stopped.append(str(exc))
    except PlanError:  # eplb's balance rests on a doubled copy (an idle slot), which our plans never have
        at_eplb = _eplb_result(_eplb_plan(phy_LP, graph, spec, fit_eps, eplb_fc, stopped)[0])
    if eplb_fc is None or target is None:
        info["balance"] = "eplb fitted" if at_eplb is not None else "eplb plan"
        if at_eplb is None:
            at_eplb = _eplb_result(_eplb_plan(phy_LP, graph, spec, fit_eps, None, stopped)[0])
        return _result(at_eplb, None, t0, info, stopped)
    info["unseen_target"] = round(target, 4)
    best: tuple[SolveResult, dict[str, Any] | None] | None = None
    how = "eplb plan"
    if at_eplb is not None:
        best, how = (at_eplb, _forecast(at_eplb.phy2log_LP, graph, spec)), "eplb fitted"
    sub = replace(fixed, balance_eps=max(target - 1.0, fit_eps), options={**fixed.options, "eplb_floor": False})
    try:
        if time.perf_counter() - t0 > 0.5 * limit:  # one solve took half the limit: no time for a search
            raise PlanError("no time left for the robustness search")
        budget = min(max(limit - (time.perf_counter() - t0), 0.3 * limit), stop - time.perf_counter())
        with hard_deadline(stop):
            found = solve_for_unseen(graph, sub, target=target, budget=budget, closest=True)
    except PlanError as exc:
        info["unseen_target_missed"] = True
        if isinstance(exc, SolveTimeout):
            stopped.append(str(exc))
    else:
        found_fc = _forecast(found.phy2log_LP, graph, spec)
        if best is None or _better(found, found_fc, *best, target, graph, spec):
            best, how = (found, found_fc), "unseen forecast"
    if hub is not None and (best is None or _better(*hub, *best, target, graph, spec)):
        best, how = hub, "hub copies"
    if best is not None:
        info["unseen_target_missed"] = _p50(best[1]) > target
    if best is None or _p50(best[1]) > eplb_fc:  # keep the forecast no worse than eplb's: else eplb's own plan
        start_LP, start_fc = _eplb_plan(phy_LP, graph, spec, fit_eps, eplb_fc, stopped)
        if best is None or _p50(start_fc) < _p50(best[1]):
            base = _eplb_result(start_LP) if best is None else best[0]
            best, how = (replace(base, phy2log_LP=start_LP), start_fc), "eplb plan"
    info["balance"] = how
    return _result(best[0], best[1], t0, info, stopped)


def _eplb_plan(
    phy_LP: np.ndarray,
    graph: RoutingGraph,
    spec: PlanSpec,
    fit_eps: float,
    eplb_fc: float | None,
    stopped: list[str],
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(phy2log [L, P], its forecast or None without ``eplb_fc``): ``_eplb_layout`` with its GPU labels chosen
    along the layers (``relabel_chain``: EPLB numbers its packs by load, which co-locates nothing; labels change
    no GPU's load, so the forecast stands, and colocation rises for free, e.g. 0.124 -> 0.145 on a window of 125
    DeepSeek-V2-Lite prompts, G = 8)."""
    start_LP, start_fc = _eplb_layout(phy_LP, graph, spec, fit_eps, eplb_fc, stopped)
    with threadpool_limits(limits=1, user_api="blas"):
        chained_LP = relabel_chain(start_LP, graph.trans_LEE.astype(np.float64), spec.num_gpus, spec.num_nodes)
    return chained_LP, start_fc


def _eplb_layout(
    phy_LP: np.ndarray,
    graph: RoutingGraph,
    spec: PlanSpec,
    fit_eps: float,
    eplb_fc: float | None,
    stopped: list[str],
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(phy2log [L, P], its forecast or None without ``eplb_fc``): EPLB's plan with its second copies on one GPU
    replaced by copies of other experts (``distinct_copies``, milliseconds), or, when that forecasts above
    ``eplb_fc`` (always, without a forecast), moved to other GPUs (``eplb_start``), whichever forecasts lower
    (without a forecast: the moved one). Never raises: an ``eplb_start`` cut at the hard deadline leaves the
    distinct copies, noted in ``stopped``."""
    start_LP = distinct_copies(phy_LP, graph.load_LE.astype(np.float64), spec.num_gpus)
    start_fc = None if eplb_fc is None else _forecast(start_LP, graph, spec)
    if start_LP.shape[1] == graph.num_experts or (eplb_fc is not None and _p50(start_fc) <= eplb_fc):
        return start_LP, start_fc
    try:  # new copies for the doubled ones cost balance: try moving the doubled ones instead
        moved_LP = eplb_start(phy_LP, graph, spec.num_gpus, 1.0 + fit_eps)
    except SolveTimeout as exc:
        stopped.append(str(exc))
        return start_LP, start_fc
    if eplb_fc is None:
        return moved_LP, None
    moved_fc = _forecast(moved_LP, graph, spec)
    return (moved_LP, moved_fc) if _p50(moved_fc) < _p50(start_fc) else (start_LP, start_fc)


def _eplb_result(phy2log_LP: np.ndarray) -> SolveResult:
    return SolveResult(phy2log_LP, "affinity", "heuristic", info={"from_eplb": True})


def _result(
    res: SolveResult, fc: dict[str, Any] | None, t0: float, info: dict[str, Any], stopped: list[str]
) -> SolveResult:
    """``res`` with the default's ``info`` (and the steps cut at the hard deadline) and its forecast."""
    extra: dict[str, Any] = {"stopped": stopped} if stopped else {}
    if fc is not None:
        extra["unseen_imbalance"] = fc
    return replace(res, solve_seconds=time.perf_counter() - t0, info={**res.info, **info, **extra})


def _hub_candidate(
    graph: RoutingGraph, spec: PlanSpec, target: float, deadline: float
) -> tuple[SolveResult, dict[str, Any] | None] | None:
    """(plan, forecast): hub copies packed by load, GPU labels chosen along the layers
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
        lm = LoadModel.from_graph(graph, kappa=HUB_KAPPA) if _p50(fc) > target else None
        for layers in (8, 24, graph.num_layers):  # a few worst layers first, more while the target is missed
            if lm is None or _p50(fc) <= target or time.perf_counter() > deadline:
                break
            polished_LP = polish_worst_layers(phy_LP, trans, lm, G, deadline, layers)
            polished_LP = relabel_chain(polished_LP, trans, G, spec.num_nodes, sweeps=1, deadline=deadline)
            polished_fc = _forecast(polished_LP, graph, spec)
            if _p50(polished_fc) < _p50(fc):
                phy_LP, fc = polished_LP, polished_fc
    return SolveResult(phy_LP, "affinity", "heuristic", info={"hub_copies": True}), fc


def _better(
    cand: SolveResult,
    cand_fc: dict[str, Any] | None,
    best: SolveResult,
    best_fc: dict[str, Any] | None,
    target: float,
    graph: RoutingGraph,
    spec: PlanSpec,
) -> bool:
    """Whether a candidate beats the best so far: meeting the target, the more co-located; else the lower
    forecast."""
    if _p50(cand_fc) <= target:
        return _p50(best_fc) > target or _colocation(cand, graph, spec) > _colocation(best, graph, spec)
    return _p50(best_fc) > target and _p50(cand_fc) < _p50(best_fc)


def _colocation(res: SolveResult, graph: RoutingGraph, spec: PlanSpec) -> float:
    from placement.metrics import colocation

    return colocation(Plan(spec.num_gpus, spec.num_nodes, graph.num_experts, graph.meta.layers, res.phy2log_LP), graph)


def _forecast(phy2log_LP: np.ndarray, graph: RoutingGraph, spec: PlanSpec) -> dict[str, Any] | None:
    """The forecast the planner reports (``predict_unseen_imbalance``, same seed), None without prompt folds."""
    plan = Plan(spec.num_gpus, spec.num_nodes, graph.num_experts, graph.meta.layers, phy2log_LP)
    return predict_unseen_imbalance(plan, graph.load_LE, graph.fold_load_SLE, seed=spec.seed)


def _p50(fc: dict[str, Any] | None) -> float:
    return float("inf") if fc is None else float(fc["p50"])
