"""A work budget makes the affinity search repeat (placement/solvers/affinity.py): a fixed number of annealing moves
and restarts instead of all the time left, so the same inputs give the same plan; the re-planner's target uses one,
so the service decides the same for the same traffic (placement/replan/solve.py), and ``moeplace plan --work``
gives the same plan file twice."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from placement.graph import PROMPT_FOLDS, RoutingGraph, graph_from_routes
from placement.plan import Plan, PlanError
from placement.replan import decide
from placement.replan.solve import TARGET_ANNEAL_MOVES
from placement.solvers.affinity import anneal_until, colocated, solve_fixed, work_budget
from placement.solvers.anneal import neighbour_weights
from placement.solvers.base import PlanSpec
from placement.trace.dataset import write_trace
from placement.trace.synthetic import synthetic_trace


def _start(L: int, E: int, G: int) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:
    rng = np.random.default_rng(0)
    bin_LE = np.stack([rng.permutation(np.arange(E) % G) for _ in range(L)]).astype(np.int64)
    trans_XEE = rng.random((L - 1, E, E)) ** 4
    model = (np.full((L, E), 1.0 / E), np.zeros((L, 1, 1)), 0.0, 1.0 + 1e-9, np.zeros(G, dtype=np.int64), 0.0)
    return bin_LE, trans_XEE, model


def test_annealing_with_a_work_budget_does_exactly_its_moves_and_repeats() -> None:
    L, E, G = 10, 64, 8
    start, trans, model = _start(L, E, G)
    spec = PlanSpec(G, options=work_budget(300_001))
    runs = []
    for _ in range(2):
        bin_LE = start.copy()
        done = anneal_until(bin_LE, neighbour_weights(bin_LE, trans, G), trans, model, time.perf_counter() + 60,
                            1.0, 0, spec)  # fmt: skip
        assert done == 300_001  # the budget, not the time: the remainder goes to the last chunk
        runs.append(bin_LE)
    assert np.array_equal(runs[0], runs[1])
    assert colocated(runs[0], trans) > colocated(start, trans)
    late = start.copy()  # the deadline still stops it
    past = time.perf_counter() - 1
    assert anneal_until(late, neighbour_weights(late, trans, G), trans, model, past, 1.0, 0, spec) == 0
    assert np.array_equal(late, start)


def test_work_budget_rejects_bad_values_and_zero_means_the_time() -> None:
    assert work_budget(0) == {}
    assert work_budget(5, restarts=3) == {"restarts": 3, "anneal_moves": 5}
    for moves, restarts in ((-1, 1), (10, 0), (10, 32)):
        with pytest.raises(PlanError, match="work budget"):
            work_budget(moves, restarts)


@pytest.fixture(scope="module")
def graph() -> RoutingGraph:
    meta, r = synthetic_trace(8, 32, 2, 6000, num_topics=8, tokens_per_prompt=40, seed=5)
    return graph_from_routes(r.expert_ids_TLK, meta, False, r.seq_ids_T, PROMPT_FOLDS)


def test_an_affinity_solve_with_a_work_budget_repeats(graph: RoutingGraph) -> None:
    spec = PlanSpec(4, balance_eps=0.1, options={"kappa": 1.0, **work_budget(200_000, restarts=2)})
    runs = [solve_fixed(graph, spec, time.perf_counter() + 60) for _ in range(2)]
    assert [r.info["anneal_iters"] for r in runs] == [200_000, 200_000]
    assert [r.info["gpu_restarts"] for r in runs] == [2, 2]
    assert np.array_equal(runs[0].phy2log_LP, runs[1].phy2log_LP)


def test_decide_repeats_on_the_same_traffic(graph: RoutingGraph) -> None:
    L, E = graph.load_LE.shape
    rng = np.random.default_rng(1)
    current = Plan(4, 1, E, graph.meta.layers, np.stack([rng.permutation(E) for _ in range(L)]))
    a, b = (decide(current, graph, time_limit=20.0, budget=40, method="target") for _ in range(2))
    assert a.info["target_anneal_moves"] == TARGET_ANNEAL_MOVES  # the target's work: its budget, not the time
    assert a.after["target_anneal_moves"] == TARGET_ANNEAL_MOVES  # reported with the decision
    assert a.changed and a.reason == b.reason
    assert np.array_equal(a.plan.phy2log, b.plan.phy2log)


def test_plan_with_work_writes_the_same_plan_twice(cli: Any, tmp_path: Path) -> None:
    meta, r = synthetic_trace(6, 16, 2, 3000, num_topics=6, tokens_per_prompt=30, seed=2)
    write_trace(tmp_path / "trace", meta, r)
    outs = []
    for i in range(2):
        out = tmp_path / f"plan{i}.json"
        code, _, err = cli("plan", "--trace", tmp_path / "trace", "--gpus", 4, "--work", 100_000,
                           "--time-limit", 60, "--out", out)  # fmt: skip
        assert code == 0, err
        plan = json.loads(out.read_text())
        assert plan["provenance"]["info"]["anneal_iters"] == 100_000  # the budget, not 60 s of annealing
        outs.append(plan["phy2log"])
    assert outs[0] == outs[1]
    code, _, err = cli("plan", "--trace", tmp_path / "trace", "--gpus", 4, "--work", -1, "--out", tmp_path / "x.json")
    assert code != 0 and "--work" in err and not (tmp_path / "x.json").exists()


def test_a_decision_that_keeps_the_plan_still_reports_its_targets_work(graph: RoutingGraph) -> None:
    L, E = graph.load_LE.shape
    rng = np.random.default_rng(2)
    current = Plan(4, 1, E, graph.meta.layers, np.stack([rng.permutation(E) for _ in range(L)]))
    res = decide(current, graph, time_limit=20.0, budget=40, min_imbalance_gain=9.0, colocation_per_move=9.0,
                 method="target")  # fmt: skip
    assert not res.changed and res.reason.startswith("kept the current plan")
    assert res.after["target_anneal_moves"] == TARGET_ANNEAL_MOVES
