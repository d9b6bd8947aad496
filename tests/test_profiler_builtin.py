"""The shipped demo MoE, routing capture, the profile API and CLI, end to end on real parts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from placement.trace.dataset import TraceWriter, open_trace
from profiler.api import (
    LoadedModel,
    ProfileError,
    completed_prompt_ids,
    load_model,
    load_prompts,
    profile_prompts,
)
from profiler.capture import CaptureError, DemoMoEAdapter, RoutingRecorder
from profiler.cli import register
from profiler.model import DemoMoE, ModelConfigError, MoEConfig, MoEFeedForward
from profiler.train_demo import transition_concentration


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: small CPU forwards are fastest and steadiest that way on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def builtin() -> LoadedModel:
    return load_model("builtin")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return load_prompts("builtin")


def _reference_routing(model: DemoMoE, input_ids_BS: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Router outputs of one forward, read by wrapping Router.forward (no hooks involved)."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    originals = {}
    for layer, router in model.routers():
        originals[layer] = router.forward

        def wrapped(x: torch.Tensor, _layer: int = layer, _orig: Any = router.forward) -> Any:
            out = _orig(x)
            seen[_layer] = out
            return out

        router.forward = wrapped  # type: ignore[method-assign,assignment]
    try:
        with torch.inference_mode():
            model(input_ids_BS)
    finally:
        for layer, router in model.routers():
            router.forward = originals[layer]  # type: ignore[method-assign]
    layers = sorted(seen)
    ids_TLK = torch.stack([seen[l][0] for l in layers], dim=1).numpy()
    w_TLK = torch.stack([seen[l][1] for l in layers], dim=1).numpy()
    return ids_TLK, w_TLK


def _batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = [list(t.encode())[:64] for t in texts]
    S = max(map(len, enc))
    ids = torch.zeros(len(enc), S, dtype=torch.long)
    mask = torch.zeros(len(enc), S, dtype=torch.bool)
    for b, e in enumerate(enc):
        ids[b, : len(e)] = torch.tensor(e)
        mask[b, : len(e)] = True
    return ids, mask


def test_builtin_config_and_weights_size(builtin: LoadedModel) -> None:
    from profiler.api import BUILTIN_WEIGHTS

    assert isinstance(builtin.module, DemoMoE)
    assert 8 <= builtin.num_experts <= 16 and builtin.top_k == 2
    assert builtin.layers == builtin.module.cfg.moe_layers and 0 not in builtin.layers
    assert BUILTIN_WEIGHTS.stat().st_size < 20 * 2**20


def test_captured_ids_equal_router_decisions(builtin: LoadedModel, prompts: list[str]) -> None:
    model = builtin.module
    assert isinstance(model, DemoMoE)
    ids_BS, mask_BS = _batch(prompts[:4])
    ref_ids, ref_w = _reference_routing(model, ids_BS)
    with RoutingRecorder(model, DemoMoEAdapter()) as rec, torch.inference_mode():
        model(ids_BS)
        got_ids, got_w = rec.pop()
        model(ids_BS)
        masked_ids, _ = rec.pop(mask_BS.reshape(-1))
    assert got_ids.dtype == np.int16 and got_w.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_array_equal(got_w, ref_w)
    np.testing.assert_array_equal(masked_ids, ref_ids[mask_BS.reshape(-1).numpy()])
    # Hooks are gone after the context: a plain forward records nothing.
    assert all(not r._forward_hooks for _, r in model.routers())


def test_recorder_refuses_two_forwards_without_pop(builtin: LoadedModel) -> None:
    ids_BS, _ = _batch(["def f(x):\n    return x\n"])
    with RoutingRecorder(builtin.module, DemoMoEAdapter()) as rec, torch.inference_mode():
        with pytest.raises(CaptureError, match="ran twice"):
            builtin.module(ids_BS)
            builtin.module(ids_BS)
        rec.clear()
        with pytest.raises(CaptureError, match="did not run"):
            rec.pop()


def test_grouped_experts_match_per_token_loop() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=32, n_layers=2, n_heads=2, n_experts=8, expert_ffn_dim=16, max_seq_len=16)
    model = DemoMoE(cfg)
    block = model.blocks[1].ffn
    assert isinstance(block, MoEFeedForward)
    x_TD = torch.randn(40, 32)
    ids_TK, w_TK = block.router(x_TD)
    got = block.experts(x_TD, ids_TK, w_TK)
    ex = block.experts
    want = torch.zeros_like(x_TD)
    for t in range(40):
        for k in range(2):
            e = int(ids_TK[t, k])
            h = torch.nn.functional.silu(x_TD[t] @ ex.w_gate_EDF[e]) * (x_TD[t] @ ex.w_up_EDF[e])
            want[t] += w_TK[t, k] * (h @ ex.w_down_EFD[e])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_config_json_round_trip_and_validation() -> None:
    cfg = MoEConfig(n_experts=8)
    assert MoEConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ModelConfigError, match="top_k"):
        MoEConfig(n_experts=8, top_k=9)
    with pytest.raises(ModelConfigError, match="unknown model config keys"):
        MoEConfig.from_json(json.dumps({"schema_version": 1, "bogus": 1}))


def test_profile_rows_padding_and_resume(builtin: LoadedModel, prompts: list[str], tmp_path: Path) -> None:
    texts = ["x = 1\n", prompts[0], "", prompts[1][:40]]
    ids = [10, 11, 12, 13]
    with TraceWriter(tmp_path / "ds", builtin.trace_meta()) as w:
        n = profile_prompts(builtin, texts, ids, w, batch_size=4, max_len=100)
    lengths = {pid: min(len(t.encode()), 100) for pid, t in zip(ids, texts, strict=True)}
    assert n == sum(lengths.values())
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "ds").glob("part-*.parquet"))
    assert rows == n * len(builtin.layers)
    routes = open_trace(tmp_path / "ds").read_all()
    for pid, length in lengths.items():
        pos = routes.token_pos_T[routes.seq_ids_T == pid]
        np.testing.assert_array_equal(np.sort(pos), np.arange(length))  # no padded positions recorded
    assert completed_prompt_ids(tmp_path / "ds") == {10, 11, 13}
    # Padding does not change routing: the short prompt traced alone gives the same decisions.
    with TraceWriter(tmp_path / "alone", builtin.trace_meta()) as w:
        profile_prompts(builtin, [texts[0]], [10], w)
    alone = open_trace(tmp_path / "alone").read_all()
    np.testing.assert_array_equal(alone.expert_ids_TLK, routes.expert_ids_TLK[routes.seq_ids_T == 10])


def test_profile_rejects_mismatched_lengths(builtin: LoadedModel, tmp_path: Path) -> None:
    with TraceWriter(tmp_path, builtin.trace_meta()) as w, pytest.raises(ProfileError, match="prompt ids"):
        profile_prompts(builtin, ["a"], [1, 2], w)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.txt", b"", "no prompts"),
        ("blank.txt", b"\n  \n", "no prompts"),
        ("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{oops\n', "line 2"),
        ("notext.jsonl", b'{"prompt": "x"}\n', "line 1"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ProfileError, match=match) as info:
        load_prompts(str(path))
    assert name in str(info.value) and "\n" not in str(info.value)


def test_load_prompts_formats(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"text": "a\\nb"}\n\n{"text": "c"}\n', encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a\nb", "c"]
    with pytest.raises(ProfileError, match="not found"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_unknown_model_spec() -> None:
    with pytest.raises(ProfileError, match="unknown model spec"):
        load_model("gpt-17")


def test_builtin_prompts_shape(prompts: list[str]) -> None:
    assert 200 <= len(prompts) <= 400
    assert all(p.strip() for p in prompts)


def test_learned_routing_beats_independence(builtin: LoadedModel, prompts: list[str], tmp_path: Path) -> None:
    with TraceWriter(tmp_path, builtin.trace_meta()) as w:
        profile_prompts(builtin, prompts[:96], list(range(96)), w, batch_size=16)
    routes = open_trace(tmp_path).read_all()
    top_m = 2 if builtin.num_experts >= 16 else 1
    conc = transition_concentration(routes.expert_ids_TLK, builtin.num_experts, top_m)
    assert conc.learned > 1.5 * conc.independent, conc
    # Experts are used: every expert of every layer gets some traffic.
    for l in range(routes.expert_ids_TLK.shape[1]):
        counts = np.bincount(routes.expert_ids_TLK[:, l].reshape(-1), minlength=builtin.num_experts)
        assert (counts > 0).all()


def test_transition_concentration_independent_is_baseline() -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([np.argsort(rng.random((20000, 3, 8)), axis=-1)[..., :2]], axis=0)[0]
    conc = transition_concentration(ids, 8, 1)
    assert abs(conc.learned - conc.independent) < 0.02
    same = np.repeat(ids[:, :1, :1], 3, axis=1)  # top-1, next layer copies this one: fully concentrated
    assert transition_concentration(same, 8, 1).learned == pytest.approx(1.0)


def test_cli_profile_resumes_and_reports_errors(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer in multi-command mode
        """Nothing."""

    runner = CliRunner()
    out = tmp_path / "ds"
    first = runner.invoke(app, ["profile", "--model", "builtin", "--out", str(out), "--limit", "3"])
    assert first.exit_code == 0, first.output
    assert completed_prompt_ids(out) == {0, 1, 2}
    second = runner.invoke(app, ["profile", "--out", str(out), "--limit", "5"])
    assert second.exit_code == 0, second.output
    assert "skipping 3" in second.stderr
    assert completed_prompt_ids(out) == {0, 1, 2, 3, 4}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\n")
    failed = runner.invoke(app, ["profile", "--prompts", str(bad), "--out", str(tmp_path / "x")])
    assert failed.exit_code == 1
    assert failed.stderr.startswith("error: ") and "bad.txt" in failed.stderr
    help_ = runner.invoke(app, ["profile", "--help"])
    assert help_.exit_code == 0 and "Trace the expert routing" in help_.output


def test_profile_refuses_a_dataset_of_another_model(tmp_path: Path) -> None:
    """Even when every prompt id looks traced already, another model's dataset is refused, untouched."""

    from placement.cli import build_app
    from placement.trace.dataset import write_trace
    from placement.trace.synthetic import synthetic_trace

    meta, routes = synthetic_trace(2, 8, 2, 64, tokens_per_prompt=8, seed=0, model_name="other-moe")
    out = tmp_path / "ds"
    write_trace(out, meta, routes)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    res = CliRunner().invoke(
        build_app(), ["profile", "--model", "builtin", "--prompts", "builtin", "--limit", "2", "--out", str(out)]
    )
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "another model" in lines[0]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
