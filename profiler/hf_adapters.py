"""Routing capture for Hugging Face ``transformers`` (5.x) MoE families, and ``load_hf``.

In transformers 5 every supported family routes through one router module per MoE layer, the
``gate`` of the layer's sparse MoE block, whose forward returns
``(router_logits_TE, topk_weights_TK, topk_ids_TK)``; the block hands exactly ``topk_ids_TK`` and
``topk_weights_TK`` to its experts. Hooking that module therefore records the decision as the
model used it:

=============  =======================  ====================  =========================================
model_type     router class (hooked)    expert-count field    what the router's top-k already includes
=============  =======================  ====================  =========================================
mixtral        MixtralTopKRouter        num_local_experts     softmax, top-k, renormalised
qwen2_moe      Qwen2MoeTopKRouter       num_experts           softmax, top-k, ``norm_topk_prob``
qwen3_moe      Qwen3MoeTopKRouter       num_experts           softmax, top-k, ``norm_topk_prob``
olmoe          OlmoeTopKRouter          num_experts           softmax, top-k, ``norm_topk_prob``
deepseek_v3    DeepseekV3TopkRouter     n_routed_experts      sigmoid + ``e_score_correction_bias``,
                                                              group limit (``n_group``/``topk_group``),
                                                              weights × ``routed_scaling_factor``
=============  =======================  ====================  =========================================

Dense layers (``first_k_dense_replace``, ``mlp_only_layers``, ``decoder_sparse_step``) have no
router and are not recorded; shared experts (Qwen2-MoE, DeepSeek-V3) are always on and are not
part of the decision. The MoE layer id is the decoder block index (``model.layers.<i>``).

Dimension key:
    B  batch, S sequence length
    T  tokens (B * S flattened, row-major)
    E  routed experts, K experts chosen per token (top-k)
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers  # noqa: F401  (fail at import if the optional dependency is missing)
from torch import nn

from profiler.api import LoadedModel, ProfileError
from profiler.capture import CaptureError

__all__ = ["FAMILIES", "HFFamily", "HFRouterAdapter", "hf_forward", "load_hf"]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class HFFamily:
    """One transformers MoE family: its router class and config field names."""

    model_type: str
    router_class: str
    experts_field: str
    top_k_field: str = "num_experts_per_tok"

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.experts_field))

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_field))


FAMILIES: dict[str, HFFamily] = {
    f.model_type: f
    for f in (
        HFFamily("mixtral", "MixtralTopKRouter", "num_local_experts"),
        HFFamily("qwen2_moe", "Qwen2MoeTopKRouter", "num_experts"),
        HFFamily("qwen3_moe", "Qwen3MoeTopKRouter", "num_experts"),
        HFFamily("olmoe", "OlmoeTopKRouter", "num_experts"),
        HFFamily("deepseek_v3", "DeepseekV3TopkRouter", "n_routed_experts"),
    )
}


class HFRouterAdapter:
    """:class:`profiler.capture.RouterAdapter` for the transformers 5 top-k routers of one family."""

    def __init__(self, family: HFFamily) -> None:
        self.family = family

    def find_routers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        found = []
        for name, module in model.named_modules():
            if type(module).__name__ != self.family.router_class:
                continue
            match = _LAYER_RE.search(name)
            if match is None:
                raise CaptureError(f"router {name!r} is not inside a 'layers.<i>' block; cannot number it")
            found.append((int(match.group(1)), module))
        return found

    def read_decision(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(output, tuple) or len(output) != 3:
            raise CaptureError(
                f"{type(module).__name__} returned {type(output).__name__}, expected (logits, weights, ids); "
                "this transformers version is not supported"
            )
        _, topk_weights_TK, topk_ids_TK = output
        return topk_ids_TK, topk_weights_TK


def hf_forward(module: nn.Module, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> Any:
    """One profiling forward: no KV cache, logits of the last position only (routing needs none)."""
    return module(input_ids=input_ids_BS, attention_mask=attention_mask_BS, use_cache=False, logits_to_keep=1)


class HFTokenizer:
    """A checkpoint's own tokenizer as ``text -> ids`` (special tokens included, as the model saw them)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._tok.encode(text))


def load_hf(spec: str) -> LoadedModel:
    """``'hf-config:<preset>'`` (tiny random model, see :mod:`profiler.hf_configs`) or ``'hf:<dir>'``."""
    version = _transformers_version()
    if int(version.split(".")[0]) < 5:
        raise ProfileError(
            f"model {spec!r}: transformers {version} is installed; the router hooks need "
            "transformers>=5 (pip install -U 'transformers>=5')"
        )
    if spec.startswith("hf-config:"):
        return _load_preset(spec, spec.removeprefix("hf-config:"))
    if spec.startswith("hf:"):
        return _load_checkpoint(spec, Path(spec.removeprefix("hf:")).expanduser())
    raise ProfileError(f"model {spec!r}: Hugging Face specs are 'hf:<dir>' or 'hf-config:<name>'")


def _transformers_version() -> str:
    return importlib.metadata.version("transformers")


def _load_preset(spec: str, name: str) -> LoadedModel:
    from profiler.hf_configs import PresetError, build_tiny_model
    from profiler.model import ByteTokenizer

    try:
        model = build_tiny_model(name)
    except PresetError as exc:
        raise ProfileError(f"model {spec!r}: {exc}") from exc
    config: Any = model.config
    return _loaded(spec, model, name, ByteTokenizer(), pad_id=int(config.pad_token_id or 0))


def _load_checkpoint(spec: str, path: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        raise ProfileError(f"model {spec!r}: checkpoint directory {path} not found")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ProfileError(f"model {spec!r}: {config_file} not found; expected a transformers checkpoint")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ProfileError(f"model {spec!r}: {config_file} is not a JSON object ({exc})") from exc
    if model_type not in FAMILIES:
        raise ProfileError(
            f"model {spec!r}: model_type {model_type!r} is not a supported MoE family "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ProfileError(f"model {spec!r}: cannot load checkpoint ({_first_line(exc)})") from exc
    tokenizer, pad_id = _checkpoint_tokenizer(spec, path, model.config)
    return _loaded(f"hf:{path.resolve()}", model, path.resolve().name, tokenizer, pad_id)


def _checkpoint_tokenizer(spec: str, path: Path, config: Any) -> tuple[Any, int]:
    """The checkpoint's tokenizer if it ships one, else UTF-8 bytes as ids (needs a vocabulary >= 256)."""
    from profiler.model import VOCAB_SIZE, ByteTokenizer

    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ProfileError(f"model {spec!r}: cannot load the checkpoint's tokenizer ({_first_line(exc)})") from exc
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return HFTokenizer(tok), int(pad or 0)
    if config.vocab_size < VOCAB_SIZE:
        raise ProfileError(
            f"model {spec!r}: no tokenizer files in {path} and vocab_size {config.vocab_size} < 256, "
            "so the byte-level fallback cannot encode prompts; save the tokenizer into the directory"
        )
    return ByteTokenizer(), int(getattr(config, "pad_token_id", None) or 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _loaded(source: str, model: nn.Module, name: str, tokenizer: Any, pad_id: int) -> LoadedModel:
    config: Any = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ProfileError(f"model {source!r}: model_type {config.model_type!r} is not a supported MoE family")
    adapter = HFRouterAdapter(family)
    routers = adapter.find_routers(model)
    if not routers:
        raise ProfileError(f"model {source!r}: no {family.router_class} modules; every layer is dense")
    num_experts, top_k = family.num_experts(config), family.top_k(config)
    for layer_id, router in routers:
        if (getattr(router, "num_experts", num_experts), getattr(router, "top_k", top_k)) != (
            num_experts,
            top_k,
        ):
            raise ProfileError(
                f"model {source!r}: router of layer {layer_id} has {router.num_experts} experts / top-"
                f"{router.top_k}, config says {num_experts} / top-{top_k}"
            )
    return LoadedModel(
        module=model,
        tokenizer=tokenizer,
        adapter=adapter,
        name=name,
        num_experts=num_experts,
        top_k=top_k,
        layers=tuple(sorted(layer_id for layer_id, _ in routers)),
        source=source,
        max_positions=getattr(config, "max_position_embeddings", None),
        pad_id=pad_id,
        forward=hf_forward,
    )
