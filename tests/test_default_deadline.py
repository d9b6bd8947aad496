"""The default (``moeplace plan`` without --balance) keeps its time limit: every solve under one hard deadline
derived from ``spec.time_limit``, the planner's work after the solver reserved out of it, and a default cut at
its deadline falls back to EPLB's plan without raising (placement/solvers/balance_target.py, placement/planner.py).
"""

from __future__ import annotations

import time

import numpy as np

from placement.graph import PROMPT_FOLDS, RoutingGraph, graph_from_routes
from placement.metrics import colocation
from placement.plan import Plan
from placement.planner import MAX_RESERVE_SHARE, MIN_SOLVE_SHARE, make_plan, post_solve_reserve
from placement.solvers.balance_target import solve_auto
from placement.solvers.base import PlanSpec
from placement.solvers.baselines import eplb_phy2log
from placement.solvers.deadline import hard_deadline
from placement.solvers.replicate import distinct_copies
from placement.solvers.robust import predict_unseen_imbalance
from placement.trace.synthetic import synthetic_trace

# make_plan's documented tolerance over its time limit (docs/benchmarks.md): steps that check no deadline
TOLERANCE_S = 1.0


def _graph(layers: int, experts: int, top_k: int, tokens: int) -> RoutingGraph:
    meta, r = synthetic_trace(layers, experts, top_k, tokens, follow=0.5, skew_sigma=0.6, seed=1)
    return graph_from_routes(r.expert_ids_TLK, meta, with_coact=False, seq_ids_T=r.seq_ids_T, num_folds=PROMPT_FOLDS)


def test_default_returns_within_its_time_limit_and_reports_its_own_forecast() -> None:
    g = _graph(16, 64, 4, 16384)
    spec = PlanSpec(8, 2, 8, time_limit=4.0, auto_balance=True)
    t0 = time.perf_counter()
    plan = make_plan(g, spec)
    wall = time.perf_counter() - t0
    assert wall <= spec.time_limit + TOLERANCE_S
    pv = plan.provenance
    assert pv["info"]["balance"] in ("eplb fitted", "unseen forecast", "hub copies", "eplb plan")
    assert "unseen_imbalance" not in pv["info"]  # moved to the provenance, not kept twice
    again = predict_unseen_imbalance(plan, g.load_LE, g.fold_load_SLE, seed=spec.seed)
    assert pv["unseen_imbalance"] == again  # the default's forecast is the one the planner would make


def test_a_deadline_already_passed_gives_eplb_plan_with_copies_apart_without_raising() -> None:
    g = _graph(6, 32, 2, 4096)
    spec = PlanSpec(4, 1, 4, time_limit=5.0, auto_balance=True)
    with hard_deadline(time.perf_counter() - 1.0):
        res = solve_auto(g, spec)
    load_LE = g.load_LE.astype(np.float64)
    eplb_LP = eplb_phy2log(load_LE, g.num_experts + spec.num_redundant, spec.num_gpus, spec.num_nodes)
    apart_LP = distinct_copies(eplb_LP, load_LE, spec.num_gpus)
    # the same packs (experts per GPU, per layer), under GPU labels chosen along the layers: more co-located
    assert _packs(res.phy2log_LP, spec.num_gpus) == _packs(apart_LP, spec.num_gpus)
    plan = Plan(spec.num_gpus, 1, g.num_experts, g.meta.layers, res.phy2log_LP)
    apart = Plan(spec.num_gpus, 1, g.num_experts, g.meta.layers, apart_LP)
    assert colocation(plan, g) > colocation(apart, g) + 0.01
    assert res.info["balance"] == "eplb plan"
    assert res.info["stopped"] and all("hard deadline" in why for why in res.info["stopped"])
    assert res.info["unseen_imbalance"] == predict_unseen_imbalance(plan, g.load_LE, g.fold_load_SLE)
    assert res.info["unseen_imbalance"] == predict_unseen_imbalance(apart, g.load_LE, g.fold_load_SLE)


def _packs(phy2log_LP: np.ndarray, num_gpus: int) -> list[set[frozenset[int]]]:
    """Per layer, the sets of experts the GPUs hold, whatever their labels."""
    L, P = phy2log_LP.shape
    return [{frozenset(g.tolist()) for g in phy2log_LP[l].reshape(num_gpus, P // num_gpus)} for l in range(L)]


def test_time_spent_before_make_plan_counts_against_the_limit_down_to_the_solver_share() -> None:
    g = _graph(8, 32, 2, 4096)
    spec = PlanSpec(4, 1, 4, time_limit=4.0, auto_balance=True)
    t0 = time.perf_counter()
    plan = make_plan(g, spec, started=t0 - 3.5)  # as if reading the trace took 3.5 s of the 4
    wall = time.perf_counter() - t0
    assert wall <= (MIN_SOLVE_SHARE + MAX_RESERVE_SHARE) * spec.time_limit + TOLERANCE_S
    assert plan.provenance["options"]["time_limit"] == spec.time_limit  # the user's limit is recorded


def test_post_solve_reserve_grows_with_the_forecast_and_stays_a_share_of_the_limit() -> None:
    g = _graph(4, 16, 2, 2048)
    spec = PlanSpec(4, time_limit=10.0)
    with_fc, without = post_solve_reserve(g, spec), post_solve_reserve(g, spec, forecast=False)
    assert 0.0 < without < with_fc <= MAX_RESERVE_SHARE * spec.time_limit
    tight = PlanSpec(4, time_limit=1e-4)
    assert post_solve_reserve(g, tight) == MAX_RESERVE_SHARE * tight.time_limit
