"""tau with and without prompt lookup, per domain, on the real Qwen2.5-Coder 0.5B -> 1.5B pair (CPU, greedy).

Greedy output is the target's own whatever the drafts, so both runs of a prompt emit the same
tokens and tau (tokens per target forward) compares them exactly; wall time is not measured.
Prompts run round-robin over the datasets (prompt i of every dataset before prompt i+1), each
without and then with lookup, and the JSON is rewritten after every prompt, so a run cut short
still covers every dataset alike.

    python3 -m treespec.bench.lookup_tau --prompts 5 --max-new 128 --out benchmarks/results/lookup_tau.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

import treespec
from treespec.bench.datasets import encode_prompt, load_prompts
from treespec.loading import load_pair

# (dataset, domain): the domain presets' trees are all [4, 1, 1] (configs/domain/*.yaml)
DATASETS = [("humaneval_edit", "repeat"), ("mtbench_rewrite", "repeat"), ("humaneval", "code"),
            ("mtbench", "text"), ("bfcl", "structured")]
TREE = [4, 1, 1]


def summarize(records: list[dict]) -> dict:
    out = {}
    for ds, _ in DATASETS:
        for lookup in (False, True):
            rs = [r for r in records if r["dataset"] == ds and r["lookup"] == lookup]
            if not rs:
                continue
            new, fwd = sum(r["new_tokens"] for r in rs), sum(r["target_forwards"] for r in rs)
            out[f"{ds}/{'lookup' if lookup else 'plain'}"] = {
                "prompts": len(rs), "new_tokens": new, "target_forwards": fwd, "tau": new / fwd,
                "accepted_from_model": sum(r["accepted_from_model"] for r in rs),
                "accepted_from_lookup": sum(r["accepted_from_lookup"] for r in rs),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/lookup_tau.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = load_pair()
    prompts = {ds: load_prompts(ds, limit=args.prompts) for ds, _ in DATASETS}
    records: list[dict] = []
    meta = {
        "command": f"python3 -m treespec.bench.lookup_tau --prompts {args.prompts} --max-new {args.max_new}",
        "pair": "Qwen2.5-Coder-1.5B-Instruct (target) / 0.5B-Instruct (draft), GGUF -> fp32, CPU",
        "tree": TREE, "lookup_config": dataclasses.asdict(treespec.LookupConfig()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads {args.threads}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    for i in range(args.prompts):
        for ds, domain in DATASETS:
            if i >= len(prompts[ds]):
                continue
            ids = encode_prompt(pair.tokenizer, prompts[ds][i])
            outs = {}
            for lookup in (False, True):
                res = treespec.generate(pair.target, pair.draft, ids, max_new_tokens=args.max_new, tree=TREE, lookup=lookup)
                st = res.stats
                outs[lookup] = res.sequences
                records.append({
                    "dataset": ds, "domain": domain, "prompt": prompts[ds][i].id, "lookup": lookup,
                    "prompt_tokens": ids.shape[1], "new_tokens": st.new_tokens, "target_forwards": st.target_forwards,
                    "tau": st.tau, "accepted_from_model": st.accepted_from_model,
                    "accepted_from_lookup": st.accepted_from_lookup, "accepted_lengths": st.accepted_lengths,
                })
                print(f"{ds} {prompts[ds][i].id} lookup={lookup}: {st.new_tokens} tokens, tau {st.tau:.2f} "
                      f"(model {st.accepted_from_model}, lookup {st.accepted_from_lookup})", flush=True)
            same = torch.equal(outs[False], outs[True])
            records[-1]["same_output_as_plain"] = same
            if not same:
                print(f"WARNING: outputs differ on {ds} {prompts[ds][i].id}", flush=True)
            meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            Path(args.out).write_text(json.dumps({"meta": meta, "summary": summarize(records), "records": records}, indent=1))


if __name__ == "__main__":
    main()
