"""Public profiling API: load a model and prompts, trace routing of prompts into a dataset.

    model = load_model("builtin")                    # or "hf:<dir>", "hf-config:<name>"
    prompts = load_prompts("builtin")                # or a .txt (one per line) / .jsonl {"text": ...}
    done = completed_prompt_ids(out_dir)
    todo = [i for i in range(len(prompts)) if i not in done]
    with TraceWriter(out_dir, model.trace_meta()) as w:
        profile_prompts(model, [prompts[i] for i in todo], todo, w)

Prompts are right-padded per batch; a causal model never lets real positions see the padding, and
padded positions are never recorded. Each prompt is written whole within one ``write`` call, so a
dataset holds complete prompts only and :func:`completed_prompt_ids` can drive resumption.

Dimension key:
    B  batch (prompts), S padded sequence length
    T  tokens (real ones only once written)
    L  MoE layers, K top-k
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from placement.trace.dataset import TraceWriter
from placement.trace.schema import TraceMeta
from profiler.capture import DemoMoEAdapter, RouterAdapter, RoutingRecorder

__all__ = [
    "ASSETS_DIR",
    "LoadedModel",
    "ProfileError",
    "completed_prompt_ids",
    "load_model",
    "load_prompts",
    "profile_prompts",
]

ASSETS_DIR = Path(__file__).parent / "assets"
BUILTIN_WEIGHTS = ASSETS_DIR / "demo_moe.safetensors"
BUILTIN_CONFIG = ASSETS_DIR / "demo_moe.json"
BUILTIN_PROMPTS = ASSETS_DIR / "builtin_prompts.jsonl"


class ProfileError(ValueError):
    """Bad profiling input; the message is one line naming the file or setting."""


ForwardFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]


def _demo_forward(module: nn.Module, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> Any:
    # Causal-only attention: right padding never reaches real positions, so the mask is unused.
    return module(input_ids_BS)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for routing capture.

    ``forward(module, input_ids_BS, attention_mask_BS)`` runs one batch (right-padded, mask 1 = real
    token); Hugging Face loaders pass e.g. ``lambda m, ids, mask: m(input_ids=ids, attention_mask=mask)``.
    ``max_positions`` caps the tokens per prompt; ``pad_id`` fills padded positions.
    """

    module: nn.Module
    tokenizer: Callable[[str], list[int]]
    adapter: RouterAdapter
    name: str
    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    source: str = ""
    max_positions: int | None = None
    pad_id: int = 0
    forward: ForwardFn = _demo_forward
    device: str = "cpu"

    def trace_meta(self) -> TraceMeta:
        return TraceMeta(
            model_name=self.name,
            num_experts=self.num_experts,
            top_k=self.top_k,
            layers=self.layers,
            source=self.source,
        )


def load_model(spec: str) -> LoadedModel:
    """``'builtin'`` (shipped demo MoE), ``'hf:<dir>'`` or ``'hf-config:<name>'`` (profiler.hf_adapters)."""
    if spec == "builtin":
        return _load_builtin()
    if spec.startswith(("hf:", "hf-config:")):
        try:
            hf = importlib.import_module("profiler.hf_adapters")
        except ModuleNotFoundError as exc:
            if exc.name != "profiler.hf_adapters":
                raise ProfileError(
                    f"model {spec!r}: missing dependency {exc.name!r} (pip install 'moeplace[hf]')"
                ) from exc
            raise ProfileError(
                f"model {spec!r}: Hugging Face support (profiler/hf_adapters.py) is not installed"
            ) from exc
        loaded = hf.load_hf(spec)
        if not isinstance(loaded, LoadedModel):
            raise ProfileError(f"model {spec!r}: load_hf gave {type(loaded).__name__}, not LoadedModel")
        return loaded
    raise ProfileError(f"unknown model spec {spec!r}: use 'builtin', 'hf:<dir>' or 'hf-config:<name>'")


def _load_builtin() -> LoadedModel:
    from profiler.model import ByteTokenizer, ModelConfigError, load_demo_model

    try:
        model = load_demo_model(BUILTIN_WEIGHTS, BUILTIN_CONFIG)
    except ModelConfigError as exc:
        raise ProfileError(f"builtin model: {exc}") from exc
    cfg = model.cfg
    return LoadedModel(
        module=model,
        tokenizer=ByteTokenizer(),
        adapter=DemoMoEAdapter(),
        name="moeplace-demo-moe",
        num_experts=cfg.n_experts,
        top_k=cfg.top_k,
        layers=cfg.moe_layers,
        source="builtin",
        max_positions=cfg.max_seq_len,
    )


def load_prompts(spec: str | os.PathLike[str]) -> list[str]:
    """``'builtin'``, a UTF-8 text file (a prompt per non-blank line) or ``.jsonl`` of ``{"text": ...}``."""
    path = BUILTIN_PROMPTS if str(spec) == "builtin" else Path(spec)
    if not path.is_file():
        raise ProfileError(f"prompts file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"prompts file {path} is not UTF-8 text (bad byte at offset {exc.start})") from exc
    if path.suffix == ".jsonl":
        prompts = _parse_jsonl(text, path)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ProfileError(f"prompts file {path} holds no prompts (it is empty)")
    return prompts


def _parse_jsonl(text: str, path: Path) -> list[str]:
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"prompts file {path} line {n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ProfileError(f'prompts file {path} line {n}: expected an object with a "text" string')
        prompts.append(record["text"])
    return prompts


def completed_prompt_ids(dataset_dir: str | os.PathLike[str]) -> set[int]:
    """Prompt ids (``seq_id``) already present in a trace dataset; empty if it does not exist yet."""
    import pyarrow.parquet as pq

    root = Path(dataset_dir)
    if not root.is_dir():
        return set()
    done: set[int] = set()
    for shard in sorted(root.glob("part-*.parquet")):
        seq = pq.read_table(shard, columns=["seq_id"]).column("seq_id").to_numpy()
        done.update(int(s) for s in np.unique(seq))
    return done


def profile_prompts(
    model: LoadedModel,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    writer: TraceWriter,
    *,
    batch_size: int = 8,
    max_len: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Run ``prompts`` through ``model`` in batches and write their routing; returns tokens traced.

    Prompt ``i`` is written with ``seq_id = prompt_ids[i]``; each is truncated to ``max_len`` tokens
    (and the model's ``max_positions``). Empty prompts produce no tokens. ``on_progress`` receives
    the number of tokens traced in each batch.
    """
    if len(prompts) != len(prompt_ids):
        raise ProfileError(f"got {len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    if batch_size < 1 or max_len < 1:
        raise ProfileError(f"batch_size ({batch_size}) and max_len ({max_len}) must be >= 1")
    meta = model.trace_meta()
    if not writer.meta.compatible_with(meta):
        raise ProfileError(
            f"trace writer is for {writer.meta.model_name!r}, model is {meta.model_name!r}; use another --out"
        )
    limit = max_len if model.max_positions is None else min(max_len, model.max_positions)
    encoded = [model.tokenizer(p)[:limit] for p in prompts]
    total = 0
    module = model.module.eval()
    with RoutingRecorder(module, model.adapter) as rec, torch.inference_mode():
        if rec.layers != meta.layers:
            raise ProfileError(f"adapter found MoE layers {list(rec.layers)}, model says {list(meta.layers)}")
        for start in range(0, len(encoded), batch_size):
            batch = [
                (pid, ids)
                for pid, ids in zip(
                    prompt_ids[start : start + batch_size], encoded[start : start + batch_size], strict=True
                )
                if ids
            ]
            if not batch:
                continue
            lengths_B = np.array([len(ids) for _, ids in batch], dtype=np.int64)
            S = int(lengths_B.max())
            input_BS = np.full((len(batch), S), model.pad_id, dtype=np.int64)
            for b, (_, ids) in enumerate(batch):
                input_BS[b, : len(ids)] = ids
            mask_BS = np.arange(S)[None, :] < lengths_B[:, None]
            input_t = torch.from_numpy(input_BS).to(model.device)
            mask_t = torch.from_numpy(mask_BS).to(model.device)
            model.forward(module, input_t, mask_t.long())
            expert_ids_TLK, gate_weights_TLK = rec.pop(mask_t.reshape(-1))
            seq_ids_T = np.repeat(np.array([pid for pid, _ in batch], dtype=np.int64), lengths_B)
            token_pos_T = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths_B])
            writer.write(expert_ids_TLK, seq_ids_T, token_pos_T, gate_weights_TLK)
            total += len(seq_ids_T)
            if on_progress is not None:
                on_progress(len(seq_ids_T))
    return total
