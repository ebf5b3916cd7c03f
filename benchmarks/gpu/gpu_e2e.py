"""End to end on the GPU: the real Qwen2.5-Coder 0.5B -> 1.5B pair, greedy, bf16.

    python benchmarks/gpu/gpu_e2e.py --model GGUF_DIR --prompts PROMPTS.json \\
        --sections pair,hf,projection,long [--new-tokens 256] [--hf-prompts 4] [--out-dir OUT]

pair        treespec autoregressive (same engine, CUDA graphs), linear and tree methods on every
            HumanEval and MT-Bench prompt of the prompts file: tokens/s, tau, and whether each
            output is identical to the engine's own autoregressive output (bf16)
hf          transformers' generate and generate(assistant_model=draft) on the first --hf-prompts
            prompts of each dataset (they run at tens of ms per token, eager), with the treespec
            methods' numbers on the same prompts for the ratios
projection  a random-weight Qwen2.5-7B-shaped target with the real 0.5B draft: step time per
            method, and tokens/s projected with the real pair's measured tau
long        the long prompt of the prompts file: tree and autoregressive decoding with the
            flash and sdpa backends (graphs), target verification time per step

The prompts file holds token ids (benchmarks/gpu/gpu_prompts.py, made where the tokenizer is);
GGUF_DIR holds the pair's .gguf files (treespec.bench.harness.model_config). Results:
OUT/e2e_<section>.json. GPU_BENCH_DEVICE=cpu --model tiny-random smoke-tests the logic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gpu_common import DEVICE, TimedBackend, device_info, divergence_margin, first_difference, random_qwen

import treespec
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FlashBackend, flash_available, reference_prefix_attention
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.bench.harness import (
    hf_generate, load_models, model_config, out_dir, read_prompts, run_treespec, summarize, write_json,
)  # fmt: skip
from treespec.bench.timing import Wall

METHODS = [  # (label, method, tree)
    ("autoregressive", "autoregressive", None),
    ("linear chain-2", "linear", "chain-2"),
    ("linear chain-4", "linear", "chain-4"),
    ("tree [3,1]", "tree", [3, 1]),
    ("tree [4,2,2,1]", "tree", [4, 2, 2, 1]),
]
LONG_METHODS = [METHODS[0], METHODS[-1]]


def graphed(name: str, capacity: int) -> GraphedBackend:
    if name == "sdpa":
        inner = StaticSdpaBackend()
    else:  # the dense stand-in for flash-attn in CPU smoke runs
        inner = FlashBackend() if DEVICE == "cuda" else FlashBackend(prefix_attention=reference_prefix_attention)
    return GraphedBackend(inner, min_capacity=capacity)


def best_backend() -> str:
    return "flash" if flash_available() else "sdpa"


def ours(target, draft, ids, method, tree, backend, new_tokens, eos):
    return run_treespec(target, draft, ids, max_new_tokens=new_tokens, method=method, tree=tree, attention=backend,
                        eos_token_id=eos)  # fmt: skip


def differences(target, plist, rows, ref) -> list[dict]:
    """Where each output first differs from the reference's, with the target's top-2 gap there."""
    out = []
    for (pid, ids), r, a in zip(plist, rows, ref):
        i = first_difference(r.tokens, a.tokens)
        if i is not None and len(out) < 8:
            out.append(dict(prompt=pid, **divergence_margin(target, ids, a.tokens, i)))
    return out


# --------------------------------------------------------------------------- sections
def section_pair(target, draft, prompts, args) -> dict:
    sets = {k: prompts[k] for k in ("humaneval", "mtbench")}
    longest = max(ids.shape[1] for v in sets.values() for _, ids in v)
    backend = graphed(best_backend(), longest + args.new_tokens + 160)
    short = sets["humaneval"][0][1][:, :64]
    for _, method, tree in METHODS:  # warm-up: capture every shape of every method once
        ours(target, draft, short, method, tree, backend, 32, [])
    print(f"warm-up: {backend.stats.captures} graphs captured in {backend.stats.capture_seconds:.1f} s", flush=True)
    results, summary = {}, {}
    for dname, plist in sets.items():
        for label, method, tree in METHODS:
            results[(dname, label)] = [ours(target, draft, ids, method, tree, backend, args.new_tokens, args.eos) for _, ids in plist]
        ar = results[(dname, "autoregressive")]
        for label, *_ in METHODS:
            rows = results[(dname, label)]
            s = summarize(rows)
            s["identical_to_autoregressive"] = sum(r.tokens == a.tokens for r, a in zip(rows, ar)) / len(rows)
            s["differences"] = differences(target, plist, rows, ar)
            s["speedup_vs_autoregressive"] = s["tokens_per_second"] / summarize(ar)["tokens_per_second"]
            summary[f"{dname}|{label}"] = s
            print(f"  {dname:9s} {label:20s} {s['tokens_per_second']:8.1f} tok/s  tau {s['tau']:.2f}  "
                  f"x{s['speedup_vs_autoregressive']:.2f} vs AR  identical {100 * s['identical_to_autoregressive']:.0f}%",
                  flush=True)  # fmt: skip
    out = dict(backend=backend.name, graphs=dict(captures=backend.stats.captures, capture_s=backend.stats.capture_seconds),
               summary=summary, per_prompt={f"{d}|{m}": [g.as_dict() for g in v] for (d, m), v in results.items()},
               tokens={f"{d}|{m}": [g.tokens for g in v] for (d, m), v in results.items()})  # fmt: skip
    write_json(args.out_dir / "e2e_pair.json", out)
    return out


def section_hf(target, draft, prompts, args) -> dict:
    backend = graphed(best_backend(), 1024)
    out = {}
    short = prompts["humaneval"][0][1]
    hf_generate(target, short, max_new_tokens=8)  # warm-up (HF's first generate pays one-off costs too)
    hf_generate(target, short, max_new_tokens=8, assistant_model=draft)
    for _, method, tree in METHODS:
        ours(target, draft, short[:, :64], method, tree, backend, 32, [])
    for dname in ("humaneval", "mtbench"):
        plist = prompts[dname][: args.hf_prompts]
        rows = {
            "hf generate": [hf_generate(target, ids, max_new_tokens=args.new_tokens, eos_token_id=args.eos) for _, ids in plist],
            "hf generate(assistant_model)": [hf_generate(target, ids, max_new_tokens=args.new_tokens, eos_token_id=args.eos,
                                                         assistant_model=draft) for _, ids in plist],
        }  # fmt: skip
        for label, method, tree in METHODS:
            rows[label] = [ours(target, draft, ids, method, tree, backend, args.new_tokens, args.eos) for _, ids in plist]
        base = summarize(rows["hf generate"])["tokens_per_second"]
        for label, r in rows.items():
            s = summarize(r)
            s["speedup_vs_hf_generate"] = s["tokens_per_second"] / base
            s["identical_to_hf_generate"] = sum(a.tokens == b.tokens for a, b in zip(r, rows["hf generate"])) / len(r)
            out[f"{dname}|{label}"] = s
            print(f"  {dname:9s} {label:30s} {s['tokens_per_second']:8.1f} tok/s  tau {s['tau']:.2f}  "
                  f"x{s['speedup_vs_hf_generate']:.2f} vs HF identical to HF {100 * s['identical_to_hf_generate']:.0f}%",
                  flush=True)  # fmt: skip
    write_json(args.out_dir / "e2e_hf.json", out)
    return out


def section_projection(draft, pair: dict | None, args) -> dict:
    """7B-shaped random target, real 0.5B draft: per-step time; tokens/s projected with tau."""
    target = random_qwen("7b" if DEVICE == "cuda" else "tiny", seed=7, dtype=draft.dtype, vocab_size=draft.config.vocab_size)
    backend = graphed(best_backend(), 1024)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    prompt = torch.randint(2, draft.config.vocab_size, (1, 160), device=DEVICE, generator=gen)
    out = {}
    for label, method, tree in METHODS:
        kwargs = dict(max_new_tokens=args.projection_steps, method=method, tree=tree, attention=backend, eos_token_id=[])
        d = None if method == "autoregressive" else draft
        with torch.no_grad():
            treespec.generate(target, d, prompt, **kwargs)  # warm-up / capture
            clock, marks = Wall(DEVICE).start(), []
            for _ in treespec.stream(target, d, prompt, **kwargs):
                marks.append(clock.stop())
        # from the end of the first step to the end of the last (prefill excluded)
        step_ms = (marks[-1] - marks[0]) * 1e3 / (len(marks) - 1) if len(marks) > 1 else float("nan")
        row = dict(step_ms=step_ms)
        for dname in ("humaneval", "mtbench"):
            tau = 1.0 if method == "autoregressive" else (pair or {}).get("summary", {}).get(f"{dname}|{label}", {}).get("tau")
            row[f"{dname}_tau"] = tau
            row[f"{dname}_projected_tokens_per_s"] = tau * 1e3 / step_ms if tau else None
        out[label] = row
        print(f"  7B-shaped {label:20s} step {step_ms:7.3f} ms  projected tok/s: "
              f"humaneval {row['humaneval_projected_tokens_per_s'] or float('nan'):7.1f}  "
              f"mtbench {row['mtbench_projected_tokens_per_s'] or float('nan'):7.1f}", flush=True)  # fmt: skip
    backend.reset()
    # transformers' generate with the 7B-shaped target: its speed does not depend on the weights
    r = hf_generate(target, prompt, max_new_tokens=args.projection_steps, ignore_eos=True)
    out["hf generate"] = dict(tokens_per_s=r.new_tokens / r.seconds, measured=True)
    print(f"  7B-shaped hf generate: {out['hf generate']['tokens_per_s']:.1f} tok/s (measured)", flush=True)
    write_json(args.out_dir / "e2e_projection.json", out)
    del target
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def section_long(target, draft, prompts, args) -> dict:
    ids = prompts["long"][0][1]
    out = {}
    for bname in (["flash", "sdpa"] if flash_available() or DEVICE != "cuda" else ["sdpa"]):
        backend = graphed(bname, ids.shape[1] + args.long_tokens + 160)
        for label, method, tree in LONG_METHODS:
            timed = TimedBackend(backend)
            kwargs = dict(max_new_tokens=args.long_tokens, method=method, tree=tree, attention=timed, eos_token_id=[])
            d = None if method == "autoregressive" else draft
            with torch.no_grad():
                treespec.generate(target, d, ids[:, :600], **dict(kwargs, max_new_tokens=16))  # capture
            timed.clear()
            g = run_treespec(target, d, ids, **kwargs)
            decode_s = g.seconds - g.time_prefill
            verify_ms = timed.forward_ms_of(target, skip=g.prefill_forwards) / g.target_forwards
            row = dict(prompt_tokens=ids.shape[1], new=g.new_tokens, tau=g.new_tokens / g.target_forwards,
                       prefill_s=g.time_prefill, decode_tokens_per_s=g.new_tokens / decode_s,
                       verify_device_ms_per_step=verify_ms, tokens=g.tokens)  # fmt: skip
            out[f"{bname}|{label}"] = row
            print(f"  long {ids.shape[1]} tokens {bname:5s} {label:16s} decode {row['decode_tokens_per_s']:7.1f} tok/s  "
                  f"tau {row['tau']:.2f} verify {verify_ms:6.3f} ms/step (device)  prefill {g.time_prefill:.2f} s",
                  flush=True)  # fmt: skip
        backend.reset()
    if "flash|autoregressive" in out and "sdpa|autoregressive" in out:
        out["identical_flash_vs_sdpa"] = {
            lbl: out[f"flash|{lbl}"]["tokens"] == out[f"sdpa|{lbl}"]["tokens"] for lbl, *_ in LONG_METHODS
        }
    write_json(args.out_dir / "e2e_long.json", out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu/gpu_e2e.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="a folder holding the pair's <name>.gguf files, "
                        "'pretrained' (the cache or PyPI) or 'tiny-random' (a smoke run)")
    parser.add_argument("--prompts", type=Path, required=True, help="written by benchmarks/gpu/gpu_prompts.py")
    parser.add_argument("--out-dir", type=Path, default=out_dir("outputs/gpu"), help="default: $OUT")
    parser.add_argument("--sections", default="pair,hf,projection,long")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hf-prompts", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="prompts per dataset (0 = all in the file)")
    parser.add_argument("--projection-steps", type=int, default=48)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --new-tokens")
    args = parser.parse_args(argv)
    args.eos = [] if args.ignore_eos else None  # None: the target's generation config
    prompts = read_prompts(args.prompts, DEVICE)
    if args.limit:
        for k in ("humaneval", "mtbench"):
            prompts[k] = prompts[k][: args.limit]
    print(device_info(), flush=True)
    with Wall() as w:
        pair = load_models(model_config(args.model, device=DEVICE, dtype="bfloat16"))
    print(f"loaded the {args.model} pair in {w.seconds:.1f} s", flush=True)
    target, draft = pair.target, pair.draft
    pair_results = None
    previous = args.out_dir / "e2e_pair.json"  # an earlier call's pair results, for the projection
    for section in args.sections.split(","):
        clock = Wall().start()
        print(f"== {section}", flush=True)
        try:
            if section == "pair":
                pair_results = section_pair(target, draft, prompts, args)
            elif section == "hf":
                section_hf(target, draft, prompts, args)
            elif section == "projection":
                if pair_results is None and previous.exists():
                    pair_results = json.loads(previous.read_text())
                section_projection(draft, pair_results, args)
            elif section == "long":
                section_long(target, draft, prompts, args)
        except Exception as err:
            import traceback

            traceback.print_exc()
            write_json(args.out_dir / f"e2e_{section}_error.json", dict(error=repr(err)))
        print(f"   ({clock.stop():.0f} s)", flush=True)


if __name__ == "__main__":
    main()
