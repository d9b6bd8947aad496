"""Exporters (SGLang, vLLM, DeepSeek) and checkpoint permutation, on real tiny Hugging Face models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from placement.cli.export import register
from placement.deploy.checkpoint import PERMUTATION_NAME
from placement.deploy.export import (
    ExportError,
    deepseek_triple,
    export,
    plan_from_vllm,
    sglang_map,
)
from placement.plan import Plan

E = 8


def _plan(layers: tuple[int, ...], G: int = 4, redundant: int = 0, seed: int = 0, E: int = E) -> Plan:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in layers:
        row = list(rng.permutation(E))
        row += list(rng.choice(E, redundant, replace=False))
        rows.append(rng.permutation(row) if redundant else row)
    return Plan(num_gpus=G, num_nodes=1, num_experts=E, layers=layers, phy2log=np.asarray(rows), model_name="t")


@pytest.fixture()
def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


def _run(app: typer.Typer, *args: object) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


# ------------------------------------------------------------------------------------------ serving formats


def test_sglang_map_has_every_expert_per_row_and_trivial_dense_rows(tmp_path: Path) -> None:
    plan = _plan((1, 3, 4), G=4, redundant=4)
    P = plan.num_slots
    res = export(plan, "sglang", tmp_path / "loc.json", num_model_layers=6)
    m_LP = np.asarray(json.loads((tmp_path / "loc.json").read_text())["physical_to_logical_map"])
    assert m_LP.shape == (6, P)
    for row in m_LP:
        assert set(row.tolist()) == set(range(E))
    for dense in (0, 2, 5):
        assert m_LP[dense].tolist() == (np.arange(P) % E).tolist()
    assert np.array_equal(m_LP[[1, 3, 4]], plan.phy2log)
    assert "--ep-num-redundant-experts 4" in res.flags
    assert any("--enable-eplb" in w for w in res.warnings)
    export(plan, "sglang", tmp_path / "loc.pt", num_model_layers=6)
    pt = torch.load(tmp_path / "loc.pt", weights_only=True)["physical_to_logical_map"]
    assert np.array_equal(pt.numpy(), m_LP)
    with pytest.raises(ExportError, match="num-model-layers"):
        sglang_map(plan, num_model_layers=4)


def test_vllm_files_round_trip_into_the_same_plan(tmp_path: Path) -> None:
    plan = _plan((2, 5, 9), G=2, redundant=2, seed=3)
    export(plan, "vllm", tmp_path / "v")
    back = plan_from_vllm(tmp_path / "v")
    assert back == plan and np.array_equal(back.phy2log, plan.phy2log)
    ascend = json.loads((tmp_path / "v" / "expert_map.json").read_text())
    assert ascend["moe_layer_count"] == 3
    assert [len(d["device_expert"]) for d in ascend["layer_list"][0]["device_list"]] == [5, 5]
    initial = json.loads((tmp_path / "v" / "initial_expert_map.json").read_text())
    assert np.asarray(initial).shape == (3, plan.num_slots)


def test_deepseek_triple_matches_eplb_conventions(tmp_path: Path) -> None:
    plan = _plan((0, 1), G=4, redundant=4, seed=1)
    phy2log, log2phy, logcnt = deepseek_triple(plan)
    L, _ = phy2log.shape
    assert log2phy.shape == (L, E, int(logcnt.max())) and logcnt.shape == (L, E)
    for l in range(L):
        for e in range(E):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(slots) == logcnt[l, e] and (phy2log[l, slots] == e).all()
    export(plan, "deepseek", tmp_path / "eplb.pt")
    d = torch.load(tmp_path / "eplb.pt", weights_only=True)
    assert torch.equal(d["log2phy"], torch.from_numpy(log2phy))


# --------------------------------------------------------------------------------------- checkpoint rewrite


def _save(model: Any, path: Path, **kw: object) -> Path:
    """Save after widening the MoE weights: at the default init (std 0.02) every routing is a near tie and the
    experts' outputs are tiny, so a wrong permutation would hide below the logits tolerance."""
    with torch.no_grad():
        for name, param in [*model.named_parameters(), *model.named_buffers()]:
            if ".experts." in name or ".gate." in name:
                param.normal_(0.0, 1.0 if ".gate." in name else 0.3)
            if name.endswith("e_score_correction_bias"):
                param.copy_(torch.randn(param.shape) * 0.1)
    model.save_pretrained(path, **kw)
    return path


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Mixtral, per-expert tensor names, sharded with an index file."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return _save(MixtralForCausalLM(cfg), tmp_path_factory.mktemp("mixtral"), max_shard_size="30KB")


@pytest.fixture(scope="module")
def qwen3_fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen3-MoE with a dense first layer, saved with transformers 5.x fused expert tensors."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=16,
        mlp_only_layers=[0],
    )  # fmt: skip
    return _save(Qwen3MoeForCausalLM(cfg), tmp_path_factory.mktemp("qwen3"), save_original_format=False)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny DeepSeek-V3: group-limited router (4 groups of 2, top-2 kept), correction bias, dense layer 0."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(2)
    cfg = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E,
        num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )  # fmt: skip
    return _save(DeepseekV3ForCausalLM(cfg), tmp_path_factory.mktemp("dsv3"))


def _expert_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _check_same_function(src: Path, dst: Path) -> None:
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(dst, ids), _logits(src, ids), rtol=1e-5, atol=1e-5)


def test_permuted_mixtral_same_logits_and_contiguous_placement_is_the_plan(mixtral: Path, tmp_path: Path) -> None:
    plan = _plan((0, 1, 2), G=4, seed=5)
    out = tmp_path / "perm"
    res = export(plan, "permute-checkpoint", out, checkpoint=mixtral)
    _check_same_function(mixtral, out)
    old, new = _expert_tensors(mixtral), _expert_tensors(out)
    S = E // plan.num_gpus
    for i, l in enumerate(plan.layers):
        gpu_of_old = {int(e): g for g in range(plan.num_gpus) for e in plan.phy2log[i, g * S : (g + 1) * S]}
        for k in range(E):  # contiguous placement: new position k on GPU k // S
            src = next(
                e for e in range(E)
                if torch.equal(new[f"model.layers.{l}.block_sparse_moe.experts.{k}.w1.weight"],
                               old[f"model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight"])
            )  # fmt: skip
            assert gpu_of_old[src] == k // S
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(new)
    assert json.loads((out / PERMUTATION_NAME).read_text())["new_to_old"] == plan.phy2log.tolist()
    assert res.info["shards"] > 1
    # the vLLM 0.33 flags under which GPU g holds positions [g S, (g + 1) S): the plan (tests/test_engines.py)
    assert res.flags == ("--enable-expert-parallel", "--tensor-parallel-size 4", "--expert-placement-strategy linear")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_permuted_fused_qwen3_moe_same_logits(qwen3_fused: Path, tmp_path: Path) -> None:
    plan = _plan((1, 2), G=2, seed=7)
    export(plan, "permute-checkpoint", tmp_path / "perm", checkpoint=qwen3_fused)
    _check_same_function(qwen3_fused, tmp_path / "perm")
    old, new = _expert_tensors(qwen3_fused), _expert_tensors(tmp_path / "perm")
    for i, l in enumerate(plan.layers):
        for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            key = f"model.layers.{l}.mlp.{name}"
            assert torch.equal(new[key], old[key][torch.tensor(plan.phy2log[i])])


def test_deepseek_group_preserving_plan_keeps_logits_and_splitting_plan_is_refused(
    deepseek: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # groups {0,1} {2,3} {4,5} {6,7}: reorder whole groups and experts inside them
    keep = Plan(num_gpus=2, num_nodes=1, num_experts=E, layers=(1, 2),
                phy2log=np.array([[5, 4, 0, 1, 7, 6, 3, 2], [2, 3, 6, 7, 1, 0, 4, 5]]))  # fmt: skip
    export(keep, "permute-checkpoint", tmp_path / "ok", checkpoint=deepseek)
    _check_same_function(deepseek, tmp_path / "ok")
    bias_key = "model.layers.1.mlp.gate.e_score_correction_bias"
    bias = _expert_tensors(deepseek)[bias_key][torch.tensor([5, 4, 0, 1, 7, 6, 3, 2])]
    assert torch.equal(_expert_tensors(tmp_path / "ok")[bias_key], bias)
    split = Plan(num_gpus=2, num_nodes=1, num_experts=E, layers=(1, 2),
                 phy2log=np.array([[0, 2, 1, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]))  # fmt: skip
    with pytest.raises(ExportError, match="splits routing groups"):
        export(split, "permute-checkpoint", tmp_path / "bad", checkpoint=deepseek)
    assert not (tmp_path / "bad").exists()
    # the refusal is needed: written anyway, that plan changes what the model computes
    monkeypatch.setattr("placement.deploy.checkpoint.check_plan", lambda plan, ck: ())
    export(split, "permute-checkpoint", tmp_path / "bad", checkpoint=deepseek)
    with pytest.raises(AssertionError):
        _check_same_function(deepseek, tmp_path / "bad")


# ----------------------------------------------------------------------------------------------- bad input


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (_plan((0, 1, 2), E=16, G=4), "16 experts"),
        (_plan((0, 1), G=4), "MoE layers"),
        (_plan((0, 1, 2), G=4, redundant=4), "replicated slots"),
    ],
    ids=["expert-count", "layers", "replicas"],
)
def test_cli_refuses_plan_for_another_model(
    app: typer.Typer, mixtral: Path, tmp_path: Path, plan: Plan, message: str
) -> None:
    plan.save(tmp_path / "plan.json")
    code, out, err = _run(app, "export", "--plan", tmp_path / "plan.json", "--format", "permute-checkpoint",
                          "--checkpoint", mixtral, "--out", tmp_path / "perm")  # fmt: skip
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "perm").exists() and not _leftovers(tmp_path)


def test_cli_refuses_existing_output_unless_force_and_unknown_format(app: typer.Typer, tmp_path: Path) -> None:
    plan = _plan((0, 1), G=2, redundant=2)
    plan.save(tmp_path / "plan.json")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "keep").write_text("x")
    base = ["export", "--plan", tmp_path / "plan.json", "--out", tmp_path / "v"]
    code, _, err = _run(app, *base, "--format", "vllm")
    assert code == 1 and "already exists" in err and "--force" in err and err.count("\n") == 1
    assert (tmp_path / "v" / "keep").exists()
    code, out, err = _run(app, *base, "--format", "vllm", "--force")
    assert code == 0, err
    assert out == "" and "vLLM 0.33 cannot serve" in err and not (tmp_path / "v" / "keep").exists()
    assert plan_from_vllm(tmp_path / "v") == plan
    code, _, err = _run(app, "export", "--plan", tmp_path / "plan.json", "--out", tmp_path / "x", "--format", "onnx")
    assert code == 1 and "unknown format 'onnx'" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)
    code, _, err = _run(app, "export", "--plan", tmp_path / "nope.json", "--out", tmp_path / "y", "--format", "sglang")
    assert code == 1 and err.startswith("error: ") and "no such plan file" in err


def test_failed_permutation_leaves_nothing(mixtral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    calls = []
    orig = safetensors.torch.save_file

    def boom(*args: object, **kw: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        orig(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export(_plan((0, 1, 2)), "permute-checkpoint", tmp_path / "perm", checkpoint=mixtral)
    assert list(tmp_path.iterdir()) == []


def test_commands_have_help(app: typer.Typer) -> None:
    for cmd in ("export", "report"):
        code, out, _ = _run(app, cmd, "--help")
        assert code == 0 and "--out" in out
