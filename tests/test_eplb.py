"""EPLB: hand-checked cases, equality with DeepSeek's reference eplb.py on pinned outputs, and the METRICS.md
reference figures of the contiguous baseline on the real DeepSeek-V2-Lite trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from placement.graph import graph_from_routes
from placement.metrics import evaluate, imbalance
from placement.plan import Plan
from placement.planner import make_plan
from placement.solvers.base import PlanSpec
from placement.solvers.baselines import eplb_phy2log
from placement.trace.schema import TraceMeta

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek_eplb.json"


def _graph(counts_E: list[int], num_layers: int = 2):
    """A top-1 trace whose every layer routes counts_E[e] tokens to expert e."""
    ids_T = np.repeat(np.arange(len(counts_E)), counts_E)
    ids_TLK = np.repeat(ids_T[:, None, None], num_layers, axis=1).astype(np.int16)
    return graph_from_routes(ids_TLK, TraceMeta("t", len(counts_E), 1, tuple(range(num_layers))))


# ------------------------------------------------------------------------------------------ hand-checked


def test_replicas_are_packed_at_their_split_load() -> None:
    # loads [8, 3, 3, 2], P = 6, G = 2. Both redundant slots go to expert 0 (8 -> 4 -> 2.67 per copy, still >= 3
    # at the second pick: 4 > 3). Per-slot loads [2.67, 3, 3, 2, 2.67, 2.67], heaviest first into the lighter GPU:
    # GPU 0 = slots {1, 0, 5} -> experts [1, 0, 0] = 8.33, GPU 1 = {2, 4, 3} -> [2, 0, 3] = 7.67.
    phy = eplb_phy2log(np.array([[8.0, 3.0, 3.0, 2.0]]), 6, 2, 1)
    assert phy.tolist() == [[1, 0, 0, 2, 0, 3]]
    plan = make_plan(_graph([8, 3, 3, 2]), PlanSpec(2, 1, 2), "eplb")
    assert plan.phy2log.tolist() == [[1, 0, 0, 2, 0, 3]] * 2
    # METRICS.md load: expert 0 is on both GPUs, 4 each; GPU 0 = 4 + 3, GPU 1 = 4 + 3 + 2 -> 9 / 8. Packing the
    # copies at the full load 8 would give GPU 0 = [0, 0, 3], GPU 1 = [0, 1, 2]: 10 / 8.
    assert imbalance(plan, _graph([8, 3, 3, 2]))[1] == pytest.approx(9 / 8)


def test_experts_packed_onto_nodes_then_gpus() -> None:
    # loads [5, 4, 3, 1], 2 nodes of 1 GPU: 5 -> node 0, 4 -> node 1, 3 -> node 1 (4 < 5), 1 -> node 0 (full),
    # inside a node heaviest first: node 0 = [0, 3], node 1 = [1, 2].
    assert eplb_phy2log(np.array([[5.0, 4.0, 3.0, 1.0]]), 4, 2, 2).tolist() == [[0, 3, 1, 2]]
    plan = make_plan(_graph([5, 4, 3, 1]), PlanSpec(2, 2, 0), "eplb")
    assert plan.phy2log.tolist() == [[0, 3, 1, 2]] * 2


def test_one_expert_per_gpu_keeps_the_order_deepseek_keeps() -> None:
    # P/G = 1 (and E/N = 1): DeepSeek's balanced_packing puts item i in pack i instead of sorting by load
    assert eplb_phy2log(np.array([[1.0, 9.0, 3.0, 7.0]]), 4, 4, 1).tolist() == [[1, 3, 2, 0]]
    assert eplb_phy2log(np.array([[1.0, 9.0, 3.0, 7.0]]), 8, 8, 4).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]


def test_eplb_balances_where_contiguous_does_not() -> None:
    g = _graph([10, 10, 1, 1, 1, 1, 1, 1])
    ep = make_plan(g, PlanSpec(4), "eplb")
    contiguous = make_plan(g, PlanSpec(4), "contiguous")
    # contiguous puts the two hot experts on GPU 0: 20 / 6.5; EPLB spreads them: 11 / 6.5
    assert imbalance(contiguous, g)[1] == pytest.approx(20 / 6.5)
    assert imbalance(ep, g)[1] == pytest.approx(11 / 6.5)


# --------------------------------------------------------------------------------- DeepSeek's reference


def _reference_cases() -> list[dict]:
    return json.loads(FIXTURE.read_text())["cases"]


def test_fixture_names_its_source() -> None:
    d = json.loads(FIXTURE.read_text())
    assert d["source"].startswith("https://github.com/deepseek-ai/EPLB/blob/") and d["source"].endswith("eplb.py")


@pytest.mark.parametrize("case", _reference_cases(), ids=lambda c: c["name"])
def test_eplb_equals_deepseek_reference(case: dict) -> None:
    """phy2log and logcnt equal deepseek-ai/EPLB's; log2phy lists the same slots (ours in slot order, the
    reference in replica-rank order)."""
    load_LE = np.asarray(case["load"], dtype=np.float64)
    L, E = load_LE.shape
    phy = eplb_phy2log(load_LE, case["num_slots"], case["num_gpus"], case["num_nodes"])
    assert phy.tolist() == case["phy2log"]
    plan = Plan(case["num_gpus"], case["num_nodes"], E, tuple(range(L)), phy)
    assert plan.logcnt.tolist() == case["logcnt"]
    ref_LER = np.asarray(case["log2phy"])
    ours_LER = plan.log2phy
    assert ours_LER.shape == ref_LER.shape
    for l in range(L):
        for e in range(E):
            assert sorted(ours_LER[l, e][ours_LER[l, e] >= 0].tolist()) == sorted(
                ref_LER[l, e][ref_LER[l, e] >= 0].tolist()
            )


def test_solve_eplb_uses_the_reference_algorithm() -> None:
    case = next(c for c in _reference_cases() if c["name"] == "skewed_one_node")
    load_LE = np.asarray(case["load"])
    L, E = load_LE.shape
    ids = [np.repeat(np.arange(E), load_LE[l]) for l in range(L)]
    T = len(ids[0])
    assert all(len(x) == T for x in ids)  # every layer routes the same number of tokens, one expert each
    rng = np.random.default_rng(0)
    ids_TLK = np.stack([rng.permutation(x) for x in ids], axis=1)[:, :, None].astype(np.int16)
    g = graph_from_routes(ids_TLK, TraceMeta("t", E, 1, tuple(range(L))))
    spec = PlanSpec(case["num_gpus"], case["num_nodes"], case["num_slots"] - E)
    assert make_plan(g, spec, "eplb").phy2log.tolist() == case["phy2log"]


# ------------------------------------------------------------------------ METRICS.md reference figures


@pytest.mark.slow
def test_metrics_reference_figures_of_contiguous_on_deepseek_v2_lite(traces_dir: Path) -> None:
    """../shared/METRICS.md: contiguous (expert e on GPU e // 8), G = 8, all 26 layers: colocation 0.127,
    imbalance_max about 1.26."""
    from placement.trace.dataset import open_trace

    tr = open_trace(traces_dir / "deepseek-v2-lite-chat.dev.npz")
    g = graph_from_routes(tr.read_all(with_gates=False).expert_ids_TLK, tr.meta, False)
    assert g.num_layers == 26 and g.num_experts == 64
    plan = make_plan(g, PlanSpec(8), "contiguous")
    assert (plan.holders_LEG.argmax(axis=2) == np.arange(64) // 8).all()
    ev = evaluate(plan, g)
    assert round(ev["colocation"], 3) == 0.127
    assert ev["imbalance_max"] == pytest.approx(1.26, abs=0.02)
