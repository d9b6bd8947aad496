"""A job manifest (ray_jobs) decides which shards of a dataset count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from placement.trace.dataset import TraceWriter, open_trace
from placement.trace.schema import TraceError
from placement.trace.synthetic import synthetic_trace


def test_only_shards_listed_in_the_manifest_are_read(tmp_path: Path) -> None:
    meta, r = synthetic_trace(2, 8, 2, 40, tokens_per_prompt=10, seed=0)
    out = tmp_path / "ds"
    for wid, sl in (("shard00000", slice(0, 20)), ("shard00001", slice(20, 40))):
        with TraceWriter(out, meta, writer_id=wid) as w:
            w.write(r.expert_ids_TLK[sl], r.seq_ids_T[sl], r.token_pos_T[sl])
    assert open_trace(out).num_tokens == 40
    manifest = {"schema_version": 1, "completed": {"shard00000": {"files": ["part-shard00000-000000.parquet"]}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert open_trace(out).num_tokens == 20
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(TraceError, match="manifest"):
        open_trace(out)
