"""Parquet trace datasets: round trip, other readers, concurrent and resumed writers, damaged input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from placement.trace.dataset import TraceWriter, open_trace, write_trace
from placement.trace.schema import RouteArrays, TraceError, TraceMeta

META = TraceMeta("toy", 16, 3, (1, 2, 5), source="test")


def _routes(T: int, seed: int = 0, gates: bool = True) -> RouteArrays:
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, 16, size=(T, 3, 3)).astype(np.int16)
    g = rng.random((T, 3, 3)).astype(np.float32) if gates else None
    return RouteArrays(ids, np.arange(T, dtype=np.int64) // 7, (np.arange(T) % 7).astype(np.int32), g)


def test_round_trip(tmp_path):
    r = _routes(1000)
    assert write_trace(tmp_path / "ds", META, r) == 3000
    t = open_trace(tmp_path / "ds")
    assert t.meta == META and t.num_tokens == 1000
    back = t.read_all()
    np.testing.assert_array_equal(back.expert_ids_TLK, r.expert_ids_TLK)
    np.testing.assert_array_equal(back.seq_ids_T, r.seq_ids_T)
    np.testing.assert_array_equal(back.token_pos_T, r.token_pos_T)
    np.testing.assert_array_equal(back.gate_weights_TLK, r.gate_weights_TLK)
    no_gates = _routes(10, gates=False)
    write_trace(tmp_path / "ng", META, no_gates)
    assert open_trace(tmp_path / "ng").read_all().gate_weights_TLK is None


def test_readable_by_pandas_duckdb_polars(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    write_trace(tmp_path / "ds", META, _routes(50))
    glob = str(tmp_path / "ds" / "part-*.parquet")
    df = pd.read_parquet(tmp_path / "ds" / "part-w0-000000.parquet")
    assert len(df) == 150 and list(df["layer"][:3]) == [1, 2, 5]
    assert len(df["expert_ids"][0]) == 3
    rel = duckdb.sql(f"select count(*), max(len(expert_ids)) from read_parquet('{glob}')")
    rows = rel.fetchall() if rel is not None else None
    assert rows == [(150, 3)]
    pf = pl.read_parquet(glob)
    assert pf.height == 150 and pf.schema["expert_ids"] == pl.List(pl.Int16)


def test_two_writers_and_resume(tmp_path):
    out = tmp_path / "ds"
    a = TraceWriter(out, META, "rank0", max_rows_buffered=30)
    b = TraceWriter(out, META, "rank1", max_rows_buffered=30)
    ra, rb = _routes(20, 1), _routes(20, 2)
    for s in range(0, 20, 10):
        a.write(ra.expert_ids_TLK[s : s + 10], ra.seq_ids_T[s : s + 10], ra.token_pos_T[s : s + 10])
        b.write(rb.expert_ids_TLK[s : s + 10], rb.seq_ids_T[s : s + 10], rb.token_pos_T[s : s + 10])
    a.flush()
    b.flush()
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    assert names == [f"part-rank{r}-{n:06d}.parquet" for r in (0, 1) for n in (0, 1)]
    with TraceWriter(out, META, "rank0") as again:  # resumed writer continues numbering
        again.write(ra.expert_ids_TLK[:5], ra.seq_ids_T[:5], ra.token_pos_T[:5])
    assert again.shards_written[0].name == "part-rank0-000002.parquet"
    assert open_trace(out).num_tokens == 45
    assert not list(out.glob(".*"))  # no temp files


def test_writer_refuses_another_model_and_bad_ids(tmp_path):
    write_trace(tmp_path / "ds", META, _routes(5))
    other = TraceMeta("other", 16, 3, (1, 2, 5))
    with pytest.raises(TraceError, match="another model"):
        TraceWriter(tmp_path / "ds", other)
    w = TraceWriter(tmp_path / "ds2", META)
    with pytest.raises(TraceError, match="expert id 16 >= num_experts=16"):
        w.write(np.full((2, 3, 3), 16), np.zeros(2), np.zeros(2))


def test_truncated_shard(tmp_path):
    write_trace(tmp_path / "ds", META, _routes(200))
    shard = tmp_path / "ds" / "part-w0-000000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="damaged or truncated"):
        open_trace(tmp_path / "ds")


def test_wrong_schema(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(pa.table({"layer": pa.array([1], pa.int16()), "experts": [[1, 2, 3]]}), d / "part-x-000000.parquet")
    with pytest.raises(TraceError, match="column 'run_id' is missing"):
        open_trace(d)


def mixed_topk_shard(path, meta=META):
    """A shard in the moeplace schema whose second row lists 2 ids at a top-3 layer."""
    from placement.trace.schema import arrow_schema

    schema = arrow_schema(meta)
    ids = [[1, 2, 3], [4, 5], [6, 7, 8]]
    t = pa.table(
        [
            pa.array(["w"] * 3),
            pa.array([0] * 3, pa.int64()),
            pa.array([0] * 3, pa.int32()),
            pa.array(list(meta.layers), pa.int16()),
            pa.array(ids, schema.field("expert_ids").type),
            pa.nulls(3, schema.field("gate_weights").type),
        ],
        schema=schema,
    )
    pq.write_table(t, path)


def test_mixed_topk_within_layer(tmp_path):
    mixed_topk_shard(tmp_path / "one.parquet")
    with pytest.raises(TraceError, match="mixed top-k: row 1 has 2 expert ids"):
        open_trace(tmp_path / "one.parquet").read_all()
