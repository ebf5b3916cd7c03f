"""One interleaved comparison on the GPU, the real pair (Qwen2.5-Coder 0.5B -> 1.5B, bf16): treespec's
methods with and without drafting ahead (overlap), its compiled and graphed autoregressive loop, and
the transformers baselines a GPU user would pick instead.

    python -m treespec.bench.gpu_compare prompts --out .xfer/prompts/prompts.json   # here (tokenizer)
    python -m treespec.bench.gpu_compare run --prompts .xfer/prompts/prompts.json --limit 20 \
        --new-tokens 128 --hf-prompts 3 --deadline 480                              # on the GPU machine

Prompt by prompt (HumanEval, then MT-Bench), every method runs in turn on the same prompt, so a
slow period of the machine hits all methods alike; speedups are ratios inside this one run.
transformers' baselines (eager `generate`, `generate(cache_implementation="static")` with its own
compilation, `generate(assistant_model=draft)`, `generate(prompt_lookup_num_tokens=10)`) run on the
first --hf-prompts prompts of each dataset only (eager generate costs ~25 ms a token there).
Every output is compared with treespec's own autoregressive output (bf16: a difference is traced
to the target's top-2 logit gap at the first differing position). A temperature-0.7 row (tree with
and without overlap, MT-Bench) ends the run. Results are written after every prompt to
$OUT/compare.json, so a run stopped by --deadline still reports what it measured.

`run` on the CPU (GPU_BENCH_DEVICE=cpu) smoke-tests the logic with tiny random models.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import treespec
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.bench.gpu_common import DEVICE, device_info, hf_generate, save_json, sync
from treespec.bench.gpu_e2e import divergence_margin, first_difference, load
from treespec.drafting.ahead import OverlapConfig

CODE_TREE = [2, 2, 2, 1, 1, 1, 1, 1]  # the H200 cost model's pick for code (benchmarks/results/sweep_summary_h200.md)
TEXT_TREE = [4, 3, 3]  # and for text


@dataclass(frozen=True)
class Method:
    """One of treespec's rows: generate(method=, tree=, overlap=, lookup=) on the graphed backend,
    compiled or not."""

    label: str
    method: str
    tree: object = None
    overlap: OverlapConfig | None = None
    compiled: bool = False
    lookup: bool = False


METHODS = [
    Method("autoregressive (graphs)", "autoregressive"),
    Method("autoregressive (compiled)", "autoregressive", compiled=True),
    Method("linear chain-4", "linear", "chain-4"),
    Method("linear chain-4 + overlap", "linear", "chain-4", OverlapConfig()),
    Method("linear chain-4 + overlap L2", "linear", "chain-4", OverlapConfig(levels=2)),
    Method("tree [4,2,2,1]", "tree", [4, 2, 2, 1]),
    Method("tree [4,2,2,1] + overlap", "tree", [4, 2, 2, 1], OverlapConfig(leaves=2)),
    Method("tree [4,2,2,1] + lookup", "tree", [4, 2, 2, 1], lookup=True),
    Method("tree code-H200", "tree", CODE_TREE),
    Method("tree code-H200 + overlap L2", "tree", CODE_TREE, OverlapConfig(leaves=2, levels=2)),
    Method("tree text-H200", "tree", TEXT_TREE),
    Method("tree text-H200 + overlap", "tree", TEXT_TREE, OverlapConfig(leaves=3)),
    Method("tree auto", "tree", "auto"),  # calibrated on this machine's graphed forwards, then cached
    Method("dynamic tree", "tree", "dynamic"),
    Method("dynamic tree + overlap", "tree", "dynamic", OverlapConfig(leaves=2)),
]
HF = [  # (label, generate kwargs beyond greedy decoding; "draft" is replaced by the draft model)
    ("hf generate", {}),
    ("hf generate static cache", {"cache_implementation": "static"}),
    ("hf generate(assistant_model)", {"assistant_model": "draft"}),
    ("hf generate(prompt_lookup_num_tokens=10)", {"prompt_lookup_num_tokens": 10}),
]
SAMPLED = [Method("T0.7 tree [4,2,2,1]", "tree", [4, 2, 2, 1]),
           Method("T0.7 tree [4,2,2,1] + overlap", "tree", [4, 2, 2, 1], OverlapConfig(leaves=2))]
REFERENCE = METHODS[0].label


def make_prompts(args) -> None:
    """Token ids of the prompts (chat template applied), made where the tokenizer is."""
    from treespec.bench.datasets import encode_prompt, load_prompts
    from treespec.loading.models import DEFAULT_TARGET, load_tokenizer

    tok = load_tokenizer(DEFAULT_TARGET)
    out = {"eos": [151645, 151643]}
    for name in ("humaneval", "mtbench"):
        out[name] = [{"id": p.id, "ids": encode_prompt(tok, p)[0].tolist()} for p in load_prompts(name, limit=args.limit)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))
    print(f"{sum(len(out[k]) for k in ('humaneval', 'mtbench'))} prompts -> {args.out}")


def run_ours(target, draft, ids, m: Method, backend, new_tokens, eos, temperature=0.0, seed=0) -> dict:
    prompt = torch.tensor([ids], device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed) if temperature > 0 else None
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = treespec.generate(target, None if m.method == "autoregressive" else draft, prompt, max_new_tokens=new_tokens,
                                method=m.method, tree=m.tree, attention=backend, eos_token_id=eos, overlap=m.overlap or False,
                                lookup=m.lookup, temperature=temperature, generator=gen)  # fmt: skip
    sync()
    s = out.stats
    return dict(tokens=out.sequences[0, len(ids):].tolist(), seconds=time.perf_counter() - t0, new=s.new_tokens,
                forwards=s.target_forwards, draft_forwards=s.draft_forwards, ahead_steps=s.ahead_steps,
                ahead_hits=s.ahead_hits, draft_forwards_ahead=s.draft_forwards_ahead,
                draft_forwards_saved=s.draft_forwards_saved, time_prefill=s.time_prefill,
                accepted_from_lookup=s.accepted_from_lookup, tree=s.tree)  # fmt: skip


def run_hf(target, draft, ids, kwargs, new_tokens, eos) -> dict:
    row = hf_generate(target, ids, new_tokens, eos, **{k: (draft if v == "draft" else v) for k, v in kwargs.items()})
    return {k: row[k] for k in ("tokens", "seconds", "new")}


def summarize(rows: list[dict]) -> dict:
    new, sec = sum(r["new"] for r in rows), sum(r["seconds"] for r in rows)
    s = dict(prompts=len(rows), new_tokens=new, seconds=sec, tokens_per_s=new / sec if sec else 0.0)
    if rows and "forwards" in rows[0]:
        s["tau"] = new / max(sum(r["forwards"] for r in rows), 1)
        steps = sum(r["ahead_steps"] for r in rows)
        if steps:
            s["ahead_hit_rate"] = sum(r["ahead_hits"] for r in rows) / steps
            s["draft_forwards_per_step_critical"] = sum(r["draft_forwards"] for r in rows) / sum(r["forwards"] for r in rows)
            s["draft_forwards_per_step_beside"] = sum(r["draft_forwards_ahead"] for r in rows) / steps
        if any(r.get("accepted_from_lookup") for r in rows):
            s["share_from_lookup"] = sum(r["accepted_from_lookup"] for r in rows) / new
        s["trees"] = sorted({r["tree"] for r in rows if "tree" in r})
    return s


def report(results: dict, prompts: dict, target) -> dict:
    """Per dataset and method: tokens/s, tau, hit rate, ratios against treespec's compiled and
    graphed autoregressive loops and transformers' static-cache generate on the same prompts,
    and identity with treespec's autoregressive output."""
    out = {}
    for dname, by_method in results.items():
        ref = by_method.get(REFERENCE, [])
        for label, rows in by_method.items():
            s = summarize(rows)
            n = len(rows)
            for base in (REFERENCE, "autoregressive (compiled)", "hf generate static cache", "hf generate"):
                base_rows = by_method.get(base, [])[:n]
                if base_rows and len(base_rows) == n and label != base:
                    s[f"speedup_vs_{base}"] = s["tokens_per_s"] / summarize(base_rows)["tokens_per_s"]
            same = [r["tokens"] == a["tokens"] for r, a in zip(rows, ref)]
            s["identical_to_autoregressive"] = f"{sum(same)}/{len(same)}"
            s["differences"] = []
            for i, (r, a) in enumerate(zip(rows, ref)):
                j = first_difference(r["tokens"], a["tokens"])
                if j is not None and len(s["differences"]) < 6 and not label.startswith("T0.7"):
                    s["differences"].append(dict(prompt=prompts[dname][i]["id"], **divergence_margin(
                        target, prompts[dname][i]["ids"], a["tokens"], j)))  # fmt: skip
            out[f"{dname}|{label}"] = s
    return out


def run(args) -> None:
    prompts = json.loads(Path(args.prompts).read_text())
    for k in ("humaneval", "mtbench"):
        prompts[k] = prompts[k][: args.limit]
    eos = prompts["eos"]
    print(device_info(), flush=True)
    target, draft = load("target", Path(args.gguf_dir)), load("draft", Path(args.gguf_dir))
    t_start = time.perf_counter()
    longest = max(len(p["ids"]) for k in ("humaneval", "mtbench") for p in prompts[k])
    capacity = longest + args.new_tokens + 256
    compiler = "inductor" if DEVICE == "cuda" else "aot_eager"  # CPU smoke runs: no C++ builds
    backends = {c: GraphedBackend(StaticSdpaBackend(), min_capacity=capacity, compile=c, compile_backend=compiler)
                for c in (False, True)}
    short = prompts["humaneval"][0]["ids"][:64]
    methods = [m for m in METHODS if args.methods is None or m.label == REFERENCE or m.label in args.methods.split(";")]
    hf_methods = [h for h in HF if args.methods is None or h[0] in args.methods.split(";")]
    warm = {}
    for m in methods:  # warm-up: capture (and compile, calibrate for 'auto') every shape once, untimed
        t0 = time.perf_counter()
        row = run_ours(target, draft, short, m, backends[m.compiled], 32, [])
        warm[m.label] = time.perf_counter() - t0
        print(f"  warm-up {m.label:32s} {warm[m.label]:6.1f} s  ({row['tree']})", flush=True)
    hf = []
    for label, kwargs in hf_methods:  # a baseline that fails (a transformers version without it) is reported, not fatal
        t0 = time.perf_counter()
        try:
            run_hf(target, draft, short, kwargs, 16, eos)
            hf.append((label, kwargs))
        except Exception as err:  # noqa: BLE001
            warm[label + " (failed)"] = repr(err)[:300]
            print(f"  {label} failed: {err!r}"[:300], flush=True)
            continue
        warm[label] = time.perf_counter() - t0
        print(f"  warm-up {label:32s} {warm[label]:6.1f} s", flush=True)
    results: dict[str, dict[str, list]] = {}
    stopped = None
    for dname in args.datasets.split(","):
        for i, p in enumerate(prompts[dname]):
            if time.perf_counter() - t_start > args.deadline:
                stopped = f"deadline reached before {dname} prompt {i}"
                break
            row = results.setdefault(dname, {})
            for m in methods:
                row.setdefault(m.label, []).append(run_ours(target, draft, p["ids"], m, backends[m.compiled], args.new_tokens, eos))
            if i < args.hf_prompts:
                for label, kwargs in hf:
                    row.setdefault(label, []).append(run_hf(target, draft, p["ids"], kwargs, args.new_tokens, eos))
            last = {label: rows[-1] for label, rows in row.items() if label in (REFERENCE, methods[-1].label)}
            rates = ", ".join(f"{label} {r['new'] / r['seconds']:.0f} tok/s" for label, r in last.items())
            print(f"  {dname} {p['id']}: {rates} ({time.perf_counter() - t_start:.0f} s)", flush=True)
            save(results, prompts, target, warm, args, stopped)
    sampled = prompts["mtbench"][: args.sampled_prompts] if "mtbench" in args.datasets and args.methods is None else []
    for i, p in enumerate(sampled):
        if time.perf_counter() - t_start > args.deadline:
            stopped = stopped or "deadline reached in the temperature-0.7 rows"
            break
        for m in SAMPLED:
            results.setdefault("mtbench", {}).setdefault(m.label, []).append(
                run_ours(target, draft, p["ids"], m, backends[False], args.new_tokens, eos, temperature=0.7, seed=i))
    summary = save(results, prompts, target, warm, args, stopped)
    for key, s in summary.items():
        extra = "".join(f"  x{v:.2f} vs {k[11:]}" for k, v in s.items() if k.startswith("speedup_vs_"))
        hit = f"  hit {100 * s['ahead_hit_rate']:.0f}%" if "ahead_hit_rate" in s else ""
        print(f"{key:55s} {s['tokens_per_s']:8.1f} tok/s  tau {s.get('tau', float('nan')):.2f}{hit}"
              f"  same {s['identical_to_autoregressive']}{extra}", flush=True)
    if stopped:
        print("STOPPED:", stopped)


def save(results, prompts, target, warm, args, stopped) -> dict:
    summary = report(results, prompts, target)
    save_json(f"compare_{args.datasets.replace(',', '_')}.json", dict(args=vars(args), device=device_info(), warmup_s=warm, stopped=stopped, summary=summary,
                                   per_prompt={f"{d}|{m}": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
                                               for d, by in results.items() for m, rows in by.items()}))  # fmt: skip
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--out", default=".xfer/prompts/prompts.json")
    p.add_argument("--limit", type=int, default=20)
    r = sub.add_parser("run")
    r.add_argument("--prompts", default=".xfer/prompts/prompts.json")
    r.add_argument("--gguf-dir", default="/tmp/xfer")
    r.add_argument("--limit", type=int, default=20)
    r.add_argument("--datasets", default="humaneval,mtbench")
    r.add_argument("--new-tokens", type=int, default=256)
    r.add_argument("--hf-prompts", type=int, default=3)
    r.add_argument("--sampled-prompts", type=int, default=5)
    r.add_argument("--methods", default=None, help="labels of METHODS / HF to run, separated by ; (default: all; "
                   "the graphed autoregressive reference always runs; the T0.7 rows only run with all)")
    r.add_argument("--deadline", type=float, default=480.0, help="seconds after loading; later prompts are skipped")
    args = ap.parse_args()
    make_prompts(args) if args.cmd == "prompts" else run(args)


if __name__ == "__main__":
    main()
