"""Exporters: a ``Plan`` in the formats serving systems read, written atomically (nothing half-written).

Slot p of a layer lives on GPU p // (P / G) in every format below, which is also how SGLang, vLLM and
deepseek-ai/EPLB lay physical experts out over EP ranks.

- ``sglang``: ``{"physical_to_logical_map": [L_all, P]}`` for ``--init-expert-location FILE.json`` (or the
  same key in a ``.pt`` file), one row per model layer; dense layers (and layers not in the plan) get the
  trivial row ``arange(P) % E`` that SGLang itself uses. SGLang (0.5.23, ``ExpertLocationMetadata.
  init_by_mapping``) reads row l as model layer l and checks neither the row count nor the width, so the map
  must have exactly ``num_hidden_layers`` rows and be launched with ``--ep-num-redundant-experts P - E``.
- ``vllm``: vLLM (0.33) cannot load a custom placement: ``--eplb-config`` has no ``initial_expert_map_path``
  (its parser exits 2) and ``--expert-placement-strategy`` is ``linear`` or ``round_robin``. The route that
  works is ``permute-checkpoint`` (a plan without replicas) served with linear placement
  (``vllm_linear_flags``). This format writes a directory of documented files for forks that read one:
  ``initial_expert_map.json`` ([L, P] physical-to-logical per MoE layer), ``expert_map.json`` (vllm-ascend's
  expert map: ``moe_layer_count``, ``layer_list[l].device_list[g].device_expert``) and ``export.json`` (model
  layer ids, nodes), enough to rebuild the plan (``plan_from_vllm``).
- ``deepseek``: a torch file with ``phy2log`` int64 [L, P], ``log2phy`` int64 [L, E, R] (slots of each expert,
  padded -1) and ``logcnt`` int64 [L, E], the triple deepseek-ai/EPLB's ``rebalance_experts`` returns.
- ``permute-checkpoint``: placement/deploy/checkpoint.py.

Dimension key: L MoE layers, L_all model layers, E logical experts, P physical slots, G GPUs, R max replicas.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from placement.deploy.common import ExportError, ExportResult, atomic_output, check_out, write_json
from placement.plan import Plan, PlanError

FORMATS = ("sglang", "vllm", "deepseek", "permute-checkpoint")
VLLM_INITIAL_MAP = "initial_expert_map.json"
VLLM_ASCEND_MAP = "expert_map.json"
VLLM_INFO = "export.json"


# ------------------------------------------------------------------------------------------------- SGLang


def sglang_map(plan: Plan, num_model_layers: int | None = None) -> np.ndarray:
    """int64 [L_all, P]: ``physical_to_logical_map`` for SGLang, MoE rows from the plan, others trivial."""
    L_all = max(plan.layers) + 1 if num_model_layers is None else num_model_layers
    if L_all <= max(plan.layers):
        raise ExportError(
            f"--num-model-layers {L_all}: the plan has MoE layer {max(plan.layers)}; "
            f"pass the model's num_hidden_layers (at least {max(plan.layers) + 1})"
        )
    P, E = plan.num_slots, plan.num_experts
    out_LP = np.tile(np.arange(P, dtype=np.int64) % E, (L_all, 1))
    out_LP[list(plan.layers)] = plan.phy2log
    return out_LP


def sglang_flags(plan: Plan, path: Path) -> tuple[str, ...]:
    """``sglang serve`` flags that load the map: EP over the G tensor-parallel ranks, P - E redundant slots."""
    return (
        f"--tp-size {plan.num_gpus}",
        f"--ep-size {plan.num_gpus}",
        f"--ep-num-redundant-experts {plan.num_slots - plan.num_experts}",
        f"--init-expert-location {shlex.quote(str(path))}",
    )


def write_sglang(plan: Plan, out: Path, force: bool, num_model_layers: int | None = None) -> ExportResult:
    if out.suffix not in (".json", ".pt"):
        raise ExportError(f"--out {out}: SGLang reads .json or .pt files; name the output *.json or *.pt")
    map_LP = sglang_map(plan, num_model_layers)
    with atomic_output(out, force, is_dir=False) as tmp:
        if out.suffix == ".json":
            write_json(tmp, {"physical_to_logical_map": map_LP.tolist()})
        else:
            import torch

            torch.save({"physical_to_logical_map": torch.from_numpy(map_LP)}, tmp)
    warnings = [
        "do not pass --enable-eplb: SGLang's online rebalancer would replace this placement",
    ]
    if num_model_layers is None:
        warnings.append(
            f"assumed the model has {map_LP.shape[0]} layers (last MoE layer + 1); "
            "pass --num-model-layers N if it has more (e.g. num_hidden_layers)"
        )
    info = {"shape": list(map_LP.shape), "launch": "sglang serve --model-path MODEL"}
    return ExportResult((out,), sglang_flags(plan, out), tuple(warnings), info)


# --------------------------------------------------------------------------------------------------- vLLM


def vllm_initial_map(plan: Plan) -> list[list[int]]:
    """[L][P] physical-to-logical per MoE layer (vLLM ``initial_expert_map_path`` proposal)."""
    return [[int(e) for e in row] for row in plan.phy2log]


def vllm_ascend_map(plan: Plan) -> dict[str, Any]:
    """vllm-ascend ``expert_map_path`` JSON: per MoE layer, per device, its experts in slot order."""
    S = plan.slots_per_gpu
    phy2log_LGS = plan.phy2log.reshape(plan.num_layers, plan.num_gpus, S)
    return {
        "moe_layer_count": plan.num_layers,
        "layer_list": [
            {
                "layer_id": l,
                "device_count": plan.num_gpus,
                "device_list": [
                    {"device_id": g, "device_expert": [int(e) for e in phy2log_LGS[l, g]]} for g in range(plan.num_gpus)
                ],
            }
            for l in range(plan.num_layers)
        ],
    }


def vllm_linear_flags(plan: Plan) -> tuple[str, ...]:
    """``vllm serve CHECKPOINT`` flags under which GPU g holds experts [g E/G, (g + 1) E/G) of every MoE layer
    (vLLM 0.33 linear placement, EP over the G tensor-parallel ranks, no EPLB to move them)."""
    return (
        "--enable-expert-parallel",
        f"--tensor-parallel-size {plan.num_gpus}",
        "--expert-placement-strategy linear",
    )


def vllm_route(plan: Plan) -> str:
    """One line: how to serve ``plan`` on vLLM 0.33, which cannot load a placement file."""
    if plan.num_slots > plan.num_experts:
        return (
            f"vLLM 0.33 cannot serve this plan: it has {plan.num_slots - plan.num_experts} replicas and vLLM places "
            "replicas only by its own EPLB; plan with --redundant 0 for vLLM, or serve it on SGLang (--format sglang)"
        )
    return (
        "vLLM 0.33 cannot load these files (no --eplb-config initial_expert_map_path; --expert-placement-strategy is "
        "linear or round_robin); serve this plan on vLLM with `moeplace export --format permute-checkpoint "
        "--checkpoint MODEL_DIR --out DIR` and `vllm serve DIR` with the flags below"
    )


def write_vllm(plan: Plan, out: Path, force: bool) -> ExportResult:
    flags = vllm_linear_flags(plan) if plan.num_slots == plan.num_experts else ()
    info = {
        "model_name": plan.model_name,
        "layers": list(plan.layers),
        "num_gpus": plan.num_gpus,
        "num_nodes": plan.num_nodes,
        "num_experts": plan.num_experts,
        "num_slots": plan.num_slots,
        "vllm": vllm_route(plan),
        "flags_for_permuted_checkpoint": list(flags),
    }
    with atomic_output(out, force, is_dir=True) as tmp:
        write_json(tmp / VLLM_INITIAL_MAP, vllm_initial_map(plan))
        write_json(tmp / VLLM_ASCEND_MAP, vllm_ascend_map(plan))
        write_json(tmp / VLLM_INFO, info)
    paths = (out / VLLM_INITIAL_MAP, out / VLLM_ASCEND_MAP, out / VLLM_INFO)
    warnings = (
        vllm_route(plan),
        f"{VLLM_INITIAL_MAP} and {VLLM_ASCEND_MAP} are for vLLM forks that read a placement file (docs/deploy.md)",
    )
    return ExportResult(paths, flags, warnings, {"launch": "vllm serve PERMUTED_CHECKPOINT"} if flags else {})


def plan_from_vllm(out_dir: str | os.PathLike[str]) -> Plan:
    """Rebuild the plan from a ``vllm`` export, checking that its two maps agree."""
    d = Path(out_dir)
    try:
        initial = json.loads((d / VLLM_INITIAL_MAP).read_text())
        ascend = json.loads((d / VLLM_ASCEND_MAP).read_text())
        info = json.loads((d / VLLM_INFO).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{d}: not a readable vllm export ({exc}); export again with --format vllm") from exc
    phy2log_LP = np.asarray(initial, dtype=np.int64)
    if phy2log_LP.ndim == 1:  # one map shared by all MoE layers
        phy2log_LP = np.tile(phy2log_LP, (len(info["layers"]), 1))
    G = int(ascend["layer_list"][0]["device_count"])
    ascend_LGS = np.asarray(
        [[dev["device_expert"] for dev in layer["device_list"]] for layer in ascend["layer_list"]],
        dtype=np.int64,
    )
    if int(ascend["moe_layer_count"]) != phy2log_LP.shape[0] or not np.array_equal(
        ascend_LGS.reshape(phy2log_LP.shape[0], -1), phy2log_LP
    ):
        raise ExportError(f"{d}: {VLLM_ASCEND_MAP} and {VLLM_INITIAL_MAP} disagree; export again")
    return Plan(
        num_gpus=G,
        num_nodes=int(info.get("num_nodes", 1)),
        num_experts=int(info.get("num_experts", int(phy2log_LP.max()) + 1)),
        layers=tuple(info["layers"]),
        phy2log=phy2log_LP,
        model_name=str(info.get("model_name", "")),
    )


# ------------------------------------------------------------------------------------------------ DeepSeek


def deepseek_triple(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log [L, P], log2phy [L, E, R] padded -1, logcnt [L, E]), int64, as deepseek-ai/EPLB returns."""
    return plan.phy2log.copy(), plan.log2phy.copy(), plan.logcnt.copy()


def write_deepseek(plan: Plan, out: Path, force: bool) -> ExportResult:
    import torch

    phy2log, log2phy, logcnt = deepseek_triple(plan)
    payload = {
        "phy2log": torch.from_numpy(phy2log),
        "log2phy": torch.from_numpy(log2phy),
        "logcnt": torch.from_numpy(logcnt),
        "layers": torch.tensor(plan.layers, dtype=torch.int64),
        "num_gpus": plan.num_gpus,
        "num_nodes": plan.num_nodes,
    }
    with atomic_output(out, force, is_dir=False) as tmp:
        torch.save(payload, tmp)
    shapes = {k: list(v.shape) for k, v in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt))}
    return ExportResult((out,), (), (), {"shapes": shapes})


# ---------------------------------------------------------------------------------------------- entry point


def export(
    plan: Plan,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    num_model_layers: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> ExportResult:
    """Write ``plan`` as ``fmt`` (one of FORMATS) to ``out``; raises ExportError / PlanError on bad input."""
    out_path = Path(out)
    writers: dict[str, Callable[[], ExportResult]] = {
        "sglang": lambda: write_sglang(plan, out_path, force, num_model_layers),
        "vllm": lambda: write_vllm(plan, out_path, force),
        "deepseek": lambda: write_deepseek(plan, out_path, force),
        "permute-checkpoint": lambda: _permute(plan, checkpoint, out_path, force),
    }
    if fmt not in writers:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if num_model_layers is not None and fmt != "sglang":
        raise ExportError("--num-model-layers only applies to --format sglang")
    if checkpoint is not None and fmt != "permute-checkpoint":
        raise ExportError("--checkpoint only applies to --format permute-checkpoint")
    check_out(out_path, force, is_dir=fmt in ("vllm", "permute-checkpoint"))
    return writers[fmt]()


def _permute(plan: Plan, checkpoint: str | os.PathLike[str] | None, out: Path, force: bool) -> ExportResult:
    from placement.deploy.checkpoint import permute_checkpoint

    if checkpoint is None:
        raise ExportError("--format permute-checkpoint needs --checkpoint DIR (a Hugging Face safetensors model)")
    res = permute_checkpoint(plan, Path(checkpoint), out, force=force)
    return replace(
        res, flags=vllm_linear_flags(plan), info={**res.info, "launch": f"vllm serve {shlex.quote(str(out))}"}
    )


__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "PlanError",
    "deepseek_triple",
    "export",
    "plan_from_vllm",
    "sglang_map",
    "vllm_ascend_map",
    "vllm_initial_map",
    "vllm_linear_flags",
]
