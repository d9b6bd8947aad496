"""Plan migration in the running EP runtime (placement/runtime/migrate.py) on real gloo process groups: expert
weights travel between ranks by the move list of placement.replan.moves, the bytes measured on both sides equal
the list's, and the outputs after the migration equal the single-process reference, for trace replay and the
live demo model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from placement.graph import graph_from_routes
from placement.plan import Plan
from placement.planner import make_plan
from placement.replan.moves import Move, count_moves, move_list, relabel_gpus
from placement.runtime import launch as ep_launch
from placement.runtime.dispatch import EPError, Exchanger
from placement.runtime.live import make_batches, moe_blocks, reference_run
from placement.runtime.migrate import (
    MigrateReport,
    check_moves,
    live_migrate_bench,
    migrate,
    migrate_bench,
)
from placement.runtime.replay import LocalExperts, ModelSpec
from placement.solvers.base import PlanSpec
from placement.trace.schema import TraceMeta
from profiler.api import load_model, load_prompts
from tests.conftest import Cli

TOL = 1e-5
SMALL = ModelSpec(hidden=32, ffn=16, seed=5)
EXPERT_BYTES = 3 * 32 * 16 * 4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with ep_launch.torch_threads(1):
        yield


def routes(T: int = 80, L: int = 3, K: int = 2, E: int = 8, seed: int = 0) -> np.ndarray:
    """int16 [T, L, K]: distinct ids per token, one unrecorded id."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T * L)]).reshape(T, L, K).astype(np.int16)
    ids[2, 1, 1] = -1
    return ids


def plan_pair(G: int, redundant: int = 0) -> tuple[Plan, Plan]:
    """Plan A fitted on one half of a trace (EPLB), plan B on the other (affinity), B relabelled to A's GPUs."""
    ids = routes()
    meta = TraceMeta("synthetic", 8, 2, (0, 1, 2))
    spec = PlanSpec(G, num_redundant=redundant, time_limit=2.0)
    a = make_plan(graph_from_routes(ids[:40], meta), spec, "eplb")
    b = make_plan(graph_from_routes(ids[40:], meta), spec, "affinity" if redundant == 0 else "eplb")
    return a, relabel_gpus(a, b)


def check_report(rep: MigrateReport, total_bytes: int) -> None:
    for fwd in (rep.before, rep.after):
        job = getattr(fwd, "job", fwd)
        assert job.max_rel_error <= TOL, f"{job.name}: rel. error {job.max_rel_error:.2e}"
        assert job.bytes_equal, f"{job.name}: token bytes differ from metrics.traffic"
    assert rep.bytes_equal, f"measured {rep.measured_bytes_GG.tolist()} != listed {rep.listed_bytes_GG.tolist()}"
    assert int(rep.measured_bytes_GG.sum()) == int(rep.received_bytes_GG.sum()) == total_bytes
    assert np.trace(rep.measured_bytes_GG) == 0


@pytest.mark.parametrize(("world", "redundant"), [(2, 0), (4, 0), (4, 4)])
def test_replay_after_migration_equals_reference(world: int, redundant: int) -> None:
    a, b = plan_pair(world, redundant)
    ml = move_list(a, b, EXPERT_BYTES)
    assert len(ml.moves) == count_moves(a, b) > 0
    rep = migrate_bench(a, b, routes(), world, moves=ml.moves, model=SMALL, backend="gloo")
    check_report(rep, ml.total_bytes)
    assert rep.num_moves == len(ml.moves) and rep.num_rounds == ml.num_rounds
    assert rep.peak_held <= a.slots_per_gpu + 1, "the list's rounds need one spare slot per GPU"
    d = rep.to_dict()
    assert d["listed_bytes_total"] == ml.total_bytes and d["after"]["max_rel_error"] <= TOL


def test_follow_mode_and_default_move_list() -> None:
    a, b = plan_pair(4)
    rep = migrate_bench(a, b, routes(seed=1), 4, mode="follow", model=SMALL, backend="gloo")
    check_report(rep, count_moves(a, b) * EXPERT_BYTES)


def test_same_plan_moves_nothing() -> None:
    a, _ = plan_pair(2)
    rep = migrate_bench(a, a, routes(), 2, model=SMALL, backend="gloo")
    check_report(rep, 0)
    assert rep.num_moves == 0


def _marked(local: LocalExperts, rank: int) -> LocalExperts:
    """Weights replaced by a value naming (layer, expert, rank that held it under A): 1000 l + 10 e + rank."""
    weights = []
    for l, w in enumerate(local.weights_L):
        mark_S = torch.tensor([1000.0 * l + 10.0 * e + rank for e in local.slot_expert_LS[l].tolist()])
        weights.append(tuple(torch.ones_like(t) * mark_S.view(-1, 1, 1) for t in w))
    return replace(local, weights_L=tuple(weights))  # type: ignore[arg-type]


def _travel_rank(ex: Exchanger, task: tuple[Plan, Plan, tuple[Move, ...]]) -> list[np.ndarray]:
    plan_a, plan_b, moves = task
    local = _marked(LocalExperts.build(plan_a, ex.rank, SMALL, ex.device), ex.rank)
    out, _ = migrate(ex, local, plan_b, moves)
    return [w[0][:, 0, 0].numpy() for w in out.weights_L]


def test_weights_come_from_the_listed_source() -> None:
    """Each rank's plan-B slots hold exactly the tensors the move list's source sent (marked per source rank),
    and the experts it kept are its own: nothing is regenerated at the destination."""
    a, b = plan_pair(4)
    ml = move_list(a, b, EXPERT_BYTES)
    got = ep_launch.launch((a, b, ml.moves), 4, "gloo", rank_fn=_travel_rank)
    src = {(m.layer, m.expert, m.dst_gpu): m.src_gpu for m in ml.moves}
    S = b.slots_per_gpu
    for g in range(4):
        for l in range(b.num_layers):
            for s, e in enumerate(b.phy2log[l, g * S : (g + 1) * S].tolist()):
                assert got[g][l][s] == 1000 * l + 10 * e + src.get((l, e, g), g), (g, l, s)


def test_bad_move_lists_fail_before_any_process_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_launch(*a: object, **k: object) -> None:
        raise AssertionError("a process group was started")

    monkeypatch.setattr(ep_launch, "launch", no_launch)
    a, b = plan_pair(4)
    moves = move_list(a, b, EXPERT_BYTES).moves
    m0 = moves[0]
    wrong_src = next(g for g in range(4) if not a.holders_LEG[m0.layer, m0.expert, g])
    relay = next(g for g in range(4) if g not in (m0.src_gpu, m0.dst_gpu))  # from m0's destination, same round
    cases = [
        (moves[1:], "leaves expert"),
        ((replace(m0, src_gpu=wrong_src), *moves[1:]), "source does not hold"),
        ((replace(m0, bytes=1), *moves[1:]), "an expert of this runtime has 6144"),
        ((replace(m0, dst_gpu=m0.src_gpu), *moves[1:]), "same GPU"),
        ((replace(m0, layer=7), *moves[1:]), "out of range"),
        ((*moves, replace(m0, src_gpu=m0.dst_gpu, dst_gpu=relay)), "hold the expert before the round"),
    ]
    for mv, msg in cases:
        with pytest.raises(EPError, match=msg) as info:
            migrate_bench(a, b, routes(), 4, moves=mv, model=SMALL, backend="gloo")
        assert "\n" not in str(info.value)
    other = Plan(4, 1, 8, (0, 1), a.phy2log[:2])
    with pytest.raises(EPError, match="does not fit plan A"):
        check_moves(a, other, (), EXPERT_BYTES)


@cache
def live_plans(G: int) -> tuple[Plan, Plan]:
    """Contiguous (A) and affinity fitted on other prompts (B, relabelled to A's GPUs) for the demo model."""
    loaded = load_model("builtin")
    prompts = load_prompts("builtin")[32:64]
    ids = reference_run(loaded, make_batches([loaded.tokenizer(p)[:48] for p in prompts], 8, loaded.pad_id))[1]
    graph = graph_from_routes(ids, loaded.trace_meta())
    a = make_plan(graph, PlanSpec(G), "contiguous")
    return a, relabel_gpus(a, make_plan(graph, PlanSpec(G, time_limit=3.0), "affinity"))


def test_live_model_after_migration_equals_single_process() -> None:
    a, b = live_plans(4)
    w1, w3, w2 = moe_blocks(load_model("builtin").module)[0].expert(0)
    nbytes = sum(t.numel() * t.element_size() for t in (w1, w3, w2))
    assert nbytes == 3 * 128 * 128 * 4
    ml = move_list(a, b, nbytes)
    rep = live_migrate_bench("builtin", a, b, 4, load_prompts("builtin")[:4], moves=ml.moves, batch_size=2, max_len=48)
    check_report(rep, ml.total_bytes)
    assert rep.before.routing_mismatch == 0 and rep.after.routing_mismatch == 0
    assert rep.peak_held <= a.slots_per_gpu + 1
    assert rep.after.job.cross_rank_bytes != rep.before.job.cross_rank_bytes
    with pytest.raises(EPError, match="does not match the plan's 4 GPUs"):
        live_migrate_bench("builtin", a, b, 2, ["hello"])


def test_cli_ep_bench_migrate_to(tmp_path: Path, cli: Cli) -> None:
    a, b = plan_pair(4)
    pa, pb, npz, mv = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "t.npz", tmp_path / "moves.json"
    a.save(pa)
    b.save(pb)
    np.savez(npz, routes=routes(), num_experts=8)
    ml = move_list(a, b, EXPERT_BYTES)
    mv.write_text(ml.to_json())
    base = ["ep-bench", "--plan", pa, "--migrate-to", pb, "--trace", npz, "--ranks", 4, "--hidden", 32, "--ffn", 16]
    code, out, err = cli(*base, "--moves", mv, "--json", "--backend", "gloo")
    assert code == 0, err
    d = json.loads(out)
    assert d["bytes_equal"] and d["measured_bytes_total"] == d["listed_bytes_total"] == ml.total_bytes
    assert d["after"]["max_rel_error"] <= TOL and d["migrate_to"] == str(pb)
    code, out, err = cli(*base, "--backend", "gloo")
    assert code == 0 and "equal per rank pair: yes" in out, err
    mv.write_text(replace(ml, moves=tuple(replace(m, bytes=4) for m in ml.moves)).to_json())
    code, _, err = cli(*base, "--moves", mv)
    assert code == 1 and err.count("\n") == 1 and "an expert of this runtime has 6144" in err, err
    code, _, err = cli(*base, "--mode", "both")
    assert code == 1 and "--migrate-to runs one --mode" in err, err


def test_cli_ep_bench_migrate_live_model(tmp_path: Path, cli: Cli) -> None:
    a, b = live_plans(4)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    a.save(pa)
    b.save(pb)
    args = ["--plan", pa, "--migrate-to", pb, "--model", "builtin", "--ranks", 4, "--limit", 2, "--max-len", 24]
    code, out, err = cli("ep-bench", *args)
    assert code == 0, err
    assert out.count("max relative output error vs dense reference") == 2 and "equal per rank pair: yes" in out
