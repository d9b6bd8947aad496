"""Plans (validation, derived maps, JSON) and the evaluator against an independent per-token computation of
../shared/METRICS.md (plain Python loops over sets, on small cases)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from placement.graph import graph_from_routes
from placement.metrics import Topology, colocation, evaluate, imbalance, traffic
from placement.plan import Plan, PlanError
from placement.trace.schema import RouteArrays, TraceMeta


def _plan(phy2log: list[list[int]], G: int, N: int = 1, E: int | None = None) -> Plan:
    arr = np.asarray(phy2log)
    E = E if E is not None else int(arr.max()) + 1
    return Plan(G, N, E, tuple(range(arr.shape[0])), arr)


def _routes(ids: list[list[list[int]]]) -> RouteArrays:
    a = np.asarray(ids, dtype=np.int16)
    return RouteArrays(a, np.arange(a.shape[0], dtype=np.int64), np.zeros(a.shape[0], np.int32))


def metrics_by_definition(plan: Plan, ids_TLK: np.ndarray) -> tuple[float, list[float]]:
    """METRICS.md verbatim: sets S_l(t), holders H_l(e), colocation and per-layer imbalance."""
    T, L, _ = ids_TLK.shape
    P = plan.num_slots
    per = P // plan.num_gpus
    H = [
        {e: {p // per for p in range(P) if plan.phy2log[l, p] == e} for e in range(plan.num_experts)} for l in range(L)
    ]
    S = [[{int(e) for e in ids_TLK[t, l] if e >= 0} for l in range(L)] for t in range(T)]
    num = den = 0
    for t in range(T):
        for l in range(L - 1):
            for i, j in itertools.product(S[t][l], S[t][l + 1]):
                num += bool(H[l][i] & H[l + 1][j])
                den += 1
    imb = []
    for l in range(L):
        load = [0.0] * plan.num_gpus
        for t in range(T):
            for e in S[t][l]:
                for g in H[l][e]:
                    load[g] += 1.0 / len(H[l][e])
        mean = sum(load) / len(load)
        imb.append(max(load) / mean if mean else 1.0)
    return num / den, imb


def test_plan_derived_maps_round_trip() -> None:
    p = _plan([[0, 1, 2, 3, 0, 2], [3, 2, 1, 0, 1, 1]], G=3)
    assert p.num_slots == 6 and p.slots_per_gpu == 2
    assert p.logcnt.tolist() == [[2, 1, 2, 1], [1, 3, 1, 1]]
    # log2phy inverts phy2log: every listed slot maps back to its expert, padding is -1.
    for l in range(2):
        for e in range(4):
            slots = [s for s in p.log2phy[l, e] if s >= 0]
            assert sorted(slots) == [s for s in range(6) if p.phy2log[l, s] == e]
    assert p.holders_LEG[1, 1].tolist() == [0, 1, 2]
    q = Plan.from_json(p.to_json())
    assert np.array_equal(q.phy2log, p.phy2log) and q == p
    d = json.loads(p.to_json())
    for key in ("num_gpus", "num_nodes", "num_experts", "layers", "phy2log"):
        assert key in d


@pytest.mark.parametrize(
    ("phy2log", "G", "N", "needle"),
    [
        ([[0, 1, 2]], 2, 1, "P=3 slots per layer, fewer than num_experts=4"),
        ([[0, 1, 2, 3, 0]], 2, 1, "P=5 slots per layer, not divisible by num_gpus=2"),
        ([[1, 1, 2, 3]], 2, 1, "no slot for expert 0"),
        ([[0, 1, 2, 3]], 4, 3, "not divisible by num_nodes"),
        ([[0, 1, 2, 9]], 2, 1, "phy2log[0, 3] = 9: expert ids must be in 0..3"),
        ([[0, 1, 2, 3], [0, 1, 2, -1]], 2, 1, "phy2log[1, 3] = -1: expert ids must be in 0..3"),
    ],
)
def test_plan_validation(phy2log: list[list[int]], G: int, N: int, needle: str) -> None:
    layers = tuple(range(len(phy2log)))
    with pytest.raises(PlanError) as exc:
        Plan(G, N, 4, layers, np.asarray(phy2log))
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    # the JSON loader refuses the same plan with the same one line, naming the file
    text = json.dumps({"num_gpus": G, "num_nodes": N, "num_experts": 4, "layers": list(layers), "phy2log": phy2log})
    with pytest.raises(PlanError) as exc:
        Plan.from_json(text, where="p.json")
    assert str(exc.value).startswith("p.json: ") and needle in str(exc.value)


@pytest.mark.parametrize(
    ("phy2log", "G"),
    [([[0, 1, 2, 3, 0]], 2), ([[0, 1, 2, -1]], 2)],
)
def test_cli_refuses_bad_plan_at_load_with_one_line(cli, tmp_path, phy2log: list[list[int]], G: int) -> None:
    """P % G != 0 (once an IndexError deep in the evaluator) and a negative id (once silently expert E-1)."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"num_gpus": G, "num_nodes": 1, "num_experts": 4, "layers": [0], "phy2log": phy2log}))
    code, out, err = cli("export", "--plan", path, "--format", "deepseek", "--out", tmp_path / "x.pt")
    assert code != 0 and not (tmp_path / "x.pt").exists()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "phy2log" in lines[0], lines


def test_plan_from_bad_json() -> None:
    with pytest.raises(PlanError, match="not JSON"):
        Plan.from_json("{nope")
    with pytest.raises(PlanError, match="missing field 'phy2log'"):
        Plan.from_json(json.dumps({"num_gpus": 2, "num_nodes": 1, "num_experts": 2, "layers": [0]}))


def test_metrics_hand_checked_case() -> None:
    # 2 layers, 4 experts, 2 GPUs. Layer 0: GPU0 {0,1}, GPU1 {2,3}; layer 1: GPU0 {0,2}, GPU1 {1,3}.
    plan = _plan([[0, 1, 2, 3], [0, 2, 1, 3]], G=2)
    r = _routes([[[0, 1], [0, 2]], [[2, 3], [3, 1]], [[0, 0], [1, -1]]])
    meta = TraceMeta("t", 4, 2, (0, 1))
    g = graph_from_routes(r.expert_ids_TLK, meta)
    # token 0: pairs (0,0)y (0,2)y (1,0)y (1,2)y; token 1: (2,3)y (2,1)y (3,3)y (3,1)y; token 2: (0,1) n
    assert colocation(plan, g) == pytest.approx(8 / 9)
    imb_L, imb_max, _ = imbalance(plan, g)
    # layer 0 loads: GPU0 = {0,1,0} -> 3, GPU1 = {2,3} -> 2; layer 1: GPU0 = {0,2} -> 2, GPU1 = {3,1,1} -> 3
    assert imb_L.tolist() == pytest.approx([3 / 2.5, 3 / 2.5])
    assert imb_max == pytest.approx(1.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_definition_with_replicas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    T, L, K, E, G = 40, 3, 3, 6, 3
    ids = rng.integers(-1, E, size=(T, L, K))
    phy = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, 3)])) for _ in range(L)])
    plan = Plan(G, 1, E, tuple(range(L)), phy)
    meta = TraceMeta("t", E, K, tuple(range(L)))
    g = graph_from_routes(ids.astype(np.int16), meta)
    want_col, want_imb = metrics_by_definition(plan, ids)
    assert colocation(plan, g) == pytest.approx(want_col)
    assert imbalance(plan, g)[0].tolist() == pytest.approx(want_imb)


def traffic_by_definition(plan: Plan, ids_TLK: np.ndarray, mode: str) -> np.ndarray:
    """The home / follow models of placement/metrics.py, one token at a time."""
    T, L, _ = ids_TLK.shape
    G, per = plan.num_gpus, plan.slots_per_gpu
    node = [g // plan.gpus_per_node for g in range(G)]
    out = np.zeros((L, 2, G, G), dtype=np.int64)
    for t in range(T):
        at = t % G
        for l in range(L):
            dest = set()
            chosen: dict[int, int] = {}
            for e in [int(x) for x in ids_TLK[t, l] if x >= 0]:
                holders = sorted({p // per for p in range(plan.num_slots) if plan.phy2log[l, p] == e})
                cands = [at] if at in holders else [h for h in holders if node[h] == node[at]] or holders
                chosen.setdefault(e, cands[t % len(cands)])
                dest.add(chosen[e])
            first = next((int(x) for x in ids_TLK[t, l] if x >= 0), None)
            new = at if mode == "home" or first is None else chosen[first]
            for g in dest:
                if g != at:
                    out[l, 0, at, g] += 1
                if g != new:
                    out[l, 1, g, new] += 1
            at = new
    return out


@pytest.mark.parametrize("mode", ["home", "follow"])
@pytest.mark.parametrize("nodes", [1, 2])
def test_traffic_equals_definition(mode: str, nodes: int) -> None:
    rng = np.random.default_rng(7)
    T, L, K, E, G = 50, 3, 2, 8, 4
    ids = rng.integers(-1, E, size=(T, L, K))
    phy = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, 4)])) for _ in range(L)])
    plan = Plan(G, nodes, E, tuple(range(L)), phy)
    got = traffic(plan, _routes(ids.tolist()), mode)
    assert np.array_equal(got, traffic_by_definition(plan, ids, mode))


def test_evaluate_reports_bytes_and_time() -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 8, size=(64, 4, 2))
    meta = TraceMeta("t", 8, 2, tuple(range(4)))
    plan = Plan(4, 2, 8, meta.layers, np.tile(np.arange(8), (4, 1)))
    r = _routes(ids.tolist())
    res = evaluate(plan, graph_from_routes(r.expert_ids_TLK, meta), r, Topology(token_bytes=10))
    for mode in ("home", "follow"):
        m = res[mode]
        assert m["bytes_total"] == m["bytes_intra_node"] + m["bytes_inter_node"]
        assert m["bytes_total"] == int(traffic(plan, r, mode).sum()) * 10
        assert len(m["alltoall_seconds_per_layer"]) == 4 and m["alltoall_seconds_total"] > 0


def test_evaluate_refuses_other_model() -> None:
    meta = TraceMeta("t", 8, 2, (0, 1))
    g = graph_from_routes(np.zeros((1, 2, 2), np.int16), meta)
    plan = Plan(2, 1, 4, (0, 1), np.tile(np.arange(4), (2, 1)))
    with pytest.raises(PlanError, match="same model"):
        evaluate(plan, g)
