"""tau with and without prompt lookup, per dataset, on the real Qwen2.5-Coder 0.5B -> 1.5B pair (CPU, greedy).

Greedy output is the target's own whatever the drafts, so both runs of a prompt emit the same
tokens and tau (tokens per target forward) compares them exactly; wall time is not measured.
Prompts run round-robin over the datasets (prompt i of every dataset before prompt i+1), each
without and then with lookup, and the JSON is rewritten after every prompt, so a run cut short
still covers every dataset alike.

    python3 benchmarks/studies/lookup_tau.py --prompts 5 --max-new 128 --out benchmarks/results/lookup_tau.json
    # the recorded run also had the second repeat set:
    #   --datasets humaneval_edit mtbench_rewrite humaneval mtbench bfcl

The datasets default to the domain presets' (treespec/configs/domain/*.yaml); the tree is [4, 1, 1],
the domain presets' shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

import treespec
from treespec.bench.datasets import encode_prompt, load_prompts
from treespec.bench.harness import domain_datasets, load_models, model_config, run_treespec, summarize, write_json

TREE = [4, 1, 1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/studies/lookup_tau.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default="pretrained", help="'pretrained' (the default pair) or a GGUF folder")
    ap.add_argument("--datasets", nargs="+", default=None, help="default: each domain preset's dataset")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lookup_tau.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    domain_of = {ds: domain for domain, ds in domain_datasets().items()}
    datasets = args.datasets or list(domain_of)
    pair = load_models(model_config(args.model))
    prompts = {ds: load_prompts(ds, limit=args.prompts) for ds in datasets}
    records: list[dict] = []
    meta = {
        "command": f"python3 benchmarks/studies/lookup_tau.py --prompts {args.prompts} --max-new {args.max_new} "
                   f"--datasets {' '.join(datasets)}",
        "pair": f"{args.model} pair, fp32, CPU", "tree": TREE,
        "lookup_config": dataclasses.asdict(treespec.LookupConfig()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads {args.threads}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    runs: dict[str, list] = {}
    for i in range(args.prompts):
        for ds in datasets:
            if i >= len(prompts[ds]):
                continue
            ids = encode_prompt(pair.tokenizer, prompts[ds][i])
            outs = {}
            for lookup in (False, True):
                g = run_treespec(pair.target, pair.draft, ids, max_new_tokens=args.max_new, tree=TREE, lookup=lookup)
                outs[lookup] = g.tokens
                runs.setdefault(f"{ds}/{'lookup' if lookup else 'plain'}", []).append(g)
                records.append({"dataset": ds, "domain": domain_of.get(ds), "prompt": prompts[ds][i].id, "lookup": lookup,
                                **g.as_dict()})  # fmt: skip
                print(f"{ds} {prompts[ds][i].id} lookup={lookup}: {g.new_tokens} tokens, tau "
                      f"{g.new_tokens / g.target_forwards:.2f} (lookup {g.accepted_from_lookup})", flush=True)  # fmt: skip
            records[-1]["same_output_as_plain"] = same = outs[False] == outs[True]
            if not same:
                print(f"WARNING: outputs differ on {ds} {prompts[ds][i].id}", flush=True)
            meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            summary = {key: summarize(gens) for key, gens in runs.items()}
            write_json(args.out, {"meta": meta, "summary": summary, "records": records})


if __name__ == "__main__":
    main()
