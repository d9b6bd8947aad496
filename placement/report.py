"""HTML report of a trace and of plans on it: one self-contained page (PNG figures embedded as base64) plus
the same PNGs as files next to it.

Figures: per-layer expert load (bars for up to 12 layers, a heatmap of all), layer-to-layer transition
heatmaps (row-normalised, up to 6 layer pairs), and per plan the load of each GPU per layer and the GPU-pair
all-to-all traffic (``home`` mode of placement.metrics). The plan table holds ``metrics.evaluate``.

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), so the module is safe
in servers, threads and notebooks.

Dimension key: L MoE layers, E experts, G GPUs, X layer pairs (L - 1).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from placement.graph import RoutingGraph, build_graph, graph_from_routes, graph_stats
from placement.metrics import evaluate, gpu_load
from placement.plan import Plan
from placement.trace.dataset import Trace, atomic_write_bytes, open_trace
from placement.trace.schema import TraceError, split_by_prompt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_BAR_LAYERS = 12
MAX_TRANSITION_PAIRS = 6


@dataclass(frozen=True)
class Report:
    """The page and its figures (name -> PNG bytes); ``write`` puts both on disk."""

    html: str
    pngs: dict[str, bytes]

    def png_paths(self, out: str | os.PathLike[str]) -> list[Path]:
        """Where ``write`` puts the figures: ``{stem}_{name}.png`` next to ``out``."""
        out_path = Path(out)
        return [out_path.with_name(f"{out_path.stem}_{name}.png") for name in self.pngs]

    def write(self, out: str | os.PathLike[str]) -> list[Path]:
        """Write ``{stem}_{name}.png`` next to ``out``, then ``out`` itself; each file atomically, and none of them
        if one fails (a full disk: the PNGs written so far are removed again)."""
        out_path = Path(out)
        umask = os.umask(0)
        os.umask(umask)
        written = []
        try:
            for p, png in zip(self.png_paths(out_path), self.pngs.values(), strict=True):
                atomic_write_bytes(p, png)
                written.append(p)
            atomic_write_bytes(out_path, self.html.encode())
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        for p in [*written, out_path]:
            p.chmod(0o666 & ~umask)  # the temp files were private; a report is for sharing
        return [*written, out_path]


# -------------------------------------------------------------------------------------------------- figures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _pick(n: int, k: int) -> list[int]:
    """Up to ``k`` indices spread evenly over range(n)."""
    return sorted({round(x) for x in np.linspace(0, n - 1, min(n, k))}) if n else []


def load_bars_png(g: RoutingGraph) -> bytes:
    """Bars of each expert's share of the layer's load, for up to MAX_BAR_LAYERS layers."""
    from matplotlib.figure import Figure

    rows = _pick(g.num_layers, MAX_BAR_LAYERS)
    ncol = min(4, len(rows))
    nrow = -(-len(rows) // ncol)
    fig = Figure(figsize=(3.2 * ncol, 2.2 * nrow))
    share_LE = g.load_LE / np.maximum(g.load_LE.sum(axis=1, keepdims=True), 1)
    E = g.num_experts
    for i, l in enumerate(rows):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.bar(np.arange(E), share_LE[l], color="#3b6ea5", width=0.9)
        ax.axhline(1.0 / E, color="#c0392b", lw=0.8, ls="--")
        ax.set_title(f"layer {g.meta.layers[l]}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlim(-0.5, E - 0.5)
    fig.suptitle("Share of routed tokens per expert (dashed: uniform)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def heatmap_png(
    m_YX: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    yticks: list[str] | None = None,
    cmap: str = "viridis",
    center: float | None = None,
) -> bytes:
    """One heatmap; ``center`` puts that value at the middle of a diverging colormap."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    h, w = m_YX.shape
    fig = Figure(figsize=(min(12, 3 + 0.12 * w), min(10, 2 + 0.12 * h)))
    ax = fig.add_subplot(1, 1, 1)
    norm = None
    if center is not None:
        span = max(float(np.abs(m_YX - center).max()), 1e-6)
        norm = TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
    im = ax.imshow(m_YX, aspect="auto", cmap=cmap, interpolation="nearest", norm=norm)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if yticks is not None and len(yticks) <= 32:
        ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
    fig.tight_layout()
    return _png(fig)


def transitions_png(g: RoutingGraph) -> bytes | None:
    """Row-normalised transition matrices P(expert j at layer l+1 | expert i at layer l) for a few pairs."""
    from matplotlib.figure import Figure

    X = g.trans_LEE.shape[0]
    if X == 0:
        return None
    pairs = _pick(X, MAX_TRANSITION_PAIRS)
    ncol = min(3, len(pairs))
    nrow = -(-len(pairs) // ncol)
    fig = Figure(figsize=(3.6 * ncol, 3.3 * nrow))
    for i, x in enumerate(pairs):
        t = g.trans_LEE[x].astype(np.float64)
        p = t / np.maximum(t.sum(axis=1, keepdims=True), 1)
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.imshow(p, cmap="magma", interpolation="nearest", vmin=0)
        ax.set_title(f"layer {g.meta.layers[x]} → {g.meta.layers[x + 1]}", fontsize=9)
        ax.set_xlabel("next expert", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Layer-to-layer transitions (row-normalised)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def figures(g: RoutingGraph, plans: dict[str, Plan], evals: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """All figures of the report, name -> PNG."""
    out = {"load_bars": load_bars_png(g)}
    share_LE = g.load_LE / np.maximum(g.load_LE.sum(axis=1, keepdims=True), 1)
    ylabels = [str(x) for x in g.meta.layers]
    out["load_heatmap"] = heatmap_png(share_LE, "Load share per expert", "expert", "layer", ylabels)
    trans = transitions_png(g)
    if trans is not None:
        out["transitions"] = trans
    for name, plan in plans.items():
        load_LG = gpu_load(plan, g)
        rel_LG = load_LG / np.maximum(load_LG.mean(axis=1, keepdims=True), 1e-12)
        out[f"gpu_load_{name}"] = heatmap_png(
            rel_LG, f"{name}: GPU load / mean per layer", "GPU", "layer", ylabels, cmap="coolwarm", center=1.0
        )
        pair = evals[name].get("home", {}).get("bytes_pair")
        if pair is not None:
            out[f"gpu_traffic_{name}"] = heatmap_png(
                np.asarray(pair, dtype=np.float64) / 2**20,
                f"{name}: all-to-all MiB src → dst (home)",
                "dst GPU",
                "src GPU",
            )
    return out


# ----------------------------------------------------------------------------------------------------- page


def _img(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def plan_table(plans: dict[str, Plan], evals: dict[str, dict[str, Any]]) -> str:
    head = (
        "<tr><th>plan</th><th>solver</th><th>GPUs</th><th>slots</th><th>colocation ↑</th>"
        "<th>imbalance max ↓</th><th>forecast unseen imbalance p50 (p10–p90)</th>"
        "<th>imbalance mean ↓</th><th>home bytes/token ↓</th><th>home inter-node GB</th>"
        "<th>follow bytes/token ↓</th><th>a2a time home (ms)</th></tr>"
    )
    rows = []
    for name, plan in plans.items():
        ev = evals[name]
        home, follow = ev.get("home", {}), ev.get("follow", {})
        inter = home.get("bytes_inter_node")
        secs = home.get("alltoall_seconds_total")
        fc = plan.provenance.get("unseen_imbalance") or {}
        forecast = f"{fc['p50']:.3f} ({fc['p10']:.3f}–{fc['p90']:.3f})" if fc else "–"
        cells = [
            html.escape(name),
            _fmt(plan.provenance.get("solver", "")),
            _fmt(plan.num_gpus),
            _fmt(plan.num_slots),
            _fmt(ev["colocation"]),
            _fmt(ev["imbalance_max"]),
            forecast,
            _fmt(ev["imbalance_mean"]),
            _fmt(home.get("bytes_per_token"), 0),
            _fmt(None if inter is None else inter / 1e9),
            _fmt(follow.get("bytes_per_token"), 0),
            _fmt(None if secs is None else secs * 1e3),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;
background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f2f4f7}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}.muted{color:#666}
"""


def render_html(
    g: RoutingGraph,
    stats: dict[str, Any],
    plans: dict[str, Plan],
    evals: dict[str, dict[str, Any]],
    pngs: dict[str, bytes],
    title: str,
    evaluated_on: str = "",
) -> str:
    s = stats["summary"]
    summary = (
        f"<table><tr><th>model</th><td>{_fmt(g.meta.model_name)}</td></tr>"
        + (f"<tr><th>prompts</th><td>{html.escape(evaluated_on)}</td></tr>" if evaluated_on else "")
        + f"<tr><th>tokens</th><td>{_fmt(g.num_tokens)}</td></tr>"
        + f"<tr><th>MoE layers</th><td>{_fmt(g.num_layers)}</td></tr>"
        f"<tr><th>experts / top-k</th><td>{g.num_experts} / {g.meta.top_k}</td></tr>"
        f"<tr><th>load skew max / mean</th><td>{_fmt(s['load_skew_max'])} / "
        f"{_fmt(s['load_skew_mean'])}</td></tr>"
        f"<tr><th>transition concentration (top-{stats['top_m']})</th><td>{_fmt(s['concentration_mean'])} "
        f"(independent: {_fmt(s['independent_mean'])})</td></tr>"
        f"<tr><th>routing entropy (bits)</th><td>{_fmt(s['entropy_bits_mean'])} of "
        f"{_fmt(s['max_entropy_bits'])}</td></tr></table>"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        "<h2>Trace</h2>",
        summary,
        "<h2>Per-layer expert load</h2>",
        _img("load_bars", pngs["load_bars"]),
        _img("load_heatmap", pngs["load_heatmap"]),
    ]
    if "transitions" in pngs:
        parts += ["<h2>Layer-to-layer transitions</h2>", _img("transitions", pngs["transitions"])]
    if plans:
        scope = f" Every plan is evaluated on {html.escape(evaluated_on)}." if evaluated_on else ""
        parts += ["<h2>Plan comparison</h2>", f"<p>{len(plans)} plans.{scope}</p>", plan_table(plans, evals)]
        parts.append("<p class='muted'>↑ higher is better, ↓ lower is better; traffic per docs/metrics.md.</p>")
        for name in plans:
            parts.append(f"<h2>Plan {html.escape(name)}</h2>")
            parts += [_img(k, pngs[k]) for k in (f"gpu_load_{name}", f"gpu_traffic_{name}") if k in pngs]
    parts.append("</body></html>")
    return "\n".join(parts)


def _plan_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in p.stem) or "plan"
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def build_report(
    trace: str | os.PathLike[str],
    plan_paths: Sequence[str | os.PathLike[str]] | None = None,
    title: str | None = None,
    prompts: str = "all",
    train_fraction: float = 0.5,
    split_seed: int = 0,
) -> Report:
    """Read the trace and plans, evaluate each plan, draw the figures and the page.

    ``prompts`` all, train or test: the prompts of the trace to show and evaluate on (the seeded split of
    ``moeplace plan/eval --prompts``); the page says which."""
    tr = open_trace(trace)
    if prompts == "all":
        g = build_graph(tr, with_coact=False)
        routes = None
        evaluated_on = f"all {_num_prompts(tr)} prompts of the trace"
    elif prompts in ("train", "test"):
        every = tr.read_all(with_gates=False)
        mask_T = split_by_prompt(every.seq_ids_T, train_fraction, split_seed)
        routes = every.take(mask_T if prompts == "train" else ~mask_T)
        g = graph_from_routes(routes.expert_ids_TLK, tr.meta, with_coact=False)
        n_all, n = np.unique(every.seq_ids_T).size, np.unique(routes.seq_ids_T).size
        evaluated_on = (
            f"the {n} {prompts} prompts of {n_all} (seeded split, --train-fraction {train_fraction}, --split-seed "
            f"{split_seed}; plans fitted on the train prompts never saw the test prompts)"
        )
    else:
        raise TraceError(f"--prompts {prompts!r}: use all, train or test")
    paths = [Path(p) for p in plan_paths or []]
    plans: dict[str, Plan] = {}
    for name, p in zip(_plan_names(paths), paths, strict=True):
        plan = Plan.load(p)
        plan.check_trace(g.meta, where=str(p))
        plans[name] = plan
    if plans and routes is None:
        routes = tr.read_all(with_gates=False)
    evals = {name: evaluate(plan, g, routes) for name, plan in plans.items()}
    pngs = figures(g, plans, evals)
    name = title or f"moeplace report: {g.meta.model_name}"
    return Report(render_html(g, graph_stats(g), plans, evals, pngs, name, evaluated_on), pngs)


def _num_prompts(tr: Trace) -> str:
    """Distinct prompts of a trace (read from the seq_id column only), as text."""
    seen: set[int] = set()
    for b in tr.iter_batches(with_ids=True, with_pos=False):
        seen.update(np.unique(b.seq_ids_T).tolist())
    return f"{len(seen):,}"
