"""`treespec-bench`: the Hydra app that runs one benchmark cell (or, with -m, a sweep of cells).

    treespec-bench model=tiny-random                       # a smoke run in seconds, no download
    treespec-bench domain=code method=linear domain.linear_k=4
    treespec-bench -m method=tree,linear,hf_assisted,autoregressive domain=code,text,structured
    treespec-bench -m domain=code domain.width=1,2,3 domain.depth=2,3,4
    treespec-report outputs/bench-multirun/<date>/<time>  # table + plots

(`python -m treespec.bench.run ...` works the same.) Each run writes `results.json` (per prompt
and aggregated, see treespec.bench.runner.run_cell) into Hydra's output directory. The config
groups live in `configs/` at the repository root; docs/configs.md documents every key.

This is the only benchmark module that imports Hydra: it registers the typed schemas of
treespec.bench.config in Hydra's ConfigStore (so unknown keys and wrong types fail at compose
time), turns the composed config into a BenchConfig (whose checks name any bad value), and hands
that to the library code. Every config error ends the run with exit code 2 and one line naming
the key, no traceback; the command line's cheap keys (devices, names, choices) are checked
before torch and transformers are imported, so a typo is answered in about a second.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from treespec.bench.config import CONFIG_DIR
from treespec.bench.config import ConfigError, check_overrides, schemas
from treespec.errors import ModelLoadError

log = logging.getLogger("treespec.bench")

SCHEMA_NAME = "schema"  # each group's typed schema: configs/<group>/*.yaml start from it


def register_configs() -> None:
    """Register BenchConfig as `bench_schema` and each group's dataclass as `<group>/schema`
    (building the tree schema imports torch: done by main after the cheap checks, and by a
    caller composing the config itself)."""
    from treespec.bench.config import BenchConfig

    cs = ConfigStore.instance()
    for group, schema in schemas().items():
        cs.store(group=group, name=SCHEMA_NAME, node=schema)
    cs.store(name="bench_schema", node=BenchConfig)


def to_bench_config(cfg: DictConfig) -> BenchConfig:
    """The composed config as typed objects; runs every check (ConfigError names the key)."""
    from treespec.bench.config import BenchConfig

    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    _check_no_extra_keys(cfg, "")
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(str(err)) from err
    if not isinstance(obj, BenchConfig):
        raise ConfigError("the config does not start from bench_schema (add `- bench_schema` to its defaults list)")
    return obj


def _check_no_extra_keys(node: DictConfig, prefix: str) -> None:
    """Keys forced in with `+key=value` (or open_dict) are not dataclass fields, and
    OmegaConf.to_object would silently drop them: refuse them instead."""
    schema = OmegaConf.get_type(node)
    fields = getattr(schema, "__dataclass_fields__", None)
    for key in node.keys():
        full = f"{prefix}{key}"
        if fields is not None and key not in fields:
            raise ConfigError(f"unknown key {full!r}: {schema.__name__} has {sorted(fields)}")
        value = node._get_node(key)
        if isinstance(value, DictConfig) and not value._is_missing() and not value._is_none():
            _check_no_extra_keys(value, full + ".")


# generate() arguments -> the config keys they come from
CONFIG_KEYS = {"max_new_tokens": "max_new_tokens", "input_ids": "dataset.name", "eos_token_id": "ignore_eos"}


def check_device(device: str) -> None:
    """model.device names a device this machine has (torch's own error would be an AssertionError)."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device}, but torch sees no CUDA device here; use model.device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device={device}, but MPS is not available here; use model.device=cpu")


def main() -> float | None:
    """The console script: the cheap checks of the command line, then the Hydra app."""
    try:
        check_overrides(sys.argv[1:], CONFIG_DIR)
    except ConfigError as err:
        print(f"treespec-bench: bad config: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    register_configs()
    return hydra.main(config_path=str(CONFIG_DIR), config_name="bench", version_base="1.3")(run)()


def run(cfg: DictConfig) -> float:
    """One cell (Hydra calls this once per cell of a sweep)."""
    try:
        bench = to_bench_config(cfg)
    except ConfigError as err:
        log.error("bad config: %s", err)
        sys.exit(2)
    from treespec.bench.results import ResultsWriter
    from treespec.bench.runner import run_interleaved  # torch/transformers only once the config is known to be good
    from treespec.engine.checks import ArgumentError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    methods = list(bench.interleave) or [bench.method.name]
    outs = {m: (run_dir / m if bench.interleave else run_dir) / bench.results_file for m in methods}
    writer = ResultsWriter(run_dir, outs)  # rewrites each method's results after every prompt
    try:
        check_device(bench.model.device)
        by_method = run_interleaved(bench, sink=writer)
    except ConfigError as err:
        log.error("bad config: %s", err)
        sys.exit(2)
    except ArgumentError as err:  # a value only the models and prompts can judge (e.g. the context length)
        key = CONFIG_KEYS.get(err.argument, err.argument)
        log.error("bad config: %s=%s: %s", key, OmegaConf.select(cfg, key, default="?"), err)
        sys.exit(2)
    except ModelLoadError as err:  # e.g. a hub id the hub does not have
        log.error("bad config: model.target=%s / model.draft=%s: %s", bench.model.target, bench.model.draft, err)
        sys.exit(2)
    log.info("%s", results_table(by_method, outs))
    if writer.failed:
        log.error("results NOT written (run directory %s):\n  %s", run_dir, "\n  ".join(writer.failed.values()))
        sys.exit(1)
    return next(iter(by_method.values()))["aggregate"]["tokens_per_second"]


def results_table(by_method: dict[str, dict], outs: dict[str, Path]) -> str:
    """What the run measured, one row per method (speedup: over method=autoregressive when it ran
    in the same interleaved run), then what tree='auto' chose and why, and where the records are."""
    alone = by_method.get("autoregressive", {}).get("aggregate", {}).get("tokens_per_second")
    first = next(iter(by_method.values()))["cell"]
    dataset = (f"synthetic prompts (random token ids in place of {first['dataset_replaced']})"
               if first.get("dataset_replaced") else first["dataset"])  # fmt: skip
    lines = [f"\n{first['model']} | domain {first['domain']} | dataset {dataset} | "
             f"temperature {first['temperature']:g} | max_new_tokens {first['max_new_tokens']}"]  # fmt: skip
    head = f"{'method':<16}{'tree':<38}{'prompts':>8}{'tokens':>8}{'tau':>7}{'accept':>8}{'tokens/s':>10}{'speedup':>9}"
    lines += [head, "-" * len(head)]
    notes = []
    for method, results in by_method.items():
        agg, prompts = results["aggregate"], results["prompts"]
        choice = next((p["tree_choice"] for p in prompts if p.get("tree_choice")), None)
        tree = f"auto: {choice['chosen']['name']}" if choice else str(results["cell"]["tree"] or "-")
        alone_ran = method == "autoregressive" or bool(choice and choice["chosen"].get("kind") == "target")
        # the target alone against itself is no speedup (tree='auto' may have chosen it)
        speed = "base" if method == "autoregressive" and alone else f"{agg['tokens_per_second'] / alone:.2f}x" if alone and not alone_ran else "-"
        lines.append(f"{method:<16}{tree[:37]:<38}{agg['prompts']:>8}{agg['new_tokens']:>8}{agg['tau']:>7.2f}"
                     f"{agg['acceptance_rate']:>8.2f}{agg['tokens_per_second']:>10.2f}{speed:>9}")  # fmt: skip
        if choice:
            notes.append(f"{method}: tree='auto' chose {choice['chosen']['name']}: {choice['reason']}")
    lines += notes + [f"results: {', '.join(str(o) for o in outs.values())}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
