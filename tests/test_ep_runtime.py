"""The expert-parallel runtime on real gloo process groups: outputs equal the dense reference, and the bytes
it moves equal ``metrics.traffic`` exactly, for contiguous, permuted, EPLB and replicated plans, both modes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from placement.cli.runtime import register
from placement.graph import graph_from_routes
from placement.metrics import MODES, traffic
from placement.plan import Plan
from placement.planner import make_plan
from placement.runtime import launch as ep_launch
from placement.runtime.dispatch import (
    EPError,
    ReplicaTable,
    build_dispatch,
    choose_ranks,
    combine_ranks,
    sent_off_rank,
)
from placement.runtime.launch import JobReport, ep_bench, validate_job
from placement.runtime.replay import (
    EPJob,
    EPTask,
    LocalExperts,
    ModelSpec,
    dense_reference,
    expert_weights,
    grouped_ffn,
)
from placement.solvers.base import PlanSpec
from placement.trace.dataset import open_trace
from placement.trace.schema import RouteArrays, TraceMeta

DEEPSEEK = Path(__file__).resolve().parents[2] / "shared" / "traces" / "deepseek-v2-lite-chat.dev.npz"
TOL = 1e-5
SMALL = ModelSpec(hidden=32, ffn=16, seed=3)


def synthetic_routes(T: int = 96, L: int = 3, K: int = 2, E: int = 8, seed: int = 0) -> np.ndarray:
    """int16 [T, L, K] distinct ids per token, with a few unrecorded (-1) and one repeated id."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T * L)]).reshape(T, L, K).astype(np.int16)
    ids[3, -1, -1] = -1
    ids[5, 0, :] = -1
    ids[7, -1, -1] = ids[7, -1, 0]
    return ids


def synthetic_plans(ids: np.ndarray, G: int, E: int = 8) -> dict[str, Plan]:
    L, K = ids.shape[1], ids.shape[2]
    meta = TraceMeta("synthetic", E, K, tuple(range(L)))
    graph = graph_from_routes(ids, meta)
    rng = np.random.default_rng(G)
    layers = meta.layers
    hand_rep = np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, G)]) for _ in range(L)])
    return {
        "contiguous": make_plan(graph, PlanSpec(G), "contiguous"),
        "permuted": Plan(G, 1, E, layers, np.stack([rng.permutation(E) for _ in range(L)])),
        "eplb": make_plan(graph, PlanSpec(G), "eplb"),
        "eplb-replicated": make_plan(graph, PlanSpec(G, num_redundant=G), "eplb"),
        "replicated-2-nodes": Plan(G, 2, E, layers, hand_rep),
    }


def jobs_for(plans: dict[str, Plan], ids: np.ndarray, gates: np.ndarray | None = None) -> list[EPJob]:
    return [EPJob(f"{name}/{mode}", p, mode, ids, gates) for name, p in plans.items() for mode in MODES]


def deepseek_jobs(G: int) -> list[EPJob]:
    if not DEEPSEEK.exists():
        return []
    tr = open_trace(DEEPSEEK)
    all_TLK = tr.read_all().expert_ids_TLK
    ids = all_TLK[:192]
    graph = graph_from_routes(all_TLK[:4096], tr.meta)
    plans = {
        "ds-contiguous": make_plan(graph, PlanSpec(G), "contiguous"),
        "ds-eplb-replicated": make_plan(graph, PlanSpec(G, num_redundant=G), "eplb"),
    }
    return jobs_for(plans, ids)


def check(rep: JobReport) -> None:
    assert rep.bytes_equal, f"{rep.name}: measured {rep.cross_rank_bytes} != predicted {rep.predicted_bytes}"
    assert rep.cross_rank_bytes > 0, rep.name
    assert rep.max_rel_error <= TOL, f"{rep.name}: rel. error {rep.max_rel_error:.2e}"
    assert rep.layer_seconds_L.shape == (rep.measured_L2GG.shape[0],)
    assert (rep.measured_L2GG[:, :, np.arange(rep.num_ranks), np.arange(rep.num_ranks)] == 0).all()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small matmuls in this process: one OpenMP thread (two are ~9x slower on a busy 2-core machine)."""
    with ep_launch.torch_threads(1):
        yield


# ------------------------------------------------------------------------------------------------ pure parts


def test_dispatch_rows_equal_evaluator_without_a_process_group() -> None:
    """Every rank's off-rank dispatch rows at layer 0 add up to metrics.traffic's dispatch matrix."""
    ids = synthetic_routes()
    T = ids.shape[0]
    for plan in synthetic_plans(ids, 4).values():
        table = ReplicaTable.from_plan(plan)
        G = plan.num_gpus
        sent_GG = np.zeros((G, G), dtype=np.int64)
        for r in range(G):
            tok_T = np.arange(r, T, G)
            at_T = np.full(tok_T.size, r)
            rank_TK = choose_ranks(table, 0, tok_T, at_T, ids[tok_T, 0])
            gates = np.ones(rank_TK.shape, np.float32)
            d = build_dispatch(
                tok_T, ids[tok_T, 0].astype(np.int64), gates, rank_TK, combine_ranks(rank_TK, at_T, "home"), G
            )
            sent_GG[r] = sent_off_rank(d.send_counts_G, r)
        routes = RouteArrays(ids, np.zeros(T, np.int64), np.zeros(T, np.int32))
        np.testing.assert_array_equal(sent_GG, traffic(plan, routes, "home")[0, 0])


def test_grouped_ffn_equals_per_token_loop() -> None:
    ids = synthetic_routes(T=16)[:, 0].astype(np.int64)
    ids[2, 1] = ids[2, 0]  # a repeated id counts twice
    ids[4, 0] = -1
    x_ND = torch.randn(16, SMALL.hidden)
    gate_NK = torch.rand(16, 2)
    w = tuple(torch.stack(ws) for ws in zip(*(expert_weights(SMALL, 0, e) for e in range(8)), strict=True))
    y_ND = grouped_ffn(x_ND, torch.from_numpy(ids), gate_NK, w)  # type: ignore[arg-type]
    for n in range(16):
        want = torch.zeros(SMALL.hidden)
        for k in range(2):
            e = int(ids[n, k])
            if e >= 0:
                w1, w3, w2 = expert_weights(SMALL, 0, e)
                want += gate_NK[n, k] * (w2 @ (torch.nn.functional.silu(w1 @ x_ND[n]) * (w3 @ x_ND[n])))
        torch.testing.assert_close(y_ND[n], want, rtol=1e-5, atol=1e-6)


def test_replicas_get_identical_weights_and_local_slots() -> None:
    plan = synthetic_plans(synthetic_routes(), 4)["eplb-replicated"]
    for r in range(4):
        loc = LocalExperts.build(plan, r, SMALL, torch.device("cpu"))
        for l in range(plan.num_layers):
            for s, e in enumerate(loc.slot_expert_LS[l]):
                assert loc.slot_expert_LS[l, loc.slot_of_LE[l, e]] == e
                torch.testing.assert_close(loc.weights_L[l][0][s], expert_weights(SMALL, l, int(e))[0])
        with pytest.raises(EPError, match="does not hold"):
            absent = np.setdiff1d(np.arange(8), loc.slot_expert_LS[0])
            loc.local_slots(0, absent[:1, None], r)


def test_bad_requests_fail_before_any_process_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_launch(*a: object, **k: object) -> None:
        raise AssertionError("a process group was started")

    monkeypatch.setattr(ep_launch, "launch", no_launch)
    ids = synthetic_routes()
    plan = synthetic_plans(ids, 4)["eplb"]
    cases = [
        (EPJob("r", plan, "home", ids), 2, r"--ranks 2 does not match the plan's 4 GPUs"),
        (EPJob("l", plan, "home", ids[:, :2]), 4, "the plan has 3 MoE layers, the routes 2"),
        (EPJob("e", plan, "home", ids + 8), 4, "the plan has 8 experts"),
        (EPJob("m", plan, "sideways", ids), 4, "mode 'sideways'"),
    ]
    for job, world, msg in cases:
        with pytest.raises(EPError, match=msg) as info:
            ep_bench([job], world, SMALL)
        assert "\n" not in str(info.value)
    with pytest.raises(EPError, match="hidden=0"):
        ep_bench([EPJob("h", plan, "home", ids)], 4, ModelSpec(hidden=0))
    validate_job(EPJob("ok", plan, "follow", ids), 4)


# ------------------------------------------------------------------------------------------------ gloo groups


@pytest.mark.parametrize("world", [2, 4])
def test_ep_stack_equals_reference_and_evaluator(world: int) -> None:
    """One launch per world size runs every plan in both modes (plus a DeepSeek-V2-Lite slice at R = 4)."""
    ids = synthetic_routes(seed=world)
    gates = np.random.default_rng(1).random(ids.shape).astype(np.float32)
    jobs = jobs_for(synthetic_plans(ids, world), ids, gates)
    if world == 4:
        jobs += deepseek_jobs(world)
    reports = ep_bench(jobs, world, SMALL, backend="gloo", repeats=2 if world == 2 else 1)
    assert [r.name for r in reports] == [j.name for j in jobs]
    for rep in reports:
        check(rep)
    by_name = {r.name: r for r in reports}
    # follow moves tokens, so it differs from home somewhere; replicas on the source rank save traffic.
    assert any(by_name[f"{n}/home"].cross_rank_bytes != by_name[f"{n}/follow"].cross_rank_bytes for n in ("eplb",))


def test_deepseek_slice_present_or_skipped() -> None:
    if not DEEPSEEK.exists():
        pytest.skip(f"{DEEPSEEK} absent: the DeepSeek-V2-Lite slice runs only where the shared traces are")
    assert len(deepseek_jobs(4)) == 4


def test_dense_reference_is_deterministic() -> None:
    ids = synthetic_routes()
    a = dense_reference(SMALL, ids, None)
    b = dense_reference(SMALL, ids, None)
    assert torch.equal(a, b) and a.abs().max() < 1.0  # tanh keeps states bounded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_backend() -> None:
    ids = synthetic_routes()
    plans = synthetic_plans(ids, 2)
    for rep in ep_bench(jobs_for({"eplb": plans["eplb"]}, ids), 2, SMALL, backend="nccl"):
        check(rep)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture()
def cli_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    ids = synthetic_routes(T=48)
    trace = tmp_path / "t.npz"
    np.savez(trace, routes=ids, num_experts=np.int64(8))
    meta = open_trace(trace).meta
    graph = graph_from_routes(ids, meta)
    plan2, plan4 = tmp_path / "p2.json", tmp_path / "p4.json"
    make_plan(graph, PlanSpec(2, num_redundant=2), "eplb").save(plan2)
    make_plan(graph, PlanSpec(4), "contiguous").save(plan4)
    return trace, plan2, plan4


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer from collapsing the app into ep-bench
        """Nothing."""

    return app


def test_cli_ep_bench_json(cli_files: tuple[Path, Path, Path]) -> None:
    trace, plan2, _ = cli_files
    args = ["ep-bench", "--plan", str(plan2), "--trace", str(trace), "--ranks", "2", "--mode", "both"]
    res = CliRunner().invoke(_app(), [*args, "--hidden", "16", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["mode"] for r in out["reports"]] == ["home", "follow"]
    for r in out["reports"]:
        assert r["bytes_equal"] and r["measured_bytes_pair"] == r["predicted_bytes_pair"]
        assert r["max_rel_error"] <= TOL and len(r["layer_seconds"]) == 3


def test_cli_ep_bench_bad_input(cli_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    trace, plan2, plan4 = cli_files
    other = tmp_path / "other.npz"
    np.savez(other, routes=synthetic_routes(L=2), num_experts=np.int64(8))
    cases = [
        ([str(plan4), str(trace), "2"], "--ranks 2 does not match the plan's 4 GPUs"),
        ([str(plan2), str(other), "2"], "plan is for a model with 8 experts and 3 MoE layers"),
        ([str(tmp_path / "nope.json"), str(trace), "2"], "no such plan file"),
    ]
    for (plan, tr, ranks), msg in cases:
        res = CliRunner().invoke(_app(), ["ep-bench", "--plan", plan, "--trace", tr, "--ranks", ranks])
        assert res.exit_code == 1
        assert res.stderr.count("\n") == 1 and msg in res.stderr, res.stderr
    res = CliRunner().invoke(_app(), ["ep-bench", "--help"])
    assert res.exit_code == 0 and "measured cross-rank bytes" in res.stdout


@pytest.mark.slow
def test_spawned_ranks_match_forked_ranks() -> None:
    """The spawn start method (what nccl uses) gives the same counters and outputs as fork."""
    ids = synthetic_routes(T=32)
    plan = synthetic_plans(ids, 2)["eplb-replicated"]
    task = EPTask(SMALL, tuple(jobs_for({"p": plan}, ids)))
    forked = ep_launch.launch(task, 2, "gloo", start_method="fork")
    spawned = ep_launch.launch(task, 2, "gloo", start_method="spawn")
    for a_jobs, b_jobs in zip(forked, spawned, strict=True):
        for a, b in zip(a_jobs, b_jobs, strict=True):
            np.testing.assert_array_equal(a.sent_rows_L2G, b.sent_rows_L2G)
            np.testing.assert_array_equal(a.tok_T, b.tok_T)
            np.testing.assert_allclose(a.x_TD, b.x_TD, rtol=1e-6, atol=1e-7)
