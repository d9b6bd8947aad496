"""Hugging Face MoE families: captured routing equals the model's own decisions; loading checkpoints.

Tiny models are built from config presets (random weights, no download). Two references, neither
read through the adapter's hooked module:

* the decision the experts actually received — a forward pre-hook on each MoE block's ``experts``
  module sees ``(hidden_states, topk_ids_TK, topk_weights_TK)``;
* an independent recomputation from ``output_router_logits=True`` (softmax top-k for Mixtral / Qwen /
  OLMoE; sigmoid + correction bias + group limit for DeepSeek-V3, written here in numpy).

Dimension key: B batch, S sequence, T tokens, L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers")

from placement.trace.dataset import TraceWriter, open_trace
from profiler.api import LoadedModel, ProfileError, load_model, profile_prompts
from profiler.capture import CaptureError, RoutingRecorder
from profiler.hf_adapters import FAMILIES, HFRouterAdapter, load_hf
from profiler.hf_configs import PRESETS, build_tiny_model

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Mixture of experts",
    "x",
    "import os\nprint(os.getcwd())  # where am I?",
]


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset(request: pytest.FixtureRequest) -> tuple[str, LoadedModel]:
    return request.param, load_model(f"hf-config:{request.param}")


def _padded_batch(loaded: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids_BS`` and ``attention_mask_BS`` (1 = real), as profile_prompts builds them."""
    encoded = [loaded.tokenizer(t) for t in texts]
    S = max(len(e) for e in encoded)
    ids_BS = torch.full((len(encoded), S), loaded.pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(encoded), S), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids_BS[b, : len(e)] = torch.tensor(e)
        mask_BS[b, : len(e)] = 1
    return ids_BS, mask_BS


def _experts_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    layers: Any = getattr(model, "model").layers  # noqa: B009  (HF models type .model loosely)
    return {i: layer.mlp.experts for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts")}


def _run_with_references(
    loaded: LoadedModel, ids_BS: torch.Tensor, mask_BS: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[Any, Any]], tuple[torch.Tensor, ...]]:
    """Adapter capture, experts' received decisions and router logits, all from one forward."""
    used: dict[int, tuple[Any, Any]] = {}
    handles = []
    for layer_id, experts in _experts_modules(loaded.module).items():

        def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _l: int = layer_id) -> None:
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            used[_l] = (ids.clone(), weights.clone())

        handles.append(experts.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with RoutingRecorder(loaded.module, loaded.adapter) as rec, torch.inference_mode():
            out = loaded.module(input_ids=ids_BS, attention_mask=mask_BS, use_cache=False, output_router_logits=True)
            ids_TLK, weights_TLK = rec.pop(mask_BS.bool().reshape(-1))
    finally:
        for h in handles:
            h.remove()
    return ids_TLK, weights_TLK, used, tuple(out.router_logits)


def _softmax_topk(logits_TE: np.ndarray, K: int, renormalise: bool) -> tuple[np.ndarray, np.ndarray]:
    z = logits_TE - logits_TE.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ids_TK = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
    w_TK = np.take_along_axis(probs, ids_TK, -1)
    return ids_TK, w_TK / w_TK.sum(-1, keepdims=True) if renormalise else w_TK


def _deepseek_topk(logits_TE: np.ndarray, router: Any) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3 selection: sigmoid + bias, keep the top ``topk_group`` groups by top-2 sum, top-k."""
    T, E = logits_TE.shape
    G, K = router.num_group, router.top_k
    scores_TE = 1 / (1 + np.exp(-logits_TE))
    choice_TE = scores_TE + router.e_score_correction_bias.numpy()
    group_TG = np.sort(choice_TE.reshape(T, G, E // G), axis=-1)[..., -2:].sum(-1)
    keep_TG = np.zeros((T, G), dtype=bool)
    np.put_along_axis(keep_TG, np.argsort(-group_TG, axis=-1)[:, : router.topk_group], True, -1)
    choice_TE = np.where(np.repeat(keep_TG, E // G, axis=1), choice_TE, -np.inf)
    ids_TK = np.argsort(-choice_TE, axis=-1)[:, :K]
    w_TK = np.take_along_axis(scores_TE, ids_TK, -1)
    w_TK = w_TK / (w_TK.sum(-1, keepdims=True) + 1e-20) * router.routed_scaling_factor
    return ids_TK, w_TK


def _sorted_by_id(ids_XK: np.ndarray, w_XK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids_XK, axis=-1)
    return np.take_along_axis(ids_XK, order, -1), np.take_along_axis(w_XK, order, -1)


def test_captured_routing_equals_model_decisions(preset: tuple[str, LoadedModel]) -> None:
    _, loaded = preset
    ids_BS, mask_BS = _padded_batch(loaded, TEXTS)
    valid_T = mask_BS.bool().reshape(-1).numpy()
    got_ids_TLK, got_w_TLK, used, router_logits = _run_with_references(loaded, ids_BS, mask_BS)
    T, L, K = int(valid_T.sum()), len(loaded.layers), loaded.top_k
    assert got_ids_TLK.shape == (T, L, K) and got_w_TLK.shape == (T, L, K)
    assert sorted(used) == list(loaded.layers) and len(router_logits) == L

    # 1. Exactly what the experts received (same order, same weights).
    for l_idx, layer in enumerate(loaded.layers):
        used_ids_TK, used_w_TK = (t.float().numpy()[valid_T] for t in used[layer])
        np.testing.assert_array_equal(got_ids_TLK[:, l_idx], used_ids_TK)
        np.testing.assert_allclose(got_w_TLK[:, l_idx], used_w_TK, rtol=1e-6, atol=1e-7)

    # 2. Independently recomputed from the router logits the model returns.
    config: Any = loaded.module.config
    routers = dict(loaded.adapter.find_routers(loaded.module))
    naive_differs = 0
    for l_idx, layer in enumerate(loaded.layers):
        logits_TE = router_logits[l_idx].float().numpy()[valid_T].astype(np.float64)
        if config.model_type == "deepseek_v3":
            want_ids, want_w = _sorted_by_id(*_deepseek_topk(logits_TE, routers[layer]))
            got_ids, got_w = _sorted_by_id(got_ids_TLK[:, l_idx], got_w_TLK[:, l_idx])
            naive_ids = np.sort(np.argsort(-logits_TE, axis=-1)[:, :K], axis=-1)
            naive_differs += int((naive_ids != got_ids).any(-1).sum())
        else:
            renorm = config.model_type == "mixtral" or bool(config.norm_topk_prob)
            want_ids, want_w = _softmax_topk(logits_TE, K, renorm)
            got_ids, got_w = got_ids_TLK[:, l_idx], got_w_TLK[:, l_idx]
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-6)
    if config.model_type == "deepseek_v3":
        # The bias and group limit change the choice: a top-k of the logits would be wrong here.
        assert naive_differs > 0


def test_meta_layers_exclude_dense_layers(preset: tuple[str, LoadedModel]) -> None:
    name, loaded = preset
    config: Any = loaded.module.config
    if name == "qwen3-moe-tiny":
        dense = set(config.mlp_only_layers)
    elif name == "deepseek-v3-tiny":
        dense = set(range(config.first_k_dense_replace))
    else:
        dense = set()
    assert dense == ({0} if name in ("qwen3-moe-tiny", "deepseek-v3-tiny") else set())
    assert loaded.layers == tuple(i for i in range(config.num_hidden_layers) if i not in dense)
    meta = loaded.trace_meta()
    assert (meta.model_name, meta.num_experts, meta.top_k, meta.layers) == (name, 8, 2, loaded.layers)


def test_profile_rows_and_padding_invariance(tmp_path: Path) -> None:
    loaded = load_model("hf-config:qwen3-moe-tiny")
    ids = [0, 1, 2, 3]
    with TraceWriter(tmp_path / "ds", loaded.trace_meta()) as w:
        n = profile_prompts(loaded, TEXTS, ids, w, batch_size=4)
    assert n == sum(len(t.encode()) for t in TEXTS)
    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "ds").glob("part-*.parquet"))
    assert rows == n * len(loaded.layers)
    routes = open_trace(tmp_path / "ds").read_all()
    # The shortest prompt, padded in the batch above, routes the same when traced alone.
    with TraceWriter(tmp_path / "alone", loaded.trace_meta()) as w:
        profile_prompts(loaded, [TEXTS[1]], [1], w)
    alone = open_trace(tmp_path / "alone").read_all()
    np.testing.assert_array_equal(alone.expert_ids_TLK, routes.expert_ids_TLK[routes.seq_ids_T == 1])


def _routing(loaded: LoadedModel, texts: list[str]) -> np.ndarray:
    ids_BS, mask_BS = _padded_batch(loaded, texts)
    with RoutingRecorder(loaded.module, loaded.adapter) as rec, torch.inference_mode():
        loaded.forward(loaded.module, ids_BS, mask_BS)
        return rec.pop(mask_BS.bool().reshape(-1))[0]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    """A saved DeepSeek-V3 (correction bias included) reloads via 'hf:<dir>' and routes identically."""
    ckpt = tmp_path / "tiny-dsv3"
    model: Any = build_tiny_model("deepseek-v3-tiny")
    model.save_pretrained(ckpt)
    assert any(ckpt.glob("*.safetensors"))
    reloaded = load_model(f"hf:{ckpt}")
    preset = load_model("hf-config:deepseek-v3-tiny")
    assert (reloaded.name, reloaded.layers, reloaded.num_experts, reloaded.top_k) == (
        "tiny-dsv3",
        (1, 2, 3),
        8,
        2,
    )
    assert reloaded.source == f"hf:{ckpt.resolve()}"
    np.testing.assert_array_equal(_routing(reloaded, TEXTS), _routing(preset, TEXTS))


def test_checkpoint_with_own_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "mixture": 5, "of": 6, "experts": 7}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    ckpt = tmp_path / "olmoe-with-tok"
    model: Any = build_tiny_model("olmoe-tiny")
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    loaded = load_model(f"hf:{ckpt}")
    assert loaded.tokenizer("mixture of experts zzz") == [5, 6, 7, 1]
    assert loaded.pad_id == 0


def _save_dense(kind: str, path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields: dict[str, Any] = {
        "llama": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
    }[kind]
    config = AutoConfig.for_model(kind, vocab_size=256, **fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dense_checkpoint_is_rejected(tmp_path: Path, kind: str) -> None:
    _save_dense(kind, tmp_path / kind)
    with pytest.raises(ProfileError, match=f"model_type '{kind}' is not a supported MoE family") as info:
        load_model(f"hf:{tmp_path / kind}")
    assert "\n" not in str(info.value)


def test_moe_family_with_only_dense_layers_is_rejected(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from profiler.hf_configs import build_tiny_config

    config = build_tiny_config("qwen2-moe-tiny")
    config.mlp_only_layers = list(range(config.num_hidden_layers))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense-qwen")
    with pytest.raises(ProfileError, match="every layer is dense"):
        load_model(f"hf:{tmp_path / 'dense-qwen'}")


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "not found"),
        ("no_config", "config.json not found"),
        ("bad_json", "not a JSON object"),
        ("no_weights", "cannot load checkpoint"),
    ],
)
def test_bad_checkpoint_dirs(tmp_path: Path, setup: str, match: str) -> None:
    ckpt = tmp_path / "ckpt"
    if setup != "missing":
        ckpt.mkdir()
    if setup == "bad_json":
        (ckpt / "config.json").write_text("[1, 2", encoding="utf-8")
    if setup == "no_weights":
        (ckpt / "config.json").write_text(json.dumps({"model_type": "mixtral"}), encoding="utf-8")
    with pytest.raises(ProfileError, match=match) as info:
        load_model(f"hf:{ckpt}")
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ProfileError, match="mixtral-tiny") as info:
        load_hf("hf-config:mixtral-huge")
    assert "unknown hf-config preset 'mixtral-huge'" in str(info.value)


def test_adapter_rejects_unexpected_router_output() -> None:
    adapter = HFRouterAdapter(FAMILIES["mixtral"])
    with pytest.raises(CaptureError, match="expected \\(logits, weights, ids\\)"):
        adapter.read_decision(torch.nn.Identity(), (), torch.zeros(3, 8))


def test_old_transformers_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    import profiler.hf_adapters

    monkeypatch.setattr(profiler.hf_adapters, "_transformers_version", lambda: "4.57.1")
    with pytest.raises(ProfileError, match="the router hooks need transformers>=5"):
        load_hf("hf-config:mixtral-tiny")
