"""The service's parts in-process: the decayed window against an independent count, JSON counts, the STATE_DIR
files, and exactly-once ingestion across restarts (the HTTP end-to-end tests are in test_serve.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from placement.graph import PROMPT_FOLDS, fold_of_seq, graph_from_routes
from placement.plan import Plan
from placement.replan.memory import LOW_KAPPA, SLACK_THRESHOLD
from placement.replan.policy import KAPPA
from placement.replan.step import STEP_KAPPA
from placement.serve.ingest import observation_counts, shard_counts
from placement.serve.service import ReplanService, ServiceConfig
from placement.serve.state import Ledger, PlanVersion, StateError, StateStore, ensure_token
from placement.serve.window import DecayedWindow, ObservationError, count_routes
from placement.trace.dataset import concat_routes
from placement.trace.importers.popularity import LoadTrace
from tests.conftest import reference_graph
from tests.serve_support import E, L, initial_plan, traffic, write_shard


def test_window_decays_by_half_life_in_tokens() -> None:
    meta, a = traffic(3000, seed=1)
    _, b = traffic(1000, seed=2)
    w = DecayedWindow(meta, half_life=2000)
    w.add(count_routes(a, meta))
    w.add(count_routes(b, meta))
    keep = 0.5 ** (1000 / 2000)  # A is 1000 tokens old when B has been added
    load_a, trans_a = reference_graph(a.expert_ids_TLK, E)
    load_b, trans_b = reference_graph(b.expert_ids_TLK, E)
    np.testing.assert_allclose(w.load_LE, keep * load_a + load_b)
    np.testing.assert_allclose(w.trans_LEE, keep * trans_a + trans_b)
    np.testing.assert_allclose(w.fold_load_SLE.sum(axis=0), w.load_LE)
    assert w.observed_tokens == 4000
    assert w.weight == pytest.approx(3000 * keep + 1000)
    assert w.graph().num_tokens == round(3000 * keep + 1000)


def test_window_without_decay_is_the_graph_of_all_traffic() -> None:
    meta, a = traffic(2000, seed=1)
    _, b = traffic(1500, seed=2)
    b = type(b)(b.expert_ids_TLK, b.seq_ids_T + 10_000, b.token_pos_T)  # other prompts
    w = DecayedWindow(meta, half_life=0)
    for r in (a, b):
        w.add(count_routes(r, meta))
    both = concat_routes([a, b], meta)
    g = graph_from_routes(both.expert_ids_TLK, meta, with_coact=False, seq_ids_T=both.seq_ids_T)
    np.testing.assert_array_equal(w.load_LE, g.load_LE)
    np.testing.assert_array_equal(w.trans_LEE, g.trans_LEE)
    assert g.fold_load_SLE is not None and g.fold_load_SLE.shape[0] == PROMPT_FOLDS
    np.testing.assert_array_equal(w.fold_load_SLE, g.fold_load_SLE)


def test_shard_counts_stream_in_batches_like_one_pass(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    meta, routes = traffic(70_000, seed=4)  # more than one 65,536-token read batch
    c, top_k = shard_counts(write_shard(tmp_path / "ds", meta, routes, "w"), plan)
    ref = count_routes(routes, meta)
    assert top_k == meta.top_k and c.num_tokens == ref.num_tokens == 70_000
    for a, b in ((c.load_LE, ref.load_LE), (c.trans_LEE, ref.trans_LEE), (c.fold_load_SLE, ref.fold_load_SLE)):
        np.testing.assert_array_equal(a, b)


def test_json_counts_pick_the_moe_layers_and_refuse_bad_fields(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    rng = np.random.default_rng(0)
    load_XE = rng.integers(0, 50, size=(L + 2, E))  # model layers 0..5: rows 0..3 are the MoE layers 0..3
    body = {"num_tokens": 100, "load_LE": load_XE.tolist(), "layers": [0, 1, 2, 3, 4, 5]}
    c, top_k = observation_counts(json.dumps(body).encode(), "application/json", plan, 7, tmp_path)
    assert top_k is None and c.trans_LEE is None and c.num_tokens == 100
    np.testing.assert_array_equal(c.load_LE, load_XE[:L])
    np.testing.assert_array_equal(c.fold_load_SLE.sum(axis=0), load_XE[:L])
    assert (c.fold_load_SLE.sum(axis=(1, 2)) > 0).sum() == 1  # one batch = one sampling unit
    stat = LoadTrace("synthetic", (0, 1, 2, 3, 4, 5), load_XE, None, "sglang-stat").to_json().encode()
    c, _ = observation_counts(stat, "application/json", plan, 8, tmp_path, top_k=2)  # as `import --loads-only` writes
    np.testing.assert_array_equal(c.load_LE, load_XE[:L])
    assert c.num_tokens == round(load_XE[:L].sum(axis=1).max() / 2)
    bad = [
        ({"num_tokens": 1, "load_LE": [[1] * E]}, "shape [1, 16]"),
        ({"num_tokens": -1, "load_LE": load_XE[:L].tolist()}, "num_tokens"),
        ({"num_tokens": 1, "load_LE": (-load_XE[:L]).tolist()}, "negative"),
        ({"num_tokens": 1, "load_LE": load_XE.tolist(), "layers": [9, 1, 2, 3, 4, 5]}, "lacks MoE layers [0]"),
        ({"load_LE": load_XE[:L].tolist()}, "num_tokens"),
    ]
    for d, msg in bad:
        with pytest.raises(ObservationError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            observation_counts(json.dumps(d).encode(), "application/json", plan, 0, tmp_path)
    with pytest.raises(ObservationError, match="Content-Type"):
        observation_counts(b"x", "text/plain", plan, 0, tmp_path)


def test_state_files_round_trip_and_one_service_per_state_dir(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    store = StateStore(tmp_path / "state")
    store.open()
    with pytest.raises(StateError, match="another moeplace serve"):
        StateStore(tmp_path / "state").open()
    v = PlanVersion(1, plan, "initial plan", {"moves": []}, {"a": 1.0}, {"b": 2.0}, 5, 123.0)
    store.write_version(v)
    back = store.read_version(1)
    assert (back.version, back.reason, back.observed_tokens) == (1, "initial plan", 5)
    assert (back.before, back.after) == (v.before, v.after)
    np.testing.assert_array_equal(back.plan.phy2log, plan.phy2log)
    with pytest.raises(StateError, match="append-only"):
        store.write_version(v)
    with pytest.raises(StateError, match=r"versions are 1\.\.1"):
        store.read_version(2)
    led = Ledger(shards={"part-a-000000.parquet": 10}, quarantined={"x": "bad"}, plan_version=1, top_k=2)
    store.save_checkpoint({"load_LE": np.ones((2, 3))}, led)
    loaded = store.load_checkpoint()
    assert loaded is not None and loaded[1] == led
    np.testing.assert_array_equal(loaded[0]["load_LE"], np.ones((2, 3)))
    store.close()
    StateStore(tmp_path / "state").open()  # released


def _service(tmp_path: Path, plan: Plan) -> ReplanService:
    s = ReplanService(plan, ServiceConfig(tmp_path / "state", tmp_path / "ds", half_life=5000))
    s.start(watch=False)
    return s


def test_shards_are_counted_exactly_once_across_restarts(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    meta, a = traffic(1200, seed=1)
    _, b = traffic(800, seed=2)
    write_shard(tmp_path / "ds", meta, a, "w1")
    (tmp_path / "ds" / "part-zz-000000.parquet").write_bytes(b"PAR1 truncated")
    s = _service(tmp_path, plan)
    assert s.ingest_pending() == 1 and s.ingest_pending() == 0
    load_before = s.window.load_LE.copy()
    s.stop()

    s = _service(tmp_path, plan)  # restart: the ledger says what the counts hold
    assert s.status()["observed_tokens"] == 1200 and s.status()["plan_version"] == 1
    np.testing.assert_array_equal(s.window.load_LE, load_before)
    assert list(s.ledger.quarantined) == ["part-zz-000000.parquet"]
    write_shard(tmp_path / "ds", meta, b, "w1")
    assert s.ingest_pending() == 1  # the new shard only; the damaged one is not retried
    st = s.status()
    assert (st["observed_tokens"], st["shards_ingested"], st["shards_quarantined"]) == (2000, 2, 1)
    s.stop()


def test_version_written_but_never_checkpointed_is_set_aside(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    s = _service(tmp_path, plan)
    s.stop()
    store = StateStore(tmp_path / "state")
    store.write_version(PlanVersion(2, plan, "crashed before the checkpoint"))
    s = _service(tmp_path, plan)
    assert s.status()["plan_version"] == 1
    assert (tmp_path / "state" / "versions" / "v000002.orphan").exists()
    s.stop()


def test_serve_cli_errors_are_one_line(cli, tmp_path: Path) -> None:
    initial_plan(tmp_path / "plan.json")
    base = ["serve", "--plan", tmp_path / "plan.json", "--state", tmp_path / "state", "--token", "t0ken"]
    held = StateStore(tmp_path / "state")
    held.open()  # a service already runs on this state directory
    cases = [
        ([*base, "--port", "0"], "another moeplace serve"),
        ([*base[:2], tmp_path / "missing.json", *base[3:]], "no such plan file"),
        ([*base, "--watch", tmp_path / "plan.json"], "not a directory"),
        ([*base, "--expert-bytes", "10", "--hf-config", tmp_path], "pass one of them"),
        ([*base, "--token-file", tmp_path / "nope"], "not both"),
        ([*base, "--half-life", "20000", "--long-half-life", "10000"], "longer than --half-life"),
        ([*base, "--one-memory", "--long-half-life", "90000"], "drop --long-half-life"),
        ([*base, "--method", "both"], "--method both: choose one of step, target"),
    ]
    for args, msg in cases:
        code, _, err = cli(*args)
        assert code == 1 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    held.close()


def test_the_second_memory_follows_its_options(tmp_path: Path) -> None:
    """Two memories by default (the window and all traffic so far), a decayed second one with
    ``long_half_life``, one with ``one_memory``; the second decays at its own half-life."""
    plan = initial_plan(tmp_path / "plan.json")
    meta, a = traffic(1200, seed=1)
    _, b = traffic(800, seed=2)
    write_shard(tmp_path / "ds", meta, a, "w1")
    write_shard(tmp_path / "ds", meta, b, "w2")
    lives = {}
    for name, kw in {"default": {}, "decayed": {"long_half_life": 20000.0}, "one": {"one_memory": True}}.items():
        s = ReplanService(plan, ServiceConfig(tmp_path / name, tmp_path / "ds", half_life=1000, **kw))
        s.start(watch=False)
        s.ingest_pending()
        lives[name] = s.status()["memory_half_lives"]
        if s.long_window is not None:  # less old traffic forgotten than in the window; none at all by default
            assert s.window.weight < s.long_window.weight <= s.window.observed_tokens + 1e-6
            assert (s.long_window.weight == s.window.observed_tokens) == (name == "default")
        s.stop()
    assert lives == {"default": [1000.0, 0.0], "decayed": [1000.0, 20000.0], "one": [1000.0]}
    with pytest.raises(ValueError, match="longer than --half-life"):
        ReplanService(plan, ServiceConfig(tmp_path / "bad", tmp_path / "ds", half_life=1000, long_half_life=500))


def test_the_method_sets_how_decisions_re_plan(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    meta, a = traffic(1500, seed=1)
    write_shard(tmp_path / "ds", meta, a, "w1")
    for method, kappa in (("step", STEP_KAPPA), ("target", KAPPA)):
        cfg = ServiceConfig(tmp_path / method, tmp_path / "ds", half_life=1000, time_limit=1.0, method=method)
        s = ReplanService(plan, cfg)
        s.start(watch=False)
        s.ingest_pending()
        assert s.status()["kappa"] == kappa  # what the next decision plans at
        out = s.decide_now()
        assert out["reason"].startswith("request: local step") == (method == "step"), out["reason"]
        assert f"[kappa {kappa:g}: " in out["reason"]
        s.stop()


def test_generated_token_is_private_and_kept(tmp_path: Path) -> None:
    token, path = ensure_token(tmp_path / "state")
    assert len(token) >= 32 and path.stat().st_mode & 0o077 == 0
    assert ensure_token(tmp_path / "state") == (token, path)  # a restart keeps it


def test_a_batch_of_few_prompts_is_sampled_by_token_blocks(tmp_path: Path) -> None:
    from placement.graph import nonempty_folds
    from placement.replan.solve import Forecaster
    from placement.serve.window import MIN_PROMPTS, TOKEN_BLOCKS

    meta, r = traffic(70_000, seed=5)  # more than one read batch of the shard
    one = type(r)(r.expert_ids_TLK, np.zeros(r.num_tokens, np.int64), r.token_pos_T)  # one long prompt
    c = count_routes(one, meta)
    assert nonempty_folds(c.fold_load_SLE).shape[0] >= MIN_PROMPTS
    np.testing.assert_allclose(c.fold_load_SLE.sum(axis=0), c.load_LE)
    block = -(-r.num_tokens // TOKEN_BLOCKS)  # the first block's loads are all in its fold
    first = graph_from_routes(r.expert_ids_TLK[:block], meta, with_coact=False).load_LE
    assert (c.fold_load_SLE[fold_of_seq(np.zeros(1, np.int64), PROMPT_FOLDS)[0]] >= first).all()
    w = DecayedWindow(meta)
    w.add(c)
    assert Forecaster.of(w.graph()).sim_LDE is not None
    by_prompt = graph_from_routes(one.expert_ids_TLK, meta, False, one.seq_ids_T, PROMPT_FOLDS)
    assert Forecaster.of(by_prompt).sim_LDE is None  # one prompt's fold alone gives no forecast
    plan = initial_plan(tmp_path / "plan.json")
    streamed, _ = shard_counts(write_shard(tmp_path / "ds", meta, one, "w"), plan)
    np.testing.assert_array_equal(streamed.fold_load_SLE, c.fold_load_SLE)
    many = count_routes(r, meta)  # thousands of prompts: folds by prompt, as before
    ref = graph_from_routes(r.expert_ids_TLK, meta, with_coact=False, seq_ids_T=r.seq_ids_T)
    np.testing.assert_array_equal(many.fold_load_SLE, ref.fold_load_SLE)


def test_decisions_score_the_last_forecast_and_keep_it_across_restarts(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    s = ReplanService(plan, ServiceConfig(tmp_path / "state", tmp_path / "ds", half_life=5000, time_limit=1.0))
    s.start(watch=False)
    meta, a = traffic(3000, seed=1)
    write_shard(tmp_path / "ds", meta, a, "w1")
    s.ingest_pending()
    s.decide_now()
    assert s.calib.pending is not None and s.calib.gaps_N.size == 0 and not s.window.fresh_LE.any()
    _, b = traffic(2000, seed=2)
    write_shard(tmp_path / "ds", meta, type(b)(b.expert_ids_TLK, b.seq_ids_T + 10**6, b.token_pos_T), "w1")
    s.ingest_pending()
    fresh = s.window.fresh_LE.copy()
    np.testing.assert_array_equal(fresh, graph_from_routes(b.expert_ids_TLK, meta, with_coact=False).load_LE)
    pending = s.calib.pending
    s.stop()
    s = ReplanService(plan, ServiceConfig(tmp_path / "state", tmp_path / "ds", half_life=5000, time_limit=1.0))
    s.start(watch=False)  # restart: the pending forecasts and the traffic since are kept
    assert s.calib.pending == pending
    np.testing.assert_array_equal(s.window.fresh_LE, fresh)
    assert s.status()["forecast_gap"] is None  # nothing scored yet
    s.decide_now()
    assert s.calib.gaps_N.size == 1 and s.calib.pending is not None
    assert s.status()["forecast_gap"] == pytest.approx(float(s.calib.gaps_N[0]))
    s.stop()


def test_two_memories_survive_a_restart_and_the_choice_is_scored_on_the_traffic_since(tmp_path: Path) -> None:
    from placement.metrics import imbalance_of_loads

    plan = initial_plan(tmp_path / "plan.json")
    cfg = ServiceConfig(tmp_path / "state", tmp_path / "ds", half_life=2000, time_limit=1.0)
    s = ReplanService(plan, cfg)
    s.start(watch=False)
    meta, a = traffic(3000, seed=1)
    _, b = traffic(2000, seed=2)
    b = type(b)(b.expert_ids_TLK, b.seq_ids_T + 10**6, b.token_pos_T)
    write_shard(tmp_path / "ds", meta, a, "w1")
    s.ingest_pending()
    s.decide_now()
    assert s.long_window is not None and s.long_window.half_life == 0.0  # all traffic so far
    write_shard(tmp_path / "ds", meta, b, "w1")
    s.ingest_pending()
    load_a, _ = reference_graph(a.expert_ids_TLK, E)
    load_b, _ = reference_graph(b.expert_ids_TLK, E)
    np.testing.assert_allclose(s.long_window.load_LE, load_a + load_b)
    np.testing.assert_allclose(s.window.load_LE, 0.5 * load_a + load_b)
    long_LE, pending, deployed = s.long_window.load_LE.copy(), s.memory.pending_MLP, s.current_plan
    assert pending is not None and pending.shape[0] == 2 and s.status()["memory_scores"] is None
    assert s.status()["balance_slack"] is None and s.status()["kappa"] == STEP_KAPPA  # one replica: the local step
    s.stop()
    s = ReplanService(plan, cfg)
    s.start(watch=False)  # restart: both memories and the pending probes are what they were
    assert s.long_window is not None and s.memory.pending_MLP is not None
    np.testing.assert_array_equal(s.long_window.load_LE, long_LE)
    np.testing.assert_array_equal(s.memory.pending_MLP, pending)
    assert s.long_window.observed_tokens == s.window.observed_tokens == 5000
    out = s.decide_now()
    expect = [imbalance_of_loads(replace(plan, phy2log=p_LP), load_b.astype(float))[1] for p_LP in pending]
    assert s.memory.scores_MN[:, 0].tolist() == pytest.approx(expect)  # each probe on the traffic since (b)
    status = s.status()
    assert status["memory_half_lives"] == [2000.0, 0.0]
    assert status["memory_scores"] == pytest.approx(expect, abs=1e-4)
    assert f"memory {int(np.argmin(expect))} of 2" in out["reason"]
    slack = expect[1] - imbalance_of_loads(deployed, load_b.astype(float))[1]  # all traffic's probe vs the plan
    assert status["balance_slack"] == pytest.approx(slack)
    assert status["kappa"] == STEP_KAPPA and s.memory.kappa() == (LOW_KAPPA if slack > SLACK_THRESHOLD else KAPPA)
    assert f"[kappa {STEP_KAPPA:g}: balance slack" in out["reason"]
    s.stop()
    s = ReplanService(plan, cfg)
    s.start(watch=False)  # the slack survives a restart
    assert s.status()["balance_slack"] == pytest.approx(slack)
    s.stop()
    flat = ReplanService(plan, ServiceConfig(tmp_path / "flat", tmp_path / "ds"))  # no decay: one memory
    assert flat.long_window is None


def test_a_checkpoint_without_the_long_memory_restarts_with_the_window_as_it(tmp_path: Path) -> None:
    plan = initial_plan(tmp_path / "plan.json")
    cfg = ServiceConfig(tmp_path / "state", tmp_path / "ds", half_life=2000, time_limit=1.0)
    s = ReplanService(plan, cfg)
    s.start(watch=False)
    meta, a = traffic(3000, seed=1)
    write_shard(tmp_path / "ds", meta, a, "w1")
    s.ingest_pending()
    s.stop()
    store = StateStore(tmp_path / "state")
    saved = store.load_checkpoint()
    assert saved is not None and "long_load_LE" in saved[0]
    old = {k: v for k, v in saved[0].items() if not k.startswith(("long_", "memory_"))}  # an earlier service's
    store.save_checkpoint(old, saved[1])
    s = ReplanService(plan, cfg)
    s.start(watch=False)
    assert s.long_window is not None and s.memory.pending_MLP is None
    np.testing.assert_array_equal(s.long_window.load_LE, s.window.load_LE)
    assert s.long_window.observed_tokens == 3000
    s.stop()
