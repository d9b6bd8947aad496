"""A live model under a plan (placement/runtime/live.py): the shipped demo MoE run on real gloo ranks, each holding
only its slots' experts and routing its own tokens, gives the single-process logits, and the bytes it moves
equal ``metrics.traffic`` on the routing it recorded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from placement.cli.runtime import register
from placement.graph import graph_from_routes
from placement.metrics import traffic
from placement.plan import Plan
from placement.planner import make_plan
from placement.runtime import launch as ep_launch
from placement.runtime.dispatch import EPError
from placement.runtime.launch import LiveReport, live_bench
from placement.runtime.live import LiveJob, make_batches, moe_blocks, reference_run
from placement.solvers.base import PlanSpec
from placement.trace.schema import RouteArrays
from profiler.api import LoadedModel, load_model, load_prompts

TOL = 1e-5
MAX_LEN = 48


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with ep_launch.torch_threads(1):
        yield


@cache
def builtin() -> LoadedModel:
    return load_model("builtin")


def routing(loaded: LoadedModel, prompts: list[str]) -> np.ndarray:
    """int64 [T, L, K]: the single-process model's routing of ``prompts`` (the profiler's capture path)."""
    return reference_run(loaded, make_batches([loaded.tokenizer(p)[:MAX_LEN] for p in prompts], 8, loaded.pad_id))[1]


@cache
def plans(G: int) -> dict[str, Plan]:
    """Contiguous, affinity and EPLB with 4 redundant slots, fitted on prompts the runs do not use."""
    loaded = builtin()
    graph = graph_from_routes(routing(loaded, load_prompts("builtin")[32:64]), loaded.trace_meta())
    return {
        "contiguous": make_plan(graph, PlanSpec(G), "contiguous"),
        "affinity": make_plan(graph, PlanSpec(G, time_limit=5.0), "affinity"),
        "eplb-replicated": make_plan(graph, PlanSpec(G, num_redundant=4), "eplb"),
    }


def check(rep: LiveReport, plan: Plan, ref_TLK: np.ndarray) -> None:
    job = rep.job
    assert job.bytes_equal, f"{job.name}: measured {job.cross_rank_bytes} != predicted {job.predicted_bytes}"
    assert job.cross_rank_bytes > 0 and job.token_bytes == 128 * 4, job.name
    assert job.max_rel_error <= TOL, f"{job.name}: logits rel. error {job.max_rel_error:.2e}"
    assert rep.routing_mismatch == 0 and np.array_equal(rep.ids_TLK, ref_TLK), job.name
    routes = RouteArrays(ref_TLK, np.zeros(len(ref_TLK), np.int64), np.zeros(len(ref_TLK), np.int32))
    np.testing.assert_array_equal(job.measured_L2GG, traffic(plan, routes, job.mode))
    assert rep.gather_bytes > 0 and rep.gather_seconds_L.shape == (3,) and job.layer_seconds_L.shape == (3,)


@pytest.mark.parametrize("world", [2, 4])
def test_live_demo_model_equals_single_process(world: int) -> None:
    """One launch per world size: every plan in home mode, the replicated plan in follow mode too."""
    prompts = load_prompts("builtin")[:5]
    ps = plans(world)
    jobs = [LiveJob(f"{name}/home", p, "home") for name, p in ps.items()]
    jobs.append(LiveJob("eplb-replicated/follow", ps["eplb-replicated"], "follow"))
    reports = live_bench("builtin", jobs, world, prompts, batch_size=2, max_len=MAX_LEN)
    ref_TLK = routing(builtin(), prompts)
    assert [r.job.name for r in reports] == [j.name for j in jobs]
    for rep, job in zip(reports, jobs, strict=True):
        check(rep, job.plan, ref_TLK)
    by = {r.job.name: r.job.cross_rank_bytes for r in reports}
    assert by["eplb-replicated/follow"] != by["eplb-replicated/home"]


def test_live_hf_mixtral_tiny() -> None:
    pytest.importorskip("transformers")
    loaded = load_model("hf-config:mixtral-tiny")
    E, L = loaded.num_experts, len(loaded.layers)
    rng = np.random.default_rng(0)
    rep_LP = np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, 2)]) for _ in range(L)])
    plan = Plan(2, 1, E, loaded.layers, rep_LP)
    prompts = load_prompts("builtin")[:3]
    (rep,) = live_bench("hf-config:mixtral-tiny", [LiveJob("mixtral", plan, "home")], 2, prompts, max_len=32)
    check_hf = rep.job
    assert check_hf.bytes_equal and check_hf.max_rel_error <= TOL and rep.routing_mismatch == 0
    assert check_hf.token_bytes == 64 * 4


def test_make_batches_keep_global_token_order() -> None:
    bs = make_batches([[1, 2, 3], [], [4], [5, 6]], 2, pad_id=0)
    assert [b.first for b in bs] == [0, 4] and [b.num_tokens for b in bs] == [4, 2]
    np.testing.assert_array_equal(bs[0].input_BS, [[1, 2, 3], [4, 0, 0]])


def test_unsupported_hf_family_is_refused() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(EPError, match="shared experts"):
        moe_blocks(load_model("hf-config:qwen2-moe-tiny").module)


def test_bad_plans_fail_before_any_process_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_launch(*a: object, **k: object) -> None:
        raise AssertionError("a process group was started")

    monkeypatch.setattr(ep_launch, "launch", no_launch)
    good = plans(4)["contiguous"]
    E = good.num_experts
    cases = [
        (Plan(4, 1, E, (0, 1, 2), good.phy2log), 4, r"MoE layers \[0, 1, 2\], model moeplace-demo-moe has 16"),
        (Plan(4, 1, 8, good.layers, np.tile(np.arange(8), (3, 1))), 4, "plan is for 8 experts"),
        (good, 2, "--ranks 2 does not match the plan's 4 GPUs"),
    ]
    for plan, world, msg in cases:
        with pytest.raises(EPError, match=msg) as info:
            live_bench("builtin", [LiveJob("x", plan, "home")], world, ["hello"])
        assert "\n" not in str(info.value)


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:
        """Nothing."""

    return app


def test_cli_ep_bench_model(tmp_path: Path) -> None:
    good, bad = tmp_path / "p.json", tmp_path / "bad.json"
    plans(2)["affinity"].save(good)
    p = plans(2)["affinity"]
    Plan(2, 1, p.num_experts, (0, 1, 2), p.phy2log).save(bad)
    base = ["ep-bench", "--model", "builtin", "--ranks", "2", "--limit", "2", "--max-len", "24"]
    res = CliRunner().invoke(_app(), [*base, "--plan", str(good), "--mode", "both", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["mode"] for r in out["reports"]] == ["home", "follow"]
    for r in out["reports"]:
        assert r["bytes_equal"] and r["max_rel_error"] <= TOL and r["routing_mismatch"] == 0
        assert r["num_prompts"] == 2 and len(r["layer_seconds"]) == 3
    res = CliRunner().invoke(_app(), [*base, "--plan", str(good)])
    assert res.exit_code == 0 and "all-gather for attention" in res.stdout, res.output
    for extra, msg in [
        (["--plan", str(bad)], "MoE layers [0, 1, 2], model moeplace-demo-moe has 16 experts and MoE layers [1, 2, 3]"),
        (["--plan", str(good), "--trace", "x.npz"], "pass exactly one of --trace"),
        (["--plan", str(good), "--limit", "0"], "--limit 0"),
    ]:
        res = CliRunner().invoke(_app(), [*base, *extra])
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and msg in res.stderr, res.stderr


def test_a_wrong_expert_output_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The logits check is not vacuous: ranks whose experts are off by 0.1% (forked ranks inherit the patch)."""
    from placement.runtime import replay as ep_runtime

    real = ep_runtime.grouped_ffn
    monkeypatch.setattr(ep_runtime, "grouped_ffn", lambda *a: real(*a) * 1.001)
    (rep,) = live_bench("builtin", [LiveJob("off", plans(2)["affinity"], "home")], 2, ["hello world"], max_len=16)
    assert rep.job.max_rel_error > 1e-5 and rep.job.bytes_equal
