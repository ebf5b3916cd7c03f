"""Tree policies against fixed trees at the same draft-node budget, per domain, temperature 0,
on the real Qwen2.5-Coder 0.5B (draft) -> 1.5B (target) pair (the tau metric: new tokens per
target forward, bonus token included; tau does not depend on the machine).

    # here (tokenizer + dataset cache): token ids of the prompts, chat template applied
    python benchmarks/studies/tree_policies.py export --out PROMPTS.json [--per-domain 16]
    # on the GPU machine, with the GGUF pair copied to a folder there (docs/gpu.md)
    python benchmarks/studies/tree_policies.py run --model GGUF_DIR --prompts PROMPTS.json --out-dir OUT
    # here again: the optimized trees as preset files (treespec/configs/presets/optimized_<domain>.yaml,
    # B=16; optimized_<domain>_b32.yaml, B=32), recomputed from the results' acceptance profiles
    python benchmarks/studies/tree_policies.py presets benchmarks/results/tree_policies/tree_policies.json

Per domain (code = HumanEval, text = MT-Bench first turns, structured = BFCL simple_python),
the first half of the prompts is the collection set: the wide tree COLLECT_WIDTHS is run on it
and its stats.accepted_ranks give the acceptance profile (treespec.tree.profile.profile_from_stats);
the second half is the held-out evaluation set, on which every policy runs:
  fixed      static widths lists with at most B draft nodes
  dynamic    DynamicTreeConfig(width, children, depth, budget=B)
  adaptive   AdaptiveTreeConfig(widths, max_depth) whose deepest tree has at most B nodes
             (its mean nodes per step is reported)
  optimized  optimize_tree(profile of the domain's collection set, budget=B, max_depth)
--controls adds deeper fixed shapes (chains to depth 16) and a dynamic tree of the fixed trees'
depth (second run, docs/benchmarks.md). Results go to OUT/tree_policies.json (rewritten after
every domain/budget, so a run cut short still returns what it measured). The domains and their
datasets are the domain presets' (treespec/configs/domain/*.yaml).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


import treespec
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.factory import make_backend
from treespec.bench.config import CONFIG_DIR
from treespec.bench.harness import (
    domain_datasets, export_prompts, load_models, model_config, out_dir, read_prompts, run_treespec, summarize, write_json,
)  # fmt: skip
from treespec.bench.runner import environment
from treespec.bench.timing import Wall
from treespec.loading.models import DEFAULT_TARGET, load_tokenizer
from treespec.tree.presets import write_preset
from treespec.tree.profile import AcceptanceProfile, profile_from_stats
from treespec.tree.sequoia import optimize_tree
from treespec.tree.topology import TreeTopology

DOMAINS = ("code", "text", "structured")  # of the domain presets; each brings its dataset
COLLECT_WIDTHS = [4, 3, 2, 2, 1, 1]  # 184 draft nodes
FIXED = {  # budget -> widths lists with at most `budget` draft nodes
    16: [[4, 1, 1, 1], [2, 2, 1, 1], [3, 1, 1, 1, 1], [2, 1, 1, 1, 1, 1, 1, 1]],
    32: [[4, 2, 1, 1], [2, 2, 2, 1, 1], [2, 2, 1, 1, 1, 1, 1, 1], [4, 1, 1, 1, 1, 1, 1, 1]],
}
# --controls (second run): deeper fixed shapes (the dynamic and optimized trees may be deeper
# than the fixed ones above) and a dynamic tree no deeper than the fixed ones
FIXED_CONTROLS = {16: [[1] * 16], 32: [[3] + [1] * 9, [2] + [1] * 15]}
DYNAMIC_CONTROLS = {16: {}, 32: {"dynamic depth 8": dict(width=4, children=4, depth=8)}}
DYNAMIC = {16: dict(width=4, children=4, depth=8), 32: dict(width=4, children=4, depth=10)}
ADAPTIVE = {16: dict(widths=(2, 1), min_depth=1, max_depth=8), 32: dict(widths=(4, 1), min_depth=1, max_depth=8)}
OPT_DEPTH = {16: 8, 32: 10}


# --------------------------------------------------------------------------- here
def export(args) -> None:
    datasets = domain_datasets()
    out = export_prompts(load_tokenizer(DEFAULT_TARGET), {datasets[d]: args.per_domain for d in DOMAINS}, args.out,
                         download=False)  # fmt: skip
    print({k: len(v) for k, v in out.items()}, "max prompt tokens:", max(len(p["ids"]) for v in out.values() for p in v))


def presets(args) -> None:
    res = json.loads(Path(args.results).read_text())
    for domain, d in res["domains"].items():
        if "profile" not in d:
            continue
        profile = AcceptanceProfile.from_dict(d["profile"])
        for budget in sorted(res["budgets"], reverse=True):  # the B=16 tree is the file's tree
            key = str(budget)
            if key not in d.get("optimized_parents", {}):
                continue
            topo = optimize_tree(profile, budget=budget, max_depth=OPT_DEPTH[budget])
            assert list(topo.parents) == d["optimized_parents"][key], (domain, budget)
            path = args.out_dir / (f"optimized_{domain}.yaml" if budget == 16 else f"optimized_{domain}_b{budget}.yaml")
            write_preset(topo, path, profile, name=path.stem, budget=budget)
            print("wrote", path, topo.describe())


# --------------------------------------------------------------------------- device
def run(args) -> None:
    clock = Wall().start()
    datasets = domain_datasets()
    by_dataset = read_prompts(args.prompts, args.device)
    prompts = {d: by_dataset[datasets[d]] for d in DOMAINS}  # {domain: [(id, ids (1, T))]}
    with Wall() as w:
        pair = load_models(model_config(args.model, device=args.device, dtype=args.dtype))
    print(f"loaded the {args.model} pair in {w.seconds:.1f} s", flush=True)
    target, draft = pair.target, pair.draft
    backend = make_backend("auto", args.device, target.dtype)
    # generate() sizes the caches for prompt + new tokens + budget + 1 nodes, but the dynamic
    # drafter's draft cache also holds (depth - 1) * width frontier nodes of scratch, which can
    # exceed that margin (KV cache full); one static cache of 1024 slots (longest prompt 335 +
    # 128 new + 185 collection nodes) sidesteps it on the GPU path.
    if isinstance(backend, GraphedBackend):
        backend.min_capacity = max(backend.min_capacity, 1024)
    budgets = [int(b) for b in args.budgets.split(",")]
    res = dict(device=environment(), dtype=args.dtype, backend=backend.name, new_tokens=args.new_tokens, temperature=0.0,
               collect_widths=COLLECT_WIDTHS, budgets=budgets, fixed={str(b): FIXED[b] for b in budgets},
               dynamic={str(b): DYNAMIC[b] for b in budgets}, adaptive={str(b): ADAPTIVE[b] for b in budgets},
               opt_depth={str(b): OPT_DEPTH[b] for b in budgets}, domains={}, incomplete=[])  # fmt: skip

    eos = [] if args.ignore_eos else None  # None: the target's own stop ids (its generation config)

    def policy(plist, tree) -> tuple[dict, list]:
        """The policy on every prompt: its summary (per prompt too) and the generations (whose
        accepted ranks make the acceptance profile)."""
        gens = [run_treespec(target, draft, ids, max_new_tokens=args.new_tokens, tree=tree, attention=backend,
                             eos_token_id=eos) for _, ids in plist]  # fmt: skip
        summary = summarize(gens) | {"seconds": sum(g.seconds for g in gens),
                                     "per_prompt": [{"id": pid} | g.as_dict() for (pid, _), g in zip(plist, gens)]}  # fmt: skip
        return summary, gens

    def out_of_time() -> bool:
        return clock.stop() > args.time_limit

    half = args.collect
    end = args.collect + (args.evaluate or args.per_domain - args.collect)
    for budget in budgets:
        for domain in DOMAINS:
            d = res["domains"].setdefault(domain, dict(collect=[pid for pid, _ in prompts[domain][:half]],
                                                       evaluate=[pid for pid, _ in prompts[domain][half:end]],
                                                       budgets={}, optimized_parents={}))  # fmt: skip
            collect, evaluate = prompts[domain][:half], prompts[domain][half:end]
            if out_of_time():
                res["incomplete"].append(f"{domain} B={budget}")
                continue
            if "profile" not in d:
                coll_topo = TreeTopology.from_widths(COLLECT_WIDTHS)
                summary, stats = policy(collect, list(COLLECT_WIDTHS))
                profile = profile_from_stats(stats, coll_topo)
                d["collection"] = {k: v for k, v in summary.items() if k != "per_prompt"}
                d["profile"] = profile.to_dict()
                d["_profile"] = profile
                print(f"{domain:10s} collection {COLLECT_WIDTHS} tau {summary['tau']:.2f} profile row0 "
                      f"{[round(x, 2) for x in profile.row(0)]}", flush=True)  # fmt: skip
            profile = d["_profile"]
            opt = optimize_tree(profile, budget=budget, max_depth=OPT_DEPTH[budget])
            d["optimized_parents"][str(budget)] = list(opt.parents)
            cells = {}
            for widths in FIXED[budget] + (FIXED_CONTROLS[budget] if args.controls else []):
                cells[f"fixed {widths}"] = widths
            cells["dynamic"] = treespec.DynamicTreeConfig(budget=budget, **DYNAMIC[budget])
            for label, kw in (DYNAMIC_CONTROLS[budget] if args.controls else {}).items():
                cells[label] = treespec.DynamicTreeConfig(budget=budget, **kw)
            cells["adaptive"] = treespec.AdaptiveTreeConfig(**ADAPTIVE[budget])
            cells["optimized"] = opt
            row = {}
            for label, tree in cells.items():
                summary, _ = policy(evaluate, tree)
                if label == "optimized":
                    summary["tree"] = opt.describe()
                    summary["num_drafts"] = opt.num_drafts
                row[label] = summary
                print(f"{domain:10s} B={budget:2d} {label:36s} tau {summary['tau']:.3f} nodes/step "
                      f"{summary['nodes_per_step']:5.1f}  {summary['seconds']:5.1f} s", flush=True)  # fmt: skip
            d["budgets"][str(budget)] = row
            write_json(args.out_dir / args.name, strip(res))
    res["seconds"] = clock.stop()
    write_json(args.out_dir / args.name, strip(res))
    table(res)


def strip(res: dict) -> dict:
    return {**res, "domains": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in res["domains"].items()}}


def table(res: dict) -> None:
    for b in res["budgets"]:
        for domain, d in res["domains"].items():
            row = d["budgets"].get(str(b))
            if not row:
                continue
            fixed = {k: v["tau"] for k, v in row.items() if k.startswith("fixed")}
            best_fixed = max(fixed.values())
            new = {k: v["tau"] for k, v in row.items() if not k.startswith("fixed")}
            best_new = max(new, key=new.get)
            print(f"B={b} {domain:10s} best fixed {best_fixed:.3f} ({max(fixed, key=fixed.get)})  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in new.items())
                  + f"  best new {best_new} {100 * (new[best_new] / best_fixed - 1):+.1f}%")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/studies/tree_policies.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export")
    p.add_argument("--out", type=Path, required=True, help="the prompts file to write")
    p.add_argument("--per-domain", type=int, default=16)
    p = sub.add_parser("run")
    p.add_argument("--model", default="pretrained", help="a folder holding the default pair's <name>.gguf files, "
                   "'pretrained' (the cache or PyPI) or 'tiny-random' (a smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=Path, required=True, help="written by `export`")
    p.add_argument("--out-dir", type=Path, default=out_dir("outputs/tree_policies"), help="default: $OUT")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --new-tokens")
    p.add_argument("--per-domain", type=int, default=16, help="prompts per domain in the prompts file to use")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--collect", type=int, default=8, help="collection prompts per domain (the first ones)")
    p.add_argument("--evaluate", type=int, default=0, help="evaluation prompts after them (0: up to --per-domain)")
    p.add_argument("--controls", action="store_true", help="also the FIXED_CONTROLS / DYNAMIC_CONTROLS cells")
    p.add_argument("--name", default="tree_policies.json", help="results file under --out-dir")
    p.add_argument("--budgets", default="16,32")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds; later domain/budget cells are skipped")
    p = sub.add_parser("presets")
    p.add_argument("results")
    p.add_argument("--out-dir", type=Path, default=CONFIG_DIR / "presets")
    args = parser.parse_args(argv)
    {"export": export, "run": run, "presets": presets}[args.cmd](args)


if __name__ == "__main__":
    main()
