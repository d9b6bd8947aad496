"""Run SGLang's and vLLM's own code on moeplace's exports, in a subprocess (tests/test_engines.py).

Needs sglang==0.5.23 / vllm==0.33.0 importable, e.g. a scratch venv made with ``pip install --no-deps`` (never
letting them pull another torch) plus the few small modules they import; docs/deploy.md shows how. Prints one JSON
object on stdout.

    python tests/engine_checks.py sglang-load MAP --layers 27 --experts 64 --redundant 16 --ep-size 8
    python tests/engine_checks.py sglang-parse -- FLAG ...
    python tests/engine_checks.py vllm-parse -- FLAG ...
    python tests/engine_checks.py pin > tests/fixtures/engine_cli.json

``sglang-load`` calls ``compute_initial_expert_location_metadata`` (sglang/srt/eplb/expert_location.py) as the
server does at startup, with ``--init-expert-location MAP``: it runs ``init_by_mapping``, ``_init_common``,
``_compute_logical_to_all_physical_map`` and ``_init_raw`` unchanged. Two things are supplied instead of a
launched server: the published config (SGLang's own ``ExecMoe`` defaults with the three flags set, and the parallel
sizes stamped through ``get_parallel().override_permanently``), and the model-architecture lookup, whose registry
import would load every model and GPU kernel: it returns DeepSeek-V2's ``get_model_config_for_expert_location``
restated (num_layers = num_hidden_layers, num_logical_experts = n_routed_experts, num_groups = n_group).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import types
from typing import Any


def sglang_load(path: str, layers: int, experts: int, redundant: int, ep_size: int) -> dict[str, Any]:
    import msgspec
    import sglang.srt.eplb.expert_location as el
    from sglang.srt import runtime_context as rc
    from sglang.srt.arg_groups.fields.exec_ import ExecMoe

    moe = msgspec.structs.replace(ExecMoe(), init_expert_location=path, ep_num_redundant_experts=redundant)
    rc.get_context()._config_bags = {
        "exec": types.SimpleNamespace(moe=moe),
        "device": types.SimpleNamespace(device="cpu"),
    }
    rc.get_parallel().override_permanently(ep_size=ep_size, elastic_ep_initial_size=None, nnodes=1)

    class DeepseekV2Shape:  # sglang/srt/models/deepseek_v2.py get_model_config_for_expert_location
        @classmethod
        def get_model_config_for_expert_location(cls, config: Any) -> Any:
            return el.ModelConfigForExpertLocation(
                num_layers=config.num_hidden_layers,
                num_logical_experts=config.n_routed_experts,
                num_groups=config.n_group,
            )

    loader = types.ModuleType("sglang.srt.model_loader")
    loader.get_model_architecture = lambda model_config: (DeepseekV2Shape, "DeepseekV2ForCausalLM")  # type: ignore[attr-defined]
    sys.modules["sglang.srt.model_loader"] = loader
    hf_config = types.SimpleNamespace(num_hidden_layers=layers, n_routed_experts=experts, n_group=1)
    md = el.compute_initial_expert_location_metadata(types.SimpleNamespace(hf_config=hf_config), moe_ep_rank=0)
    return {
        "physical_to_logical_map": md.physical_to_logical_map.tolist(),
        "logical_to_all_physical_map": md.logical_to_all_physical_map.tolist(),
        "num_local_physical_experts": md.num_local_physical_experts,
    }


def parse(engine: str, flags: list[str]) -> dict[str, Any]:
    """Run the engine's own CLI parser on ``flags``; {"exit": 0, "parsed": {...}} or {"exit": code}."""
    keys: tuple[str, ...]
    if engine == "sglang":
        from sglang.srt.server_args import ServerArgs

        parser: Any = argparse.ArgumentParser(prog="sglang serve")
        ServerArgs.add_cli_args(parser)
        argv = ["--model-path", "MODEL", *flags]
        keys = ("tp_size", "ep_size", "ep_num_redundant_experts", "init_expert_location", "enable_eplb")
    else:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
        argv = ["--model", "MODEL", *flags]
        keys = ("enable_expert_parallel", "tensor_parallel_size", "expert_placement_strategy", "enable_eplb")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return {"exit": exc.code}
    return {"exit": 0, "parsed": {k: getattr(ns, k) for k in keys}}


SGLANG_OPTIONS = ("--tp-size", "--ep-size", "--ep-num-redundant-experts", "--init-expert-location", "--enable-eplb")
VLLM_OPTIONS = ("--enable-expert-parallel", "--tensor-parallel-size", "--expert-placement-strategy", "--eplb-config")


def _options(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> dict[str, Any]:
    """What the parser accepts for each option: its value count and, where limited, its choices."""
    by_name = {s: a for a in parser._actions for s in a.option_strings}
    return {
        n: {
            "nargs": by_name[n].nargs,
            "type": getattr(by_name[n].type, "__name__", None),
            "choices": list(by_name[n].choices or []) or None,
        }
        for n in names
        if n in by_name
    }


def pin() -> dict[str, Any]:
    """The facts tests/test_engines.py checks in CI, read from the installed engines."""
    import typing
    from importlib.metadata import version

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from sglang.srt.server_args import ServerArgs
    from vllm.config.parallel import EPLBConfig, ExpertPlacementStrategy
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    sg: Any = argparse.ArgumentParser()
    ServerArgs.add_cli_args(sg)
    vl = EngineArgs.add_cli_args(FlexibleArgumentParser())
    return {
        "sglang": {
            "version": version("sglang"),
            "source": "sglang/srt/server_args.py ServerArgs.add_cli_args",
            "options": _options(sg, SGLANG_OPTIONS),
        },
        "vllm": {
            "version": version("vllm"),
            "source": "vllm/engine/arg_utils.py EngineArgs.add_cli_args; vllm/config/parallel.py EPLBConfig",
            "options": _options(vl, VLLM_OPTIONS),
            "eplb_config_fields": sorted(EPLBConfig.__dataclass_fields__),
            "expert_placement_strategies": list(typing.get_args(ExpertPlacementStrategy)),
        },
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("sglang-load")
    load.add_argument("map")
    for name in ("layers", "experts", "redundant", "ep_size"):
        load.add_argument(f"--{name.replace('_', '-')}", type=int, required=True)
    for name in ("sglang-parse", "vllm-parse"):
        sub.add_parser(name).add_argument("flags", nargs="*")
    sub.add_parser("pin")
    a = ap.parse_args(argv)
    if a.cmd == "pin":
        print(json.dumps(pin(), indent=1))
        return
    if a.cmd == "sglang-load":
        out = sglang_load(a.map, a.layers, a.experts, a.redundant, a.ep_size)
    else:
        out = parse(a.cmd.split("-")[0], [x for f in a.flags for x in shlex.split(f)])
    print("ENGINE-CHECK " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
