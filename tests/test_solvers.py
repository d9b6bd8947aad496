"""Baselines, the affinity optimiser and the planner: valid plans, balance kept, affinity beats balancing-only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from placement.graph import graph_from_routes
from placement.metrics import colocation, evaluate, imbalance
from placement.plan import PlanError
from placement.planner import make_plan, topology_cost
from placement.solvers.base import PlanSpec
from placement.solvers.baselines import balanced_packing, eplb_phy2log, replicate_hottest
from placement.trace.schema import split_by_prompt
from placement.trace.synthetic import synthetic_trace


@pytest.fixture(scope="module")
def small_trace():
    meta, r = synthetic_trace(6, 16, 2, 6000, tokens_per_prompt=30, num_preferred=2, num_topics=8, seed=1)
    m = split_by_prompt(r.seq_ids_T, 0.5, seed=0)
    fit = graph_from_routes(r.expert_ids_TLK[m], meta, seq_ids_T=r.seq_ids_T[m])
    test = graph_from_routes(r.expert_ids_TLK[~m], meta)
    return meta, fit, test


def test_balanced_packing_fills_every_pack_equally() -> None:
    rng = np.random.default_rng(0)
    w = rng.random((5, 12))
    pack, rank = balanced_packing(w, 4)
    for x in range(5):
        assert np.bincount(pack[x], minlength=4).tolist() == [3, 3, 3, 3]
        for p in range(4):
            assert sorted(rank[x][pack[x] == p].tolist()) == [0, 1, 2]
    # greedy LPT on identical items splits them evenly
    pack, _ = balanced_packing(np.ones((1, 8)), 4)
    assert np.bincount(pack[0]).tolist() == [2, 2, 2, 2]


def test_replicate_hottest_gives_copies_to_the_heaviest() -> None:
    phy, cnt = replicate_hottest(np.array([[10.0, 1.0, 1.0, 4.0]]), 7)
    # per-copy loads: 10 (copy) -> 5 still heaviest (copy) -> 3.33 < 4 so the third copy goes to expert 3
    assert cnt.tolist() == [[3, 1, 1, 2]]
    assert sorted(phy[0].tolist()) == sorted(np.repeat(np.arange(4), cnt[0]).tolist())


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("redundant", [0, 4])
def test_eplb_plan_is_valid_and_balances(small_trace, nodes: int, redundant: int) -> None:
    _, fit, _ = small_trace
    plan = make_plan(fit, PlanSpec(4, nodes, redundant), "eplb")
    assert plan.num_slots == 16 + redundant
    assert (plan.logcnt >= 1).all()
    contiguous = make_plan(fit, PlanSpec(4, nodes, redundant), "contiguous")
    assert imbalance(plan, fit)[1] <= imbalance(contiguous, fit)[1] + 1e-9


def test_contiguous_and_round_robin_layouts(small_trace) -> None:
    _, fit, _ = small_trace
    c = make_plan(fit, PlanSpec(4), "contiguous")
    assert (c.holders_LEG.argmax(axis=2) == np.arange(16) // 4).all()
    rr = make_plan(fit, PlanSpec(4), "round_robin")
    assert (rr.holders_LEG.argmax(axis=2) == np.arange(16) % 4).all()


def test_eplb_vectorised_large_shape() -> None:
    rng = np.random.default_rng(0)
    load = rng.lognormal(0, 0.5, size=(58, 256))
    phy = eplb_phy2log(load, 288, 32, 4)
    assert phy.shape == (58, 288)
    assert all(set(row.tolist()) == set(range(256)) for row in phy)


@pytest.mark.parametrize("redundant", [0, 4])
def test_affinity_beats_eplb_at_the_balance_asked(small_trace, redundant: int) -> None:
    _, fit, test = small_trace
    eps = 0.1
    spec = PlanSpec(4, 1, redundant, eps, time_limit=3.0, seed=0)
    aff = make_plan(fit, spec, "affinity")
    ep = make_plan(fit, spec, "eplb")
    assert imbalance(aff, fit)[1] <= 1 + eps + 1e-9
    assert colocation(aff, fit) > colocation(ep, fit) + 0.05
    assert colocation(aff, test) > colocation(ep, test) + 0.03
    assert aff.provenance["topology_cost"] == pytest.approx(topology_cost(aff.phy2log, fit, spec))


def test_affinity_two_nodes_keeps_traffic_inside_nodes(small_trace) -> None:
    _, fit, _ = small_trace
    spec = PlanSpec(4, 2, 0, 0.15, time_limit=3.0, inter_node_cost=4.0)
    aff = make_plan(fit, spec, "affinity")
    ep = make_plan(fit, spec, "eplb")
    assert topology_cost(aff.phy2log, fit, spec) < topology_cost(ep.phy2log, fit, spec)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (PlanSpec(3), "split evenly"),
        (PlanSpec(4, 1, 2), "not divisible by --gpus"),
        (PlanSpec(4, 3), "not divisible by --nodes"),
        (PlanSpec(4, time_limit=0), "--time-limit"),
        (PlanSpec(4, balance_eps=-1), "--balance"),
    ],
)
def test_planner_rejects_bad_specs(small_trace, spec: PlanSpec, needle: str) -> None:
    _, fit, _ = small_trace
    with pytest.raises(PlanError, match=needle):
        make_plan(fit, spec, "eplb")


def test_unknown_solver(small_trace) -> None:
    _, fit, _ = small_trace
    with pytest.raises(PlanError, match="unknown solver"):
        make_plan(fit, PlanSpec(4), "magic")


@pytest.mark.slow
def test_affinity_on_deepseek_v2_lite_held_out(traces_dir: Path) -> None:
    from placement.trace.dataset import open_trace

    tr = open_trace(traces_dir / "deepseek-v2-lite-chat.dev.npz")
    r = tr.read_all(with_gates=False)
    m = split_by_prompt(r.seq_ids_T, 0.5, seed=0)
    fit = graph_from_routes(r.expert_ids_TLK[m], tr.meta, False, r.seq_ids_T[m])
    test = graph_from_routes(r.expert_ids_TLK[~m], tr.meta, False)
    plan = make_plan(fit, PlanSpec(8, 1, 0, 0.1, time_limit=10.0), "affinity")
    fit_ev, test_ev = evaluate(plan, fit), evaluate(plan, test)
    assert fit_ev["imbalance_max"] <= 1.1 + 1e-9
    assert test_ev["colocation"] >= 0.28  # contiguous: 0.127, eplb: 0.125
    plan8 = make_plan(fit, PlanSpec(8, 1, 8, 0.03, time_limit=10.0), "affinity")
    assert evaluate(plan8, fit)["imbalance_max"] <= 1.03 + 1e-9
    assert evaluate(plan8, test)["colocation"] >= 0.32


def test_affinity_says_when_the_balance_is_not_reachable(small_trace) -> None:
    _, fit, _ = small_trace
    with pytest.raises(PlanError, match=r"--balance 0 was not reached.*eplb reaches"):
        make_plan(fit, PlanSpec(4, 1, 0, 0.0, time_limit=1.0), "affinity")


@pytest.mark.parametrize("nodes", [1, 3])
def test_capacity_bound_is_below_the_brute_force_optimum(nodes: int) -> None:
    import itertools

    from placement.solvers.base import capacity_lower_bound
    from placement.trace.schema import TraceMeta

    rng = np.random.default_rng(nodes)
    L, E, G = 3, 6, 3
    meta = TraceMeta("t", E, 2, tuple(range(L)))
    g = graph_from_routes(rng.integers(0, E, size=(300, L, 2)).astype(np.int16), meta, with_coact=False)
    spec = PlanSpec(G, nodes, 0, 10.0)
    node_G = np.arange(G) // (G // nodes)
    dist_GG = np.where(np.eye(G, dtype=bool), 0.0, np.where(node_G[:, None] == node_G[None, :], 1.0, 4.0))
    # GPU of each expert for every ordered layout of 6 experts as 3 pairs
    gpus = {tuple(np.argsort(p) // 2) for p in itertools.permutations(range(E))}
    ordered = [np.array(x) for x in sorted(gpus)]
    canonical = [x for x in ordered if list(dict.fromkeys(x.tolist())) == list(range(G))]

    def pair_cost(x_E: np.ndarray, y_E: np.ndarray, trans_EE: np.ndarray) -> float:
        return float((trans_EE * dist_GG[x_E][:, y_E]).sum())

    # GPUs are interchangeable: fix the labels of the middle layer, enumerate the outer ones.
    best = min(
        min(pair_cost(a, b, g.trans_LEE[0]) for a in ordered) + min(pair_cost(b, c, g.trans_LEE[1]) for c in ordered)
        for b in canonical
    )
    lb = capacity_lower_bound(g, spec)
    assert 0 <= lb <= best + 1e-9
    aff = make_plan(g, PlanSpec(G, nodes, 0, 10.0, time_limit=1.0), "affinity")
    assert aff.provenance["bound"] == pytest.approx(lb) and 0 <= aff.provenance["gap"] <= 1
    assert aff.provenance["topology_cost"] >= best - 1e-9


def test_ilp_skips_models_too_large_to_stop_on_time(small_trace) -> None:
    _, fit, _ = small_trace
    spec = PlanSpec(4, 1, 0, 0.5, time_limit=5.0, options={"ilp_max_vars": 10})
    plan = make_plan(fit, spec, "ilp")
    pv = plan.provenance
    assert pv["status"] == "feasible-greedy" and "exact solve skipped" in pv["info"]["note"]
    assert pv["bound"] is not None and pv["bound"] <= pv["objective"]  # capacity bound filled in by the planner
