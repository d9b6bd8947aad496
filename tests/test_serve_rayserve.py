"""``moeplace serve --ray-serve``: the same API as a Ray Serve application (placement/serve/rayserve.py), started for
real (the CLI in a subprocess, an embedded local Ray, Ray Serve's HTTP proxy on a free port, real HTTP): token
checks, ingestion of the watched dataset, a decision, the state directory's lock held by the replica, a clean stop
on SIGTERM, and a state directory that the plain server resumes exactly (the replica ran the same service)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.serve_support import Server, initial_plan, traffic, write_shard


@pytest.mark.ray
@pytest.mark.slow
def test_ray_serve_app_serves_ingests_decides_and_its_state_resumes(cli: Any, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    initial = initial_plan(plan)
    watch, state = tmp_path / "ds", tmp_path / "state"
    meta, routes = traffic(1200, seed=5)
    srv = Server(plan, state, watch, "--ray-serve", "--ray-cpus", "2")
    try:
        assert srv.status()["observed_tokens"] == 0 and srv.status()["plan_version"] == 1
        assert srv.post("/v1/replan", token=None).status_code == 401
        assert srv.post("/v1/replan", token="wrong").status_code == 403
        write_shard(watch, meta, routes, "a")
        srv.wait_for(lambda st: st["observed_tokens"] == 1200 and st["shards_ingested"] == 1)
        decided = srv.post("/v1/replan")
        assert decided.status_code == 200 and isinstance(decided.json()["version"], int)
        served = srv.get("/v1/plan").json()
        assert served["num_gpus"] == initial.num_gpus and served["phy2log"] is not None
        before: dict[str, Any] = srv.status()
        # the replica holds the state directory's lock: a second service on it is one error line, before Ray starts
        args = ["serve", "--plan", plan, "--state", state, "--token", "t", "--ray-serve"]
        code, _, err = cli(*args)
        assert code == 1 and "another moeplace serve uses this --state" in err and err.count("\n") == 1, err
    finally:
        code = srv.stop()
    assert code == 0, srv.log.read_text()[-2000:]
    again = Server(plan, state, watch)  # the plain uvicorn server on the same state directory
    try:
        after = again.status()
        for key in ("observed_tokens", "plan_version", "shards_ingested", "decisions"):
            assert after[key] == before[key], key
    finally:
        assert again.stop() in (0, -15)  # uvicorn re-raises the signal after its graceful shutdown
