"""``moeplace serve`` end to end: the real server (uvicorn in a subprocess on a free 127.0.0.1 port) over real HTTP.

Shards go into the watched dataset the way ``moeplace profile`` writes them (TraceWriter); observations are
posted as Parquet, Arrow IPC and JSON counts."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from placement.deploy.export import deepseek_triple, sglang_map, vllm_ascend_map, vllm_initial_map
from placement.plan import Plan
from placement.replan.moves import count_moves
from tests.serve_support import E, Server, initial_plan, traffic, write_shard

POST_ROUTES = ("/v1/observations", "/v1/replan", "/v1/rollback/1")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that do not restart it (start-up costs seconds on a small machine)."""
    root = tmp_path_factory.mktemp("serve")
    initial_plan(root / "plan.json")
    s = Server(root / "plan.json", root / "state", root / "ds", "--max-body-mb", "1", "--half-life", "0")
    yield s
    assert s.stop() in (0, -15)


def server_tmp(s: Server) -> Path:
    return s.log.parent


def _counted(s: Server, before: dict[str, Any]) -> dict[str, Any]:
    """Status, after checking that nothing changed since ``before`` (status without the live metrics)."""
    after = s.status()
    for key in ("observed_tokens", "plan_version", "shards_ingested", "decisions"):
        assert after[key] == before[key], key
    return after


def test_posts_need_the_bearer_token(server: Server) -> None:
    before = server.status()
    for route in POST_ROUTES:
        r = server.post(route, token=None)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", route
        r = server.post(route, token="wrong-token-0123456789")
        assert r.status_code == 403 and r.json() == {"error": "wrong bearer token"}, route
        r = server.post(route, token=None, headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert r.status_code == 401, route
    _counted(server, before)


def test_bad_bodies_get_400_and_change_nothing(server: Server) -> None:
    meta, routes = traffic(300, seed=5)
    shard = write_shard(server_tmp(server) / "scratch", meta, routes, "scratch")
    good = shard.read_bytes()
    other_shard = write_shard(server_tmp(server) / "scratch-other", *traffic(50, seed=6, num_experts=2 * E), "o")
    parquet = {"Content-Type": "application/vnd.apache.parquet"}
    js = {"Content-Type": "application/json"}
    cases = [
        (b"", parquet, "empty body"),
        (good[: len(good) // 2], parquet, "not a readable Parquet file"),
        (other_shard.read_bytes(), parquet, "E=32"),
        (b"{not json", js, "not JSON"),
        (json.dumps({"num_tokens": 3, "load_LE": [[1, 2]]}).encode(), js, "load_LE"),
        (json.dumps({"num_tokens": 3, "load_LE": [[-1] * E] * 4}).encode(), js, "negative"),
        (b"ARROW1 nonsense", {"Content-Type": "application/vnd.apache.arrow.file"}, "Arrow IPC"),
        (good, {"Content-Type": "text/csv"}, "Content-Type"),
    ]
    before = server.status()
    for body, headers, msg in cases:
        r = server.post("/v1/observations", content=body, headers=headers)
        assert r.status_code == 400, (msg, r.text)
        err = r.json()["error"]
        assert msg in err and "\n" not in err and "scratch" not in err, err
    r = server.post("/v1/observations", content=b"x" * (2 << 20), headers=parquet)
    assert r.status_code == 413
    r = server.post("/v1/rollback/not-a-number")
    assert r.status_code == 400 and "version" in r.json()["error"]
    _counted(server, before)


def test_observations_as_parquet_arrow_and_json_counts(server: Server) -> None:
    meta, routes = traffic(400, seed=7)
    shard = write_shard(server_tmp(server) / "obs", meta, routes, "obs")
    t0 = server.status()["observed_tokens"]
    r = server.post("/v1/observations", content=shard.read_bytes(), headers={"Content-Type": "application/x-parquet"})
    assert r.status_code == 200 and r.json()["observed_tokens"] == t0 + 400
    sink = io.BytesIO()
    table = pq.read_table(shard)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    r = server.post(
        "/v1/observations", content=sink.getvalue(), headers={"Content-Type": "application/vnd.apache.arrow.stream"}
    )
    assert r.status_code == 200 and r.json()["observed_tokens"] == t0 + 800
    body = {"num_tokens": 50, "load_LE": np.ones((4, E), dtype=int).tolist()}
    key = {"Content-Type": "application/json", "Idempotency-Key": "engine-7-step-12"}
    r = server.post("/v1/observations", content=json.dumps(body).encode(), headers=key)
    assert r.status_code == 200 and r.json()["duplicate"] is False and r.json()["observed_tokens"] == t0 + 850
    r = server.post("/v1/observations", content=json.dumps(body).encode(), headers=key)  # a retried POST
    assert r.status_code == 200 and r.json()["duplicate"] is True and r.json()["observed_tokens"] == t0 + 850


def test_corrupt_and_foreign_shards_do_not_stop_ingestion(server: Server) -> None:
    ds = server_tmp(server) / "ds"
    meta, a = traffic(600, seed=8)
    _, b = traffic(500, seed=9)
    st0 = server.status()
    write_shard(ds, meta, a, "good")
    (ds / "part-broken-000000.parquet").write_bytes(b"PAR1 half a shard")
    foreign = write_shard(server_tmp(server) / "foreign", *traffic(40, seed=3, num_experts=2 * E), "foreign")
    shutil.copy(foreign, ds / foreign.name)
    write_shard(ds, meta, b, "good")
    st = server.wait_for(lambda st: st["observed_tokens"] == st0["observed_tokens"] + 1100)
    st = server.wait_for(lambda st: st["shards_quarantined"] == st0["shards_quarantined"] + 2)
    assert st["shards_ingested"] == st0["shards_ingested"] + 2
    assert st["observed_tokens"] == st0["observed_tokens"] + 1100  # nothing of the bad ones counted


def test_rollback_formats_and_metrics(server: Server) -> None:
    v1 = Plan.from_json(server.get("/v1/plan/1").content)
    n = server.status()["plan_version"]
    r = server.post("/v1/rollback/1")
    assert r.status_code == 200 and r.json()["version"] == n + 1 and r.json()["changed"] is True
    cur = server.get("/v1/plan")
    assert cur.headers["x-plan-version"] == str(n + 1)
    plan = Plan.from_json(cur.content)
    np.testing.assert_array_equal(plan.phy2log, v1.phy2log)
    moves = server.get(f"/v1/moves/{n + 1}").json()
    prev = Plan.from_json(server.get(f"/v1/plan/{n}").content)
    assert moves["num_moves"] == count_moves(prev, plan) and moves["reason"] == "rollback to version 1"
    assert server.post("/v1/rollback/999").status_code == 404
    assert server.get("/v1/plan/999").status_code == 404 and server.get("/v1/moves/0").status_code == 404
    assert server.get("/v1/plan", params={"format": "sglang"}).json() == {
        "physical_to_logical_map": sglang_map(plan).tolist()
    }
    sg = server.get("/v1/plan", params={"format": "sglang", "num_model_layers": 6}).json()
    assert np.asarray(sg["physical_to_logical_map"]).shape == (6, plan.num_slots)
    vl = server.get("/v1/plan", params={"format": "vllm"}).json()
    assert vl == {"initial_expert_map": vllm_initial_map(plan), "expert_map": vllm_ascend_map(plan)}
    ds = server.get(f"/v1/plan/{n + 1}", params={"format": "deepseek"}).json()
    for key, arr in zip(("phy2log", "log2phy", "logcnt"), deepseek_triple(plan), strict=True):
        np.testing.assert_array_equal(np.asarray(ds[key]), arr)
    assert server.get("/v1/plan", params={"format": "yaml"}).status_code == 400
    versions = server.get("/v1/versions").json()["versions"]
    assert [v["version"] for v in versions] == list(range(1, n + 2))

    st = server.status()
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    value = {name: f.samples[0].value for name, f in families.items()}
    assert value["moeplace_observed_tokens"] == st["observed_tokens"]
    assert value["moeplace_plan_version"] == st["plan_version"] == n + 1
    assert value["moeplace_live_imbalance_max"] == pytest.approx(st["live"]["imbalance_max"])
    assert value["moeplace_live_colocation"] == pytest.approx(st["live"]["colocation"])
    assert families["moeplace_moves"].type == "counter" and value["moeplace_moves"] == st["moves_total"]
    assert {"moeplace_decisions", "moeplace_bytes_moved", "moeplace_shards_quarantined"} <= set(families)


@pytest.mark.slow
def test_ingest_replan_and_restart_keep_tokens_and_version(tmp_path: Path) -> None:
    initial_plan(tmp_path / "plan.json")
    meta, a = traffic(3000, seed=11)
    _, b = traffic(2000, seed=12)
    _, c = traffic(700, seed=13)
    ds, state = tmp_path / "ds", tmp_path / "state"
    s = Server(tmp_path / "plan.json", state, ds, "--time-limit", "3", "--interval", "1", "--half-life", "20000")
    try:
        write_shard(ds, meta, a, "w1")
        write_shard(ds, meta, b, "w1")
        st = s.wait_for(lambda st: st["observed_tokens"] == 5000)
        st = s.wait_for(lambda st: st["decisions"] >= 1)  # --interval 1: the watcher decided on its own
        r = s.post("/v1/replan")
        assert r.status_code == 200
        res = r.json()
        assert isinstance(res["changed"], bool) and res["reason"].startswith("request: ")
        st = s.status()
        assert res["version"] == st["plan_version"] and st["decisions"] >= 2
        cur = s.get("/v1/plan")
        assert int(cur.headers["x-plan-version"]) == st["plan_version"]
        plan = Plan.from_json(cur.content)
        assert (plan.num_gpus, plan.num_experts) == (4, E)
        if st["plan_version"] > 1:  # the move list of the last version takes the previous plan to this one
            prev = Plan.from_json(s.get(f"/v1/plan/{st['plan_version'] - 1}").content)
            assert s.get(f"/v1/moves/{st['plan_version']}").json()["num_moves"] == count_moves(prev, plan)
    finally:
        assert s.stop() in (0, -15)
    before = {k: st[k] for k in ("observed_tokens", "plan_version", "shards_ingested", "moves_total")}

    s = Server(tmp_path / "plan.json", state, ds, "--half-life", "20000")  # restart mid-stream
    try:
        st = s.status()
        assert {k: st[k] for k in before} == before
        assert s.get("/v1/plan").headers["x-plan-version"] == str(before["plan_version"])
        write_shard(ds, meta, c, "w1")
        st = s.wait_for(lambda st: st["observed_tokens"] == before["observed_tokens"] + 700)
        time.sleep(0.5)  # a few more scans: nothing is counted twice
        assert s.status()["observed_tokens"] == 5700 and s.status()["shards_ingested"] == 3
    finally:
        assert s.stop() in (0, -15)
