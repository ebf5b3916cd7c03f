"""One interleaved comparison on the GPU, the real pair (Qwen2.5-Coder 0.5B -> 1.5B, bf16): treespec's
methods with and without drafting ahead (overlap), its compiled and graphed autoregressive loop, and
the transformers baselines a GPU user would pick instead.

    python benchmarks/gpu/gpu_prompts.py --out PROMPTS.json --limit 20            # here (tokenizer)
    python benchmarks/gpu/gpu_compare.py --model GGUF_DIR --prompts PROMPTS.json --limit 20 \\
        --new-tokens 128 --hf-prompts 3 --deadline 480 [--out-dir OUT]            # on the GPU machine

The rows are configs, one file each under benchmarks/gpu/methods/ (`MethodRow` below is their
schema: an unknown key or a wrong type fails on loading); --methods picks some by file name.
Prompt by prompt (HumanEval, then MT-Bench), every row runs in turn on the same prompt, so a slow
period of the machine hits all rows alike; speedups are ratios inside this one run. transformers'
baselines (kind: hf) run on the first --hf-prompts prompts of each dataset only (eager generate
costs ~25 ms a token there). Every output is compared with treespec's own autoregressive output
(bf16: a difference is traced to the target's top-2 logit gap at the first differing position).
Sampled rows (temperature > 0) end the run, on the first --sampled-prompts MT-Bench prompts.
Results are written after every prompt to OUT/compare_<datasets>.json, so a run stopped by
--deadline still reports what it measured.

GPU_BENCH_DEVICE=cpu --model tiny-random smoke-tests the logic.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gpu_common import DEVICE, device_info, divergence_margin, first_difference
from omegaconf import OmegaConf

from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.bench.harness import (
    hf_generate, load_models, model_config, out_dir, read_prompts, run_treespec, summarize, write_json,
)  # fmt: skip
from treespec.bench.timing import Wall
from treespec.drafting.ahead import OverlapConfig

METHODS_DIR = Path(__file__).resolve().parent / "methods"
REFERENCE = "autoregressive_graphs"  # every output is compared with this row's; it always runs
BASELINES = ("autoregressive_graphs", "autoregressive_compiled", "hf_static", "hf_generate")  # the speedups' denominators


@dataclass
class MethodRow:
    """One row of the comparison (a file of benchmarks/gpu/methods/).

    kind: 'treespec' = generate(method=, tree=, overlap=, lookup=, temperature=) on the graphed
        backend (compiled: its forwards torch.compile'd); 'hf' = transformers' generate with the
        `hf` settings of treespec.bench.harness.hf_generate (assisted: the draft as assistant_model).
    overlap: an OverlapConfig's fields ({} = its defaults); null = no drafting ahead.
    """

    label: str = "???"
    order: int = 0
    kind: str = "treespec"
    method: str = "tree"
    tree: Any = None
    overlap: Optional[dict] = None
    compiled: bool = False
    lookup: bool = False
    temperature: float = 0.0
    hf: dict = field(default_factory=dict)
    name: str = ""  # the file's name, set on loading


def load_methods(names: list[str] | None = None, directory: Path = METHODS_DIR) -> list[MethodRow]:
    """The rows of `directory` (those named, and the reference), in their `order`."""
    rows = []
    for path in sorted(directory.glob("*.yaml")):
        if names is not None and path.stem not in names and path.stem != REFERENCE:
            continue
        cfg = OmegaConf.merge(OmegaConf.structured(MethodRow), OmegaConf.load(path))
        row = OmegaConf.to_object(cfg)
        row.name = path.stem
        if row.kind not in ("treespec", "hf"):
            raise ValueError(f"{path}: kind must be 'treespec' or 'hf', got {row.kind!r}")
        rows.append(row)
    missing = set(names or ()) - {r.name for r in rows}
    if missing:
        raise ValueError(f"no such rows in {directory}: {sorted(missing)}")
    return sorted(rows, key=lambda r: r.order)


def run_row(row: MethodRow, target, draft, ids, backends, new_tokens: int, eos, seed: int = 0):
    """One generation of one row (harness.Generation)."""
    if row.kind == "hf":
        hf = dict(row.hf)
        assistant = draft if hf.pop("assisted", False) else None
        return hf_generate(target, ids, max_new_tokens=new_tokens, eos_token_id=eos, assistant_model=assistant, **hf)
    overlap = OverlapConfig(**row.overlap) if row.overlap is not None else False
    return run_treespec(target, draft, ids, max_new_tokens=new_tokens, method=row.method, tree=row.tree,
                        attention=backends[row.compiled], eos_token_id=eos, overlap=overlap, lookup=row.lookup,
                        temperature=row.temperature, seed=seed)  # fmt: skip


def report(results: dict, labels: dict, prompts: dict, target) -> dict:
    """Per dataset and row: harness.summarize, ratios against the BASELINES on the same prompts,
    and identity with treespec's autoregressive output."""
    out = {}
    for dname, by_row in results.items():
        ref = by_row.get(REFERENCE, [])
        for name, rows in by_row.items():
            s = summarize(rows)
            n = len(rows)
            for base in BASELINES:
                base_rows = by_row.get(base, [])[:n]
                if base_rows and len(base_rows) == n and name != base:
                    s[f"speedup_vs_{labels[base]}"] = s["tokens_per_second"] / summarize(base_rows)["tokens_per_second"]
            same = [r.tokens == a.tokens for r, a in zip(rows, ref)]
            s["identical_to_autoregressive"] = f"{sum(same)}/{len(same)}"
            s["differences"] = []
            for i, (r, a) in enumerate(zip(rows, ref)):
                j = first_difference(r.tokens, a.tokens)
                if j is not None and len(s["differences"]) < 6 and not labels[name].startswith("T0."):
                    pid, ids = prompts[dname][i]
                    s["differences"].append(dict(prompt=pid, **divergence_margin(target, ids, a.tokens, j)))
            out[f"{dname}|{labels[name]}"] = s
    return out


def run(args) -> None:
    prompts = read_prompts(args.prompts, DEVICE)
    for k in ("humaneval", "mtbench"):
        prompts[k] = prompts[k][: args.limit]
    eos = [] if args.ignore_eos else None  # None: the target's generation config
    print(device_info(), flush=True)
    pair = load_models(model_config(args.model, device=DEVICE, dtype="bfloat16"))
    target, draft = pair.target, pair.draft
    clock = Wall().start()
    longest = max(ids.shape[1] for k in ("humaneval", "mtbench") for _, ids in prompts[k])
    capacity = longest + args.new_tokens + 256
    compiler = "inductor" if DEVICE == "cuda" else "aot_eager"  # CPU smoke runs: no C++ builds
    backends = {c: GraphedBackend(StaticSdpaBackend(), min_capacity=capacity, compile=c, compile_backend=compiler)
                for c in (False, True)}  # fmt: skip
    rows = load_methods(args.methods.split(",") if args.methods else None)
    labels = {r.name: r.label for r in rows}
    greedy = [r for r in rows if r.temperature == 0]
    sampled = [r for r in rows if r.temperature > 0]
    short = prompts["humaneval"][0][1][:, :64]
    warm, ok = {}, []
    for row in greedy:  # warm-up: capture (and compile, calibrate for 'auto') every shape once, untimed
        w = Wall().start()
        try:
            ours = row.kind == "treespec"  # treespec's warm-up runs a fixed length; transformers' stops as it will
            g = run_row(row, target, draft, short, backends, 32 if ours else 16, [] if ours else eos)
        except Exception as err:  # noqa: BLE001  a baseline that fails (a transformers version without it) is reported
            if row.kind != "hf":
                raise
            warm[row.label + " (failed)"] = repr(err)[:300]
            print(f"  {row.label} failed: {err!r}"[:300], flush=True)
            continue
        warm[row.label] = w.stop()
        ok.append(row)
        print(f"  warm-up {row.label:40s} {warm[row.label]:6.1f} s  ({g.tree})", flush=True)
    results: dict[str, dict[str, list]] = {}
    stopped = None
    for dname in args.datasets.split(","):
        for i, (pid, ids) in enumerate(prompts[dname]):
            if clock.stop() > args.deadline:
                stopped = f"deadline reached before {dname} prompt {i}"
                break
            by_row = results.setdefault(dname, {})
            for row in ok:
                if row.kind == "treespec" or i < args.hf_prompts:
                    by_row.setdefault(row.name, []).append(run_row(row, target, draft, ids, backends, args.new_tokens, eos))
            last = {labels[n]: rs[-1] for n, rs in by_row.items() if n in (REFERENCE, ok[-1].name)}
            rates = ", ".join(f"{label} {g.new_tokens / g.seconds:.0f} tok/s" for label, g in last.items())
            print(f"  {dname} {pid}: {rates} ({clock.stop():.0f} s)", flush=True)
            save(results, labels, prompts, target, warm, args, stopped)
    for i, (_, ids) in enumerate(prompts["mtbench"][: args.sampled_prompts] if "mtbench" in args.datasets else []):
        if clock.stop() > args.deadline:
            stopped = stopped or "deadline reached in the sampled rows"
            break
        for row in sampled:
            results.setdefault("mtbench", {}).setdefault(row.name, []).append(
                run_row(row, target, draft, ids, backends, args.new_tokens, eos, seed=i))
    summary = save(results, labels, prompts, target, warm, args, stopped)
    for key, s in summary.items():
        extra = "".join(f"  x{v:.2f} vs {k[11:]}" for k, v in s.items() if k.startswith("speedup_vs_"))
        hit = f"  hit {100 * s['ahead_hit_rate']:.0f}%" if "ahead_hit_rate" in s else ""
        print(f"{key:55s} {s['tokens_per_second']:8.1f} tok/s  tau {s['tau']:.2f}{hit}"
              f"  same {s['identical_to_autoregressive']}{extra}", flush=True)  # fmt: skip
    if stopped:
        print("STOPPED:", stopped)


def save(results, labels, prompts, target, warm, args, stopped) -> dict:
    summary = report(results, labels, prompts, target)
    write_json(args.out_dir / f"compare_{args.datasets.replace(',', '_')}.json",
               dict(args=vars(args), device=device_info(), warmup_s=warm, stopped=stopped, summary=summary,
                    per_prompt={f"{d}|{labels[m]}": [g.as_dict() for g in gens] for d, by in results.items()
                                for m, gens in by.items()}))  # fmt: skip
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu/gpu_compare.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", required=True, help="a folder holding the pair's <name>.gguf files, "
                    "'pretrained' (the cache or PyPI) or 'tiny-random' (a smoke run)")
    ap.add_argument("--prompts", type=Path, required=True, help="written by benchmarks/gpu/gpu_prompts.py")
    ap.add_argument("--out-dir", type=Path, default=out_dir("outputs/gpu"), help="default: $OUT")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--datasets", default="humaneval,mtbench")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-prompts", type=int, default=3)
    ap.add_argument("--sampled-prompts", type=int, default=5)
    ap.add_argument("--methods", default=None, help="file names under benchmarks/gpu/methods/ to run, separated by "
                    "commas (default: all; the autoregressive reference always runs)")
    ap.add_argument("--deadline", type=float, default=480.0, help="seconds after loading; later prompts are skipped")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --new-tokens")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
