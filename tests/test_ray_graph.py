"""The routing graph built as Ray tasks over a trace's shards (ray_jobs/graph.py) equals the single-process build
exactly: loads, transitions, co-activation and prompt-fold loads, for any split of the shards, on a synthetic
multi-shard dataset and on the real DeepSeek trace; ``moeplace stats --ray`` and ``plan --ray`` give what the
single-process commands give. Ray tests start an embedded local Ray (2 CPUs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from placement.graph import PROMPT_FOLDS, RoutingGraph, build_graph
from placement.plan import Plan
from placement.trace.dataset import ArrayTrace, ParquetTrace, TraceWriter, open_trace
from placement.trace.synthetic import synthetic_trace
from ray_jobs.driver import JobConfig, RayJobError
from ray_jobs.graph import build_graph_ray, split_trace, sum_graphs
from tests.conftest import Cli, reference_graph

ray_slow = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic trace (5 layers x 16 experts, top-3, 6,000 tokens) in shards of unequal size, two writers."""
    meta, routes = synthetic_trace(5, 16, 3, 6000, tokens_per_prompt=40, seed=4)
    routes.expert_ids_TLK[7, 2, 1] = -1  # an unrecorded id
    out = tmp_path_factory.mktemp("ds") / "trace"
    cut = 3600
    with TraceWriter(out, meta, "a", max_rows_buffered=5 * 700) as w:
        for a in range(0, cut, 700):
            b = min(a + 700, cut)
            w.write(routes.expert_ids_TLK[a:b], routes.seq_ids_T[a:b], routes.token_pos_T[a:b])
    with TraceWriter(out, meta, "b", max_rows_buffered=5 * 2400) as w:
        w.write(routes.expert_ids_TLK[cut:], routes.seq_ids_T[cut:], routes.token_pos_T[cut:])
    return out


def assert_same(got: RoutingGraph, want: RoutingGraph) -> None:
    assert got.num_tokens == want.num_tokens and got.meta == want.meta
    for name in ("load_LE", "trans_LEE", "coact_LEE", "fold_load_SLE"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_split_covers_every_shard_once(dataset: Path) -> None:
    trace = open_trace(dataset)
    assert isinstance(trace, ParquetTrace) and len(trace.shards) == 7
    for n in (1, 2, 3, 7, 50):
        parts = split_trace(trace, n)
        shards = [s for p in parts for s in p.shards]  # type: ignore[union-attr]
        assert len(parts) == min(n, 7) and sorted(shards) == sorted(trace.shards)
        assert sum(p.num_tokens for p in parts) == trace.num_tokens
    rows = [p.num_tokens for p in split_trace(trace, 2)]
    assert sorted(rows) == [2900, 3100]  # largest first into the lightest: 2,400 + 700 vs 5 x 500 + 400 (LPT)


def test_sum_of_parts_equals_whole_without_ray(dataset: Path) -> None:
    """The reduction alone (no Ray): any split, counted part by part and summed, is the whole graph."""
    trace = open_trace(dataset)
    whole = build_graph(trace, with_coact=True, num_folds=PROMPT_FOLDS)
    load_LE, trans_LEE = reference_graph(trace.read_all().expert_ids_TLK, 16)
    assert np.array_equal(whole.load_LE, load_LE) and np.array_equal(whole.trans_LEE, trans_LEE)
    for n in (2, 5):
        parts = [build_graph(p, with_coact=True, num_folds=PROMPT_FOLDS) for p in split_trace(trace, n)]
        assert_same(sum_graphs(parts), whole)
    arr = ArrayTrace(trace.path, trace.meta, trace.read_all())
    parts = [build_graph(p, num_folds=PROMPT_FOLDS) for p in split_trace(arr, 3)]
    assert_same(sum_graphs(parts), build_graph(arr, num_folds=PROMPT_FOLDS))
    no_folds = [build_graph(p) for p in split_trace(trace, 2)]
    assert sum_graphs(no_folds).fold_load_SLE is None
    with pytest.raises(RayJobError, match="no graph parts"):
        sum_graphs([])


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One embedded local Ray (2 CPUs) for the module's tests that share a connection."""
    import ray

    from ray_jobs.driver import connect

    connect(JobConfig(out=tmp_path_factory.mktemp("unused")))
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_build_starts_and_stops_its_own_ray(dataset: Path) -> None:
    import ray

    assert not ray.is_initialized()
    seen: list[int] = []
    got = build_graph_ray(dataset, num_workers=2, num_folds=PROMPT_FOLDS, on_progress=seen.append)
    assert not ray.is_initialized()
    assert_same(got, build_graph(open_trace(dataset), num_folds=PROMPT_FOLDS))
    assert sum(seen) == 6000 and len(seen) == 4


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("num_tasks", [1, 3, 7])
def test_ray_build_equals_single_process(dataset: Path, local_ray: None, num_tasks: int) -> None:
    trace = open_trace(dataset)
    want = build_graph(trace, with_coact=True, num_folds=PROMPT_FOLDS)
    got = build_graph_ray(dataset, num_workers=2, num_tasks=num_tasks, with_coact=True, num_folds=PROMPT_FOLDS)
    assert_same(got, want)
    top = build_graph_ray(trace, num_workers=1, with_coact=False, keep_top=3)
    assert_same(top, build_graph(trace, with_coact=False, keep_top=3))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_build_of_an_npz_and_bad_input(tmp_path: Path, dataset: Path, local_ray: None) -> None:
    routes = open_trace(dataset).read_all()
    npz = tmp_path / "t.npz"
    np.savez(npz, routes=routes.expert_ids_TLK, num_experts=16)
    got = build_graph_ray(str(npz), num_workers=2)
    assert_same(got, build_graph(open_trace(npz)))
    with pytest.raises(RayJobError, match="must be >= 1"):
        build_graph_ray(dataset, num_workers=0)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_build_of_the_deepseek_trace_in_parquet(traces_dir: Path, tmp_path: Path, local_ray: None) -> None:
    """The real DeepSeek-V2-Lite trace (94,165 tokens, 26 layers x 64 experts, top-6) imported into Parquet in
    four shards: the Ray build equals the single-process build, fold loads and co-activation included."""
    src = open_trace(traces_dir / "deepseek-v2-lite-chat.dev.npz")
    routes = src.read_all(with_gates=False)
    T = routes.num_tokens
    with TraceWriter(tmp_path / "ds", src.meta, "imp") as w:
        for a in range(0, T, T // 4 + 1):
            part = routes.take(np.arange(a, min(a + T // 4 + 1, T)))
            w.write(part.expert_ids_TLK, part.seq_ids_T, part.token_pos_T)
            w.flush()
    trace = open_trace(tmp_path / "ds")
    assert isinstance(trace, ParquetTrace) and len(trace.shards) == 4
    got = build_graph_ray(trace, num_workers=2, num_folds=PROMPT_FOLDS)
    assert_same(got, build_graph(trace, num_folds=PROMPT_FOLDS))
    assert got.num_tokens == T == 94165


@pytest.mark.ray
@pytest.mark.slow
def test_cli_stats_and_plan_with_ray(dataset: Path, tmp_path: Path, cli: Cli, local_ray: None) -> None:
    code, plain, err = cli("stats", dataset, "--json")
    assert code == 0, err
    code, with_ray, err = cli("stats", dataset, "--json", "--ray", "--workers", "2")
    assert code == 0, err
    assert json.loads(with_ray) == json.loads(plain)
    p1, p2 = tmp_path / "p1.json", tmp_path / "p2.json"
    base = ["plan", "--trace", dataset, "--gpus", 4, "--solver", "eplb", "--balance", "0.1"]
    assert cli(*base, "--out", p1)[0] == 0
    code, _, err = cli(*base, "--out", p2, "--ray", "--workers", "2")
    assert code == 0, err
    a, b = Plan.load(p1), Plan.load(p2)
    assert np.array_equal(a.phy2log, b.phy2log)
    assert a.provenance["unseen_imbalance"] == b.provenance["unseen_imbalance"]
    code, _, err = cli(*base, "--out", tmp_path / "p3.json", "--ray", "--prompts", "train")
    assert code == 1 and "--ray" in err and err.count("\n") == 1, err
    # replan --ray scores the deployed plan on the same graph as the single-process build
    runs = []
    for i, extra in enumerate(([], ["--ray", "--workers", "2"])):
        args = ["replan", "--current", p1, "--trace", dataset, "--out", tmp_path / f"r{i}.json", "--max-moves", 0]
        code, out, err = cli(*args, "--json", *extra)
        assert code == 0, err
        runs.append(json.loads(out))
    assert runs[0]["before"] == runs[1]["before"] and runs[0]["before"]["colocation"] > 0
