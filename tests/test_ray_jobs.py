"""Ray profiling jobs: same routing as the single-process profiler, exactly-once under worker loss, job submit.

Ray tests start an embedded local Ray (2 CPUs) or a loopback head; they are marked ``ray`` and ``slow``.
The exactly-once bookkeeping (ray_jobs/shards.py) is tested without Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from placement.trace.dataset import DATASET_FILE, TraceWriter, open_parquet_trace, read_metadata
from placement.trace.schema import TraceMeta
from ray_jobs.driver import JobConfig, JobProgress, RayJobError, run_job
from ray_jobs.shards import MANIFEST, JobKey, Manifest, ShardError, ShardResult, prepare_output, trace_shard
from tests.conftest import REPO, listing

N_PROMPTS = 32
ray_slow = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sorted_routes(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = open_parquet_trace(path).read_all()
    assert r.gate_weights_TLK is not None
    o = np.lexsort((r.token_pos_T, r.seq_ids_T))
    return r.seq_ids_T[o], r.token_pos_T[o], r.expert_ids_TLK[o], r.gate_weights_TLK[o]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-process profile of the first 32 builtin prompts (batch size 8, one thread like the workers)."""
    import torch

    from profiler.api import load_model, load_prompts, profile_prompts

    out = tmp_path_factory.mktemp("ref") / "trace"
    model = load_model("builtin")
    prompts = load_prompts("builtin")[:N_PROMPTS]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TraceWriter(out, model.trace_meta()) as w:
            profile_prompts(model, prompts, list(range(N_PROMPTS)), w, batch_size=8)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    """One embedded local Ray (2 CPUs) for the module: jobs reuse the connection (one ``ray.init`` per process)."""
    import ray

    from ray_jobs.driver import connect

    connect(JobConfig(out=tmp_path_factory.mktemp("unused")))
    try:
        yield
    finally:
        ray.shutdown()


def _assert_same_routing(got: Path, ref: Path) -> None:
    a, b = _sorted_routes(got), _sorted_routes(ref)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # exactly once: no (seq_id, token_pos) twice
    keys = a[0] * 10_000 + a[1]
    assert np.unique(keys).size == keys.size


def _rows_expected(ref: Path) -> int:
    t = open_parquet_trace(ref)
    return t.num_tokens * t.meta.num_layers


# ------------------------------------------------------------------------------------------- Ray jobs


@pytest.mark.parametrize("mode", ["data", "expert"])
@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_match_single_process(tmp_path: Path, reference: Path, mode: str, local_ray) -> None:
    out = tmp_path / "trace"
    seen: list[JobProgress] = []
    res = run_job(JobConfig(out=out, limit=N_PROMPTS, workers=2, mode=mode), on_progress=seen.append)
    assert res.rows == _rows_expected(reference)
    trace = open_parquet_trace(out)
    assert trace.num_tokens * trace.meta.num_layers == res.rows
    _assert_same_routing(out, reference)
    n_shards = 4 if mode == "data" else 2  # expert mode: a batch per rank in every shard
    assert [p.shards_done for p in seen] == list(range(1, n_shards + 1)) and seen[-1].shards_total == n_shards
    manifest = json.loads(read_metadata(out / MANIFEST))
    assert sorted(manifest["completed"]) == [f"shard{i:05d}" for i in range(n_shards)]
    listed = {f for v in manifest["completed"].values() for f in v["files"]}
    assert listed == {p.name for p in out.glob("part-*.parquet")}
    # A resumed job skips every completed shard.
    again = run_job(JobConfig(out=out, limit=N_PROMPTS, workers=2, mode=mode))
    assert again.shards_run == 0 and again.tokens == 0


@pytest.mark.parametrize("mode", ["data", "expert"])
@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_job_finishes_exactly_once(tmp_path: Path, reference: Path, mode: str, local_ray) -> None:
    """SIGKILL one worker after the first shard: data mode restarts it and retries its shards, expert mode
    rebuilds the process group; the dataset is complete, each prompt once."""
    out = tmp_path / "trace"
    pids: list[int] = []
    killed: list[int] = []

    def kill_after_first(p: JobProgress) -> None:
        if p.shards_done == 1 and not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed.append(pids[1])

    cfg = JobConfig(out=out, limit=N_PROMPTS, workers=2, mode=mode)
    res = run_job(cfg, on_progress=kill_after_first, on_pids=pids.extend)
    assert killed and res.shards_run == res.shards_total and res.tokens * 3 == res.rows
    seq = _sorted_routes(out)[0]
    assert np.unique(seq).tolist() == list(range(N_PROMPTS))
    _assert_same_routing(out, reference)  # every (prompt, position) exactly once, routing unchanged


@pytest.fixture(scope="module")
def ray_head():
    """A loopback Ray head (2 CPUs, job API on a free port, token auth off), stopped afterwards.

    ``ray start`` runs in a new session, so the head's processes form one process group that teardown ends
    (``ray stop --force`` would also stop other users' clusters on a shared machine).
    """
    port, dash, agent = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # The job API needs the head's dashboard agent; its default port (52365) is taken by any other Ray on
    # this machine (the embedded one of these tests, other users'), so give it a free one.
    start = [
        str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
    ]  # fmt: skip
    head = subprocess.Popen(start, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = head.communicate(timeout=120)
        if head.returncode != 0:
            pytest.fail(f"ray start --head failed: {out.decode()[-500:]}")
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            time.sleep(3)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_entry_point(tmp_path: Path, reference: Path, ray_head) -> None:
    _, dashboard, env = ray_head
    out = tmp_path / "trace"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        dashboard,
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "ray_jobs.profile",
        "--out",
        str(out),
        "--limit",
        str(N_PROMPTS),
        "--workers",
        "2",
    ]
    for _ in range(10):  # the job agent may register a little after 'ray start' returns
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "shards 4/4" in proc.stdout + proc.stderr
    _assert_same_routing(out, reference)


@pytest.mark.ray
@pytest.mark.slow
def test_too_many_workers_for_the_cluster(tmp_path: Path, ray_head) -> None:
    address, _, env = ray_head
    out = tmp_path / "trace"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.profile",
            "--out",
            str(out),
            "--limit",
            "8",
            "--workers",
            "3",
            "--address",
            address,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--workers 3 need 3 CPUs but the cluster has 2" in errors[0]
    assert not out.exists()


# ------------------------------------------------------------------------------ bad input, no Ray needed


def test_unreachable_address_is_one_error_line(tmp_path: Path, cli) -> None:
    out = tmp_path / "trace"
    code, _, err = cli("profile", "--ray", "--address", f"127.0.0.1:{_free_port()}", "--out", out, "--limit", 4)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: Ray address 127.0.0.1:") and "unreachable" in lines[-1]
    assert not out.exists()


def test_other_models_trace_is_refused_untouched(tmp_path: Path, cli) -> None:
    out = tmp_path / "trace"
    other = TraceMeta(model_name="other-moe", num_experts=8, top_k=2, layers=(0, 1))
    with TraceWriter(out, other) as w:
        w.write(np.zeros((3, 2, 2), np.int16), np.zeros(3, np.int64), np.arange(3, dtype=np.int32))
    before = listing(out)
    code, _, err = cli("profile", "--ray", "--out", out, "--limit", 4)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"error: {out.resolve()}: holds a trace of another model")
    assert listing(out) == before


def test_bad_mode_and_worker_count(tmp_path: Path) -> None:
    with pytest.raises(RayJobError, match="--mode 'tensor'"):
        run_job(JobConfig(out=tmp_path / "t", mode="tensor"))
    with pytest.raises(RayJobError, match="do not split over 3 workers"):
        run_job(JobConfig(out=tmp_path / "t", mode="expert", workers=3, limit=4))
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------- exactly-once bookkeeping, no Ray


def _meta() -> TraceMeta:
    return TraceMeta(model_name="m", num_experts=4, top_k=1, layers=(1,))


def _write_tokens(n: int, seq: int):
    def write(w: TraceWriter) -> int:
        w.write(np.zeros((n, 1, 1), np.int16), np.full(n, seq, np.int64), np.arange(n, dtype=np.int32))
        return n

    return write


def test_manifest_is_the_source_of_truth(tmp_path: Path) -> None:
    meta = _meta()
    key = JobKey.of(meta, ["a", "b", "c"], shard_size=1, max_len=8, mode="data")
    m = prepare_output(tmp_path, meta, key, num_shards=3)
    r0 = trace_shard(tmp_path, meta, 0, _write_tokens(2, 0))
    m.record(0, r0)
    m.save(tmp_path)
    # Shard 1 "died" after its rename but before the manifest update; shard 2 died mid-write (temp file).
    trace_shard(tmp_path, meta, 1, _write_tokens(3, 1))
    (tmp_path / ".part-shard00002-000000.parquet.x.tmp").write_bytes(b"partial")
    resumed = prepare_output(tmp_path, meta, key, num_shards=3)
    assert sorted(resumed.completed) == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DATASET_FILE, MANIFEST, *r0.files])
    # A retried shard rewrites the same name; it never adds a second file.
    assert trace_shard(tmp_path, meta, 1, _write_tokens(3, 1)).files == ("part-shard00001-000000.parquet",)
    assert trace_shard(tmp_path, meta, 1, _write_tokens(3, 1)).files == ("part-shard00001-000000.parquet",)
    assert len(list(tmp_path.glob("part-shard00001-*"))) == 1


def test_manifest_of_another_job_is_refused(tmp_path: Path) -> None:
    meta = _meta()
    prepare_output(tmp_path, meta, JobKey.of(meta, ["a"], 1, 8, "data"), 1)
    with pytest.raises(ShardError, match="holds a job with other prompts_sha256"):
        prepare_output(tmp_path, meta, JobKey.of(meta, ["b"], 1, 8, "data"), 1)
    m = Manifest.read(tmp_path / MANIFEST)
    m.record(0, [ShardResult(0, ("x.parquet",), 5, 0.1), ShardResult(0, ("y.parquet",), 2, 0.1)])
    assert m.completed[0] == {"files": ["x.parquet", "y.parquet"], "tokens": 7}
