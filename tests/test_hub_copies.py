"""Hub copies (placement/solvers/hub_copies.py): extra copies to the busiest experts up to one per GPU, the rest
packed by load, GPU labels chosen along the layers; and the default balance taking that plan when it wins."""

from __future__ import annotations

import time

import numpy as np
import pytest

from placement.graph import PROMPT_FOLDS, graph_from_routes
from placement.metrics import colocation, imbalance
from placement.plan import Plan, PlanError
from placement.planner import make_plan
from placement.solvers.balance_target import _hub_candidate, _p50, eplb_reference, forecast_optimism
from placement.solvers.base import PlanSpec
from placement.solvers.hub_copies import hub_counts, hub_packing, relabel_chain
from placement.trace.synthetic import synthetic_trace


def test_extra_copies_fill_the_busiest_expert_up_to_one_per_gpu() -> None:
    load_LE = np.array([[50.0, 30.0, 10.0, 9.0, 1.0, 1.0, 1.0, 1.0]])
    count_LE = hub_counts(load_LE, num_gpus=4, num_redundant=4)
    # 3 copies make expert 0 whole on the 4 GPUs; the fourth goes to the next busiest, not per-copy load
    assert count_LE.tolist() == [[4, 2, 1, 1, 1, 1, 1, 1]]
    with pytest.raises(PlanError, match="at most 24 extra copies"):
        hub_counts(load_LE, num_gpus=4, num_redundant=28)


def test_hub_packing_is_a_valid_balanced_plan_with_hubs_on_every_gpu() -> None:
    meta, r = synthetic_trace(5, 32, 4, 6000, skew_sigma=0.8, seed=3)
    g = graph_from_routes(r.expert_ids_TLK, meta, with_coact=False)
    load_LE = g.load_LE.astype(np.float64)
    phy_LP = hub_packing(load_LE, 8, 16)
    plan = Plan(8, 1, 32, meta.layers, phy_LP)  # validates: every expert held, P / G slots per GPU
    H_LEG = plan.holders_LEG
    assert H_LEG.max() == 1  # no GPU holds two copies of one expert
    top2_L2 = np.argsort(-load_LE, axis=1)[:, :2]  # 16 extra copies on 8 GPUs: the two busiest on every GPU
    assert (np.take_along_axis(H_LEG.sum(axis=2), top2_L2, axis=1) == 8).all()
    contiguous = Plan(8, 1, 32, meta.layers, np.tile(np.arange(32), (5, 1)))
    assert imbalance(plan, g)[1] < min(1.05, imbalance(contiguous, g)[1])


def test_relabelling_keeps_every_load_split_and_aligns_the_chain() -> None:
    """Layer 1 holds layer 0's groups under other GPU labels; every token follows expert i to expert i: the
    relabelled plan co-locates every pair, and each GPU's load (on any trace) is a GPU's load of the original."""
    ids_TLK = np.repeat(np.arange(8)[:, None, None], 2, axis=1).repeat(50, axis=0).astype(np.int16)
    from placement.trace.schema import TraceMeta

    meta = TraceMeta("chain", 8, 1, (0, 1))
    g = graph_from_routes(ids_TLK, meta, with_coact=False)
    phy_LP = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [6, 7, 0, 1, 2, 3, 4, 5]])
    before = Plan(4, 1, 8, meta.layers, phy_LP)
    after = Plan(4, 1, 8, meta.layers, relabel_chain(phy_LP, g.trans_LEE.astype(np.float64), 4))
    assert colocation(before, g) == 0.0 and colocation(after, g) == 1.0
    load_before_LG = np.sort(np.einsum("le,leg->lg", g.load_LE, before.holders_LEG), axis=1)
    load_after_LG = np.sort(np.einsum("le,leg->lg", g.load_LE, after.holders_LEG), axis=1)
    assert np.array_equal(load_before_LG, load_after_LG)


def test_relabelling_adds_colocation_on_a_dependent_trace() -> None:
    meta, r = synthetic_trace(6, 32, 4, 8000, follow=0.6, seed=4)
    g = graph_from_routes(r.expert_ids_TLK, meta, with_coact=False)
    packed_LP = hub_packing(g.load_LE.astype(np.float64), 8, 8)
    relabelled_LP = relabel_chain(packed_LP, g.trans_LEE.astype(np.float64), 8, num_nodes=2)
    packed, relabelled = (Plan(8, 2, 32, meta.layers, p) for p in (packed_LP, relabelled_LP))
    assert colocation(relabelled, g) > 1.04 * colocation(packed, g)  # 1.067x measured
    assert imbalance(relabelled, g)[1] == pytest.approx(imbalance(packed, g)[1])


def test_default_is_at_least_as_co_located_as_the_hub_plan_within_eplbs_forecast() -> None:
    """Weakly dependent layers: the hub plan meets eplb's forecast target with more colocation than eplb; the
    default weighs it among its candidates, so its pick forecasts within eplb's and co-locates at least as much
    (the hub plan, or a search plan that beats it when the machine leaves time for the search)."""
    meta, r = synthetic_trace(8, 32, 4, 12000, follow=0.3, skew_sigma=0.7, tokens_per_prompt=20, seed=5)
    g = graph_from_routes(r.expert_ids_TLK, meta, with_coact=False, seq_ids_T=r.seq_ids_T, num_folds=PROMPT_FOLDS)
    spec = PlanSpec(8, 2, 8, time_limit=4.0, auto_balance=True)
    eplb_fc = eplb_reference(g, spec)[2]
    assert eplb_fc is not None
    target = eplb_fc - forecast_optimism(spec, g)
    hub = _hub_candidate(g, spec, target, time.perf_counter() + 60.0)
    assert hub is not None and hub[0].info["hub_copies"] is True
    hub_plan = Plan(8, 2, 32, meta.layers, hub[0].phy2log_LP)
    assert hub_plan.holders_LEG.max() == 1
    assert _p50(hub[1]) <= target
    assert colocation(hub_plan, g) > colocation(make_plan(g, spec, "eplb"), g)
    plan = make_plan(g, spec, "auto")
    assert plan.provenance["unseen_imbalance"]["p50"] <= eplb_fc + 1e-9
    assert colocation(plan, g) >= colocation(hub_plan, g) - 1e-12
    assert plan.holders_LEG.max() == 1


def test_polish_lowers_the_worst_robust_ratio_and_leaves_other_layers_alone() -> None:
    from placement.metrics import load_split
    from placement.solvers.hub_copies import polish_worst_layers
    from placement.solvers.robust import LoadModel

    meta, r = synthetic_trace(6, 32, 4, 12000, follow=0.5, tokens_per_prompt=20, seed=6)
    g = graph_from_routes(r.expert_ids_TLK, meta, with_coact=False, seq_ids_T=r.seq_ids_T, num_folds=PROMPT_FOLDS)
    lm = LoadModel.from_graph(g, kappa=2.0)
    packed_LP = hub_packing(g.load_LE.astype(np.float64), 8, 8)

    def ratio_L(phy_LP: np.ndarray) -> np.ndarray:
        split_LEG = load_split(Plan(8, 1, 32, meta.layers, phy_LP))
        var_LG = np.einsum("leg,lef,lfg->lg", split_LEG, lm.cov_LEE, split_LEG)
        mean_LG = np.einsum("le,leg->lg", lm.share_LE, split_LEG)
        return np.asarray((8 * (mean_LG + 2.0 * np.sqrt(np.maximum(var_LG, 0.0)))).max(axis=1))

    trans = g.trans_LEE.astype(np.float64)
    polished_LP = polish_worst_layers(packed_LP, trans, lm, 8, float("inf"), layers=2)
    Plan(8, 1, 32, meta.layers, polished_LP)  # still a valid plan
    before_L, after_L = ratio_L(packed_LP), ratio_L(polished_LP)
    worst2 = np.argsort(-before_L)[:2]
    assert after_L.max() < before_L.max()
    assert (after_L[worst2] <= before_L[worst2] + 1e-12).all()
    others = np.setdiff1d(np.arange(6), worst2)
    assert np.array_equal(polished_LP[others], packed_LP[others])
    assert Plan(8, 1, 32, meta.layers, polished_LP).holders_LEG.max() == 1
