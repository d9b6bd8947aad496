"""What the serving engines load from moeplace's exports, checked with their own code: SGLang's
``--init-expert-location`` loader (sglang 0.5.23) and the command-line parsers of SGLang and vLLM (0.33.0).

The engines' own code runs where it is importable: set MOEPLACE_ENGINES_SITE to a site-packages holding
sglang==0.5.23 and vllm==0.33.0 (docs/deploy.md shows the scratch venv), or install them. Everywhere else the same
checks run against what was pinned from that code: tests/fixtures/sglang_expert_location.py (the loader, restated
with its source) and tests/fixtures/engine_cli.json (the options, written by ``tests/engine_checks.py pin``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from placement.deploy.export import export, sglang_flags, vllm_linear_flags
from placement.plan import Plan
from tests.fixtures.sglang_expert_location import load_like_sglang

HERE = Path(__file__).parent
HARNESS = HERE / "engine_checks.py"
PINNED = json.loads((HERE / "fixtures" / "engine_cli.json").read_text())
# DeepSeek-V2-Lite: 27 decoder layers (num_hidden_layers), layer 0 dense, MoE layers 1..26, 64 routed experts
V2_LITE_LAYERS, V2_LITE_MOE, V2_LITE_E = 27, tuple(range(1, 27)), 64


def _v2_lite_plan(G: int = 8, R: int = 16, seed: int = 0) -> Plan:
    rng = np.random.default_rng(seed)
    E = V2_LITE_E
    rows = [rng.permutation(np.concatenate([np.arange(E), rng.choice(E, R, replace=False)])) for _ in V2_LITE_MOE]
    return Plan(G, 1, E, V2_LITE_MOE, np.asarray(rows), model_name="deepseek-v2-lite")


def _engine(module: str, *args: object) -> dict[str, Any]:
    """Run tests/engine_checks.py with the engine importable; skip with a reason where it is not."""
    env = dict(os.environ)
    site = os.environ.get("MOEPLACE_ENGINES_SITE")
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, str(HERE.parent), env.get("PYTHONPATH", "")])
    elif importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not importable; set MOEPLACE_ENGINES_SITE (docs/deploy.md) to run its own code")
    res = subprocess.run(
        [sys.executable, str(HARNESS), *map(str, args)], env=env, capture_output=True, text=True, timeout=900
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("ENGINE-CHECK ")), None)
    assert res.returncode == 0 and line is not None, res.stderr[-3000:]
    return json.loads(line.removeprefix("ENGINE-CHECK "))


def _expected_all_physical(plan: Plan, num_layers: int) -> np.ndarray:
    """logical_to_all_physical_map SGLang should build: MoE rows from the plan, other rows trivial."""
    P, E = plan.num_slots, plan.num_experts
    out = np.full((num_layers, E, P), -1)
    for l in range(num_layers):
        row = plan.phy2log[plan.layers.index(l)] if l in plan.layers else np.arange(P) % E
        for e in range(E):
            slots = np.flatnonzero(row == e)
            out[l, e, : len(slots)] = slots
    return out[:, :, : max(int(plan.logcnt.max()), -(-P // E))].copy()


# ------------------------------------------------------------------------------------------------ SGLang


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_sglang_map_is_every_decoder_layer_by_E_plus_redundant(tmp_path: Path, suffix: str) -> None:
    """SGLang reads row l as layer l and checks neither rows nor width: a 26-row map for DeepSeek-V2-Lite would be
    accepted and shifted one layer. So: rows = num_hidden_layers (27, dense layer 0 trivial), width = E + R, and
    the exact --ep-num-redundant-experts printed with it."""
    plan = _v2_lite_plan()
    out = tmp_path / f"loc{suffix}"
    res = export(plan, "sglang", out)
    assert f"--ep-num-redundant-experts {plan.num_slots - V2_LITE_E}" in res.flags
    assert "--ep-num-redundant-experts 16" in res.flags and "--ep-size 8" in res.flags
    got = load_like_sglang(out, V2_LITE_LAYERS, V2_LITE_E, 16, 8)
    m_LP = np.asarray(got["physical_to_logical_map"])
    assert m_LP.shape == (V2_LITE_LAYERS, V2_LITE_E + 16)
    assert m_LP[0].tolist() == (np.arange(80) % 64).tolist()
    assert np.array_equal(m_LP[1:], plan.phy2log)
    all_LEX = np.asarray(got["logical_to_all_physical_map"])
    want = _expected_all_physical(plan, V2_LITE_LAYERS)
    assert np.array_equal(all_LEX[:, :, : want.shape[2]], want) and (all_LEX[:, :, want.shape[2] :] == -1).all()
    # the loader itself does not catch a missing dense row: the pin above is what does
    short = tmp_path / f"short{suffix}"
    export(Plan(8, 1, 64, tuple(range(26)), plan.phy2log), "sglang", short)
    assert len(load_like_sglang(short, V2_LITE_LAYERS, V2_LITE_E, 16, 8)["physical_to_logical_map"]) == 26


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_sglang_own_loader_accepts_export(tmp_path: Path, suffix: str) -> None:
    """compute_initial_expert_location_metadata of sglang 0.5.23 on our export builds what the restatement says."""
    plan = _v2_lite_plan()
    out = tmp_path / f"loc{suffix}"
    export(plan, "sglang", out)
    real = _engine("sglang", "sglang-load", out, "--layers", 27, "--experts", 64, "--redundant", 16, "--ep-size", 8)
    assert real["num_local_physical_experts"] == 10
    restated = load_like_sglang(out, V2_LITE_LAYERS, V2_LITE_E, 16, 8)
    assert real["physical_to_logical_map"] == restated["physical_to_logical_map"]
    assert real["logical_to_all_physical_map"] == restated["logical_to_all_physical_map"]


# ------------------------------------------------------------------------------------------ launch flags


def _printed_flags(tmp_path: Path) -> dict[str, tuple[str, ...]]:
    plan, flat = _v2_lite_plan(), _v2_lite_plan(R=0)
    vllm_dir = tmp_path / "v"
    flags = {
        "sglang": export(plan, "sglang", tmp_path / "loc.json").flags,
        "vllm": export(flat, "vllm", vllm_dir).flags,
        "vllm-permute-checkpoint": vllm_linear_flags(flat),
    }
    assert export(plan, "vllm", tmp_path / "v2").flags == ()  # replicas: nothing vLLM can launch
    assert json.loads((vllm_dir / "export.json").read_text())["flags_for_permuted_checkpoint"] == list(flags["vllm"])
    return flags


def _check_pinned(engine: str, flags: tuple[str, ...]) -> None:
    pinned = PINNED[engine]
    argv = [x for f in flags for x in shlex.split(f)]
    assert argv, f"{engine}: no flags printed"
    i = 0
    while i < len(argv):
        opt = argv[i]
        spec = pinned["options"].get(opt)
        assert spec is not None, f"{opt} is not a {engine} {pinned['version']} option this test pinned"
        if spec["nargs"] == 0:
            i += 1
            continue
        value = argv[i + 1]
        if spec["type"] == "int":
            int(value)
        if spec["choices"]:
            assert value in spec["choices"], f"{opt} {value}: {engine} accepts only {spec['choices']}"
        if opt == "--eplb-config":
            assert set(json.loads(value)) <= set(pinned["eplb_config_fields"]), value
        i += 2


def test_printed_flags_fit_the_engines_pinned_options(tmp_path: Path) -> None:
    assert PINNED["sglang"]["version"] == "0.5.23" and PINNED["vllm"]["version"] == "0.33.0"
    assert PINNED["vllm"]["expert_placement_strategies"] == ["linear", "round_robin"]
    assert "initial_expert_map_path" not in PINNED["vllm"]["eplb_config_fields"]
    flags = _printed_flags(tmp_path)
    _check_pinned("sglang", flags["sglang"])
    for key in ("vllm", "vllm-permute-checkpoint"):
        _check_pinned("vllm", flags[key])
    assert not any("initial_expert_map_path" in f for f in flags["vllm"])


@pytest.mark.slow
def test_printed_flags_pass_the_engines_own_parsers(tmp_path: Path) -> None:
    flags = _printed_flags(tmp_path)
    sg = _engine("sglang", "sglang-parse", "--", *flags["sglang"])
    assert sg == {
        "exit": 0,
        "parsed": {
            "tp_size": 8,
            "ep_size": 8,
            "ep_num_redundant_experts": 16,
            "init_expert_location": str(tmp_path / "loc.json"),
            "enable_eplb": False,
        },
    }
    vl = _engine("vllm", "vllm-parse", "--", *flags["vllm"])
    assert vl["exit"] == 0 and vl["parsed"]["expert_placement_strategy"] == "linear"
    assert vl["parsed"]["tensor_parallel_size"] == 8 and vl["parsed"]["enable_expert_parallel"] is True
    # what moeplace printed before: vLLM 0.33 exits 2 on it
    old = '--eplb-config \'{"initial_expert_map_path": "/x.json", "num_redundant_experts": 0}\''
    assert _engine("vllm", "vllm-parse", "--", "--enable-expert-parallel --enable-eplb", old) == {"exit": 2}


def test_vllm_export_says_how_to_serve_the_plan(cli, tmp_path: Path) -> None:
    flat = tmp_path / "flat.json"
    _v2_lite_plan(R=0).save(flat)
    code, out, err = cli("export", "--plan", flat, "--format", "vllm", "--out", tmp_path / "v")
    assert code == 0 and "permute-checkpoint" in err and "vLLM 0.33 cannot load" in err
    assert "launch flags for `vllm serve PERMUTED_CHECKPOINT ...`:" in err
    assert out.split() == "--enable-expert-parallel --tensor-parallel-size 8 --expert-placement-strategy linear".split()
    replicated = tmp_path / "rep.json"
    _v2_lite_plan().save(replicated)
    code, out, err = cli("export", "--plan", replicated, "--format", "vllm", "--out", tmp_path / "v2")
    assert code == 0 and out == "" and "--redundant 0" in err


def test_sglang_flags_quote_the_path() -> None:
    flags = sglang_flags(_v2_lite_plan(), Path("/tmp/my maps/loc.pt"))
    assert shlex.split(flags[-1]) == ["--init-expert-location", "/tmp/my maps/loc.pt"]
