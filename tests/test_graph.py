"""Routing graph: counts against an independent reference, on real traces and generated edge cases."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from placement.graph import build_graph, graph_from_routes, graph_stats
from placement.trace.dataset import open_trace
from placement.trace.schema import TraceMeta
from tests.conftest import SHARED_SPECS, reference_graph


def _meta(L: int, E: int, K: int) -> TraceMeta:
    return TraceMeta("t", E, K, tuple(range(L)))


@pytest.mark.parametrize(("spec", "T", "K"), SHARED_SPECS)
def test_real_traces_match_reference(traces_dir, spec, T, K):
    trace = open_trace(traces_dir / spec)
    ids_TLK = trace.read_all().expert_ids_TLK
    assert ids_TLK.shape[0] == T and ids_TLK.shape[2] == K
    g = build_graph(trace, batch_tokens=10_000)
    load_LE, trans_LEE = reference_graph(ids_TLK, trace.meta.num_experts)
    np.testing.assert_array_equal(g.load_LE, load_LE)
    np.testing.assert_array_equal(g.trans_LEE, trans_LEE)
    if (ids_TLK >= 0).all():  # deepseek, flame: no -1, and the K ids of a token are distinct
        assert (g.load_LE.sum(axis=1) == T * K).all()
        assert (g.trans_LEE.sum(axis=(1, 2)) == T * K * K).all()
        assert g.coact_LEE is not None
        assert (g.coact_LEE.sum(axis=(1, 2)) == T * K * (K - 1)).all()


def test_top1():
    ids = np.array([[[0], [1], [1]], [[2], [1], [0]]])
    g = graph_from_routes(ids, _meta(3, 3, 1))
    np.testing.assert_array_equal(g.load_LE, [[1, 0, 1], [0, 2, 0], [1, 1, 0]])
    assert g.trans_LEE[0, 0, 1] == 1 and g.trans_LEE[0, 2, 1] == 1 and g.trans_LEE[0].sum() == 2
    assert g.trans_LEE[1, 1, 1] == 1 and g.trans_LEE[1, 1, 0] == 1
    assert g.coact_LEE is not None and g.coact_LEE.sum() == 0


def test_repeated_ids_count_once():
    ids = np.array([[[2, 2, 1], [0, 0, 0]]])
    g = graph_from_routes(ids, _meta(2, 4, 3))
    np.testing.assert_array_equal(g.load_LE, [[0, 1, 1, 0], [1, 0, 0, 0]])
    assert g.trans_LEE.sum() == 2 and g.trans_LEE[0, 2, 0] == 1 and g.trans_LEE[0, 1, 0] == 1
    assert g.coact_LEE is not None and g.coact_LEE[0, 1, 2] == 1 and g.coact_LEE[0, 2, 1] == 1


def test_negative_ids_skipped():
    ids = np.array([[[-1, 3], [-1, -1]], [[1, 0], [2, -1]]])
    g = graph_from_routes(ids, _meta(2, 4, 2))
    load, trans = reference_graph(ids, 4)
    np.testing.assert_array_equal(g.load_LE, load)
    np.testing.assert_array_equal(g.trans_LEE, trans)
    assert g.load_LE.sum() == 4 and g.trans_LEE.sum() == 2


def test_single_token_and_one_layer():
    g = graph_from_routes(np.array([[[0, 1]]]), _meta(1, 2, 2))
    assert g.num_tokens == 1 and g.trans_LEE.shape == (0, 2, 2)
    np.testing.assert_array_equal(g.load_LE, [[1, 1]])
    s = graph_stats(g)
    assert s["load_sum"] == [2] and s["trans_sum"] == [] and s["load_skew"] == [1.0]


def test_random_matches_reference_and_batching_is_invisible():
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 16, size=(3000, 5, 4))
    meta = _meta(5, 16, 4)
    g = graph_from_routes(ids, meta)
    load, trans = reference_graph(ids, 16)
    np.testing.assert_array_equal(g.load_LE, load)
    np.testing.assert_array_equal(g.trans_LEE, trans)
    from placement.trace.dataset import ArrayTrace
    from placement.trace.schema import RouteArrays

    routes = RouteArrays(ids.astype(np.int16), np.zeros(3000, np.int64), np.arange(3000, dtype=np.int32))
    g2 = build_graph(ArrayTrace(None, meta, routes), batch_tokens=7)  # type: ignore[arg-type]
    np.testing.assert_array_equal(g2.trans_LEE, g.trans_LEE)


def test_keep_top_pairs_and_networkx(tmp_path):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 8, size=(500, 3, 2))
    g = graph_from_routes(ids, _meta(3, 8, 2))
    kept = g.keep_top_pairs(2)
    assert ((kept.trans_LEE > 0).sum(axis=2) <= 2).all()
    np.testing.assert_array_equal(np.sort(kept.trans_LEE, axis=2)[:, :, -2:], np.sort(g.trans_LEE, axis=2)[:, :, -2:])
    dg = g.to_networkx()
    assert dg.number_of_nodes() == 24
    assert sum(w for _, _, w in dg.edges(data="weight")) == g.trans_LEE.sum()
    assert dg.nodes[(1, 3)]["load"] == g.load_LE[1, 3]
    path = tmp_path / "g.graphml"
    g.write_graphml(path, min_weight=5)
    back = nx.read_graphml(path)
    assert back.number_of_edges() == int((g.trans_LEE >= 5).sum())


def test_count_loads_matches_the_graph_build():
    """The importers' loads-only counter and the graph kernel count the same tokens (METRICS.md rules)."""
    from placement.graph import graph_from_routes
    from placement.trace.importers.popularity import count_loads
    from placement.trace.synthetic import synthetic_trace

    meta, routes = synthetic_trace(3, 16, 4, 500, seed=3)
    ids = routes.expert_ids_TLK.copy()
    ids[::7, 1, 0] = -1  # not recorded
    ids[::5, 2, 1] = ids[::5, 2, 0]  # a repeated id counts once
    assert np.array_equal(count_loads(ids, 16), graph_from_routes(ids, meta).load_LE)
