"""The per-domain preset sweep: which draft-tree shape (and which linear k) pays, per domain.

Greedy verification accepts, at each step, the longest path of the tree that spells the
target's own greedy continuation, so a step's accepted length depends only on where the target's
tokens rank among the draft's proposals: with per-level widths [w1, ..., wD], the step starting
after p generated tokens accepts a drafts where a is the largest a <= D with
rank(g[p+d-1]) < w_d for every d <= a (rank = the true token's rank under the draft given the
true prefix; 0 = the draft's top token). So one greedy generation per prompt plus one
teacher-forced draft forward over it gives the EXACT tau of every tree shape at once (up to
float ties), instead of one engine run per shape.

    # 1. on the real pair: greedy continuations (treespec, linear k=4 - also a check of the
    #    replay against the engine), draft ranks of every generated token, target argmax check
    #    (the recorded run: --sets code=humaneval:5 text=mtbench:3 text=gsm8k:3 structured=bfcl:5)
    nice -n 10 python benchmarks/studies/tree_sweep.py collect --out benchmarks/results/sweep_ranks.json
    # 2. replay every shape; cost model from benchmarks/studies/forward_costs.py; pick the presets
    python benchmarks/studies/tree_sweep.py analyze --ranks benchmarks/results/sweep_ranks.json \
        --costs benchmarks/results/forward_costs_cpu.json --out benchmarks/results/sweep_summary.json

Selection rule (documented in docs/benchmarks.md): per domain, the tree preset is the branching
shape (some level wider than 1) and linear k the chain with the highest predicted tokens/s = tau / (verify(1 + N) + sum over levels of draft(frontier) + overhead), with
the per-forward costs measured on this machine; tau per unit of tree size is reported alongside.
The step model is the library's (treespec.tree.auto.step_seconds), and `analyze` also prints
what tree='auto' (treespec.tree.auto.choose_tree) picks from the ranks' acceptance profile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

from treespec.bench.datasets import encode_prompt, load_prompts
from treespec.bench.harness import domain_datasets, load_models, model_config, run_treespec, write_json
from treespec.tree.auto import CostTable, choose_tree, nodes_per_level, step_seconds
from treespec.tree.profile import AcceptanceProfile

DOMAINS = ("code", "text", "structured")  # of the domain presets (treespec/configs/domain/)
OFFSET = 5  # prompts 0-4 are the final comparison's: the presets are chosen on held-out prompts


def prompt_sets(specs: list[str], count: int) -> list[tuple[str, str, int]]:
    """[(domain, dataset, prompts)] from 'domain=dataset:n' specs, by default each domain preset's
    dataset with `count` prompts."""
    if not specs:
        datasets = domain_datasets()
        return [(d, datasets[d], count) for d in DOMAINS]
    out = []
    for spec in specs:
        domain, _, rest = spec.partition("=")
        dataset, _, n = rest.partition(":")
        out.append((domain, dataset, int(n) if n else count))
    return out


# ------------------------------------------------------------------------------------ collect
def collect(args) -> None:
    torch.set_num_threads(args.threads)
    pair = load_models(model_config(args.model))
    doc = {"max_new_tokens": args.max_new_tokens, "offset": OFFSET, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "threads": args.threads, "prompts": []}  # fmt: skip
    out = Path(args.out)
    if out.exists():  # resume
        doc = json.loads(out.read_text())
    done = {(p["dataset"], p["id"]) for p in doc["prompts"]}
    for domain, ds, n in prompt_sets(args.sets, args.prompts):
        if args.domains and domain not in args.domains.split(","):
            continue
        for prompt in load_prompts(ds, limit=n, offset=OFFSET):
            if (ds, prompt.id) in done:
                continue
            ids = encode_prompt(pair.tokenizer, prompt)
            load0 = os.getloadavg()[0]
            res = run_treespec(pair.target, pair.draft, ids, max_new_tokens=args.max_new_tokens, method="linear",
                               tree=[1] * 4)  # fmt: skip
            gen = torch.tensor(res.tokens)  # (L,)
            full = res.sequences  # (1, T + L)
            with torch.no_grad():
                q = pair.draft(full).logits[0, ids.shape[1] - 1 : -1].float()  # (L, V) draft given true prefix
                true = q.gather(1, gen[:, None])  # (L, 1)
                ranks = (q > true).sum(1).tolist()
                p_argmax = pair.target(full).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
            rec = {
                "domain": domain, "dataset": ds, "id": prompt.id, "prompt_tokens": ids.shape[1],
                "generated": gen.tolist(), "draft_ranks": ranks,
                "target_argmax_matches": int((p_argmax == gen).sum()), "new_tokens": len(gen),
                "engine_chain4": {"target_forwards": res.target_forwards, "accepted_lengths": res.accepted_lengths,
                                  "time_total": res.seconds, "time_prefill": res.time_prefill},
                "loadavg_start": load0,
            }  # fmt: skip
            doc["prompts"].append(rec)
            write_json(out, doc)
            print(f"{domain}/{ds}/{prompt.id}: {len(gen)} tokens, chain-4 tau {len(gen) / res.target_forwards:.2f}, "
                  f"{res.seconds:.1f} s, target argmax matches {rec['target_argmax_matches']}/{len(gen)}, "
                  f"ranks {ranks[:24]}...", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------ replay
def accepted(ranks: list[int], p: int, widths: list[int]) -> int:
    a = 0
    for d, w in enumerate(widths):
        i = p + d
        if i >= len(ranks) or ranks[i] >= w:
            break
        a += 1
    return a


def replay(ranks: list[int], widths: list[int]) -> tuple[int, list[int]]:
    """(target forwards, accepted lengths per step) of greedy tree decoding over one generation."""
    L, p, steps = len(ranks), 0, []
    while p < L:
        a = min(accepted(ranks, p, widths), L - p - 1) if p < L else 0
        steps.append(a)
        p += a + 1
    return len(steps), steps


def shapes(max_depth: int, max_width: int, max_nodes: int):
    for depth in range(1, max_depth + 1):
        for ws in itertools.product(range(max_width, 0, -1), repeat=depth):
            if any(ws[i] < ws[i + 1] for i in range(depth - 1)):
                continue  # widths never grow with depth (deeper nodes are less likely to be reached)
            if sum(nodes_per_level(list(ws))) <= max_nodes:
                yield list(ws)


# The lead's 2-thread wall-clock measurements on this machine (fp32): target forward of n new
# tokens; draft = 140 ms for 1 token, assumed to scale with n like the target does.
LEAD_TARGET_2T = {1: 0.35, 8: 1.1, 32: 1.2, 64: 1.7}
LEAD_DRAFT_2T = {n: 0.14 * v / 0.35 for n, v in LEAD_TARGET_2T.items()}


def cost_models(files: list[dict], overhead: float) -> dict[str, CostTable]:
    """One cost table per (threads, clock) found in the forward_costs files; several files with
    the same (threads, clock) are merged by taking each size's minimum (the least disturbed)."""
    tables: dict[str, tuple[dict, dict]] = {}
    for costs in files:
        for clock in ("wall", "cpu"):
            if f"target_{clock}" not in costs:
                continue
            name = f"measured_{costs['threads']}thread_{clock}"
            verify, draft = tables.setdefault(name, ({}, {}))
            for table, key in ((verify, f"target_{clock}"), (draft, f"draft_{clock}")):
                for k, v in costs[key].items():
                    table[int(k)] = min(v, table.get(int(k), float("inf")))
    tables["lead_2thread_wall"] = (LEAD_TARGET_2T, LEAD_DRAFT_2T)
    return {name: CostTable(v, d, overhead, device=f"cpu: {name}") for name, (v, d) in tables.items()}


def evaluate(prompts: list[dict], grid: list[list[int]], costs: CostTable) -> dict[str, list[dict]]:
    """Per domain, every shape of the grid with its exact replayed tau, priced by the library's
    step model (treespec.tree.auto.step_seconds: the one tree='auto' uses)."""
    ar_step = step_seconds([], costs)
    results = {}
    for domain in dict.fromkeys(p["domain"] for p in prompts):
        ps = [p for p in prompts if p["domain"] == domain]
        if not ps:
            continue
        new = sum(p["new_tokens"] for p in ps)
        rows = []
        for ws in grid:
            steps = [a for p in ps for a in replay(p["draft_ranks"], ws)[1]]
            fwd = len(steps)
            tau = new / fwd
            n = sum(nodes_per_level(ws))
            p_full = sum(a == len(ws) for a in steps) / fwd
            cost = step_seconds(nodes_per_level(ws), costs, p_full)
            rows.append({
                "widths": ws, "draft_nodes": n, "depth": len(ws), "tau": tau, "p_full_accept": p_full,
                "tau_gain_per_node": (tau - 1) / n, "step_seconds": cost,
                "predicted_tokens_per_second": tau / cost, "predicted_speedup": tau / cost * ar_step,
            })  # fmt: skip
        rows.sort(key=lambda r: -r["predicted_tokens_per_second"])
        results[domain] = rows
    return results


def rank_profile(prompts: list[dict], width: int) -> AcceptanceProfile:
    """The depth-independent profile of the draft ranks: P(rank r | rank >= r) over every
    generated token (greedy: the rank-r child is accepted exactly when the target's token has
    draft rank r), for the chooser of tree='auto'."""
    ranks = [r for p in prompts for r in p["draft_ranks"]]
    row = []
    for r in range(width):
        tried = sum(x >= r for x in ranks)
        row.append(sum(x == r for x in ranks) / tried if tried else 0.0)
    return AcceptanceProfile.uniform(row)


def analyze(args) -> None:
    prompts = []
    for f in args.ranks:
        prompts += json.loads(Path(f).read_text())["prompts"]
    models = cost_models([json.loads(Path(f).read_text()) for f in args.costs], args.overhead)
    primary = args.cost_model or next(iter(models))

    # check the replay against the engine's own chain-4 runs (must be exact)
    mismatch = 0
    for p in prompts:
        fwd, steps = replay(p["draft_ranks"], [1] * 4)
        eng = p["engine_chain4"]
        # the last step may differ in its accepted count only (the engine counts drafts past the end)
        if fwd != eng["target_forwards"] or steps[:-1] != eng["accepted_lengths"][:-1]:
            mismatch += 1
            print(f"replay differs from the engine on {p['dataset']}/{p['id']}: {steps} vs {eng['accepted_lengths']}")
    argmax_ok = sum(p["target_argmax_matches"] for p in prompts), sum(p["new_tokens"] for p in prompts)

    grid = list(shapes(args.max_depth, args.max_width, args.max_nodes))
    by_model = {name: evaluate(prompts, grid, costs) for name, costs in models.items()}
    results = by_model[primary]
    domains = list(results)
    summary = {
        "selection": f"max predicted tokens/s = tau / (verify(1+N) + sum_d draft(F_d) + overhead) under cost model {primary!r}",
        "cost_models": {name: costs.to_dict() for name, costs in models.items()},
        "overhead_seconds_per_step": args.overhead,
        "replay_vs_engine_mismatches": mismatch,
        "target_argmax_matches": list(argmax_ok),
        "prompts": {d: [f"{p['dataset']}/{p['id']}" for p in prompts if p["domain"] == d] for d in domains},
        "new_tokens": {d: sum(p["new_tokens"] for p in prompts if p["domain"] == d) for d in domains},
        "grid": {"max_depth": args.max_depth, "max_width": args.max_width, "max_nodes": args.max_nodes, "shapes": len(grid)},
        "presets": {},
        "best_by_cost_model": {},
        "top_trees": {},
        "chains": {},
        "max_tau": {},
        "auto": {},
    }
    for domain, rows in results.items():
        chains = [r for r in rows if all(w == 1 for w in r["widths"])]
        trees = [r for r in rows if max(r["widths"]) > 1]  # a real tree: some node has 2+ children
        summary["presets"][domain] = {"tree": trees[0], "linear": chains[0], "best_overall": rows[0]}
        summary["best_by_cost_model"][domain] = {
            name: {"tree": next(r for r in res[domain] if max(r["widths"]) > 1)["widths"],
                   "linear_k": next(r for r in res[domain] if all(w == 1 for w in r["widths"]))["depth"],
                   "best_overall": res[domain][0]["widths"]}
            for name, res in by_model.items()
        }  # fmt: skip
        summary["top_trees"][domain] = rows[: args.top]
        summary["chains"][domain] = sorted(chains, key=lambda r: r["depth"])
        summary["max_tau"][domain] = max(rows, key=lambda r: r["tau"])
        print(f"\n== {domain}: {summary['new_tokens'][domain]} tokens from {len(summary['prompts'][domain])} prompts; cost model {primary}")
        print(f"{'widths':<22}{'nodes':>6}{'tau':>7}{'(tau-1)/N':>10}{'step s':>8}{'pred tok/s':>11}{'pred speedup':>13}")
        for r in rows[: args.top] + [None] + summary["chains"][domain]:
            if r is None:
                print("  -- chains --")
                continue
            print(f"{str(r['widths']):<22}{r['draft_nodes']:>6}{r['tau']:>7.2f}{r['tau_gain_per_node']:>10.3f}"
                  f"{r['step_seconds']:>8.3f}{r['predicted_tokens_per_second']:>11.3f}{r['predicted_speedup']:>13.2f}")  # fmt: skip
        m = summary["max_tau"][domain]
        print(f"  highest tau in the grid: {m['widths']} tau {m['tau']:.2f} ({m['draft_nodes']} nodes)")
        for name, best in summary["best_by_cost_model"][domain].items():
            print(f"  best under {name}: tree {best['tree']}, linear k={best['linear_k']}, any shape {best['best_overall']}")
        profile = rank_profile([p for p in prompts if p["domain"] == domain], args.max_width)
        choice = choose_tree(profile, models[primary], budget=args.max_nodes, max_depth=args.max_depth)
        summary["auto"][domain] = {"profile": [list(r) for r in profile.probs]} | choice.as_dict()
        print(f"  tree='auto' under {primary}, from the rank profile: {choice.best.name}: {choice.reason}")
    print(f"\nreplay vs engine (chain-4): {mismatch} mismatching prompts; target argmax == generated: {argmax_ok[0]}/{argmax_ok[1]}")
    write_json(args.out, summary)
    print(f"-> {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(summary, models[primary], by_model, args.top))
        print(f"-> {args.markdown}")


def to_markdown(summary: dict, primary: CostTable, by_model: dict, top: int) -> str:
    verify, draft = primary.target, primary.draft
    out = ["### Cost model (seconds per forward of n new tokens, 2 threads, wall clock, quiet machine)", ""]
    ns = sorted(verify)
    out.append("| n | " + " | ".join(map(str, ns)) + " |")
    out.append("|---|" + "---|" * len(ns))
    out.append("| target | " + " | ".join(f"{verify[n]:.3f}" for n in ns) + " |")
    out.append("| draft | " + " | ".join(f"{draft[n]:.3f}" if n in draft else "" for n in ns) + " |")
    for domain, rows in summary["top_trees"].items():
        out += ["", f"### {domain}: {summary['new_tokens'][domain]} tokens from {', '.join(summary['prompts'][domain])}", ""]
        out.append("| shape (widths) | drafts N | tau | (tau-1)/N | full-path accepts | step s (model) | predicted tokens/s | predicted speedup |")
        out.append("|---|---|---|---|---|---|---|---|")
        shown = rows[:top] + [r for r in summary["chains"][domain] if r not in rows[:top]]
        for r in shown:
            out.append(f"| {r['widths']} | {r['draft_nodes']} | {r['tau']:.2f} | {r['tau_gain_per_node']:.3f} | "
                       f"{100 * r['p_full_accept']:.0f}% | {r['step_seconds']:.3f} | {r['predicted_tokens_per_second']:.2f} | "
                       f"{r['predicted_speedup']:.2f} |")  # fmt: skip
        m = summary["max_tau"][domain]
        p = summary["presets"][domain]
        out += ["", f"Highest tau in the grid: {m['widths']} ({m['draft_nodes']} drafts): {m['tau']:.2f}. "
                f"Chosen: tree {p['tree']['widths']}, linear k={p['linear']['depth']}.", ""]  # fmt: skip
        out.append("| cost model | best tree | best linear k | best shape of any kind |")
        out.append("|---|---|---|---|")
        for name, b in summary["best_by_cost_model"][domain].items():
            out.append(f"| {name} | {b['tree']} | {b['linear_k']} | {b['best_overall']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/studies/tree_sweep.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--out", required=True)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--domains", default="", help="comma-separated subset of code,text,structured")
    c.add_argument("--model", default="pretrained", help="'pretrained' (the default pair) or a GGUF folder")
    c.add_argument("--sets", nargs="*", default=[], help="domain=dataset:n prompt sets (default: each domain preset's)")
    c.add_argument("--prompts", type=int, default=5, help="prompts per set without an explicit n")
    a = sub.add_parser("analyze")
    a.add_argument("--ranks", required=True, nargs="+")
    a.add_argument("--costs", required=True, nargs="+")
    a.add_argument("--out", required=True)
    a.add_argument("--overhead", type=float, default=0.01, help="seconds per step outside the forwards")
    a.add_argument("--cost-model", default="", help="which cost model picks the presets (default: the first measured one)")
    a.add_argument("--max-depth", type=int, default=8)
    a.add_argument("--max-width", type=int, default=4)
    a.add_argument("--max-nodes", type=int, default=64)
    a.add_argument("--top", type=int, default=12)
    a.add_argument("--markdown", default="", help="also write the tables as markdown here")
    args = ap.parse_args(argv)
    {"collect": collect, "analyze": analyze}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
