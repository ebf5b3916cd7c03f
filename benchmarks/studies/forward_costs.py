"""Measure what one forward of n new tokens costs the target and the draft, through treespec's
own attention backend and KV cache (the forwards the engine makes: verification of an n-node
tree, one draft level of n nodes), after a prompt of `--context` tokens.

    nice -n 10 python benchmarks/studies/forward_costs.py --threads 1 --out benchmarks/results/forward_costs_1thread.json

The minimum over --reps repetitions is kept, of both the wall time and the process CPU time.
On a shared machine the wall time of a multi-threaded forward is at the mercy of the other
processes (a descheduled thread stalls the other at every barrier); the CPU time of a
single-threaded forward (--threads 1) is not, and equals its wall time on an idle core. These
costs feed the cost model of benchmarks/studies/tree_sweep.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path

import torch

from treespec.backends.kv_cache import TreeKVCache
from treespec.backends.sdpa import SdpaBackend
from treespec.bench.harness import load_models, model_config, write_json
from treespec.bench.timing import Wall

SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 24, 32, 48, 64]


def measure(model, sizes, context: int, reps: int, logits: str) -> dict[int, dict]:
    """Round-robin over the sizes, `reps` times, in a shuffled order each round, so that a busy
    period of the machine hits every size alike; keep each size's minimum."""
    backend = SdpaBackend()
    cache = TreeKVCache.for_model(model, context + max(sizes) + 8)
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    prompt = torch.randint(100, min(vocab, 20000), (1, context), generator=gen)
    best = {n: {"wall": float("inf"), "cpu": float("inf"), "cpu_all": []} for n in sizes}
    with torch.no_grad():
        backend.forward(model, cache, prompt, torch.arange(context)[None], torch.ones(context, context, dtype=torch.bool).tril(), last_only=True)
        cache.commit_all()
        for rep in range(reps):
            order = list(sizes)
            rng.shuffle(order)
            for n in order:
                ids = torch.randint(100, min(vocab, 20000), (1, n), generator=gen)
                pos = torch.arange(context, context + n)[None]
                mask = torch.ones(n, n, dtype=torch.bool).tril()
                with Wall() as w:
                    backend.forward(model, cache, ids, pos, mask, last_only=(logits == "last"))
                wall, cpu = w.seconds, w.cpu_seconds
                cache.commit(torch.zeros(n, dtype=torch.long), 0)  # drop the scratch entries
                b = best[n]
                b["wall"], b["cpu"] = min(b["wall"], wall), min(b["cpu"], cpu)
                b["cpu_all"].append(cpu)
            print(f"  round {rep + 1}/{reps}: " + " ".join(f"{n}:{best[n]['cpu'] * 1000:.0f}" for n in sizes) + " (ms cpu, min so far)", flush=True)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/studies/forward_costs.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--draft-sizes", default="1,2,3,4,5,6,8,12,16,24,32")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="pretrained", help="'pretrained' (the default pair), 'tiny-random' or a GGUF folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = load_models(model_config(args.model))
    load_before = os.getloadavg()
    print("target (all logits, as in verification)")
    target = measure(pair.target, [int(s) for s in args.target_sizes.split(",")], args.context, args.reps, "all")
    print("draft (all logits, as in a tree level)")
    draft = measure(pair.draft, [int(s) for s in args.draft_sizes.split(",")], args.context, args.reps, "all")
    doc = {
        "what": "seconds per forward of n new tokens after a context, min over reps (treespec SdpaBackend + TreeKVCache)",
        "context": args.context,
        "reps": args.reps,
        "threads": args.threads,
        "dtype": "float32",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target_wall": {str(k): v["wall"] for k, v in target.items()},
        "draft_wall": {str(k): v["wall"] for k, v in draft.items()},
        "target_cpu": {str(k): v["cpu"] for k, v in target.items()},
        "draft_cpu": {str(k): v["cpu"] for k, v in draft.items()},
        "target_cpu_all_reps": {str(k): v["cpu_all"] for k, v in target.items()},
        "draft_cpu_all_reps": {str(k): v["cpu_all"] for k, v in draft.items()},
    }
    write_json(args.out, doc)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
