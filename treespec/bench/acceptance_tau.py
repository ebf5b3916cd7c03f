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

    python3 -m treespec.bench.acceptance_tau --prompts 5 --max-new 64 --out benchmarks/results/acceptance_tau.json

CPU, fp32; tau does not depend on wall time, so a busy machine is fine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import treespec
from treespec.acceptance import block as blockmod
from treespec.acceptance.rejection import rejection_accept
from treespec.acceptance.sampling import logits_to_probs
from treespec.acceptance.traversal import _node_states, _usable, postorder_keys
from treespec.bench.datasets import encode_prompt, load_prompts
from treespec.loading.models import load_pair
from treespec.tree.topology import TreeTopology

DOMAINS = {"code": "humaneval", "text": "mtbench", "structured": "bfcl"}
REJECTION_DRAWS = 64


def traversal_expected(structure, tokens, valid, p, q, wor: bool) -> float:
    """E[accepted | tree] under traversal verification: P(stop at u) = h_u prod_{v before u}(1 - h_v)
    over the post-order (independent coins), h = the nodes' final masses."""
    mass, _ = _node_states(structure, tokens[None], valid[None], p[None], q[None], wor)
    h = torch.where(_usable(structure, valid[None]), mass, 0.0)[0].double()  # (N,)
    h[0] = 1.0
    order = postorder_keys(structure).argsort()
    h, depth = h[order], structure.depth[order].double()
    survive = torch.cumprod(torch.cat([h.new_ones(1), 1 - h[:-1]]), dim=0)
    return float((h * survive * depth).sum())


def block_expected(tokens, valid, p, q) -> float:
    """E[accepted | chain] under block verification, from its own h_i (stop = deepest passing)."""
    x = tokens[None, 1:, None]
    px, qx = p[None, :-1].gather(-1, x)[..., 0], q[None, :-1].gather(-1, x)[..., 0]
    usable = torch.cumprod((valid[None, 1:] & (qx > 0)).to(torch.uint8), dim=1).bool()
    w = blockmod._sequence_weights(px, qx, usable)
    has_child = torch.cat([usable, usable.new_zeros(1, 1)], dim=1)
    h = torch.where(has_child, blockmod._stop_prob(w, blockmod._residual(w, p[None], q[None]).sum(-1)), w)[0].double()
    h = torch.where(torch.cat([usable.new_ones(1, 1), usable], dim=1)[0], h, 0.0)
    h[0] = 1.0
    n = h.shape[0]
    # P(stop = i) = h_i prod_{j > i} (1 - h_j)
    after = torch.cumprod(torch.cat([(1 - h).flip(0)[:-1].new_ones(1), (1 - h).flip(0)[:-1]]), dim=0).flip(0)
    return float((h * after * torch.arange(n, dtype=torch.float64)).sum())


class PairedAcceptor:
    """Wraps the engine's acceptor: verifies with it, and records every scheme's E[accepted] on
    the step's tree and on its rank-0 chain (which is distributed exactly as a linear draft of the
    same depth: the first draw without replacement is a draw from q)."""

    def __init__(self, inner, chain_depth: int):
        self.inner, self.chain = inner, TreeTopology.chain(chain_depth)
        self.records: list[dict] = []
        self.gen = torch.Generator().manual_seed(1234)

    def accept(self, tree, p_logits):
        cfg = self.inner.config
        wor = cfg.without_replacement
        p = logits_to_probs(p_logits, cfg)
        q = logits_to_probs(tree.q_logits, cfg)
        s, tok, val = tree.structure, tree.tokens, tree.valid
        rec = {"tree_rejection": self._rejection(s, tok, val, p, q, wor),
               "tree_traversal": traversal_expected(s, tok, val, p, q, wor)}
        node, path = torch.zeros((), dtype=torch.long), [0]
        for _ in range(self.chain.max_depth):
            node = s.children[node, 0]
            path.append(int(node))
        path = torch.tensor(path)
        ct, cv, cp, cq = tok[path], val[path], p[path], q[path]
        rec["chain_rejection"] = self._rejection(self.chain, ct, cv, cp, cq, wor)
        rec["chain_block"] = block_expected(ct, cv, cp, cq)
        rec["chain_traversal"] = traversal_expected(self.chain.tensors(), ct, cv, cp, cq, wor)
        self.records.append(rec)
        return self.inner.accept(tree, p_logits)

    def _rejection(self, s, tok, val, p, q, wor) -> float:
        rows = lambda t: t[None].expand(REJECTION_DRAWS, *t.shape)  # noqa: E731
        acc = rejection_accept(s, rows(tok), rows(val), rows(p), rows(q), without_replacement=wor, generator=self.gen)
        return float(acc.num_accepted.double().mean())


SCHEMES = ("tree_rejection", "tree_traversal", "chain_rejection", "chain_block", "chain_traversal")


def run(args) -> dict:
    pair = load_pair()
    torch.set_num_threads(args.threads)
    out = {"command": "python3 -m treespec.bench.acceptance_tau " + " ".join(args.argv),
           "machine": f"{platform.machine()}, shared 2-core VM, fp32 CPU, {args.threads} threads",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tree": args.tree, "chain": args.chain,
           "cells": []}
    for domain in args.domains:
        prompts = load_prompts(DOMAINS[domain], limit=args.prompts)
        for temperature in args.temperatures:
            cell = {"domain": domain, "temperature": temperature, "prompts": []}
            for i, prompt in enumerate(prompts):
                ids = encode_prompt(pair.tokenizer, prompt)
                stream = treespec.stream(pair.target, pair.draft, ids, max_new_tokens=args.max_new, tree=args.tree,
                                         temperature=temperature, generator=torch.Generator().manual_seed(args.seed + i))
                paired = PairedAcceptor(stream.engine.acceptor, args.chain)
                stream.engine.acceptor = paired
                for _ in stream:
                    pass
                st = stream.result.stats
                rec = {"id": prompt.id, "tokens": st.new_tokens, "forwards": st.target_forwards,
                       "realised_tau_tree_rejection": st.new_tokens / max(st.target_forwards, 1), "steps": paired.records}
                cell["prompts"].append(rec)
                print(domain, temperature, prompt.id, rec["realised_tau_tree_rejection"], flush=True)
            cell["summary"] = summarise(cell["prompts"])
            print("SUMMARY", domain, temperature, cell["summary"], flush=True)
            out["cells"].append(cell)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    return out


def summarise(prompts: list[dict]) -> dict:
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
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS))
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.7, 1.0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--tree", default="3,2,1,1", help="widths; its rank-0 path is the chain scored for block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/acceptance_tau.json")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.tree = [int(w) for w in args.tree.split(",")]
    args.chain = len(args.tree)
    run(args)


if __name__ == "__main__":
    main()
