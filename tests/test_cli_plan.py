"""``moeplace plan`` / ``eval`` / ``demo`` end to end: real files, bad input handled with one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from placement.plan import Plan
from placement.trace.dataset import write_trace
from placement.trace.synthetic import synthetic_trace
from tests.conftest import one_error_line, topic_trace_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return topic_trace_dir(tmp_path_factory, 2000)


@pytest.mark.parametrize("solver", ["contiguous", "round_robin", "eplb", "affinity", "auto"])
def test_plan_then_eval(cli, dataset: Path, tmp_path: Path, solver: str) -> None:
    out = tmp_path / "plan.json"
    code, stdout, stderr = cli(
        "plan",
        "--trace",
        dataset,
        "--gpus",
        4,
        "--solver",
        solver,
        "--time-limit",
        2,
        "--prompts",
        "train",
        "--out",
        out,
    )
    assert code == 0, stderr
    plan = Plan.load(out)
    assert plan.num_gpus == 4 and plan.num_experts == 8
    fc = plan.provenance["unseen_imbalance"]  # the trace has prompt ids: the plan forecasts unseen imbalance
    assert 1.0 <= fc["p10"] <= fc["p50"] <= fc["p90"] and fc["folds"] >= 8
    assert f"the busiest GPU should carry about {fc['p50']:.2f}x the mean load" in stdout
    code, stdout, stderr = cli("eval", "--plan", out, "--trace", dataset, "--prompts", "test", "--json")
    assert code == 0, stderr
    res = json.loads(stdout)
    # the CLI's numbers are evaluate()'s on the held-out half of the prompts (default split: 0.5, seed 0)
    from placement.graph import graph_from_routes
    from placement.metrics import evaluate
    from placement.trace.dataset import open_trace
    from placement.trace.schema import split_by_prompt

    tr = open_trace(dataset)
    routes = tr.read_all(with_gates=False)
    held_out = routes.take(~split_by_prompt(routes.seq_ids_T, 0.5, 0))
    want = evaluate(plan, graph_from_routes(held_out.expert_ids_TLK, tr.meta, with_coact=False))
    for key in ("colocation", "imbalance_max", "imbalance_mean"):
        assert res[key] == pytest.approx(want[key], rel=1e-9), key
    assert res["home"]["bytes_total"] == res["home"]["bytes_intra_node"]


def test_plan_bad_inputs_leave_nothing(cli, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    out.write_text("keep me")
    for args, needle in [
        (("--gpus", 3), "split evenly"),
        (("--gpus", 4, "--redundant", 2), "not divisible by --gpus"),
        (("--gpus", 4, "--time-limit", 0), "--time-limit"),
        (("--gpus", 4, "--solver", "nope"), "unknown --solver"),
    ]:
        code, _, stderr = cli("plan", "--trace", dataset, "--out", out, *args)
        assert code != 0
        assert needle in one_error_line(stderr)
        assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_plan_infeasible_balance_for_ilp(cli, dataset: Path, tmp_path: Path) -> None:
    code, _, stderr = cli(
        "plan", "--trace", dataset, "--gpus", 4, "--solver", "ilp", "--balance", 0, "--out", tmp_path / "p.json"
    )
    assert code != 0 and "--balance" in one_error_line(stderr)
    assert not (tmp_path / "p.json").exists()


def test_eval_bad_plans(cli, dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, stderr = cli("eval", "--plan", bad, "--trace", dataset)
    assert code != 0 and "bad.json" in one_error_line(stderr)
    other = tmp_path / "other.json"
    Plan(2, 1, 16, (0, 1, 2, 3), np.tile(np.arange(16), (4, 1))).save(other)
    code, _, stderr = cli("eval", "--plan", other, "--trace", dataset)
    assert code != 0 and "same model" in one_error_line(stderr)
    code, _, stderr = cli("eval", "--plan", tmp_path / "missing.json", "--trace", dataset)
    assert code != 0 and "no such plan" in one_error_line(stderr)


def test_every_command_has_help(cli) -> None:
    from placement.cli import build_app

    app = build_app()
    names = [c.name for c in app.registered_commands]
    assert {"import", "stats", "plan", "eval", "profile", "demo"} <= set(names)
    for c in app.registered_commands:
        assert c.help or (c.callback is not None and c.callback.__doc__), f"command {c.name} has no help text"
        code, stdout, _ = cli(c.name, "--help")
        assert code == 0 and "Usage" in stdout


@pytest.mark.slow
def test_demo_runs_offline(cli, tmp_path: Path) -> None:
    code, stdout, stderr = cli("demo", "--out", tmp_path / "demo", "--gpus", "4", "--time-limit", 2, "--json")
    assert code == 0, stderr
    res = json.loads(stdout)
    solvers = {r["solver"] for r in res["rows"] if r["status"] != "no plan"}
    assert {"contiguous", "eplb", "affinity"} <= solvers
    best = max(r["colocation"] for r in res["rows"] if r["solver"] == "affinity")
    base = max(r["colocation"] for r in res["rows"] if r["solver"] == "contiguous")
    assert best > base
    assert res["stats"]["concentration_mean"] > 1.5 * res["stats"]["independent_mean"]
    assert (tmp_path / "demo" / "report.html").exists()
    planned = [r for r in res["rows"] if r["status"] != "no plan"]
    assert len(list((tmp_path / "demo" / "plans").glob("*.json"))) == len(planned)


@pytest.fixture(scope="module")
def topic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta, r = synthetic_trace(6, 16, 2, 40000, tokens_per_prompt=20, num_preferred=3, num_topics=4, seed=0)
    out = tmp_path_factory.mktemp("topics") / "trace"
    write_trace(out, meta, r)
    return out


def test_unseen_balance_holds_on_held_out_prompts(cli, topic_dataset: Path, tmp_path: Path) -> None:
    """--unseen balances for the forecast of unseen prompts: the forecast meets --balance, and on the held-out
    prompts the plan is better balanced than the plan balanced on the fitted prompts only."""
    imb = {}
    for flag in ([], ["--unseen"]):
        out = tmp_path / f"plan{len(flag)}.json"
        args = ["--trace", topic_dataset, "--gpus", 4, "--balance", 0.05, "--time-limit", 3, "--prompts", "train"]
        code, stdout, stderr = cli("plan", *args, *flag, "--out", out)
        assert code == 0, stderr
        fc = Plan.load(out).provenance["unseen_imbalance"]
        code, stdout, stderr = cli("eval", "--plan", out, "--trace", topic_dataset, "--prompts", "test", "--json")
        assert code == 0, stderr
        imb[bool(flag)] = (fc["p50"], json.loads(stdout)["imbalance_max"])
    assert imb[False][0] > 1.05 >= imb[True][0]  # plain: forecast over the tolerance; --unseen: within it
    assert imb[True][1] < imb[False][1]  # and so it is on the prompts it never saw
    assert imb[True][1] < 1.06


def test_unseen_balance_refuses_what_it_cannot_reach(cli, topic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    out.write_text("keep me")
    base = ["plan", "--trace", topic_dataset, "--gpus", 4, "--time-limit", 2, "--unseen", "--out", out, "--force"]
    code, _, stderr = cli(*base, "--balance", 0.005)
    assert code != 0 and "unseen prompts was not reached" in one_error_line(stderr)
    code, _, stderr = cli(*base, "--solver", "eplb")
    assert code != 0 and "--unseen works with --solver affinity" in one_error_line(stderr)
    assert out.read_text() == "keep me"
