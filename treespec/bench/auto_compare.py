"""tree="auto" against fixed trees, linear and the target alone, interleaved, per domain.

    python -m treespec.bench.auto_compare --model tiny-random          # seconds: a smoke test of the tool
    python -m treespec.bench.auto_compare                              # the real pair, the demo prompt: minutes
    python -m treespec.bench.auto_compare --domains demo,code,text,structured --prompts 3 \
        --variants auto,preset,optimized,small,medium,linear --out outputs/auto_compare.json \
        --markdown outputs/auto_compare.md                           # the full comparison: hours on a CPU

The default is small (the demo's prompt, tree=auto, the domain preset, linear and the target
alone, 32 new tokens). After the untimed warm-up of the first domain the tool prints an
estimate of the whole run's time from the warm-up's per-token times, and a line per prompt.

Per domain (the demo's prompt, then code / text / structured prompts of the benchmark's datasets,
held-out offsets as in docs/benchmarks.md), every variant decodes prompt i before any starts
prompt i+1, in an order that rotates with i, so a busy moment of a shared machine slows every
variant alike and the ratios are paired. Before timing, each variant runs once on the domain's
first prompt untimed (weights touched; tree=auto calibrates there, or reads its cached costs).
Variants:

    auto            method=tree, tree="auto" with the domain's acceptance profile
    preset          method=tree with the domain preset's fixed widths (treespec/configs/domain/<domain>.yaml, tree=preset)
    optimized       method=tree with the domain's Sequoia preset (treespec/configs/presets/optimized_<domain>.yaml)
    <name>          a treespec.PRESETS tree (small, medium, large, wide, chain-4, ...)
    linear          method=linear, the domain preset's linear_k
    autoregressive  the target alone, through the same engine (the ratios' denominator)

Every variant's greedy output is checked against the target alone's (they must be identical).
The speedup of a variant in a domain is its pooled tokens/s (all its tokens over all its seconds)
over the target alone's on the same prompts. A variant that ran the target alone (tree="auto"
chose no draft) has no speedup: its row says "the target alone" and "-". `--model tiny-random` runs the whole thing on the
tiny random pair in seconds (a smoke test of the tool; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from treespec.bench.config import (
    CONFIG_DIR, BenchConfig, DatasetConfig, DomainConfig, MethodConfig, ModelConfig, SamplingSettings, TreePolicyConfig,
)
from treespec.bench.demo import DEFAULT_PROMPT
from treespec.bench.metrics import aggregate
from treespec.bench.runner import build_prompts, environment, generate_one, load_models
from treespec.tree.auto import AutoTreeConfig
from treespec.tree.topology import PRESETS

# domain -> (dataset, the domain preset whose widths / linear_k / profile it uses)
DOMAINS = {"demo": (None, "code"), "code": ("humaneval", "code"), "text": ("mtbench", "text"),
           "structured": ("bfcl", "structured")}  # fmt: skip


def domain_preset(name: str) -> DomainConfig:
    """treespec/configs/domain/<name>.yaml (its fixed tree, linear k) as the benchmark reads it."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "domain" / f"{name}.yaml"))
    return DomainConfig(**{k: v for k, v in data.items() if k != "defaults"})


VARIANTS = ("auto", "preset", "optimized", "small", "medium", "linear", "autoregressive")
DEFAULT_VARIANTS = ("auto", "preset", "linear", "autoregressive")


def variant_config(base: BenchConfig, variant: str, profile_domain: str) -> BenchConfig:
    """The cell of one variant (treespec.bench.runner.generate_one runs it)."""
    domain = domain_preset(profile_domain)
    if variant == "auto":
        defaults = AutoTreeConfig()
        tree = TreePolicyConfig(name="auto", budget=defaults.budget, max_depth=defaults.max_depth)
    elif variant == "optimized":
        tree = TreePolicyConfig(name="optimized")
    elif variant in PRESETS:
        tree, domain = TreePolicyConfig(name="preset"), replace(domain, widths=list(PRESETS[variant]))
    elif variant in ("preset", "linear", "autoregressive"):
        tree = TreePolicyConfig(name="preset")
    else:
        raise SystemExit(f"unknown variant {variant!r}: auto, preset, optimized, linear, autoregressive or one of {sorted(PRESETS)}")
    method = variant if variant in ("linear", "autoregressive") else "tree"
    return replace(base, method=MethodConfig(name=method), tree=tree, domain=domain)


def prompts_for(domain: str, cfg: BenchConfig, pair, n: int, offset: int) -> list[tuple[str, torch.Tensor]]:
    dataset, _ = DOMAINS[domain]
    if dataset is None:  # the demo's prompt, as treespec-demo encodes it
        if pair.tokenizer is None:
            return build_prompts(replace(cfg, dataset=DatasetConfig(name="synthetic", num_prompts=1)), pair)
        messages = [{"role": "user", "content": DEFAULT_PROMPT}]
        ids = pair.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]  # fmt: skip
        return [("demo", ids.to(pair.target.device))]
    return build_prompts(replace(cfg, dataset=DatasetConfig(name=dataset, num_prompts=n, offset=offset)), pair)


def run_domain(domain: str, variants: list[str], base: BenchConfig, pair, n: int, offset: int, *,
               estimate_for: int = 0) -> dict:
    """Every variant on the domain's prompts, interleaved. estimate_for > 0: after the warm-up,
    print how long the timed runs of that many domains like this one should take."""
    profile_domain = DOMAINS[domain][1]
    cfgs = {v: variant_config(base, v, profile_domain) for v in variants}
    prompts = prompts_for(domain, base, pair, n, offset)
    per_token = {}
    for v, cfg in cfgs.items():  # untimed: first touch, calibration, lazy allocations
        print(f"  {domain}: warm-up of {v} ...", file=sys.stderr, flush=True)
        _, rec = generate_one(cfg, pair, prompts[0][1], base.warmup_tokens, 0)
        per_token[v] = rec.time_total / max(rec.new_tokens, 1)
    if estimate_for:
        seconds = sum(per_token.values()) * base.max_new_tokens * len(prompts) * estimate_for
        print(f"estimated time of the timed runs: about {seconds / 60:.1f} min ({len(variants)} variants x "
              f"{len(prompts)} prompts x {estimate_for} domain(s) x {base.max_new_tokens} tokens, from the "
              f"warm-up's per-token times)", file=sys.stderr, flush=True)  # fmt: skip
    records: dict[str, list] = {v: [] for v in variants}
    outputs: dict[str, list] = {v: [] for v in variants}
    for i, (pid, ids) in enumerate(prompts):
        for j in range(len(variants)):
            v = variants[(i + j) % len(variants)]  # rotate who goes first
            seqs, rec = generate_one(cfgs[v], pair, ids, base.max_new_tokens, 0)
            rec.id, rec.loadavg = pid, os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            records[v].append(rec)
            outputs[v].append(seqs[0, ids.shape[1]:].tolist())
            print(f"  {domain} prompt {i + 1}/{len(prompts)} ({pid}) {v}: {rec.tokens_per_second:.2f} tokens/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    alone = aggregate(records["autoregressive"])["tokens_per_second"] if "autoregressive" in records else None
    out = {"prompts": [pid for pid, _ in prompts], "variants": {}}
    for v in variants:
        agg = aggregate(records[v])
        choice = next((r.tree_choice for r in records[v] if r.tree_choice), None)
        target_alone = v == "autoregressive" or bool(choice and choice["chosen"]["kind"] == "target")
        out["variants"][v] = {
            "tree": choice["chosen"]["name"] if choice else (records[v][0].tree if records[v] else None),
            "target_alone": target_alone,
            "tau": agg["tau"], "tokens_per_second": agg["tokens_per_second"], "new_tokens": agg["new_tokens"],
            # the target alone against itself is no speedup: only variants that drafted get one
            "speedup": agg["tokens_per_second"] / alone if alone and not target_alone else None,
            "identical_to_target": outputs[v] == outputs.get("autoregressive", outputs[v]),
            "tree_choice": choice, "per_prompt": [r.as_dict() for r in records[v]],
        }  # fmt: skip
    return out


def to_markdown(doc: dict) -> str:
    lines = []
    for domain, res in doc["domains"].items():
        lines += [f"### {domain}: {', '.join(res['prompts'])}", "",
                  "| variant | tree | tau | tokens/s | speedup | identical |", "|---|---|---|---|---|---|"]  # fmt: skip
        for v, r in res["variants"].items():
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            tree = "the target alone" if r.get("target_alone") else r["tree"]
            lines.append(f"| {v} | {tree} | {r['tau']:.2f} | {r['tokens_per_second']:.2f} | {sp} | {r['identical_to_target']} |")
        choice = res["variants"].get("auto", {}).get("tree_choice")
        lines += ["", f"tree='auto': {choice['reason']}" if choice else "", ""]
    return "\n".join(lines)


def _write(path: Path, doc: dict) -> None:
    from treespec.loading.cache import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m treespec.bench.auto_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--domains", default="demo", help=f"comma-separated subset of {','.join(DOMAINS)}")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {','.join(VARIANTS)} or a preset name (module docstring)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per dataset domain (the demo domain has one)")
    ap.add_argument("--offset", type=int, default=0, help="first prompt of each dataset")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="pretrained", choices=("pretrained", "tiny-random"))
    ap.add_argument("--recalibrate", action="store_true",
                    help="measure tree=auto's forward costs afresh first (a table cached while the machine was busy is pessimistic)")
    ap.add_argument("--out", type=Path, default=Path("outputs/auto_compare.json"),
                    help="the JSON record, rewritten after every domain (default outputs/auto_compare.json)")
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    bad = [d for d in args.domains.split(",") if d not in DOMAINS]
    if bad:  # before any model is loaded
        raise SystemExit(f"unknown domain {bad[0]!r}; choose from {', '.join(DOMAINS)}")
    if "autoregressive" not in variants:
        variants.append("autoregressive")  # the denominator of every ratio
    torch.set_num_threads(args.threads)
    base = BenchConfig(
        model=ModelConfig(name=args.model, source=args.model), method=MethodConfig(name="tree"),
        domain=domain_preset("code"), tree=TreePolicyConfig(name="preset"),
        dataset=DatasetConfig(name="synthetic"), sampling=SamplingSettings(name="greedy"),
        max_new_tokens=args.max_new_tokens, warmup_tokens=args.warmup_tokens, threads=args.threads,
        progress=False, keep_outputs=False,
    )  # fmt: skip
    pair = load_models(base.model)
    if args.recalibrate:
        from treespec.backends.factory import make_backend
        from treespec.engine.calibrate import calibrated_costs

        calibrated_costs(pair.target, pair.draft, make_backend("auto", pair.target.device, pair.target.dtype), refresh=True)
    doc = {"command": " ".join(sys.argv), "environment": environment(), "loadavg_start": os.getloadavg()[0],
           "max_new_tokens": args.max_new_tokens, "threads": args.threads, "domains": {}}  # fmt: skip
    t0 = time.perf_counter()
    domains = args.domains.split(",")
    for i, domain in enumerate(domains):
        doc["domains"][domain] = run_domain(domain, variants, base, pair, args.prompts, args.offset,
                                            estimate_for=len(domains) if i == 0 else 0)  # fmt: skip
        _write(args.out, doc)  # after every domain: a long run keeps what it has
    doc["seconds"], doc["loadavg_end"] = time.perf_counter() - t0, os.getloadavg()[0]
    _write(args.out, doc)
    print(f"record: {args.out}", file=sys.stderr)
    table = to_markdown(doc)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    bad = [(d, v) for d, r in doc["domains"].items() for v, x in r["variants"].items() if not x["identical_to_target"]]
    if bad:
        print(f"outputs differ from the target alone's: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
