"""A moeplace dataset directory is read directly by pandas, polars, pyarrow.dataset, DuckDB and Ray Data, with
the same row count as moeplace: for datasets written by ``import``, by ``profile`` and by a Ray profiling job
(with its manifest), also with a writer's temp file inside. The metadata files ``_dataset.parquet`` /
``_manifest.parquet`` are zero-row Parquet files with the shard schema (pyarrow.dataset, pandas and Ray Data skip
them for their leading ``_``, polars and DuckDB read them as 0 rows); datasets with the old JSON names still
open."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from placement.trace.dataset import (
    DATASET_FILE,
    MANIFEST_FILE,
    metadata_file,
    open_parquet_trace,
    open_trace,
    read_metadata,
    write_metadata,
    write_trace,
)
from placement.trace.schema import META_KEY, TraceMeta, arrow_schema
from placement.trace.synthetic import synthetic_trace

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> int:
    t = open_trace(path)
    return t.num_tokens * t.meta.num_layers


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, cli) -> Path:
    d = tmp_path_factory.mktemp("imported")
    _, r = synthetic_trace(3, 8, 2, 300, tokens_per_prompt=30, seed=0)
    gates = np.full(r.expert_ids_TLK.shape, 0.5, np.float32)
    np.savez(d / "src.npz", routes=r.expert_ids_TLK, scores=gates, num_experts=8, prompt_lens=[30] * 10)
    for _ in range(2):  # two imports: two shards
        code, _, err = cli("import", d / "src.npz", "--format", "npz", "--out", d / "ds")
        assert code == 0, err
    return d / "ds"


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory, cli) -> Path:
    out = tmp_path_factory.mktemp("profiled") / "ds"
    code, _, err = cli("profile", "--limit", 3, "--max-len", 32, "--out", out)
    assert code == 0, err
    return out


def _with_temp_files(src: Path, dst: Path) -> Path:
    """A copy of ``src`` holding what a writer leaves while it works: a shard's and a metadata file's temp file."""
    shutil.copytree(src, dst)
    (dst / ".part-w0-000009.parquet.x1y2.tmp").write_bytes(b"PAR1 half-written")
    (dst / f".{DATASET_FILE}.a1b2.tmp").write_bytes(b"PAR1")
    return dst


def _readers(path: Path, busy: bool = False) -> dict[str, int]:
    """Rows each reader sees in the bare directory. polars refuses a directory holding a file of another
    extension, so while a writer works (its ``.*.tmp`` file) it needs ``hidden_file_prefix="."``."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    return {
        "pandas.read_parquet(DIR)": len(pd.read_parquet(path)),
        "pyarrow.dataset.dataset(DIR)": pads.dataset(path).count_rows(),
        "duckdb read_parquet('DIR')": duckdb.execute(f"select count(*) from read_parquet('{path}')").fetchall()[0][0],
        "polars.scan_parquet(DIR)": (pl.scan_parquet(path, hidden_file_prefix=".") if busy else pl.scan_parquet(path))
        .collect()
        .height,
        "polars.scan_parquet('DIR/part-*.parquet')": pl.scan_parquet(f"{path}/part-*.parquet").collect().height,
    }


def _assert_metadata_files(path: Path, manifest: bool) -> None:
    """Only Parquet files in the directory (no JSON), the metadata files holding zero rows of the shard schema."""
    names = {p.name for p in path.iterdir()}
    assert all(n.endswith(".parquet") for n in names), names
    assert (MANIFEST_FILE in names) == manifest and DATASET_FILE in names
    shard_schema = pq.read_schema(next(path.glob("part-*.parquet"))).remove_metadata()
    for name in (DATASET_FILE, MANIFEST_FILE) if manifest else (DATASET_FILE,):
        assert pq.read_metadata(path / name).num_rows == 0
        assert pq.read_schema(path / name).remove_metadata().equals(shard_schema, check_metadata=True)
    meta = open_trace(path).meta
    assert TraceMeta.from_json(read_metadata(path / DATASET_FILE)) == meta
    assert pq.read_schema(path / DATASET_FILE).metadata[META_KEY] == arrow_schema(meta).metadata[META_KEY]


@pytest.mark.parametrize("which", ["imported", "profiled"])
def test_every_reader_reads_the_directory(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path: Path = request.getfixturevalue(which)
    _assert_metadata_files(path, manifest=False)
    want = _rows(path)
    assert want > 0
    assert _readers(path) == dict.fromkeys(_readers(path), want)
    busy = _with_temp_files(path, tmp_path / "busy")
    assert _readers(busy, busy=True) == dict.fromkeys(_readers(busy, busy=True), want)
    assert _rows(busy) == want


def test_the_columns_readers_see(imported: Path) -> None:
    import pandas as pd

    df = pd.read_parquet(imported)
    assert list(df.columns) == ["run_id", "seq_id", "token_pos", "layer", "expert_ids", "gate_weights"]
    r = open_trace(imported).read_all()
    assert r.gate_weights_TLK is not None
    got = np.sort(np.concatenate(df["expert_ids"].to_numpy()))  # the same routing, in whatever file order
    np.testing.assert_array_equal(got, np.sort(r.expert_ids_TLK.reshape(-1)))
    assert np.concatenate(df["gate_weights"].to_numpy()).sum() == pytest.approx(r.gate_weights_TLK.sum())


@pytest.mark.parametrize("names", [("dataset.json", "manifest.json"), ("_dataset.json", "_manifest.json")])
def test_datasets_with_the_old_names_still_open(imported: Path, tmp_path: Path, names: tuple[str, str]) -> None:
    old = tmp_path / "old"
    shutil.copytree(imported, old)
    meta = open_trace(imported).meta
    (old / DATASET_FILE).unlink()
    (old / names[0]).write_text(meta.to_json())
    listed = sorted(p.name for p in old.glob("part-*.parquet"))[:1]
    manifest = {"schema_version": 1, "completed": {"shard00000": {"files": listed, "tokens": 1}}}
    (old / names[1]).write_text(json.dumps(manifest))
    t = open_parquet_trace(old)
    assert t.meta == meta and [s.name for s in t.shards] == listed
    _, r = synthetic_trace(3, 8, 2, 30, tokens_per_prompt=30, seed=1)
    write_trace(old, t.meta, r, writer_id="more")  # appending keeps the old name, writes no second metadata file
    assert not (old / DATASET_FILE).exists() and not (old / MANIFEST_FILE).exists()
    assert TraceMeta.from_json((old / names[0]).read_text()) == meta
    marked = {**json.loads(meta.to_json()), "source": "the old file"}  # it is the one read
    (old / names[0]).write_text(json.dumps(marked))
    assert open_parquet_trace(old).meta.source == "the old file"
    for name in (DATASET_FILE, MANIFEST_FILE):  # the conversion of docs/trace_format.md
        legacy = metadata_file(old, name)
        if legacy.suffix == ".json":
            write_metadata(legacy.with_name(name), read_metadata(legacy))
            legacy.unlink()
    _assert_metadata_files(old, manifest=True)
    converted = open_parquet_trace(old)
    assert converted.meta.source == "the old file" and [s.name for s in converted.shards] == listed
    seen = _readers(old)  # all of them, polars on the bare directory too (they ignore the manifest)
    assert seen == dict.fromkeys(seen, 3 * (300 + 300 + 30))


# ------------------------------------------------------------------------------------------------ Ray job


def _env_without_auth_mode() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def ray_profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A dataset written by ``moeplace profile --ray`` (embedded local Ray), and everything the command printed."""
    out = tmp_path_factory.mktemp("ray") / "ds"
    cmd = [sys.executable, "-c", "from placement.cli import main; main()", "profile", "--ray", "--workers", "2"]
    cmd += ["--limit", "8", "--max-len", "64", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env_without_auth_mode(), capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout + proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_ray_profile_is_quiet_and_its_dataset_reads_everywhere(ray_profiled: tuple[Path, str], tmp_path: Path) -> None:
    out, printed = ray_profiled
    assert "Token authentication" not in printed and "RAY_AUTH_MODE" not in printed, printed
    _assert_metadata_files(out, manifest=True)
    assert json.loads(read_metadata(out / MANIFEST_FILE))["completed"]
    want = _rows(out)
    assert want > 0
    assert _readers(out) == dict.fromkeys(_readers(out), want)
    busy = _with_temp_files(out, tmp_path / "busy")
    assert _readers(busy, busy=True) == dict.fromkeys(_readers(busy, busy=True), want)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_reads_every_dataset(
    imported: Path, profiled: Path, ray_profiled: tuple[Path, str], tmp_path: Path
) -> None:
    import ray
    import ray.data

    from ray_jobs.driver import JobConfig, connect

    connect(JobConfig(out=tmp_path / "unused", num_cpus=2))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        for path in (imported, profiled, ray_profiled[0]):
            busy = _with_temp_files(path, tmp_path / f"busy-{path.parent.name}")
            assert ray.data.read_parquet(str(busy)).count() == _rows(path)
    finally:
        ray.shutdown()
