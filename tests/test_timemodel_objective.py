"""``--objective time`` keeps ONE time limit for all its candidates and says what it compared
(placement/solvers/time_objective.py); ``--hf-config`` on the configs of real MoE families, as the hub ships them
and as transformers writes them, and the one error line for a config of another model (placement/timemodel.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from placement.graph import RoutingGraph, graph_from_routes
from placement.plan import Plan
from placement.planner import make_plan
from placement.solvers.base import PlanSpec
from placement.timemodel import PRESETS, ModelDims, TimeModelError, dims_from_hf_config, step_time_bound
from placement.trace.synthetic import synthetic_trace
from tests.conftest import one_error_line, topic_trace_dir

HW = PRESETS["h100-nvlink-ib400"]
DIMS = ModelDims(2048, 1408)
CANDIDATES = {"contiguous", "eplb", "affinity default", "affinity balance 0.1", "affinity balance 0.05"}


@pytest.fixture(scope="module")
def moderate() -> RoutingGraph:
    """16 layers x 64 experts, top-6, 20,000 tokens in 64-token prompts: affinity solves take about a second."""
    meta, r = synthetic_trace(16, 64, 6, 20000, seed=1)
    return graph_from_routes(r.expert_ids_TLK, meta, with_coact=False, seq_ids_T=r.seq_ids_T)


def _plan(graph: RoutingGraph, limit: float) -> tuple[Plan, float]:
    opts = {"objective": "time", "hardware": HW.to_json(), "model_dims": DIMS.to_json()}
    t0 = time.perf_counter()
    plan = make_plan(graph, PlanSpec(8, 2, 8, time_limit=limit, options=opts))
    return plan, time.perf_counter() - t0


@pytest.mark.parametrize("limit", [6.0, 0.5])
def test_objective_time_returns_within_its_limit(moderate: RoutingGraph, limit: float) -> None:
    """Generous margins (2 shared CI cores): the solver within 10 % + 1 s of its limit, the planner's own cost,
    bound and forecast within 3 s more. Before the limit was shared, a 6 s limit took about 9 s in the solver."""
    plan, wall = _plan(moderate, limit)
    assert plan.provenance["solve_seconds"] <= limit * 1.1 + 1.0
    assert wall <= limit * 1.1 + 3.0
    info = plan.provenance["info"]
    tried = {row["name"] for row in info["time"]}
    skipped = {row["name"] for row in info["time_skipped"]}
    fit = next(n for n in tried | skipped if n.startswith("affinity balance 0.0") and n not in CANDIDATES)
    # every candidate is either compared or listed with why not; the baselines always are compared
    assert tried | skipped >= CANDIDATES | {fit} and not tried & skipped
    assert {"contiguous", "eplb"} <= tried
    chosen = min(info["time"], key=lambda row: row["step_s"])
    assert info["time_choice"] == chosen["name"]
    assert 0 < info["time_bound_s"] < chosen["step_s"]
    assert info["time_gap"] == pytest.approx(1 - info["time_bound_s"] / chosen["step_s"], abs=1e-4)
    assert info["time_bound_s"] == pytest.approx(step_time_bound(moderate, 8, HW, DIMS))
    if limit >= 6.0:  # time for the default and eplb's fitted balance at least; affinity beats the baselines
        assert tried >= {"affinity default", fit} and chosen["name"].startswith("affinity")
    else:  # no time for every affinity solve: the ones left out are listed, each with why
        assert skipped and all(row["why"] for row in info["time_skipped"])


# ------------------------------------------------------------------------------------------------ --hf-config

# the keys of each family's config.json as published on the Hugging Face hub (other keys left out)
HUB = {
    "Qwen3-30B-A3B": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144}
    | {"moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "torch_dtype": "bfloat16"},
    "DeepSeek-V3": {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432}
    | {"moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8}
    | {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
    "Mixtral-8x7B": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336}
    | {"num_local_experts": 8, "num_experts_per_tok": 2, "torch_dtype": "bfloat16"},
    "OLMoE-1B-7B": {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024}
    | {"num_experts": 64, "num_experts_per_tok": 8, "torch_dtype": "float32"},
    "Qwen1.5-MoE-A2.7B": {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632}
    | {"moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60}
    | {"num_experts_per_tok": 4, "torch_dtype": "bfloat16"},
}
WANT = {  # hidden size, routed expert's FFN size, routed experts, bytes per element
    "Qwen3-30B-A3B": (2048, 768, 128, 2),
    "DeepSeek-V3": (7168, 2048, 256, 2),
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "OLMoE-1B-7B": (2048, 1024, 64, 4),
    "Qwen1.5-MoE-A2.7B": (2048, 1408, 60, 2),
}


@pytest.mark.parametrize("model", sorted(HUB))
def test_hub_configs(tmp_path: Path, model: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HUB[model]))
    h, f, e, b = WANT[model]
    d = dims_from_hf_config(tmp_path, num_experts=e)
    assert (d.hidden_size, d.expert_ffn_size, d.bytes_per_element) == (h, f, b)
    # a multimodal config that keeps the language model's keys under text_config reads the same
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wrapper", "text_config": HUB[model]}))
    assert dims_from_hf_config(tmp_path, num_experts=e).expert_ffn_size == f


def test_configs_as_transformers_writes_them(tmp_path: Path) -> None:
    """transformers 5 writes Qwen3-MoE's expert count as num_local_experts and the dtype as ``dtype``."""
    tf = pytest.importorskip("transformers")
    configs = {
        "Qwen3-30B-A3B": tf.Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128),
        "DeepSeek-V3": tf.DeepseekV3Config(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256),
        "Mixtral-8x7B": tf.MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8),
        "OLMoE-1B-7B": tf.OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64),
        "Qwen1.5-MoE-A2.7B": tf.Qwen2MoeConfig(hidden_size=2048, moe_intermediate_size=1408, num_experts=60),
    }
    for model, cfg in configs.items():
        cfg.dtype = "bfloat16"
        cfg.save_pretrained(tmp_path / model)
        h, f, e, _ = WANT[model]
        d = dims_from_hf_config(tmp_path / model, num_experts=e)
        assert (d.hidden_size, d.expert_ffn_size, d.bytes_per_element) == (h, f, 2), model


def test_a_dense_config_is_refused(tmp_path: Path) -> None:
    llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(TimeModelError, match=r"no routed-expert count .* so not an MoE config"):
        dims_from_hf_config(tmp_path, num_experts=8)
    assert dims_from_hf_config(tmp_path).expert_bytes == 3 * 4096 * 11008 * 2  # replan's use: no trace to match


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return topic_trace_dir(tmp_path_factory, 3000)


def test_plan_with_a_mixtral_config(cli, dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HUB["Mixtral-8x7B"]))
    out = tmp_path / "plan.json"
    args = ("--gpus", 4, "--objective", "time", "--hf-config", tmp_path, "--time-limit", 2, "--out", out)
    code, stdout, stderr = cli("plan", "--trace", dataset, *args)
    assert code == 0, stderr
    info = Plan.load(out).provenance["info"]
    assert info["model_dims"]["hidden_size"] == 4096 and info["model_dims"]["expert_ffn_size"] == 14336
    assert info["model_dims"]["source"].endswith("config.json")
    assert f"bound for any plan: {info['time_bound_s'] * 1e3:.3f} ms per step" in stdout
    for row in info["time_skipped"]:
        assert f"not compared: {row['why']}" in stdout


@pytest.mark.parametrize("command", ["plan", "eval"])
def test_a_config_of_another_model_is_one_error_line(cli, dataset: Path, tmp_path: Path, command: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HUB["DeepSeek-V3"]))
    out = tmp_path / "plan.json"
    if command == "plan":
        args: tuple = ("plan", "--trace", dataset, "--gpus", 4, "--objective", "time", "--out", out)
    else:
        code, _, stderr = cli("plan", "--trace", dataset, "--gpus", 4, "--solver", "eplb", "--out", out)
        assert code == 0, stderr
        args = ("eval", "--plan", out, "--trace", dataset, "--hardware", "h100-nvlink-ib400")
    code, _, stderr = cli(*args, "--hf-config", tmp_path / "config.json")
    line = one_error_line(stderr)
    assert code == 1 and "256 routed experts, the trace has 8; pass the config of the traced model" in line
    assert str(tmp_path / "config.json") in line
    assert (command == "eval") == out.exists()  # plan writes nothing
