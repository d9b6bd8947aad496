"""Per-layer time model of an expert-parallel MoE step: expert compute plus all-to-all, per plan.

For every MoE layer l of a plan (docs/metrics.md, "Predicted step time", gives the same sums):

- **compute**: the busiest GPU's token-expert pairs, each ``6 * hidden * expert_ffn`` FLOPs (SwiGLU expert:
  gate, up and down projections), at ``peak_flops * gemm_efficiency``:
      compute[l] = max_g load[l, g] * s * 6 h f / (peak * eff)
  with load[l, g] of ../shared/METRICS.md (replicas share their expert's count equally) and s = tokens_per_step /
  T, the trace's T tokens scaled to one step.
- **communication** (MoETuner's dependency model): a token's state at layer l sits on the GPUs of its layer-l
  experts, 1/K on each (K = top_k; a replicated expert's share split equally over its holders). Each of its K^2
  expert pairs (i at l, j at l+1) carries 1/K token from GPU g (serving i) to the GPU serving j: g itself if g
  holds j (free), else j's holders on g's node (equal shares), else all of j's holders (equal shares) -- the
  replica rule of placement/metrics.py. At layer 0 tokens start on their home ranks, 1/G on each GPU. So the
  dispatch demand of GPU g for expert j at layer l is
      M[0, g, j] = load[0, j] / G,      M[l, g, j] = (1/K) * sum_i share[l-1, i, g] * trans[l-1, i, j]
  and F[l, g, h] (g != h) the tokens it sends to h. Bytes = F * s * hidden * bytes_per_element. Each GPU has
  four links: NVLink out / in (``nvlink_bw``, to GPUs of its node) and RDMA out / in (``rdma_bw``, to other
  nodes); a phase takes as long as its busiest link. The combine returns every result along the reverse of its
  dispatch (DeepEP's combine), so it takes exactly the dispatch's time: comm[l] = 2 * dispatch phase time.
- layer[l] = compute[l] + comm[l] (no overlap of compute and communication); step = sum over l.

``forecast_time`` evaluates the same model on prompt-fold bootstrap draws of unseen traffic (the resampling of
placement/solvers/robust.py's imbalance forecast, sized to one step) and averages per layer.

Dimension key: L MoE layers, X adjacent-layer pairs (L - 1), E experts, G GPUs, N nodes, D bootstrap draws,
S prompt folds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from placement.graph import RoutingGraph, unseen_share_draws
from placement.metrics import load_split
from placement.plan import Plan
from placement.trace.schema import TraceMeta

TIME_SCHEMA_VERSION = 1
DEFAULT_TOKENS_PER_GPU = 4096
_CHUNK_ELEMENTS = 1 << 23  # float64 elements of a batch of draws' loads, flows and link bytes
FLOPS_PER_PAIR = 6  # FLOPs per (token, expert) per hidden x ffn weight: 3 matrices x 2 FLOPs per MAC


class TimeModelError(ValueError):
    """Bad hardware preset, model dims or Hugging Face config; one line naming the field and how to fix it."""


def _from_json(cls: Any, text: str | bytes, where: str) -> Any:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TimeModelError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise TimeModelError(f"{where}: expected a JSON object, got {type(d).__name__}")
    version = d.get("schema_version", TIME_SCHEMA_VERSION)
    if version != TIME_SCHEMA_VERSION:
        raise TimeModelError(f"{where}: schema_version {version}, this moeplace reads {TIME_SCHEMA_VERSION}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise TimeModelError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(names))}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise TimeModelError(f"{where}: {exc}") from exc


def _check_positive(where: str, **values: float | int | None) -> None:
    for key, v in values.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise TimeModelError(f"{where}: {key} = {v!r} must be a positive number")


@dataclass(frozen=True)
class HardwarePreset:
    """One GPU type in NVLink nodes joined by RDMA. Bandwidths in bytes/s per GPU and direction, peak_flops dense
    bf16 FLOP/s per GPU; gemm_efficiency the share of peak a grouped expert GEMM reaches."""

    name: str
    gpus_per_node: int
    nvlink_bw: float
    rdma_bw: float
    peak_flops: float
    gemm_efficiency: float = 0.6
    source: str = ""
    schema_version: int = TIME_SCHEMA_VERSION

    def __post_init__(self) -> None:
        where = f"hardware {self.name!r}"
        _check_positive(where, gpus_per_node=self.gpus_per_node, nvlink_bw=self.nvlink_bw, rdma_bw=self.rdma_bw)
        _check_positive(where, peak_flops=self.peak_flops, gemm_efficiency=self.gemm_efficiency)
        if not isinstance(self.gpus_per_node, int) or self.gemm_efficiency > 1:
            raise TimeModelError(f"{where}: gpus_per_node must be an integer and gemm_efficiency at most 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "hardware preset") -> HardwarePreset:
        out: HardwarePreset = _from_json(cls, text, where)
        return out


# DeepEP (github.com/deepseek-ai/DeepEP README) measures its normal kernels at about 150 GB/s over NVLink and
# 45 GB/s over RDMA per GPU (H800, ConnectX-7 400 Gb/s InfiniBand). Dense BF16 tensor-core peak from NVIDIA's
# H100 SXM and H200 SXM data sheets: 989 TFLOPS (the sheets' 1,979 is with 2:4 sparsity).
_DEEPEP = "links: DeepEP README normal-kernel bandwidths (~150 GB/s NVLink, ~45 GB/s RDMA per GPU)"
PRESETS: dict[str, HardwarePreset] = {
    "h100-nvlink-ib400": HardwarePreset(
        "h100-nvlink-ib400", 8, 150e9, 45e9, 989e12, 0.6, f"{_DEEPEP}; flops: NVIDIA H100 SXM data sheet, dense BF16"
    ),
    "h200-nvlink-ib400": HardwarePreset(
        "h200-nvlink-ib400", 8, 150e9, 45e9, 989e12, 0.6, f"{_DEEPEP}; flops: NVIDIA H200 SXM data sheet, dense BF16"
    ),
}


def load_hardware(name_or_path: str) -> HardwarePreset:
    """A preset by name, or a HardwarePreset JSON file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return HardwarePreset.from_json(p.read_text(), where=str(p))
    raise TimeModelError(
        f"--hardware {name_or_path!r}: unknown preset; use one of {', '.join(PRESETS)} or a preset JSON file"
    )


@dataclass(frozen=True)
class ModelDims:
    """What one token costs: hidden_size (elements moved per token), expert_ffn_size (each expert's
    intermediate size), bytes_per_element (2 = bf16), tokens_per_step (tokens of one step over all GPUs;
    None: DEFAULT_TOKENS_PER_GPU per GPU)."""

    hidden_size: int
    expert_ffn_size: int
    tokens_per_step: int | None = None
    bytes_per_element: int = 2
    source: str = ""
    schema_version: int = TIME_SCHEMA_VERSION

    def __post_init__(self) -> None:
        where = f"model dims ({self.source or 'given'})"
        for key in ("hidden_size", "expert_ffn_size", "bytes_per_element", "tokens_per_step"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TimeModelError(f"{where}: {key} = {v!r} must be an integer")
        _check_positive(where, hidden_size=self.hidden_size, expert_ffn_size=self.expert_ffn_size)
        _check_positive(where, bytes_per_element=self.bytes_per_element, tokens_per_step=self.tokens_per_step)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights: gate, up and down projections of hidden x expert_ffn."""
        return 3 * self.hidden_size * self.expert_ffn_size * self.bytes_per_element

    def step_tokens(self, num_gpus: int) -> int:
        return self.tokens_per_step or DEFAULT_TOKENS_PER_GPU * num_gpus

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "model dims") -> ModelDims:
        out: ModelDims = _from_json(cls, text, where)
        return out


# Published configs (config.json on the Hugging Face hub): hidden_size, routed-expert intermediate size.
KNOWN_DIMS: dict[str, tuple[int, int]] = {
    "deepseek-v2-lite": (2048, 1408),
    "deepseek-v2": (5120, 1536),
    "deepseek-v3": (7168, 2048),
    "deepseek-r1": (7168, 2048),
    "kimi-k2": (7168, 2048),
    "mixtral-8x7b": (4096, 14336),
    "mixtral-8x22b": (6144, 16384),
    "olmoe-1b-7b": (2048, 1024),
    "qwen1.5-moe-a2.7b": (2048, 1408),
    "qwen3-30b-a3b": (2048, 768),
    "qwen3-235b-a22b": (4096, 1536),
}

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1, "int8": 1}
# model_type -> key of the routed experts' intermediate size: moe_intermediate_size where intermediate_size is the
# dense FFN (DeepSeek, Qwen-MoE), intermediate_size where every FFN is a routed expert's (Mixtral, OLMoE); other
# families: moe_intermediate_size if the config has it, else intermediate_size
_MOE_FFN_KEY = {"deepseek_v2": "moe_intermediate_size", "deepseek_v3": "moe_intermediate_size"}
_MOE_FFN_KEY |= {"qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size"}
_MOE_FFN_KEY |= {"mixtral": "intermediate_size", "olmoe": "intermediate_size"}
# routed-expert count: DeepSeek n_routed_experts; Mixtral (and Qwen3-MoE as transformers 5 writes it)
# num_local_experts; Qwen-MoE and OLMoE num_experts; ERNIE-4.5-MoE moe_num_experts
_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")


def dims_from_hf_config(
    path: str | Path, num_experts: int | None = None, fix: str = "pass --hidden-size / --expert-ffn-size"
) -> ModelDims:
    """hidden_size, the routed experts' intermediate size (moe_intermediate_size for DeepSeek-V2/V3 and
    Qwen2/Qwen3-MoE, intermediate_size for Mixtral and OLMoE; ``_MOE_FFN_KEY``) and torch_dtype (or dtype) of a
    config.json (or its directory; a multimodal config's text_config counts too); with ``num_experts`` the config
    must name a routed-expert count (``_EXPERT_COUNT_KEYS``) equal to the trace's. ``fix``: the flags that replace
    the config, named in the error when a size is missing."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise TimeModelError(f"--hf-config {p}: no such file; pass the model directory or its config.json")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TimeModelError(f"--hf-config {p}: not JSON ({exc}); pass the model's config.json") from exc
    if not isinstance(cfg, dict):
        raise TimeModelError(f"--hf-config {p}: expected a JSON object")
    text = cfg.get("text_config")  # multimodal configs keep the language model's keys there
    cfg = {**text, **cfg} if isinstance(text, dict) else cfg
    ffn_key = _MOE_FFN_KEY.get(str(cfg.get("model_type", "")))
    if ffn_key is None:
        ffn_key = "moe_intermediate_size" if "moe_intermediate_size" in cfg else "intermediate_size"
    for key in ("hidden_size", ffn_key):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise TimeModelError(f"--hf-config {p}: needs an integer {key!r}; or {fix}")
    count = next((cfg[k] for k in _EXPERT_COUNT_KEYS if isinstance(cfg.get(k), int)), None)
    if num_experts is not None and count is None:
        raise TimeModelError(
            f"--hf-config {p}: no routed-expert count ({', '.join(_EXPERT_COUNT_KEYS)}), so not an MoE config; "
            f"pass the config of the traced model, or {fix} instead"
        )
    if num_experts is not None and count != num_experts:
        raise TimeModelError(
            f"--hf-config {p}: {count} routed experts, the trace has {num_experts}; pass the config of the traced model"
        )
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
    if dtype not in _DTYPE_BYTES:
        raise TimeModelError(
            f"--hf-config {p}: torch_dtype {dtype!r} unknown; use one of {', '.join(_DTYPE_BYTES)} or {fix}"
        )
    return ModelDims(cfg["hidden_size"], cfg[ffn_key], None, _DTYPE_BYTES[dtype], source=str(p))


def resolve_dims(
    meta: TraceMeta,
    hf_config: str | Path | None = None,
    hidden_size: int | None = None,
    expert_ffn_size: int | None = None,
    tokens_per_step: int | None = None,
) -> ModelDims:
    """Model dims of a trace, first found wins per field: flags, the HF config, the trace metadata's ``extra``
    (hidden_size, moe_intermediate_size or intermediate_size), KNOWN_DIMS by model-name prefix."""
    base: tuple[int | None, int | None, int, str] = (None, None, 2, "")
    if hf_config is not None:
        d = dims_from_hf_config(hf_config, meta.num_experts)
        base = (d.hidden_size, d.expert_ffn_size, d.bytes_per_element, d.source)
    else:
        ex = meta.extra
        ffn = ex.get("moe_intermediate_size", ex.get("intermediate_size"))
        if isinstance(ex.get("hidden_size"), int) and isinstance(ffn, int):
            base = (ex["hidden_size"], ffn, 2, "trace metadata")
        else:
            name = meta.model_name.lower()
            key = max((k for k in KNOWN_DIMS if name.startswith(k)), key=len, default=None)
            if key is not None:
                base = (*KNOWN_DIMS[key], 2, f"known dims of {key}")
    h = hidden_size if hidden_size is not None else base[0]
    f = expert_ffn_size if expert_ffn_size is not None else base[1]
    if h is None or f is None:
        raise TimeModelError(
            f"model dims of {meta.model_name!r} unknown: pass --hf-config, or --hidden-size and --expert-ffn-size"
        )
    src = base[3] if hidden_size is None and expert_ffn_size is None else "flags" + (f" + {base[3]}" if base[3] else "")
    return ModelDims(h, f, tokens_per_step, base[2], source=src)


def check_topology(plan_gpus: int, plan_nodes: int, hw: HardwarePreset) -> None:
    """The plan's GPUs per node must fit the preset's nodes."""
    if plan_gpus // plan_nodes > hw.gpus_per_node:
        need = -(-plan_gpus // hw.gpus_per_node)
        raise TimeModelError(
            f"--gpus {plan_gpus} --nodes {plan_nodes} puts {plan_gpus // plan_nodes} GPUs on a node; {hw.name} has "
            f"{hw.gpus_per_node}: pass --nodes {need} or more"
        )


# ------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class StepTime:
    """Seconds per layer of one step: compute_L, comm_L (dispatch + combine), layer_L = compute + comm."""

    compute_L: np.ndarray
    comm_L: np.ndarray

    @property
    def layer_L(self) -> np.ndarray:
        return np.asarray(self.compute_L + self.comm_L)

    def summary(self) -> dict[str, float]:
        """Per-layer mean and max, and the step total, in seconds."""
        t_L = self.layer_L
        return {
            "layer_mean_s": float(t_L.mean()),
            "layer_max_s": float(t_L.max()),
            "step_s": float(t_L.sum()),
            "compute_s": float(self.compute_L.sum()),
            "comm_s": float(self.comm_L.sum()),
        }


def dispatch_demand(share_LEG: np.ndarray, load_LE: np.ndarray, trans_XEE: np.ndarray, top_k: int) -> np.ndarray:
    """float64 [L, G, E]: tokens GPU g dispatches for expert j at layer l (module docstring, M)."""
    L, E, G = share_LEG.shape
    M_LGE = np.empty((L, G, E))
    M_LGE[0] = np.asarray(load_LE[0], dtype=np.float64)[None, :] / G
    if L > 1:
        M_LGE[1:] = np.matmul(share_LEG[:-1].transpose(0, 2, 1), trans_XEE.astype(np.float64)) / top_k
    return M_LGE


def dispatch_flows(plan: Plan, M_LGE: np.ndarray, scale_yLE: np.ndarray | None = None) -> np.ndarray:
    """float64 [L, G, G]: tokens sent g -> h (g != h) for demand M [L, G, E] by the replica rule; with
    ``scale_yLE`` [..., L, E], [..., L, G, G]: one flow matrix per scale, the demand for expert j at layer l scaled
    by scale[..., l, j] (the flows are linear in j's demand). Summed over the K = P / G slots of h (a copy doubled
    on h counts half) rather than over all E experts, so a batch of scales costs L x G x P, not L x G x E x G, per
    scale."""
    cnt_LEG = plan.holders_LEG
    H_LEG = (cnt_LEG > 0).astype(np.float64)
    L, E, G = H_LEG.shape
    node_G = plan.node_of_gpu_G
    N = plan.num_nodes
    cnt_LE = H_LEG.sum(axis=2)
    cn_LEG = H_LEG.reshape(L, E, N, G // N).sum(axis=3)[:, :, node_G]  # holders of e on g's node
    away_LGE = (1.0 - H_LEG).transpose(0, 2, 1)
    node_LGE = np.divide(1.0, cn_LEG, out=np.zeros_like(cn_LEG), where=cn_LEG > 0).transpose(0, 2, 1)
    any_LGE = np.where(cn_LEG == 0, 1.0 / cnt_LE[:, :, None], 0.0).transpose(0, 2, 1)
    # rows 0..G-1: g's demand sent to holders on its node; rows G..2G-1: to all holders (none on g's node)
    W_LRE = np.concatenate([away_LGE * node_LGE, away_LGE * any_LGE], axis=1) * np.concatenate([M_LGE, M_LGE], axis=1)
    phy_LP = plan.phy2log
    P = phy_LP.shape[1]
    K = P // G
    w_LP = 1.0 / cnt_LEG[np.arange(L)[:, None], phy_LP, plan.gpu_of_slot_P[None, :]]
    W_LRP = np.take_along_axis(W_LRE, np.broadcast_to(phy_LP[:, None, :], (L, 2 * G, P)), axis=2) * w_LP[:, None, :]
    W_LHRK = W_LRP.reshape(L, 2 * G, G, K).transpose(0, 2, 1, 3)
    if scale_yLE is None:
        F_xLRH = W_LHRK.sum(axis=3).transpose(0, 2, 1)
    else:
        s_YLE = scale_yLE.reshape(-1, L, E)
        s_YLP = np.take_along_axis(s_YLE, np.broadcast_to(phy_LP[None], (s_YLE.shape[0], L, P)), axis=2)
        F_LHRY = np.matmul(W_LHRK, s_YLP.reshape(-1, L, G, K).transpose(1, 2, 3, 0))
        F_xLRH = F_LHRY.transpose(3, 0, 2, 1).reshape(*scale_yLE.shape[:-2], L, 2 * G, G)
    same_GG = node_G[:, None] == node_G[None, :]
    return np.asarray(F_xLRH[..., :G, :] * same_GG + F_xLRH[..., G:, :])


def phase_seconds(plan: Plan, bytes_xLGG: np.ndarray, hw: HardwarePreset) -> np.ndarray:
    """float64 [..., L]: time of one all-to-all phase, its busiest link's bytes over that link's bandwidth."""
    node_G = plan.node_of_gpu_G
    same_GG = node_G[:, None] == node_G[None, :]
    nv = np.where(same_GG, bytes_xLGG, 0.0)
    rd = np.where(same_GG, 0.0, bytes_xLGG)
    links = (nv.sum(-1) / hw.nvlink_bw, nv.sum(-2) / hw.nvlink_bw, rd.sum(-1) / hw.rdma_bw, rd.sum(-2) / hw.rdma_bw)
    return np.asarray(np.maximum.reduce(links).max(axis=-1))


def _step_time(
    plan: Plan,
    load_xLE: np.ndarray,
    M_LGE: np.ndarray,
    num_tokens: int,
    hw: HardwarePreset,
    dims: ModelDims,
    scale_xLE: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(compute [..., L], comm [..., L]) seconds for loads and dispatch demand (its expert columns scaled by
    ``scale_xLE``, ``dispatch_flows``) counted over ``num_tokens``."""
    s = dims.step_tokens(plan.num_gpus) / max(num_tokens, 1)
    gpu_xLG = np.matmul(load_xLE[..., :, None, :], load_split(plan))[..., 0, :]
    flops = FLOPS_PER_PAIR * dims.hidden_size * dims.expert_ffn_size
    compute = gpu_xLG.max(axis=-1) * s * flops / (hw.peak_flops * hw.gemm_efficiency)
    token_bytes = dims.hidden_size * dims.bytes_per_element
    comm = 2.0 * phase_seconds(plan, dispatch_flows(plan, M_LGE, scale_xLE) * (s * token_bytes), hw)
    return np.asarray(compute), np.asarray(comm)


def predict_time(plan: Plan, g: RoutingGraph, hw: HardwarePreset, dims: ModelDims) -> StepTime:
    """Predicted seconds per layer of one step of ``dims.tokens_per_step`` tokens routed like trace ``g``."""
    plan.check_trace(g.meta)
    M_LGE = dispatch_demand(load_split(plan), g.load_LE, g.trans_LEE, g.meta.top_k)
    compute_L, comm_L = _step_time(plan, g.load_LE.astype(np.float64), M_LGE, g.num_tokens, hw, dims)
    return StepTime(compute_L, comm_L)


def step_time_bound(g: RoutingGraph, num_gpus: int, hw: HardwarePreset, dims: ModelDims) -> float:
    """Seconds: a lower bound on the predicted step (``predict_time`` or ``forecast_time``, whose draws keep
    each layer's total) of any plan on ``num_gpus`` GPUs: every GPU equally loaded and no all-to-all,
        sum over l of (sum over e of load[l, e]) / G * s * 6 h f / (peak * eff)."""
    s = dims.step_tokens(num_gpus) / max(g.num_tokens, 1)
    pair_s = FLOPS_PER_PAIR * dims.hidden_size * dims.expert_ffn_size / (hw.peak_flops * hw.gemm_efficiency)
    return float(g.load_LE.astype(np.float64).sum()) / num_gpus * s * pair_s


def bootstrap_loads(
    load_LE: np.ndarray, fold_load_SLE: np.ndarray, holdout_ratio: float, draws: int, seed: int
) -> np.ndarray | None:
    """float64 [D, L, E]: loads of unseen traffic ``holdout_ratio`` times the trace's size, scaled back to the
    trace's totals: the fold bootstrap of robust.py's forecast (share deviations x sqrt(1 + 1/ratio)). None with
    fewer than 8 non-empty folds."""
    sim_DLE = unseen_share_draws(load_LE, fold_load_SLE, holdout_ratio, draws, seed)
    if sim_DLE is None:
        return None
    tot_L1 = np.maximum(np.asarray(load_LE, dtype=np.float64).sum(axis=1, keepdims=True), 1e-12)
    sim_DLE /= np.maximum(sim_DLE.sum(axis=2, keepdims=True), 1e-12)
    return np.asarray(sim_DLE * tot_L1)


def forecast_time(
    plan: Plan, g: RoutingGraph, hw: HardwarePreset, dims: ModelDims, draws: int = 64, seed: int = 0
) -> StepTime:
    """Expected per-layer time of one step of unseen prompts: the model on ``draws`` bootstrap loads of the
    prompt folds (one step's worth of tokens), each dispatch demand for expert j scaled by j's resampled load,
    averaged per layer. Without prompt folds: ``predict_time`` on the trace itself."""
    ratio = dims.step_tokens(plan.num_gpus) / max(g.num_tokens, 1)
    sim_DLE = None if g.fold_load_SLE is None else bootstrap_loads(g.load_LE, g.fold_load_SLE, ratio, draws, seed)
    if sim_DLE is None:
        return predict_time(plan, g, hw, dims)
    plan.check_trace(g.meta)
    load_LE = g.load_LE.astype(np.float64)
    M_LGE = dispatch_demand(load_split(plan), load_LE, g.trans_LEE, g.meta.top_k)
    r_DLE = np.divide(sim_DLE, load_LE, out=np.ones_like(sim_DLE), where=load_LE > 0)
    compute_L, comm_L = np.zeros(plan.num_layers), np.zeros(plan.num_layers)
    L, G, E = M_LGE.shape
    chunk = max(1, _CHUNK_ELEMENTS // (L * (E + 4 * G * G)))  # draws per batch: bounded memory at any size
    for a in range(0, sim_DLE.shape[0], chunk):
        sim_dLE, r_dLE = sim_DLE[a : a + chunk], r_DLE[a : a + chunk]
        c_dL, m_dL = _step_time(plan, sim_dLE, M_LGE, g.num_tokens, hw, dims, r_dLE)
        compute_L += c_dL.sum(axis=0)
        comm_L += m_dL.sum(axis=0)
    return StepTime(compute_L / sim_DLE.shape[0], comm_L / sim_DLE.shape[0])
