"""A job manifest (ray_jobs) decides which shards of a dataset count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from placement.trace.dataset import DATASET_FILE, MANIFEST_FILE, TraceWriter, open_trace, write_metadata, write_trace
from placement.trace.schema import TraceError
from placement.trace.synthetic import synthetic_trace


@pytest.mark.parametrize("name", [MANIFEST_FILE, "_manifest.json", "manifest.json"])  # the current and legacy names
def test_only_shards_listed_in_the_manifest_are_read(tmp_path: Path, name: str) -> None:
    meta, r = synthetic_trace(2, 8, 2, 40, tokens_per_prompt=10, seed=0)
    out = tmp_path / "ds"
    for wid, sl in (("shard00000", slice(0, 20)), ("shard00001", slice(20, 40))):
        with TraceWriter(out, meta, writer_id=wid) as w:
            w.write(r.expert_ids_TLK[sl], r.seq_ids_T[sl], r.token_pos_T[sl])
    assert open_trace(out).num_tokens == 40
    manifest = {"schema_version": 1, "completed": {"shard00000": {"files": ["part-shard00000-000000.parquet"]}}}
    write_metadata(out / name, json.dumps(manifest))
    assert open_trace(out).num_tokens == 20
    write_metadata(out / name, "{broken")
    with pytest.raises(TraceError, match="manifest"):
        open_trace(out)


def test_a_damaged_metadata_file_is_one_line(tmp_path: Path) -> None:
    meta, r = synthetic_trace(2, 8, 2, 20, tokens_per_prompt=10, seed=0)
    out = tmp_path / "ds"
    write_trace(out, meta, r)
    good = (out / DATASET_FILE).read_bytes()
    for name in (DATASET_FILE, MANIFEST_FILE):
        (out / name).write_bytes(good[: len(good) // 2])
        with pytest.raises(TraceError, match=re.escape(f"{name}: not a readable Parquet file")) as exc:
            open_trace(out)
        assert "\n" not in str(exc.value)
        if name == DATASET_FILE:
            (out / name).write_bytes(good)
        else:
            (out / name).unlink()
    (out / MANIFEST_FILE).write_bytes(good)  # a Parquet file without a manifest entry
    with pytest.raises(TraceError, match=r"no moeplace\.manifest entry in the Parquet key-value metadata"):
        open_trace(out)
