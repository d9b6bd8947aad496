"""The per-layer time model (placement/timemodel.py) and ``moeplace plan --objective time``: hand-computed cases,
a per-layer loop reference, presets and model dims as JSON, Hugging Face configs of five families, the CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from placement.graph import PROMPT_FOLDS, RoutingGraph, build_graph, graph_from_routes
from placement.plan import Plan
from placement.timemodel import (
    PRESETS,
    HardwarePreset,
    ModelDims,
    StepTime,
    TimeModelError,
    dims_from_hf_config,
    forecast_time,
    load_hardware,
    predict_time,
    resolve_dims,
    step_time_bound,
)
from placement.trace.dataset import open_trace
from placement.trace.schema import TraceMeta
from placement.trace.synthetic import synthetic_trace
from tests.conftest import one_error_line, topic_trace_dir

# round numbers: a token is 100 x 2 = 200 bytes, a token-expert pair 6 x 100 x 50 = 30 kFLOP at 0.5 TFLOP/s
HW = HardwarePreset("test", 2, nvlink_bw=1e9, rdma_bw=0.25e9, peak_flops=1e12, gemm_efficiency=0.5)
PAIR_S = 6 * 100 * 50 / 0.5e12
TOKEN_LINK_S = 200 / 1e9  # one token over NVLink


def _graph(routes_TL: Sequence[tuple[int, ...]], E: int, folds_SLE: np.ndarray | None = None) -> RoutingGraph:
    meta = TraceMeta("hand", E, 1, tuple(range(len(routes_TL[0]))))
    ids_TLK = np.array(routes_TL, dtype=np.int16)[:, :, None]
    g = graph_from_routes(ids_TLK, meta, with_coact=False)
    return g if folds_SLE is None else RoutingGraph(meta, g.num_tokens, g.load_LE, g.trans_LEE, None, folds_SLE)


# four top-1 tokens over 2 layers, 4 experts; each token stays in its half (0/1 or 2/3)
HAND = [(0, 1), (1, 0), (2, 3), (3, 2)]


def _dims(tokens: int = 4) -> ModelDims:
    return ModelDims(100, 50, tokens_per_step=tokens, bytes_per_element=2)


def test_all_local_traffic_costs_no_time_and_compute_is_the_busiest_gpu() -> None:
    g = _graph(HAND, 4)
    plan = Plan(
        2, 1, 4, (0, 1), np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    )  # halves on GPUs 0 and 1: layer 0 -> 1 all local
    t = predict_time(plan, g, HW, _dims())
    np.testing.assert_allclose(t.compute_L, [2 * PAIR_S, 2 * PAIR_S])
    # layer 0: tokens start 1/2 on each GPU; GPU 0 sends (1 + 1) / 2 = 1 token to GPU 1 and back; both ways alike
    np.testing.assert_allclose(t.comm_L, [2 * TOKEN_LINK_S, 0.0])
    assert t.summary()["step_s"] == pytest.approx(4 * PAIR_S + 2 * TOKEN_LINK_S)
    # a step twice the trace's tokens doubles every term
    t2 = predict_time(plan, g, HW, _dims(8))
    np.testing.assert_allclose(t2.layer_L, 2 * t.layer_L)


def test_step_time_bound_is_compute_at_perfect_balance() -> None:
    g = _graph(HAND, 4)
    balanced = Plan(2, 1, 4, (0, 1), np.array([[0, 1, 2, 3], [0, 1, 2, 3]]))  # 2 pairs per GPU in each layer
    assert step_time_bound(g, 2, HW, _dims()) == pytest.approx(4 * PAIR_S)  # 8 pairs over 2 GPUs, 2 layers
    assert predict_time(balanced, g, HW, _dims()).compute_L.sum() == pytest.approx(4 * PAIR_S)
    # one GPU: nothing to send, so the bound is exact; two GPUs: the layer-0 dispatch comes on top
    one = Plan(1, 1, 4, (0, 1), np.array([[0, 1, 2, 3], [0, 1, 2, 3]]))
    assert predict_time(one, g, HW, _dims()).summary()["step_s"] == pytest.approx(step_time_bound(g, 1, HW, _dims()))
    skewed = _graph([*HAND, (0, 0), (0, 0)], 4)
    for plan in (balanced, Plan(2, 1, 4, (0, 1), np.array([[0, 2, 1, 3], [3, 1, 2, 0]]))):
        bound = step_time_bound(skewed, 2, HW, _dims(6))
        assert predict_time(plan, skewed, HW, _dims(6)).summary()["step_s"] > bound
        assert forecast_time(plan, skewed, HW, _dims(6)).summary()["step_s"] > bound


def test_moving_one_expert_changes_time_by_the_expected_amount() -> None:
    g = _graph(HAND, 4)
    before = Plan(2, 1, 4, (0, 1), np.array([[0, 1, 2, 3], [0, 1, 2, 3]]))
    after = Plan(2, 1, 4, (0, 1), np.array([[0, 1, 2, 3], [0, 2, 1, 3]]))  # layer 1: experts 1 and 2 swap GPUs
    t0, t1 = predict_time(before, g, HW, _dims()), predict_time(after, g, HW, _dims())
    # token 0 (0 -> 1) now goes GPU 0 -> 1 and token 3 (3 -> 2) GPU 1 -> 0: one token each way, then the combine
    np.testing.assert_allclose(t1.comm_L - t0.comm_L, [0.0, 2 * TOKEN_LINK_S])
    np.testing.assert_allclose(t1.compute_L, t0.compute_L)  # each GPU still serves 2 pairs
    # now make one GPU busier: expert 0 takes 3 more tokens at layer 1 (all from expert 0 / 1 at layer 0)
    g2 = _graph([*HAND, (0, 0), (1, 0), (0, 0)], 4)
    t2 = predict_time(before, g2, HW, _dims(7))
    assert t2.compute_L[1] == pytest.approx(5 * PAIR_S)  # GPU 0 serves 5 pairs at layer 1


def test_inter_node_links_are_slower() -> None:
    g = _graph(HAND, 4)
    phy = [[0, 1, 2, 3], [0, 2, 1, 3]]
    intra = predict_time(Plan(2, 1, 4, (0, 1), np.array(phy)), g, HW, _dims())
    inter = predict_time(Plan(2, 2, 4, (0, 1), np.array(phy)), g, HW, _dims())  # the two GPUs on two nodes
    np.testing.assert_allclose(inter.comm_L, intra.comm_L * HW.nvlink_bw / HW.rdma_bw)
    np.testing.assert_allclose(inter.compute_L, intra.compute_L)


def _loop_reference(plan: Plan, g: RoutingGraph, hw: HardwarePreset, dims: ModelDims) -> StepTime:
    """The model of the module docstring, one layer, expert and GPU at a time."""
    H = plan.holders_LEG > 0
    L, E, G = H.shape
    node = plan.node_of_gpu_G
    K = g.meta.top_k
    s = dims.step_tokens(G) / g.num_tokens
    comp, comm = [], []
    for l in range(L):
        served = [sum(g.load_LE[l, e] / H[l, e].sum() for e in range(E) if H[l, e, d]) for d in range(G)]
        comp.append(
            max(served) * s * 6 * dims.hidden_size * dims.expert_ffn_size / (hw.peak_flops * hw.gemm_efficiency)
        )
        F = np.zeros((G, G))
        for j in range(E):
            for src in range(G):
                if l == 0:
                    demand = g.load_LE[0, j] / G
                else:
                    demand = sum(g.trans_LEE[l - 1, i, j] / K * H[l - 1, i, src] / H[l - 1, i].sum() for i in range(E))
                if H[l, j, src]:
                    continue
                near = [h for h in range(G) if H[l, j, h] and node[h] == node[src]]
                targets = near or [h for h in range(G) if H[l, j, h]]
                for h in targets:
                    F[src, h] += demand / len(targets)
        b = F * s * dims.hidden_size * dims.bytes_per_element
        worst = 0.0
        for d in range(G):
            for same, bw in ((True, hw.nvlink_bw), (False, hw.rdma_bw)):
                peers = [h for h in range(G) if (node[h] == node[d]) == same]
                worst = max(worst, sum(b[d, h] for h in peers) / bw, sum(b[h, d] for h in peers) / bw)
        comm.append(2 * worst)
    return StepTime(np.array(comp), np.array(comm))


@pytest.mark.parametrize(("seed", "N"), [(0, 1), (1, 1), (0, 2), (1, 2), (2, 2)])
def test_vectorised_equals_per_layer_loop(seed: int, N: int) -> None:
    rng = np.random.default_rng(seed)
    L, E, G, R, K = 4, 8, 4, 4, 2
    meta, routes = synthetic_trace(L, E, K, 300, num_preferred=2, num_topics=3, seed=seed)
    g = graph_from_routes(routes.expert_ids_TLK, meta, with_coact=False)
    # every expert once, then R random extra copies: some experts on 2 GPUs of one node, some across nodes
    phy_LP = np.stack([np.concatenate([rng.permutation(E), rng.integers(E, size=R)]) for _ in range(L)])
    plan = Plan(G, N, E, meta.layers, phy_LP)
    dims = ModelDims(64, 32, tokens_per_step=1000)
    fast, ref = predict_time(plan, g, HW, dims), _loop_reference(plan, g, HW, dims)
    np.testing.assert_allclose(fast.compute_L, ref.compute_L, rtol=1e-12)
    np.testing.assert_allclose(fast.comm_L, ref.comm_L, rtol=1e-12)
    assert ref.comm_L.min() > 0


def test_top1_dispatch_equals_the_evaluators_follow_traffic() -> None:
    """With one expert per token and no replicas, a token sits on one GPU: the model's dispatch after layer 0 is
    exactly the per-token follow-mode dispatch of placement/metrics.py."""
    from placement.metrics import load_split, traffic
    from placement.timemodel import dispatch_demand, dispatch_flows

    meta, routes = synthetic_trace(5, 8, 1, 400, num_preferred=2, num_topics=3, seed=3)
    g = graph_from_routes(routes.expert_ids_TLK, meta, with_coact=False)
    rng = np.random.default_rng(0)
    plan = Plan(4, 2, 8, meta.layers, np.stack([rng.permutation(8) for _ in range(5)]))
    F_LGG = dispatch_flows(plan, dispatch_demand(load_split(plan), g.load_LE, g.trans_LEE, 1))
    tok_L2GG = traffic(plan, routes, "follow")
    np.testing.assert_allclose(F_LGG[1:], tok_L2GG[1:, 0])
    assert F_LGG[1:].sum() > 0


def test_scaled_flows_equal_the_flows_of_scaled_demand() -> None:
    """forecast_time scales each draw's demand for expert j on j's slots, all draws at once: the same flows as
    scaling M, one draw at a time (a copy doubled on one GPU included)."""
    from placement.metrics import load_split
    from placement.timemodel import dispatch_demand, dispatch_flows

    meta, routes = synthetic_trace(4, 8, 2, 300, num_preferred=2, num_topics=3, seed=4)
    g = graph_from_routes(routes.expert_ids_TLK, meta, with_coact=False)
    rng = np.random.default_rng(1)
    phy_LP = np.stack([np.concatenate([rng.permutation(8), [l, 7 - l, (l + 3) % 8, (l + 5) % 8]]) for l in range(4)])
    phy_LP[0, 10] = phy_LP[0, 11]  # layer 0: one expert twice on GPU 3
    plan = Plan(4, 2, 8, meta.layers, phy_LP)
    assert plan.holders_LEG.max() == 2
    M_LGE = dispatch_demand(load_split(plan), g.load_LE, g.trans_LEE, 2)
    r_DLE = rng.random((3, 4, 8)) * 2
    want = np.stack([dispatch_flows(plan, M_LGE * r_LE[:, None, :]) for r_LE in r_DLE])
    np.testing.assert_allclose(dispatch_flows(plan, M_LGE, r_DLE), want, rtol=1e-12)
    assert not np.allclose(want[0], want[1])


def test_forecast_equals_prediction_when_every_fold_looks_alike() -> None:
    g = _graph(HAND * 16, 4)
    plan = Plan(2, 1, 4, (0, 1), np.array([[0, 1, 2, 3], [0, 2, 1, 3]]))
    same = _graph(HAND * 16, 4, folds_SLE=np.repeat(g.load_LE[None], 16, axis=0) // 16)  # 16 alike folds
    np.testing.assert_allclose(
        forecast_time(plan, same, HW, _dims()).layer_L, predict_time(plan, g, HW, _dims()).layer_L
    )
    # no folds: the trace itself
    np.testing.assert_allclose(forecast_time(plan, g, HW, _dims()).layer_L, predict_time(plan, g, HW, _dims()).layer_L)


def test_forecast_sees_imbalance_that_the_fit_hides() -> None:
    """Folds that disagree (each fold hot on another expert) make unseen steps slower than the fitted average."""
    folds_SLE = np.zeros((16, 2, 4), dtype=np.int64)
    for s in range(16):
        folds_SLE[s, :, s % 4] = 10
    g = RoutingGraph(
        TraceMeta("hand", 4, 1, (0, 1)),
        160,
        folds_SLE.sum(axis=0),
        np.eye(4, dtype=np.int64)[None] * 40,
        None,
        folds_SLE,
    )
    plan = Plan(2, 1, 4, (0, 1), np.array([[0, 1, 2, 3], [0, 1, 2, 3]]))
    fit, fc = predict_time(plan, g, HW, _dims(160)), forecast_time(plan, g, HW, _dims(160))
    assert (fc.compute_L > fit.compute_L).all()


def test_presets_and_dims_round_trip_as_json() -> None:
    for hw in PRESETS.values():
        assert HardwarePreset.from_json(hw.to_json()) == hw
        assert hw.gpus_per_node == 8 and hw.nvlink_bw == 150e9 and hw.rdma_bw == 45e9
    dims = ModelDims(7168, 2048, 65536, 1, source="x")
    assert ModelDims.from_json(dims.to_json()) == dims
    d = json.loads(dims.to_json())
    with pytest.raises(TimeModelError, match="schema_version 2"):
        ModelDims.from_json(json.dumps({**d, "schema_version": 2}))
    with pytest.raises(TimeModelError, match="unknown field 'hidden'"):
        ModelDims.from_json(json.dumps({**d, "hidden": 1}))
    with pytest.raises(TimeModelError, match="rdma_bw = -1"):
        HardwarePreset.from_json(json.dumps({**json.loads(PRESETS["h100-nvlink-ib400"].to_json()), "rdma_bw": -1}))
    with pytest.raises(TimeModelError, match="unknown preset"):
        load_hardware("a100-pcie")


def test_hardware_from_a_json_file(tmp_path: Path) -> None:
    p = tmp_path / "hw.json"
    mine = HardwarePreset("mine", 4, 100e9, 25e9, 500e12)
    p.write_text(mine.to_json())
    assert load_hardware(str(p)) == mine


CONFIGS = {
    "deepseek-v3": (
        {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048}
        | {"n_routed_experts": 256, "num_experts_per_tok": 8, "torch_dtype": "bfloat16"},
        (7168, 2048, 2),
    ),
    "qwen3-moe": (
        {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768}
        | {"num_experts": 128, "num_experts_per_tok": 8, "torch_dtype": "bfloat16"},
        (2048, 768, 2),
    ),
    "mixtral": (
        {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8}
        | {"num_experts_per_tok": 2, "torch_dtype": "float32"},
        (4096, 14336, 4),
    ),
    # OLMoE-1B-7B: every FFN is a routed expert, so intermediate_size is the expert's
    "olmoe": (
        {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64}
        | {"num_experts_per_tok": 8, "torch_dtype": "bfloat16"},
        (2048, 1024, 2),
    ),
    # Qwen1.5-MoE-A2.7B: intermediate_size and shared_expert_intermediate_size are not the routed experts'
    "qwen2-moe": (
        {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408}
        | {"shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4, "dtype": "bfloat16"},
        (2048, 1408, 2),
    ),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hf_config_of_five_families(tmp_path: Path, family: str) -> None:
    cfg, (h, f, b) = CONFIGS[family]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    d = dims_from_hf_config(tmp_path)  # the directory or the file
    assert (d.hidden_size, d.expert_ffn_size, d.bytes_per_element) == (h, f, b)
    assert dims_from_hf_config(tmp_path / "config.json", num_experts=None) == d
    count = next(v for k, v in cfg.items() if k in ("n_routed_experts", "num_local_experts", "num_experts"))
    assert isinstance(count, int)
    assert dims_from_hf_config(tmp_path, num_experts=count) == d  # the trace's expert count matches
    with pytest.raises(TimeModelError, match=f"{count} routed experts, the trace has {count + 1}; pass the config"):
        dims_from_hf_config(tmp_path, num_experts=count + 1)


def test_hf_config_errors(tmp_path: Path) -> None:
    cfg = dict(CONFIGS["deepseek-v3"][0])
    del cfg["moe_intermediate_size"]  # a DeepSeek config's intermediate_size is the dense FFN: never used instead
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(TimeModelError, match="needs an integer 'moe_intermediate_size'"):
        dims_from_hf_config(p)
    p.write_text(json.dumps(CONFIGS["deepseek-v3"][0]))
    with pytest.raises(TimeModelError, match="256 routed experts, the trace has 64"):
        dims_from_hf_config(p, num_experts=64)
    with pytest.raises(TimeModelError, match="no such file"):
        dims_from_hf_config(tmp_path / "nope.json")


def test_dims_resolution_order(tmp_path: Path) -> None:
    meta = TraceMeta("deepseek-v2-lite-chat", 64, 6, (1, 2))
    cfg = {"model_type": "deepseek_v2", "hidden_size": 2048, "moe_intermediate_size": 1408, "n_routed_experts": 64}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float16"}))
    from_cfg = resolve_dims(meta, hf_config=tmp_path, tokens_per_step=512)
    assert (from_cfg.hidden_size, from_cfg.expert_ffn_size, from_cfg.tokens_per_step) == (2048, 1408, 512)
    assert resolve_dims(meta, hf_config=tmp_path, hidden_size=1024).hidden_size == 1024  # flags win
    assert (resolve_dims(meta).hidden_size, resolve_dims(meta).expert_ffn_size) == (2048, 1408)
    assert resolve_dims(meta, expert_ffn_size=99).expert_ffn_size == 99
    own = TraceMeta("mine", 8, 2, (0,), extra={"hidden_size": 32, "moe_intermediate_size": 16})
    assert (resolve_dims(own).hidden_size, resolve_dims(own).expert_ffn_size) == (32, 16)
    with pytest.raises(TimeModelError, match="model dims of 'mine2' unknown"):
        resolve_dims(TraceMeta("mine2", 8, 2, (0,)))


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return topic_trace_dir(tmp_path_factory, 3000)


def test_plan_objective_time_end_to_end(cli, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    args = ("--hidden-size", 256, "--expert-ffn-size", 128, "--tokens-per-step", 8192, "--time-limit", 3)
    code, stdout, stderr = cli("plan", "--trace", dataset, "--gpus", 4, "--objective", "time", *args, "--out", out)
    assert code == 0, stderr
    plan = Plan.load(out)
    info = plan.provenance["info"]
    rows = {r["name"]: r for r in info["time"]}
    assert {"contiguous", "eplb", "affinity default"} <= set(rows)
    chosen = rows[info["time_choice"]]
    assert chosen["step_s"] == min(r["step_s"] for r in rows.values())
    for name in ("contiguous", "eplb", info["time_choice"]):
        assert f"{rows[name]['step_s'] * 1e3:9.3f} ms per step" in stdout
    # the printed prediction is forecast_time of the written plan on the trace's graph
    g = build_graph(open_trace(dataset), with_coact=False, num_folds=PROMPT_FOLDS)
    dims = ModelDims(256, 128, tokens_per_step=8192)
    again = forecast_time(plan, g, PRESETS["h100-nvlink-ib400"], dims).summary()
    assert again["step_s"] == pytest.approx(chosen["step_s"], rel=1e-9)
    assert info["tokens_per_step"] == 8192 and info["hardware"] == "h100-nvlink-ib400"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--objective", "time", "--hardware", "tpu-v9"), "--hardware 'tpu-v9': unknown preset"),
        (("--objective", "time"), "model dims of 'synthetic' unknown"),
        (("--hardware", "h100-nvlink-ib400"), "--hardware is an option of the time model; add --objective time"),
        (("--objective", "speed"), "--objective 'speed': use colocation or time"),
        (("--objective", "time", "--balance", 0.1), "--objective time chooses the balance itself"),
        (("--objective", "time", "--hidden-size", 8, "--expert-ffn-size", 8, "--solver", "eplb"), "drop --solver"),
        (("--objective", "time", "--hf-config", "BAD"), "needs an integer 'moe_intermediate_size'"),
    ],
)
def test_plan_objective_time_bad_inputs(cli, dataset: Path, tmp_path: Path, extra: tuple, message: str) -> None:
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128}))
    extra = tuple(bad if a == "BAD" else a for a in extra)
    out = tmp_path / "plan.json"
    code, _, stderr = cli("plan", "--trace", dataset, "--gpus", 4, "--time-limit", 1, *extra, "--out", out)
    assert code == 1 and message in one_error_line(stderr)
    assert not out.exists()


def test_eval_predicts_time_with_hardware(cli, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    code, _, stderr = cli("plan", "--trace", dataset, "--gpus", 4, "--solver", "eplb", "--out", out)
    assert code == 0, stderr
    args = ("--hardware", "h200-nvlink-ib400", "--hidden", 256, "--expert-ffn-size", 128, "--json")
    code, stdout, stderr = cli("eval", "--plan", out, "--trace", dataset, *args)
    assert code == 0, stderr
    res = json.loads(stdout)
    g = build_graph(open_trace(dataset), with_coact=False)
    want = predict_time(Plan.load(out), g, PRESETS["h200-nvlink-ib400"], ModelDims(256, 128))
    assert res["predicted_time"]["layer_s"] == pytest.approx(want.layer_L.tolist(), rel=1e-9)
    assert res["predicted_time"]["tokens_per_step"] == 4 * 4096
    assert res["home"]["bytes_per_token"] > 0 and res["topology"]["token_bytes"] == 256 * 2
    code, stdout, _ = cli("eval", "--plan", out, "--trace", dataset)
    assert code == 0 and "predicted" not in stdout  # without --hardware: no time model
    code, _, stderr = cli("eval", "--plan", out, "--trace", dataset, "--tokens-per-step", 100)
    assert code == 1 and "add --hardware" in one_error_line(stderr)
