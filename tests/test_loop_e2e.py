"""The loop closed end to end: ``moeplace profile --ray`` writes routing into the dataset a real ``moeplace serve``
watches (uvicorn in a subprocess, real HTTP), the service re-plans, and the running expert-parallel ranks of the
live demo model move their expert weights to the new plan version by the service's move list: bytes measured on
the ranks equal the list's, and the logits after the migration equal the single-process model's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from placement.plan import Plan
from placement.replan.moves import MoveList, count_moves
from placement.runtime import launch as ep_launch
from placement.runtime.live import moe_blocks
from placement.runtime.migrate import live_migrate_bench
from placement.trace.dataset import open_trace
from profiler.api import load_model, load_prompts
from tests.conftest import Cli
from tests.serve_support import Server

TOL = 1e-5
G = 4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with ep_launch.torch_threads(1):
        yield


@pytest.mark.ray
@pytest.mark.slow
def test_ray_profile_service_replan_and_live_migration(tmp_path: Path, cli: Cli) -> None:
    loaded = load_model("builtin")
    meta = loaded.trace_meta()
    E, L = meta.num_experts, meta.num_layers
    plan_a = Plan(G, 1, E, meta.layers, np.tile(np.arange(E), (L, 1)), model_name=meta.model_name)  # contiguous
    plan_a.save(tmp_path / "plan.json")
    nbytes = sum(t.numel() * t.element_size() for t in moe_blocks(loaded.module)[0].expert(0))
    ds, state = tmp_path / "ds", tmp_path / "state"
    code, _, err = cli("profile", "--ray", "--workers", 2, "--limit", 24, "--max-len", 64, "--out", ds)
    assert code == 0, err
    tokens = open_trace(ds).num_tokens
    s = Server(
        tmp_path / "plan.json", state, ds, "--time-limit", "3", "--half-life", "0", "--expert-bytes", str(nbytes)
    )
    try:
        s.wait_for(lambda st: st["observed_tokens"] == tokens)
        res = s.post("/v1/replan").json()
        assert res["changed"], res
        version = res["version"]
        plan_b = Plan.from_json(s.get(f"/v1/plan/{version}").content)
        prev = Plan.from_json(s.get(f"/v1/plan/{version - 1}").content)
        moves = MoveList.from_json(s.get(f"/v1/moves/{version}").content)
    finally:
        assert s.stop() in (0, -15)
    assert np.array_equal(prev.phy2log, plan_a.phy2log) and len(moves.moves) == count_moves(plan_a, plan_b) > 0
    prompts = load_prompts("builtin")[24:28]  # prompts the service has not seen
    rep = live_migrate_bench("builtin", plan_a, plan_b, G, prompts, moves=moves.moves, batch_size=2, max_len=48)
    assert rep.bytes_equal and int(rep.measured_bytes_GG.sum()) == moves.total_bytes
    for fwd in (rep.before, rep.after):
        assert fwd.job.max_rel_error <= TOL and fwd.job.bytes_equal and fwd.routing_mismatch == 0
