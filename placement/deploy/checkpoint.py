"""Rewrite a Hugging Face safetensors MoE checkpoint so that contiguous placement realises a plan.

Frameworks with contiguous expert placement (Megatron, DeepSpeed, Tutel, vLLM's linear placement) put experts
[g * E/G, (g + 1) * E/G) on GPU g. After the rewrite, the expert at position k of MoE layer l is the original
expert ``plan.phy2log[l, k]``, so GPU g holds exactly the plan's experts of GPU g. The router's rows (and
DeepSeek's ``e_score_correction_bias``) move with their experts, so the rewritten model computes the same
function; only expert ids change (``moeplace_permutation.json`` in the output maps them).

Recognised tensor names (``block`` = the MoE module, e.g. ``model.layers.3.mlp`` or
``model.layers.3.block_sparse_moe``):

- per-expert tensors ``{block}.experts.{e}.{rest}`` (Mixtral ``w1/w2/w3``, Qwen-MoE / OLMoE / DeepSeek
  ``gate_proj/up_proj/down_proj``, quantisation scales alike): renamed position by position;
- fused expert tensors ``{block}.experts.{name}`` with a leading expert dimension (transformers 5.x in memory
  and with ``save_original_format=False``: ``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]): rows taken;
- router tensors ``{block}.gate.*`` / ``{block}.router.*`` with a leading expert dimension: rows taken.
  Shared experts (``shared_expert(s)``, ``shared_expert_gate``) are left alone.

Refused, with a reason: plans with replicas (P > E), a plan for another model (expert count or MoE layer ids
differ from the checkpoint), and for group-limited routers (config ``n_group`` > 1 with ``topk_group`` <
``n_group``, DeepSeek-V2/V3) a plan whose contiguous groups of E/n_group positions mix experts of different
routing groups. MoE layers beyond ``num_hidden_layers`` (DeepSeek-V3's MTP layer) are copied unchanged.

Dimension key: L MoE layers, E experts, P physical slots, G GPUs, D hidden size.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from placement.deploy.common import ExportError, ExportResult, atomic_output
from placement.plan import Plan

INDEX_NAME = "model.safetensors.index.json"
PERMUTATION_NAME = "moeplace_permutation.json"
_EXPERT_RE = re.compile(r"^(?P<block>.*?\blayers\.(?P<layer>\d+)\..*?)\.experts\.(?P<idx>\d+)\.(?P<rest>.+)$")
_FUSED_RE = re.compile(r"^(?P<block>.*?\blayers\.(?P<layer>\d+)\..*?)\.experts\.(?P<rest>[A-Za-z_][^.]*(\..+)?)$")
_ROUTER_RE = re.compile(r"^(?P<block>.*?\blayers\.(?P<layer>\d+)\..*?)\.(gate|router)\.(?P<rest>.+)$")
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class CheckpointInfo:
    """What the rewrite needs to know about a checkpoint directory."""

    path: Path
    shards: tuple[str, ...]  # safetensors file names
    shard_of: dict[str, str]  # tensor name -> shard file name
    num_experts: int
    num_hidden_layers: int | None
    n_group: int
    topk_group: int
    blocks: dict[int, str]  # MoE layer id -> block prefix


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's config (multimodal configs nest it under ``text_config``)."""
    inner = cfg.get("text_config")
    return inner if isinstance(inner, dict) and any(k in inner for k in _EXPERT_COUNT_KEYS) else cfg


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Inspect ``path`` (config.json + safetensors shards); ExportError with a fix when it is not usable."""
    from safetensors import safe_open

    if not path.is_dir():
        raise ExportError(f"--checkpoint {path}: not a directory; pass a Hugging Face model directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{path}: no config.json; pass a Hugging Face model directory")
    try:
        cfg = _text_config(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{cfg_path}: not JSON ({exc})") from exc
    index_path = path / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ExportError(f"{index_path}: no readable weight_map ({exc}); re-save the checkpoint") from exc
        shards = tuple(sorted(set(weight_map.values())))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ExportError(f"{index_path}: names shard {missing[0]} that is not in {path}; copy all shards")
    else:
        shards = tuple(sorted(p.name for p in path.glob("*.safetensors")))
        if not shards:
            raise ExportError(
                f"{path}: no *.safetensors files (only safetensors checkpoints can be permuted); "
                "re-save the model with save_pretrained(safe_serialization=True)"
            )
        weight_map = {}
        for s in shards:
            with safe_open(str(path / s), framework="pt") as f:
                weight_map.update({k: s for k in f.keys()})
    num_experts = next((int(cfg[k]) for k in _EXPERT_COUNT_KEYS if cfg.get(k)), 0)
    blocks: dict[int, str] = {}
    for name in weight_map:
        m = _EXPERT_RE.match(name) or _FUSED_RE.match(name)
        if m is None:
            continue
        layer, block = int(m["layer"]), m["block"]
        if blocks.setdefault(layer, block) != block:
            raise ExportError(f"{path}: layer {layer} has two expert blocks ({blocks[layer]}, {block}); unsupported")
    if not blocks:
        raise ExportError(f"{path}: no expert tensors (*.layers.N.*.experts.*) found; is this an MoE checkpoint?")
    if not num_experts:
        raise ExportError(f"{cfg_path}: no expert count ({' / '.join(_EXPERT_COUNT_KEYS)}); is this an MoE model?")
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or n_group)
    nhl = cfg.get("num_hidden_layers")
    return CheckpointInfo(
        path, shards, weight_map, num_experts, None if nhl is None else int(nhl), n_group, topk_group, blocks
    )


def check_plan(plan: Plan, ck: CheckpointInfo) -> tuple[int, ...]:
    """Raise ExportError unless ``plan`` fits ``ck``; returns the MoE layers copied unchanged (MTP)."""
    P, E = plan.num_slots, plan.num_experts
    if P != E:
        raise ExportError(
            f"plan has {P - E} replicated slots (P={P} > E={E}); a permuted checkpoint holds each expert "
            "once, so plan with --redundant 0 or export to a replica-aware format (sglang, vllm, deepseek)"
        )
    if E != ck.num_experts:
        raise ExportError(
            f"plan is for a model with {E} experts, {ck.path} has {ck.num_experts}; "
            "plan with a trace of this checkpoint's model"
        )
    extra = tuple(
        sorted(l for l in ck.blocks if l not in plan.layers and ck.num_hidden_layers and l >= ck.num_hidden_layers)
    )
    moe = tuple(sorted(l for l in ck.blocks if l not in extra))
    if moe != tuple(sorted(plan.layers)):
        raise ExportError(
            f"plan is for MoE layers {_short(plan.layers)}, {ck.path} has MoE layers {_short(moe)}; "
            "plan with a trace of this checkpoint's model"
        )
    if ck.n_group > 1 and ck.topk_group < ck.n_group:
        if E % ck.n_group:
            raise ExportError(f"{ck.path}: {E} experts do not split into n_group={ck.n_group} routing groups")
        size = E // ck.n_group
        group_LXS = (plan.phy2log // size).reshape(plan.num_layers, ck.n_group, size)
        split_LX = (group_LXS != group_LXS[:, :, :1]).any(axis=2)
        if split_LX.any():
            li, x = (int(v) for v in np.argwhere(split_LX)[0])
            raise ExportError(
                f"plan splits routing groups (n_group={ck.n_group}, topk_group={ck.topk_group}): layer "
                f"{plan.layers[li]} positions {x * size}..{(x + 1) * size - 1} hold experts "
                f"{plan.phy2log[li, x * size : (x + 1) * size].tolist()} from different groups; plan "
                f"with whole groups of {size} experts kept together"
            )
    return extra


def _short(layers: tuple[int, ...]) -> str:
    return f"[{layers[0]}..{layers[-1]}] ({len(layers)})" if len(layers) > 4 else str(list(layers))


def source_of(name: str, new2old_by_layer: dict[int, np.ndarray], blocks: dict[int, str]) -> tuple[str, Any]:
    """(source tensor name, row index or None) that output tensor ``name`` is made from."""
    m = _EXPERT_RE.match(name)
    if m and int(m["layer"]) in new2old_by_layer and blocks.get(int(m["layer"])) == m["block"]:
        old = int(new2old_by_layer[int(m["layer"])][int(m["idx"])])
        return f"{m['block']}.experts.{old}.{m['rest']}", None
    for rx in (_FUSED_RE, _ROUTER_RE):
        m = rx.match(name)
        if m and int(m["layer"]) in new2old_by_layer and blocks.get(int(m["layer"])) == m["block"]:
            return name, new2old_by_layer[int(m["layer"])]
    return name, None


def permute_checkpoint(plan: Plan, checkpoint: Path, out: Path, *, force: bool = False) -> ExportResult:
    """Write the permuted copy of ``checkpoint`` to ``out`` (atomically: temp directory + rename)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    ck = read_checkpoint(checkpoint)
    unchanged = check_plan(plan, ck)
    new2old = {l: plan.phy2log[i] for i, l in enumerate(plan.layers)}
    E = plan.num_experts
    names_by_shard: dict[str, list[str]] = defaultdict(list)
    for name, shard in ck.shard_of.items():
        names_by_shard[shard].append(name)
    moved = 0
    with atomic_output(out, force, is_dir=True) as tmp:
        handles = {s: safe_open(str(checkpoint / s), framework="pt") for s in ck.shards}
        for shard in ck.shards:
            tensors: dict[str, torch.Tensor] = {}
            for name in names_by_shard[shard]:
                src, rows = source_of(name, new2old, ck.blocks)
                if src not in ck.shard_of:
                    raise ExportError(
                        f"{checkpoint}: tensor {src} (source of {name}) is missing; is the checkpoint whole?"
                    )
                t = handles[ck.shard_of[src]].get_tensor(src)
                if rows is not None:
                    if t.ndim == 0 or t.shape[0] != E:
                        raise ExportError(
                            f"{checkpoint}: {name} has shape {list(t.shape)}, expected a leading expert "
                            f"dimension of {E}; unsupported tensor layout"
                        )
                    t = t[torch.tensor(rows, dtype=torch.int64)]
                moved += int(src != name or rows is not None)
                tensors[name] = t.contiguous()
            metadata = handles[shard].metadata() or {"format": "pt"}
            save_file(tensors, str(tmp / shard), metadata=metadata)
        handles.clear()
        for item in checkpoint.iterdir():
            if item.name in ck.shards or item.name == INDEX_NAME or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        if (checkpoint / INDEX_NAME).is_file():
            index = json.loads((checkpoint / INDEX_NAME).read_text())
            index.setdefault("metadata", {})["moeplace_permutation"] = PERMUTATION_NAME
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / PERMUTATION_NAME).write_text(json.dumps(permutation_record(plan, unchanged), indent=1) + "\n")
    warnings = (
        [f"MoE layers {list(unchanged)} (beyond num_hidden_layers, e.g. MTP) copied unchanged"] if unchanged else []
    )
    warnings.append(
        f"expert ids change: new expert k of a layer is old expert new_to_old[k] ({PERMUTATION_NAME}); "
        f"serve it with contiguous placement on {plan.num_gpus} GPUs ({plan.slots_per_gpu} experts per GPU)"
    )
    return ExportResult((out,), (), tuple(warnings), {"tensors_moved": moved, "shards": len(ck.shards)})


def permutation_record(plan: Plan, unchanged: tuple[int, ...] = ()) -> dict[str, Any]:
    """JSON record of the rewrite: per MoE layer new_to_old [E] (= phy2log) and old_to_new [E]."""
    old2new_LE = np.argsort(plan.phy2log, axis=1, kind="stable")
    return {
        "model_name": plan.model_name,
        "layers": list(plan.layers),
        "num_gpus": plan.num_gpus,
        "experts_per_gpu": plan.slots_per_gpu,
        "new_to_old": plan.phy2log.tolist(),
        "old_to_new": old2new_LE.tolist(),
        "unchanged_layers": list(unchanged),
    }
