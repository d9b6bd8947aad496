"""The service's local step (placement/replan/step.py): within its budget, repairs balance first, then co-locates,
repeats, and is what ``decide`` does for plans with one replica per expert."""

from __future__ import annotations

import time

import numpy as np
import pytest

from placement.graph import PROMPT_FOLDS, RoutingGraph, graph_from_routes
from placement.metrics import colocation, imbalance
from placement.plan import Plan, PlanError
from placement.replan import count_moves, decide, relabel_gpus
from placement.replan.search import robust_ratio_LG
from placement.replan.solve import eplb_plan, gpu_of
from placement.replan.step import STEP_EPS, STEP_KAPPA, STEP_SHARE, local_step
from placement.solvers.robust import LoadModel
from placement.trace.synthetic import synthetic_trace


@pytest.fixture(scope="module")
def graph() -> RoutingGraph:
    meta, r = synthetic_trace(6, 16, 2, 4000, num_topics=8, tokens_per_prompt=40, seed=3)
    return graph_from_routes(r.expert_ids_TLK, meta, False, r.seq_ids_T, PROMPT_FOLDS)


def lopsided(g: RoutingGraph) -> Plan:
    """The hottest experts of every layer together on GPU 0."""
    return Plan(4, 1, 16, g.meta.layers, np.argsort(-g.load_LE, axis=1), g.meta.model_name)


def ratio_LG(plan: Plan, g: RoutingGraph) -> np.ndarray:
    """Robust load ratio of every (layer, GPU) at the step's kappa."""
    return robust_ratio_LG(gpu_of(plan), LoadModel.from_graph(g, kappa=STEP_KAPPA), plan.num_gpus)


def excess(plan: Plan, g: RoutingGraph, limit: float) -> float:
    """Robust load ratio over ``limit``, summed over (layer, GPU)."""
    return float(np.maximum(ratio_LG(plan, g) - limit, 0.0).sum())


def max_ratio(plan: Plan, g: RoutingGraph) -> float:
    return float(ratio_LG(plan, g).max())


def test_the_step_repairs_balance_within_its_default_budget(graph: RoutingGraph) -> None:
    cur = lopsided(graph)
    eplb = eplb_plan(cur, graph)
    full = count_moves(cur, relabel_gpus(cur, eplb, per_layer=True))
    res = local_step(cur, graph, time_limit=5.0)
    limit = 1.0 + max(STEP_EPS, imbalance(eplb, graph)[1] - 1.0)
    assert res.info["budget"] == int(STEP_SHARE * full) and res.info["full_rebalance_moves"] == full
    assert res.changed and 0 < count_moves(cur, res.plan) == len(res.moves.moves) <= res.info["budget"]
    assert excess(res.plan, graph, limit) < excess(cur, graph, limit) - 1.5  # 8.96 -> 6.73 when written
    assert max_ratio(res.plan, graph) < max_ratio(cur, graph) - 0.3  # 2.38 -> 1.95
    assert imbalance(res.plan, graph)[1] < imbalance(cur, graph)[1] - 0.4  # 2.30 -> 1.55
    assert res.after["forecast_imbalance"] < res.before["forecast_imbalance"]


def test_a_balanced_plan_gains_colocation_and_stays_within_the_limit(graph: RoutingGraph) -> None:
    cur = relabel_gpus(lopsided(graph), eplb_plan(lopsided(graph), graph))  # balanced, not co-located
    limit = 1.0 + max(STEP_EPS, imbalance(cur, graph)[1] - 1.0)
    assert max_ratio(cur, graph) > limit  # EPLB's plan is over the robust limit here: the step may not go further
    for budget in (6, 30):
        res = local_step(cur, graph, budget=budget, time_limit=5.0)
        assert res.changed and count_moves(cur, res.plan) <= budget
        assert colocation(res.plan, graph) > colocation(cur, graph) + 0.005
        worst_L = np.maximum(ratio_LG(res.plan, graph).max(axis=1), limit)  # no layer's worst GPU further over
        assert (worst_L <= np.maximum(ratio_LG(cur, graph).max(axis=1), limit) + 1e-9).all()
        assert res.after["forecast_imbalance"] <= res.before["forecast_imbalance"] + 0.01
    wide = local_step(cur, graph, budget=30, time_limit=5.0)
    narrow = local_step(cur, graph, budget=6, time_limit=5.0)
    assert colocation(wide.plan, graph) > colocation(narrow.plan, graph)  # more moves, more co-located


def test_budget_zero_keeps_the_plan_and_the_step_repeats(graph: RoutingGraph) -> None:
    cur = lopsided(graph)
    kept = local_step(cur, graph, budget=0)
    assert not kept.changed and kept.plan is cur and not kept.moves.moves and "no swap" in kept.reason
    a, b = local_step(cur, graph, budget=20), local_step(cur, graph, budget=20)
    assert np.array_equal(a.plan.phy2log, b.plan.phy2log) and a.reason == b.reason


def test_decide_steps_with_one_replica_and_re_plans_with_the_target_otherwise(graph: RoutingGraph) -> None:
    cur = lopsided(graph)
    res = decide(cur, graph, budget=12, time_limit=3.0)
    assert res.reason.startswith("local step") and res.info["kappa"] == STEP_KAPPA
    assert np.array_equal(res.plan.phy2log, local_step(cur, graph, budget=12).plan.phy2log)
    assert res.info["forecast_raw"] is not None and res.info["eplb_phy2log"].shape == cur.phy2log.shape
    with_replicas = Plan(4, 1, 16, graph.meta.layers, np.hstack([cur.phy2log, cur.phy2log[:, :4]]), cur.model_name)
    other = decide(with_replicas, graph, budget=12, time_limit=3.0, exact="off")
    assert not other.reason.startswith("local step") and count_moves(with_replicas, other.plan) <= 12
    with pytest.raises(PlanError, match="one replica per expert"):
        local_step(with_replicas, graph)
    with pytest.raises(PlanError, match="method='both'"):
        decide(cur, graph, method="both")
    with pytest.raises(PlanError, match="--max-moves -1"):
        local_step(cur, graph, budget=-1)


def test_swaps_that_only_co_locate_pay_min_gain_per_added_move(graph: RoutingGraph) -> None:
    from placement.replan.search import colocated_X, swap_search

    cur = relabel_gpus(lopsided(graph), eplb_plan(lopsided(graph), graph))
    cur_LE = gpu_of(cur)
    trans = graph.trans_LEE.astype(np.float64)
    lm = LoadModel.from_graph(graph, kappa=0.0)
    limit = float(robust_ratio_LG(cur_LE, lm, 4).max()) + 0.05  # within the limit: no swap is a repair
    moved, gained = [], []
    for min_gain in (0.0, 0.002 * trans.sum(), 10.0 * trans.sum()):
        new_LE = swap_search(cur_LE, cur_LE, trans, lm, limit, 40, time.perf_counter() + 30, min_gain=min_gain)
        moves = int((new_LE != cur_LE).sum())
        gain = float(colocated_X(new_LE, trans).sum() - colocated_X(cur_LE, trans).sum())
        assert moves <= 40 and gain >= min_gain * moves - 1e-9  # every swap paid for the moves it added
        assert float(robust_ratio_LG(new_LE, lm, 4).max()) <= limit + 1e-9
        moved.append(moves)
        gained.append(gain)
    assert moved[0] > moved[1] > moved[2] == 0 and gained[0] >= gained[1] > 0  # dearer moves: fewer, still paying


def test_decide_insures_the_step_for_the_forecasts_horizon(graph: RoutingGraph) -> None:
    cur = lopsided(graph)
    horizon = 0.25 * graph.num_tokens  # a quarter of the memory: a wider spread to insure against
    res = decide(cur, graph, budget=30, horizon_tokens=horizon, time_limit=3.0)
    same = local_step(cur, graph, budget=30, holdout_ratio=0.25)
    assert np.array_equal(res.plan.phy2log, same.plan.phy2log)
    assert not np.array_equal(res.plan.phy2log, local_step(cur, graph, budget=30).plan.phy2log)
