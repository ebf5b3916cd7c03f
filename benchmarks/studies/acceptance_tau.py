"""tau of the stochastic verifiers (rejection, traversal, block) on the real pair, per domain.

One generation per (domain, temperature, prompt), driven by the default verifier (token-level
rejection sampling) on a static tree (default widths [3, 2, 1, 1]). At every step the step's
tree (tokens, p, q) is also verified by every scheme and E[accepted | tree] is recorded:

* tree_rejection: token-level verification of the whole tree (64 draws);
* tree_traversal: traversal verification of the whole tree (exact: its stop probabilities are
  functions of the tree alone);
* chain_rejection / chain_block / chain_traversal: the tree's rank-0 path, which is distributed
  exactly as a linear draft of the same depth (the first draw without replacement is a draw
  from q), verified token-level (64 draws), by block verification and by traversal (exact).

All schemes are lossless, so the contexts along the run have the target's law whichever scheme
drives it, and 1 + mean E[accepted] estimates each scheme's tau on the same trees: a paired
comparison with far less noise than separate runs. (A linear run's steps start at different
positions than a tree run's; the comparison between chain schemes is on the same chains.)

    python3 benchmarks/studies/acceptance_tau.py --prompts 5 --max-new 64 --out benchmarks/results/acceptance_tau.json

CPU, fp32; tau does not depend on wall time, so a busy machine is fine. The scores come in
through the public `acceptance=` option: a TreeVerifier that verifies by token-level rejection
(the default) and records every scheme's expected accepted length on the step's tree
(treespec.acceptance.traversal.expected_accepted, treespec.acceptance.block.expected_accepted).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import treespec
from treespec.acceptance import block, traversal
from treespec.acceptance.rejection import rejection_accept
from treespec.bench.datasets import encode_prompt, load_prompts
from treespec.bench.harness import domain_datasets, load_models, model_config, write_json
from treespec.tree.topology import TreeTopology

REJECTION_DRAWS = 64


class RecordingVerifier:
    """A TreeVerifier (treespec.acceptance.schemes, passed as acceptance=): verifies by token-level
    rejection, the default, and records every scheme's E[accepted] on the step's tree and on its
    rank-0 chain (distributed exactly as a linear draft of the same depth: the first draw without
    replacement is a draw from q). Its own draws use a generator of its own, so the run is the
    default's."""

    def __init__(self, chain_depth: int):
        self.chain = TreeTopology.chain(chain_depth)
        self.records: list[dict] = []
        self.gen = torch.Generator().manual_seed(1234)

    def __call__(self, tree, tokens, valid, p, q, *, without_replacement=True, generator=None, **lookup):
        wor = without_replacement
        rec = {"tree_rejection": self._rejection(tree, tokens, valid, p, q, wor),
               "tree_traversal": float(traversal.expected_accepted(tree, tokens, valid, p, q, without_replacement=wor))}  # fmt: skip
        node, path = torch.zeros((), dtype=torch.long), [0]
        for _ in range(self.chain.max_depth):
            node = tree.children[node, 0]
            path.append(int(node))
        path = torch.tensor(path)
        ct, cv, cp, cq = tokens[path], valid[path], p[path], q[path]
        rec["chain_rejection"] = self._rejection(self.chain, ct, cv, cp, cq, wor)
        rec["chain_block"] = float(block.expected_accepted(ct, cv, cp, cq))
        rec["chain_traversal"] = float(traversal.expected_accepted(self.chain, ct, cv, cp, cq, without_replacement=wor))
        self.records.append(rec)
        return rejection_accept(tree, tokens, valid, p, q, without_replacement=wor, generator=generator, **lookup)

    def _rejection(self, s, tok, val, p, q, wor) -> float:
        rows = lambda t: t[None].expand(REJECTION_DRAWS, *t.shape)  # noqa: E731
        acc = rejection_accept(s, rows(tok), rows(val), rows(p), rows(q), without_replacement=wor, generator=self.gen)
        return float(acc.num_accepted.double().mean())


SCHEMES = ("tree_rejection", "tree_traversal", "chain_rejection", "chain_block", "chain_traversal")


def run(args) -> dict:
    pair = load_models(model_config(args.model))
    torch.set_num_threads(args.threads)
    datasets = domain_datasets()
    out = {"command": "python3 benchmarks/studies/acceptance_tau.py " + " ".join(args.argv),
           "machine": f"{platform.machine()}, fp32 CPU, {args.threads} threads",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tree": args.tree, "chain": args.chain,
           "cells": []}  # fmt: skip
    for domain in args.domains:
        prompts = load_prompts(datasets[domain], limit=args.prompts)
        for temperature in args.temperatures:
            cell = {"domain": domain, "temperature": temperature, "prompts": []}
            for i, prompt in enumerate(prompts):
                ids = encode_prompt(pair.tokenizer, prompt)
                verifier = RecordingVerifier(args.chain)
                res = treespec.generate(pair.target, pair.draft, ids, max_new_tokens=args.max_new, tree=args.tree,
                                        temperature=temperature, acceptance=verifier,
                                        generator=torch.Generator().manual_seed(args.seed + i))  # fmt: skip
                st = res.stats
                rec = {"id": prompt.id, "tokens": st.new_tokens, "forwards": st.target_forwards,
                       "realised_tau_tree_rejection": st.new_tokens / max(st.target_forwards, 1), "steps": verifier.records}  # fmt: skip
                cell["prompts"].append(rec)
                print(domain, temperature, prompt.id, rec["realised_tau_tree_rejection"], flush=True)
            cell["summary"] = scheme_summary(cell["prompts"])
            print("SUMMARY", domain, temperature, cell["summary"], flush=True)
            out["cells"].append(cell)
            write_json(args.out, out)
    return out


def scheme_summary(prompts: list[dict]) -> dict:
    """Per scheme: tau = 1 + mean E[accepted] over all steps; gains against token-level
    rejection on the same trees / chains, with their standard errors over steps."""
    steps = [s for p in prompts for s in p["steps"]]
    col = lambda k: torch.tensor([s[k] for s in steps], dtype=torch.float64)  # noqa: E731
    summary = {"steps": len(steps)}
    for scheme in SCHEMES:
        summary[f"tau_{scheme}"] = 1 + float(col(scheme).mean())
    for scheme, base in (("tree_traversal", "tree_rejection"), ("chain_block", "chain_rejection"),
                         ("chain_traversal", "chain_rejection")):
        diff = col(scheme) - col(base)
        summary[f"gain_{scheme}"] = float(diff.mean())
        summary[f"gain_se_{scheme}"] = float(diff.std() / len(steps) ** 0.5)
    toks, fwd = sum(p["tokens"] for p in prompts), sum(p["forwards"] for p in prompts)
    summary["realised_tau_tree_rejection"] = toks / max(fwd, 1)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/studies/acceptance_tau.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default="pretrained", help="'pretrained' (the default pair), 'tiny-random' or a GGUF folder")
    ap.add_argument("--domains", nargs="+", default=["code", "text", "structured"], help="configs/domain/ presets")
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.7, 1.0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--tree", default="3,2,1,1", help="widths; its rank-0 path is the chain scored for block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/acceptance_tau.json"))
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.tree = [int(w) for w in args.tree.split(",")]
    args.chain = len(args.tree)
    run(args)


if __name__ == "__main__":
    main()
