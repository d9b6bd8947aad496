"""``moeplace import / stats / graph`` end to end: hand-checked statistics, help text, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from placement.trace.dataset import open_trace, write_trace
from tests.conftest import SHARED_SPECS, listing, reference_graph
from tests.test_trace_dataset import META, _routes, mixed_topk_shard


@pytest.mark.parametrize(("spec", "T", "K"), SHARED_SPECS)
def test_stats_json_matches_hand_computation(cli, traces_dir, spec, T, K):
    code, out, _ = cli("stats", traces_dir / spec, "--json")
    assert code == 0
    s = json.loads(out)
    ids_TLK = open_trace(traces_dir / spec).read_all().expert_ids_TLK
    E = s["num_experts"]
    load, trans = reference_graph(ids_TLK, E)
    assert s["num_tokens"] == T and s["top_k"] == K
    assert s["load_sum"] == load.sum(axis=1).tolist()
    assert s["trans_sum"] == trans.sum(axis=(1, 2)).tolist()
    if (ids_TLK >= 0).all():
        assert s["load_sum"] == [T * K] * s["num_layers"]
        assert s["trans_sum"] == [T * K * K] * (s["num_layers"] - 1)
    else:  # mixtral: -1 marks dropped records; sums count only recorded ids
        valid_L = (ids_TLK >= 0).sum(axis=(0, 2))
        assert s["load_sum"] == valid_L.tolist()
    skew = load.max(axis=1) / load.mean(axis=1)
    np.testing.assert_allclose(s["load_skew"], skew)
    m = s["top_m"]
    conc = np.sort(trans, axis=2)[:, :, -m:].sum(axis=(1, 2)) / trans.sum(axis=(1, 2))
    np.testing.assert_allclose(s["concentration"], conc)
    p = load / load.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    np.testing.assert_allclose(s["entropy_bits"], ent)


def test_stats_table_and_dataset_equals_npz(cli, traces_dir, tmp_path):
    src = traces_dir / "flame-moe-290m.npz"
    assert cli("import", src, "--format", "npz", "--out", tmp_path / "ds")[0] == 0
    _, a, _ = cli("stats", src, "--json")
    _, b, _ = cli("stats", tmp_path / "ds", "--json", "--top-m", "8")
    _, c, _ = cli("stats", tmp_path / "ds", "--json")
    assert json.loads(a) == json.loads(c) and json.loads(b)["top_m"] == 8
    code, table, _ = cli("stats", tmp_path / "ds")
    assert code == 0 and "load skew" in table and "concentration" in table


def test_stats_popularity(cli, traces_dir):
    for f in sorted((traces_dir / "mixtral-8x7b-popularity").glob("*.json")):
        code, out, _ = cli("stats", f, "--json")
        s = json.loads(out)
        raw = np.array(json.loads(f.read_text())["expert_popularity"])
        assert code == 0 and s["loads_only"] and s["load_sum"] == raw.sum(axis=1).tolist()
        assert len(set(s["load_sum"])) == 1  # every layer routes the same tokens
        np.testing.assert_allclose(s["load_skew"], raw.max(axis=1) / raw.mean(axis=1))


def test_graph_command(cli, traces_dir, tmp_path):
    import networkx as nx

    code, _, _ = cli(
        "graph",
        f"{traces_dir / 'mixtral-8x7b-instruct.humaneval0.npz'}:prefill",
        "--graphml",
        tmp_path / "g.graphml",
    )
    assert code == 0
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert g.number_of_nodes() == 32 * 8


def test_every_command_has_help(cli):
    for cmd in ("import", "stats", "graph"):
        code, out, _ = cli(cmd, "--help")
        assert code == 0 and "Usage" in out
    from placement.cli.trace import graph_cmd, import_cmd, stats_cmd

    assert all(f.__doc__ for f in (import_cmd, stats_cmd, graph_cmd))


def _one_error(cli, *args) -> str:
    code, out, err = cli(*args)
    lines = [ln for ln in (out + err).splitlines() if ln.startswith("error:")]
    assert code != 0 and len(lines) == 1, (code, out, err)
    assert len(err.strip().splitlines()) == 1
    return lines[0]


def test_bad_inputs_one_error_line_nothing_left(cli, tmp_path):
    out = tmp_path / "out"
    # a truncated Parquet file
    write_trace(tmp_path / "trunc", META, _routes(100))
    shard = tmp_path / "trunc" / "part-w0-000000.parquet"
    shard.write_bytes(shard.read_bytes()[:500])
    assert "part-w0-000000.parquet" in _one_error(cli, "stats", tmp_path / "trunc")
    # a dataset with the wrong schema
    (tmp_path / "wrong").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "wrong" / "part-a-000000.parquet")
    assert "column 'run_id' is missing" in _one_error(cli, "graph", tmp_path / "wrong", "--graphml", out / "g.graphml")
    # an .npz without routes
    np.savez(tmp_path / "noroutes.npz", x=np.zeros(3))
    assert "noroutes.npz: no array 'routes'" in _one_error(
        cli, "import", tmp_path / "noroutes.npz", "-f", "npz", "-o", out
    )
    # expert ids >= num_experts
    np.savez(tmp_path / "big.npz", routes=np.array([[[1, 7]]]), num_experts=4)
    assert "big.npz: expert id 7 >= num_experts=4" in _one_error(
        cli, "import", tmp_path / "big.npz", "-f", "npz", "-o", out
    )
    # mixed top-k within one layer
    mixed_topk_shard(tmp_path / "mixed.parquet")
    assert "mixed.parquet: mixed top-k" in _one_error(cli, "stats", tmp_path / "mixed.parquet")
    # an SGLang dump of another version
    torch.save({"version": 2, "routing": torch.zeros(3)}, tmp_path / "v2.pt")
    assert "v2.pt: unknown SGLang dump layout" in _one_error(
        cli, "import", tmp_path / "v2.pt", "-f", "sglang", "-o", out
    )
    # a loads-only dump without --loads-only
    torch.save({"rank": 0, "logical_count": torch.ones(1, 2, 4, dtype=torch.int32)}, tmp_path / "stat.pt")
    assert "--loads-only" in _one_error(cli, "import", tmp_path / "stat.pt", "-f", "sglang", "-o", out)
    assert not out.exists()
    assert not [p for p in listing(tmp_path) if ".import-" in p or p.endswith(".tmp")]


def test_import_refuses_other_model_and_leaves_out_unchanged(cli, traces_dir, tmp_path):
    out = tmp_path / "ds"
    assert cli("import", traces_dir / "flame-moe-290m.npz", "-f", "npz", "-o", out)[0] == 0
    before = listing(out)
    msg = _one_error(
        cli,
        "import",
        f"{traces_dir / 'mixtral-8x7b-instruct.humaneval0.npz'}:prefill",
        "-f",
        "npz",
        "-o",
        out,
    )
    assert "holds a trace of another model" in msg and str(out) in msg
    assert listing(out) == before and listing(tmp_path) == ["ds", *[f"ds/{p}" for p in before]]
    # a second import of the same model appends under the next shard number
    assert cli("import", traces_dir / "flame-moe-290m.npz", "-f", "npz", "-o", out)[0] == 0
    assert open_trace(out).num_tokens == 2 * 640
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-import-000000.parquet",
        "part-import-000001.parquet",
    ]


def test_import_failure_midway_leaves_nothing(cli, tmp_path):
    """Megatron: the second step is cut off; the first step's shard must not reach --out."""
    from tests.test_importers import _mega_rec

    f = tmp_path / "router_trace_rank0.jsonl"
    good = [_mega_rec(0, layer, [[1, 2]] * 3) for layer in (1, 2)]
    bad = [_mega_rec(1, 1, [[1, 2]] * 3), _mega_rec(1, 2, [[1, 2]] * 2)]
    f.write_text("\n".join(good + bad) + "\n")
    out = tmp_path / "ds"
    assert "step 1: layer 2 routed 2 tokens" in _one_error(cli, "import", f, "-f", "megatron", "-o", out)
    assert listing(tmp_path) == ["router_trace_rank0.jsonl"]
