"""``moeplace serve --ray``: the real server (uvicorn in a subprocess, real HTTP) counts the watched shards as Ray
tasks (ray_jobs/ingest.py, an embedded local Ray with 2 CPUs) and ends exactly where the in-process service
ends: the same observed tokens, ledger (quarantine reasons included), decayed window arrays and so the same input
to the next decision, with a corrupt shard and a shard of another model among the good ones; on a Ray head at
``--ray-address`` too, across a restart. ``ShardCounter`` is also checked on its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from placement.plan import Plan
from placement.serve.ingest import shard_counts
from placement.serve.state import Ledger, StateStore
from placement.serve.window import DecayedWindow
from placement.trace.schema import TraceError, TraceMeta
from ray_jobs.driver import JobConfig, RayJobError, connect
from ray_jobs.ingest import ShardCounter
from tests.serve_support import E, Server, free_port, initial_plan, traffic, write_shard

HALF_LIFE = "1500"  # tokens: the window decays between shards, so the order of folding shows in its arrays


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards staged once, copied into each server's watched dataset in two phases: ``first/`` (two good shards
    and a corrupt one, there before the server starts) and ``later/`` (a shard of another model between two good
    ones, written while it runs)."""
    root = tmp_path_factory.mktemp("staged")
    initial_plan(root / "plan.json")
    meta, _ = traffic(10, seed=0)
    first, later = root / "first", root / "later"
    for writer, (tokens, seed) in zip("ab", ((900, 21), (1300, 22)), strict=True):
        write_shard(first, meta, traffic(tokens, seed=seed)[1], writer)
    (first / "part-ab-broken-000000.parquet").write_bytes(b"PAR1 half a shard")
    write_shard(later, meta, traffic(600, seed=23)[1], "c")
    foreign = write_shard(root / "foreign", *traffic(40, seed=3, num_experts=2 * E), "cd-foreign")
    shutil.copy(foreign, later / foreign.name)
    write_shard(later, meta, traffic(750, seed=24, skew_sigma=1.0, num_topics=4)[1], "d")
    return root


def _arrive(src: Path, watch: Path) -> None:
    """The shards of ``src`` appear in ``watch`` the way writers publish them: a temp file, then a rename."""
    watch.mkdir(exist_ok=True)
    for p in sorted(src.glob("*.parquet")):
        if not (watch / p.name).exists():
            shutil.copy(p, watch / f".{p.name}.tmp")
            (watch / f".{p.name}.tmp").rename(watch / p.name)


def _run(staged: Path, name: str, *extra: str) -> tuple[dict[str, Any], dict[str, Any], bytes, Path]:
    """A server on its own copy of the staged shards: (status after ingestion, replan result, plan body, state)."""
    watch, state = staged / name / "ds", staged / name / "state"
    watch.parent.mkdir()
    _arrive(staged / "first", watch)
    s = Server(staged / "plan.json", state, watch, "--half-life", HALF_LIFE, "--time-limit", "2", *extra)
    try:
        s.wait_for(lambda st: st["shards_ingested"] == 2 and st["shards_quarantined"] == 1)
        _arrive(staged / "later", watch)
        st = s.wait_for(lambda st: st["shards_ingested"] == 4 and st["shards_quarantined"] == 2)
        decided = s.post("/v1/replan")
        assert decided.status_code == 200
        plan = s.get("/v1/plan")
        assert plan.status_code == 200
    finally:
        assert s.stop() in (0, -15)
    return st, decided.json(), plan.content, state


def _checkpoint(state: Path) -> tuple[dict[str, np.ndarray], Ledger]:
    saved = StateStore(state).load_checkpoint()
    assert saved is not None
    return saved


@pytest.mark.ray
@pytest.mark.slow
def test_ray_ingestion_ends_where_in_process_ingestion_ends(staged: Path) -> None:
    st, decided, plan, state = _run(staged, "local")
    st_ray, decided_ray, plan_ray, state_ray = _run(staged, "ray", "--ray", "--ray-cpus", "2", "--log-level", "info")
    log = "\n".join(p.read_text() for p in (staged / "ray").glob("server-*.log"))
    assert "watched shards as Ray tasks on local Ray (2 CPUs)" in log

    assert st["observed_tokens"] == 900 + 1300 + 600 + 750  # nothing of the corrupt or foreign shard
    assert st_ray == st  # tokens, window mass, shard counts and the live metrics of the current plan
    # The policy gets the same input: the same current plan and window, so the same metrics before it searches.
    # Its search is anytime (its result depends on the wall-clock time it gets), so the plans are not compared.
    assert decided_ray["before"] == decided["before"] and decided["before"]["forecast_imbalance"] > 0
    assert [d["version"] for d in (decided, decided_ray)] == [1 + d["changed"] for d in (decided, decided_ray)]
    assert Plan.from_json(plan_ray).num_experts == Plan.from_json(plan).num_experts == E

    arrays, ledger = _checkpoint(state)
    arrays_ray, ledger_ray = _checkpoint(state_ray)
    for name in ("load_LE", "trans_LEE", "fold_load_SLE", "scalars"):
        assert np.array_equal(arrays_ray[name], arrays[name]), name  # the decayed window, exactly
    assert arrays["load_LE"].sum() > 0
    assert ledger_ray.shards == ledger.shards and len(ledger.shards) == 4
    reasons = [
        {name: why.replace(str(staged / run / "ds"), "WATCH") for name, why in led.quarantined.items()}
        for run, led in (("local", ledger), ("ray", ledger_ray))
    ]
    assert reasons[1] == reasons[0]  # the same shards, with the same reasons
    assert set(ledger.quarantined) == {"part-ab-broken-000000.parquet", "part-cd-foreign-000000.parquet"}
    assert "damaged or truncated" in ledger.quarantined["part-ab-broken-000000.parquet"]


@pytest.mark.ray
@pytest.mark.slow
def test_shard_counter_yields_in_order_and_keeps_shard_errors(staged: Path) -> None:
    import ray

    plan = Plan.load(staged / "plan.json")
    paths = sorted((staged / "first").glob("part-*.parquet")) + sorted((staged / "later").glob("part-*.parquet"))
    connect(JobConfig(out=Path("."), num_cpus=2))
    try:
        counter = ShardCounter(num_workers=2)
        assert counter.open() == "the process's Ray connection"  # a connection it finds is kept, not shut down
        got = list(counter.counted(shard_counts, paths, plan, errors=(TraceError, ValueError)))
        assert [p for p, _ in got] == paths  # in the order asked, whatever order the tasks finished in
        for path, result in got:
            try:
                want = shard_counts(path, plan)
            except TraceError as exc:
                assert type(result) is TraceError and str(result) == str(exc)
                continue
            assert result[1] == want[1] and result[0].num_tokens == want[0].num_tokens
            assert want[0].trans_LEE is not None and np.array_equal(result[0].trans_LEE, want[0].trans_LEE)
            assert np.array_equal(result[0].fold_load_SLE, want[0].fold_load_SLE)
        broken = [p for p in paths if "broken" in p.name]
        with pytest.raises(RayJobError, match=r"broken.*counting task failed"):  # not listed in errors: raised
            list(counter.counted(shard_counts, broken, plan, errors=()))
        counter.close()
        assert ray.is_initialized()  # the counter found the connection, so it left it open
    finally:
        ray.shutdown()


def test_serve_ray_options_are_checked_before_ray_starts(cli: Any, tmp_path: Path) -> None:
    initial_plan(tmp_path / "plan.json")
    base = ["serve", "--plan", tmp_path / "plan.json", "--state", tmp_path / "state", "--token", "t0ken"]
    cases = [
        ([*base, "--watch", tmp_path, "--ray-cpus", "4"], "need --ray or --ray-serve"),
        ([*base, "--ray-serve", "--ray-workers", "3"], "--ray-workers needs --ray"),
        ([*base, "--ray"], "pass --watch"),
        ([*base, "--watch", tmp_path, "--ray", "--ray-address", "127.0.0.1:9"], "unreachable"),
    ]
    for args, msg in cases:
        code, _, err = cli(*args)
        assert code == 1 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    with pytest.raises(RayJobError, match="must be >= 1"):
        ShardCounter(num_workers=0)


@pytest.fixture()
def ray_head(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A loopback Ray head (2 CPUs, no dashboard, token auth off for it and for the servers started here) in its
    own session, whose process group teardown ends (``ray stop`` would stop every cluster of the user)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    start = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=false", "--block",
    ]  # fmt: skip
    head = subprocess.Popen(start, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # the GCS port accepts connections once the head is up
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}")
            time.sleep(0.2)
        else:
            pytest.fail("the Ray head did not come up within 2 minutes")
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            time.sleep(2)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_address_and_restart_count_every_shard_once(staged: Path, ray_head: str) -> None:
    """On a running head (``--ray-address``): the window equals the shards folded in name order in this process,
    and a restart counts nothing again."""
    plan = Plan.load(staged / "plan.json")
    watch, state = staged / "cluster" / "ds", staged / "cluster" / "state"
    watch.parent.mkdir()
    _arrive(staged / "first", watch)
    _arrive(staged / "later", watch)
    args = ("--half-life", HALF_LIFE, "--ray", "--ray-address", ray_head, "--log-level", "info")
    s = Server(staged / "plan.json", state, watch, *args)
    try:
        st = s.wait_for(lambda st: st["shards_ingested"] + st["shards_quarantined"] == 6)
    finally:
        assert s.stop() in (0, -15)
    assert f"watched shards as Ray tasks on Ray at {ray_head}" in s.log.read_text()
    assert (st["observed_tokens"], st["shards_ingested"], st["shards_quarantined"]) == (3550, 4, 2)

    want = DecayedWindow(TraceMeta(plan.model_name, E, 1, plan.layers, "test"), float(HALF_LIFE))
    for path in sorted(watch.glob("part-*.parquet")):
        with contextlib.suppress(TraceError):
            want.add(shard_counts(path, plan)[0])
    arrays = _checkpoint(state)[0]
    for name, a in want.arrays().items():
        assert np.array_equal(arrays[name], a), name

    s = Server(staged / "plan.json", state, watch, *args)  # restart: the ledger says every shard is counted
    try:
        again = s.status()
        time.sleep(1.0)  # several scans of --watch
        assert s.status() == again and again["observed_tokens"] == 3550 and again["shards_ingested"] == 4
    finally:
        assert s.stop() in (0, -15)
