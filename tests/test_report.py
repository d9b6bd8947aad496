"""The HTML report: content, CLI behaviour, and rendering in a real headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from placement.cli.export import register
from placement.graph import build_graph
from placement.plan import Plan
from placement.planner import make_plan
from placement.report import build_report
from placement.solvers.base import PlanSpec
from placement.trace.dataset import open_trace
from placement.trace.schema import RouteArrays, TraceMeta

E, K, LAYERS = 8, 2, (1, 2, 3, 4)


def synthetic_trace(out: Path, tokens: int = 1500, seed: int = 0) -> Path:
    """A trace whose layer l+1 expert follows layer l's (so transitions are concentrated)."""
    from placement.trace.dataset import write_trace

    rng = np.random.default_rng(seed)
    ids_TLK = np.zeros((tokens, len(LAYERS), K), np.int16)
    prev_T = rng.integers(0, E, tokens)
    for l in range(len(LAYERS)):
        a_T = (prev_T + rng.integers(0, 2, tokens)) % E
        ids_TLK[:, l, 0] = a_T
        ids_TLK[:, l, 1] = (a_T + 1 + rng.integers(0, E - 1, tokens)) % E
        prev_T = a_T
    meta = TraceMeta("synthetic-moe", E, K, LAYERS)
    routes = RouteArrays(ids_TLK, np.arange(tokens) // 50, (np.arange(tokens) % 50).astype(np.int32))
    write_trace(out, meta, routes)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("report")
    trace = synthetic_trace(d / "trace")
    g = build_graph(open_trace(trace), num_folds=16)  # prompt folds: plans carry an unseen-imbalance forecast
    plans = []
    for solver, spec in (
        ("contiguous", PlanSpec(num_gpus=4)),
        ("eplb", PlanSpec(num_gpus=4, num_redundant=4)),
    ):
        make_plan(g, spec, solver).save(d / f"{solver}.json")
        plans.append(d / f"{solver}.json")
    return trace, plans


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_report_is_self_contained_with_table_and_figures(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    trace, plans = inputs
    rep = build_report(trace, [str(p) for p in plans])
    names = set(rep.pngs)
    assert {"load_bars", "load_heatmap", "transitions"} <= names
    for plan in ("contiguous", "eplb"):
        assert {f"gpu_load_{plan}", f"gpu_traffic_{plan}"} <= names
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', rep.html)
    assert len(images) == len(names)
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)
    assert not re.search(r'(src|href)="(?!data:)', rep.html)  # nothing loaded from elsewhere
    assert rep.html.count("<tr><td>") == 2 and "contiguous" in rep.html and "eplb" in rep.html
    for p in plans:
        fc = Plan.load(p).provenance["unseen_imbalance"]
        assert f"<td>{fc['p50']:.3f} ({fc['p10']:.3f}–{fc['p90']:.3f})</td>" in rep.html
    paths = rep.write(tmp_path / "r.html")
    assert (tmp_path / "r_load_bars.png").read_bytes() == rep.pngs["load_bars"]
    assert len(paths) == len(names) + 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_report_refuses_existing_output_and_plan_of_another_model(
    inputs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    trace, plans = inputs
    runner = CliRunner()
    out = tmp_path / "r.html"
    res = runner.invoke(_app(), ["report", "--trace", str(trace), "--plan", str(plans[0]), "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(_app(), ["report", "--trace", str(trace), "--out", str(out)])
    assert res.exit_code == 1 and "already exists" in res.stderr and res.stderr.count("\n") == 1
    other = synthetic_trace(tmp_path / "other", tokens=200)
    import json

    d = json.loads(plans[0].read_text())
    d["layers"] = [5, 6, 7, 8]
    (tmp_path / "wrong.json").write_text(json.dumps(d))
    out2 = tmp_path / "r2.html"
    res = runner.invoke(_app(), ["report", "--trace", str(other), "--plan", str(tmp_path / "wrong.json"),
                                 "--out", str(out2)])  # fmt: skip
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "same model" in res.stderr and not list(tmp_path.glob("r2*"))


def test_cli_report_never_replaces_existing_figures_without_force(
    inputs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    trace, plans = inputs
    runner = CliRunner()
    out = tmp_path / "r.html"
    args = ["report", "--trace", str(trace), "--plan", str(plans[0]), "--out", str(out)]
    assert runner.invoke(_app(), args).exit_code == 0
    figure = tmp_path / "r_load_bars.png"
    out.unlink()  # the page is gone, its figures are still there
    figure.write_bytes(b"somebody else's figure")
    res = runner.invoke(_app(), args)
    assert res.exit_code == 1 and "already exists" in res.stderr and "r_load_bars.png" in res.stderr
    assert figure.read_bytes() == b"somebody else's figure" and not out.exists()
    res = runner.invoke(_app(), [*args, "--force"])
    assert res.exit_code == 0 and figure.read_bytes().startswith(b"\x89PNG") and out.exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (CI: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from matplotlib.image import imread

    trace, plans = inputs
    page = tmp_path / "report.html"
    build_report(trace, [str(p) for p in plans]).write(page)
    shot = tmp_path / "shot.png"
    profile = tmp_path / "chromium-profile"
    cmd = [
        str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1200,1600", "--hide-scrollbars",
        f"--screenshot={shot}", page.as_uri(),
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-500:]}"
    rgb_YXC = imread(shot)[..., :3]
    assert rgb_YXC.shape[:2] == (1600, 1200)
    assert float(rgb_YXC.std()) > 0.05  # not a blank page
    non_white = float((rgb_YXC.min(axis=2) < 0.9).mean())
    assert non_white > 0.05, f"only {non_white:.1%} of the screenshot is drawn"
