"""A moeplace dataset directory is read directly by pandas, polars, pyarrow.dataset, DuckDB and Ray Data, with
the same row count as moeplace: for datasets written by ``import``, by ``profile`` and by a Ray profiling job
(with its manifest), also with a writer's temp file inside. The metadata files are named ``_dataset.json`` /
``_manifest.json`` so that Arrow-world readers skip them; datasets with the old names still open."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from placement.trace.dataset import DATASET_JSON, MANIFEST_JSON, open_parquet_trace, open_trace, write_trace
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
    (dst / f".{DATASET_JSON}.a1b2.tmp").write_text("{")
    return dst


def _readers(path: Path) -> dict[str, int]:
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    return {
        "pandas.read_parquet(DIR)": len(pd.read_parquet(path)),
        "pyarrow.dataset.dataset(DIR)": pads.dataset(path).count_rows(),
        "duckdb read_parquet('DIR')": duckdb.execute(f"select count(*) from read_parquet('{path}')").fetchall()[0][0],
        "polars.scan_parquet('DIR/*.parquet')": pl.scan_parquet(f"{path}/*.parquet").collect().height,
        "polars.scan_parquet(DIR, hidden_file_prefix)": pl.scan_parquet(path, hidden_file_prefix=["_", "."])
        .collect()
        .height,
    }


@pytest.mark.parametrize("which", ["imported", "profiled"])
def test_every_reader_reads_the_directory(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path: Path = request.getfixturevalue(which)
    assert (path / DATASET_JSON).is_file() and not (path / "dataset.json").exists()
    want = _rows(path)
    assert want > 0
    assert _readers(path) == dict.fromkeys(_readers(path), want)
    busy = _with_temp_files(path, tmp_path / "busy")
    assert _readers(busy) == dict.fromkeys(_readers(busy), want)
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


def test_datasets_with_the_old_names_still_open(imported: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(imported, old)
    (old / DATASET_JSON).rename(old / "dataset.json")
    listed = sorted(p.name for p in old.glob("part-*.parquet"))[:1]
    manifest = {"schema_version": 1, "completed": {"shard00000": {"files": listed, "tokens": 1}}}
    (old / "manifest.json").write_text(json.dumps(manifest))
    t = open_parquet_trace(old)
    assert t.meta == open_trace(imported).meta and [s.name for s in t.shards] == listed
    _, r = synthetic_trace(3, 8, 2, 30, tokens_per_prompt=30, seed=1)
    write_trace(old, t.meta, r, writer_id="more")  # appending keeps the old name, writes no second metadata file
    assert not (old / DATASET_JSON).exists() and not (old / MANIFEST_JSON).exists()


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
    assert (out / MANIFEST_JSON).is_file() and (out / DATASET_JSON).is_file()
    want = _rows(out)
    assert want > 0
    assert _readers(out) == dict.fromkeys(_readers(out), want)
    busy = _with_temp_files(out, tmp_path / "busy")
    assert _readers(busy) == dict.fromkeys(_readers(busy), want)


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
