"""End to end on the GPU: the real Qwen2.5-Coder 0.5B -> 1.5B pair, greedy, bf16.

    python benchmarks/gpu_e2e.py --gguf-dir /tmp/xfer --prompts .xfer/prompts/prompts.json \
        --sections pair,hf,projection,long [--new-tokens 256] [--hf-prompts 4]

pair        treespec autoregressive (same engine, CUDA graphs), linear and tree methods on every
            HumanEval and MT-Bench prompt of the prompts file: tokens/s, tau, and whether each
            output is identical to the engine's own autoregressive output (bf16)
hf          transformers' generate and generate(assistant_model=draft) on the first --hf-prompts
            prompts of each dataset (they run at tens of ms per token, eager), with the treespec
            methods' numbers on the same prompts for the ratios
projection  a random-weight Qwen2.5-7B-shaped target with the real 0.5B draft: step time per
            method, and tokens/s projected with the real pair's measured tau
long        the 8k-token prompt of the prompts file: tree and autoregressive decoding with the
            flash and sdpa backends (graphs), target verification time per step

The prompts file holds token ids (chat template applied), made where the tokenizer is; the
models are loaded from the GGUF files once and cached as bf16 torch files under /tmp/models so
that later calls on the same machine skip the dequantization. Results: $OUT/e2e_<section>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from treespec.bench.gpu_common import DEVICE, TimedBackend, device_info, hf_generate, random_qwen, save_json, sync

import treespec
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FlashBackend, flash_available, reference_prefix_attention
from treespec.backends.static_cache import StaticSdpaBackend

MODELS = {"target": "qwen2.5-coder-1.5b-instruct", "draft": "qwen2.5-coder-0.5b-instruct"}
METHODS = [  # (label, method, tree)
    ("autoregressive", "autoregressive", None),
    ("linear chain-2", "linear", "chain-2"),
    ("linear chain-4", "linear", "chain-4"),
    ("tree [3,1]", "tree", [3, 1]),
    ("tree [4,2,2,1]", "tree", [4, 2, 2, 1]),
]
LONG_METHODS = [METHODS[0], METHODS[-1]]


# --------------------------------------------------------------------------- loading
def load(role: str, gguf_dir: Path) -> torch.nn.Module:
    """bf16 model on CUDA; dequantized from GGUF once, then cached as a torch file in /tmp."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if DEVICE != "cuda":  # CPU smoke run of the script's logic
        return random_qwen("tiny", seed=0 if role == "target" else 1)
    cached = Path("/tmp/models") / f"{role}.pt"
    t0 = time.perf_counter()
    if cached.exists():
        blob = torch.load(cached, weights_only=False)
        config = Qwen2Config.from_dict(blob["config"])
        config._attn_implementation = "sdpa"
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(blob["state"])
        how = "torch cache"
    else:
        from treespec.loading.models import load_model

        model = load_model(str(gguf_dir / f"{MODELS[role]}.gguf"), dtype=torch.bfloat16, device=DEVICE, cache_converted=False)
        cached.parent.mkdir(exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        torch.save({"config": config, "state": {k: v.cpu() for k, v in model.state_dict().items()}}, cached)
        how = "GGUF"
    model.eval()
    print(f"loaded {role} from {how} in {time.perf_counter() - t0:.1f} s", flush=True)
    return model


def graphed(name: str, capacity: int) -> GraphedBackend:
    if name == "sdpa":
        inner = StaticSdpaBackend()
    else:  # the dense stand-in for flash-attn in CPU smoke runs
        inner = FlashBackend() if DEVICE == "cuda" else FlashBackend(prefix_attention=reference_prefix_attention)
    return GraphedBackend(inner, min_capacity=capacity)


def best_backend() -> str:
    return "flash" if flash_available() else "sdpa"


# --------------------------------------------------------------------------- one generation
def run_ours(target, draft, ids, method, tree, backend, new_tokens, eos):
    prompt = torch.tensor([ids], device=DEVICE)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = treespec.generate(target, None if method == "autoregressive" else draft, prompt, max_new_tokens=new_tokens,
                                method=method, tree=tree, attention=backend, eos_token_id=eos)  # fmt: skip
    sync()
    seconds = time.perf_counter() - t0
    s = out.stats
    return dict(tokens=out.sequences[0, len(ids):].tolist(), seconds=seconds, new=s.new_tokens, forwards=s.target_forwards,
                tau=s.tau, time_prefill=s.time_prefill)  # fmt: skip


def run_hf(target, draft, ids, new_tokens, eos, assisted: bool):
    return hf_generate(target, ids, new_tokens, eos, **({"assistant_model": draft} if assisted else {}))


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def divergence_margin(target, ids, ref_tokens, i) -> dict:
    """At the first position where two outputs differ: the target's top-2 logits there (bf16,
    one plain forward over the common prefix). A gap of about one bf16 step is a tie."""
    seq = torch.tensor([ids + ref_tokens[:i]], device=DEVICE)
    with torch.no_grad():
        logits = target(seq, logits_to_keep=1).logits[0, -1].float()
    top = logits.topk(2)
    return dict(position=i, top2=top.indices.tolist(), gap=(top.values[0] - top.values[1]).item(), top1=top.values[0].item())


def summarize(rows: list[dict]) -> dict:
    new = sum(r["new"] for r in rows)
    sec = sum(r["seconds"] for r in rows)
    return dict(prompts=len(rows), new_tokens=new, seconds=sec, tokens_per_s=new / sec if sec else 0.0,
                tau=new / max(sum(r["forwards"] for r in rows), 1),
                tau_mean=statistics.mean(r["tau"] for r in rows))  # fmt: skip


# --------------------------------------------------------------------------- sections
def section_pair(target, draft, prompts, args) -> dict:
    eos = prompts["eos"]
    sets = {k: prompts[k] for k in ("humaneval", "mtbench")}
    longest = max(len(p["ids"]) for v in sets.values() for p in v)
    backend = graphed(best_backend(), longest + args.new_tokens + 160)
    # warm-up: capture every shape of every method once, on a short prompt
    for _, method, tree in METHODS:
        run_ours(target, draft, sets["humaneval"][0]["ids"][:64], method, tree, backend, 32, [])
    print(f"warm-up: {backend.stats.captures} graphs captured in {backend.stats.capture_seconds:.1f} s", flush=True)
    results = {}
    for dname, plist in sets.items():
        for label, method, tree in METHODS:
            results[(dname, label)] = [run_ours(target, draft, p["ids"], method, tree, backend, args.new_tokens, eos) for p in plist]
        ar = results[(dname, "autoregressive")]
        for label, *_ in METHODS:
            rows = results[(dname, label)]
            s = summarize(rows)
            same = [r["tokens"] == a["tokens"] for r, a in zip(rows, ar)]
            s["identical_to_autoregressive"] = sum(same) / len(same)
            s["differences"] = [
                dict(prompt=plist[i]["id"], **divergence_margin(target, plist[i]["ids"], ar[i]["tokens"],
                                                                 first_difference(rows[i]["tokens"], ar[i]["tokens"])))
                for i in range(len(rows)) if not same[i] and first_difference(rows[i]["tokens"], ar[i]["tokens"]) is not None
            ][:8]  # fmt: skip
            s["speedup_vs_autoregressive"] = s["tokens_per_s"] / summarize(ar)["tokens_per_s"]
            results[(dname, label, "summary")] = s
            print(f"  {dname:9s} {label:20s} {s['tokens_per_s']:8.1f} tok/s  tau {s['tau']:.2f}  x{s['speedup_vs_autoregressive']:.2f} "
                  f"vs AR  identical {100 * s['identical_to_autoregressive']:.0f}%", flush=True)  # fmt: skip
    out = dict(backend=backend.name, graphs=dict(captures=backend.stats.captures, capture_s=backend.stats.capture_seconds),
               summary={f"{k[0]}|{k[1]}": v for k, v in results.items() if len(k) == 3},
               per_prompt={f"{k[0]}|{k[1]}": [{kk: vv for kk, vv in r.items() if kk != "tokens"} for r in v]
                           for k, v in results.items() if len(k) == 2},
               tokens={f"{k[0]}|{k[1]}": [r["tokens"] for r in v] for k, v in results.items() if len(k) == 2})  # fmt: skip
    save_json("e2e_pair.json", out)
    return out


def section_hf(target, draft, prompts, args) -> dict:
    eos = prompts["eos"]
    backend = graphed(best_backend(), 1024)
    out = {}
    # warm-up (HF's first generate pays one-off costs too)
    run_hf(target, draft, prompts["humaneval"][0]["ids"], 8, eos, False)
    run_hf(target, draft, prompts["humaneval"][0]["ids"], 8, eos, True)
    for _, method, tree in METHODS:
        run_ours(target, draft, prompts["humaneval"][0]["ids"][:64], method, tree, backend, 32, [])
    for dname in ("humaneval", "mtbench"):
        plist = prompts[dname][: args.hf_prompts]
        rows = {
            "hf generate": [run_hf(target, draft, p["ids"], args.new_tokens, eos, False) for p in plist],
            "hf generate(assistant_model)": [run_hf(target, draft, p["ids"], args.new_tokens, eos, True) for p in plist],
        }
        for label, method, tree in METHODS:
            rows[label] = [run_ours(target, draft, p["ids"], method, tree, backend, args.new_tokens, eos) for p in plist]
        base = summarize(rows["hf generate"])["tokens_per_s"]
        for label, r in rows.items():
            s = summarize(r)
            s["speedup_vs_hf_generate"] = s["tokens_per_s"] / base
            s["identical_to_hf_generate"] = sum(a["tokens"] == b["tokens"] for a, b in zip(r, rows["hf generate"])) / len(r)
            out[f"{dname}|{label}"] = s
            print(f"  {dname:9s} {label:30s} {s['tokens_per_s']:8.1f} tok/s  tau {s['tau']:.2f}  x{s['speedup_vs_hf_generate']:.2f} vs HF "
                  f"identical to HF {100 * s['identical_to_hf_generate']:.0f}%", flush=True)  # fmt: skip
    save_json("e2e_hf.json", out)
    return out


def section_projection(draft, pair: dict | None, args) -> dict:
    """7B-shaped random target, real 0.5B draft: per-step time; tokens/s projected with tau."""
    target = random_qwen("7b" if DEVICE == "cuda" else "tiny", seed=7)
    backend = graphed(best_backend(), 1024)
    prompt = torch.randint(2, 150000, (1, 160), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0))
    out = {}
    for label, method, tree in METHODS:
        kwargs = dict(max_new_tokens=args.projection_steps, method=method, tree=tree, attention=backend, eos_token_id=[])
        d = None if method == "autoregressive" else draft
        with torch.no_grad():
            treespec.generate(target, d, prompt, **kwargs)  # warm-up / capture
            marks = []
            for _ in treespec.stream(target, d, prompt, **kwargs):
                marks.append(time.perf_counter())
        # from the end of the first step to the end of the last (prefill excluded)
        step_ms = (marks[-1] - marks[0]) * 1e3 / (len(marks) - 1) if len(marks) > 1 else float("nan")
        row = dict(step_ms=step_ms)
        for dname in ("humaneval", "mtbench"):
            tau = 1.0 if method == "autoregressive" else (pair or {}).get("summary", {}).get(f"{dname}|{label}", {}).get("tau")
            row[f"{dname}_tau"] = tau
            row[f"{dname}_projected_tokens_per_s"] = tau * 1e3 / step_ms if tau else None
        out[label] = row
        print(f"  7B-shaped {label:20s} step {step_ms:7.3f} ms  projected tok/s: "
              f"humaneval {row['humaneval_projected_tokens_per_s'] or float('nan'):7.1f}  mtbench {row['mtbench_projected_tokens_per_s'] or float('nan'):7.1f}",
              flush=True)  # fmt: skip
    backend.reset()
    # transformers' generate with the 7B-shaped target: its speed does not depend on the weights
    target.generation_config.eos_token_id = None
    r = run_hf(target, draft, prompt[0].tolist(), args.projection_steps, [151645], False)
    out["hf generate"] = dict(tokens_per_s=r["new"] / r["seconds"], measured=True)
    print(f"  7B-shaped hf generate: {out['hf generate']['tokens_per_s']:.1f} tok/s (measured)", flush=True)
    save_json("e2e_projection.json", out)
    del target
    torch.cuda.empty_cache()
    return out


def section_long(target, draft, prompts, args) -> dict:
    ids = prompts["long"][0]["ids"]
    out = {}
    for bname in (["flash", "sdpa"] if flash_available() or DEVICE != "cuda" else ["sdpa"]):
        backend = graphed(bname, len(ids) + args.long_tokens + 160)
        for label, method, tree in LONG_METHODS:
            timed = TimedBackend(backend)
            prompt = torch.tensor([ids], device=DEVICE)
            kwargs = dict(max_new_tokens=args.long_tokens, method=method, tree=tree, attention=timed, eos_token_id=[])
            d = None if method == "autoregressive" else draft
            with torch.no_grad():
                treespec.generate(target, d, prompt[:, :600], **dict(kwargs, max_new_tokens=16))  # capture
                timed.events.clear()
                timed.models.clear()
                sync()
                t0 = time.perf_counter()
                res = treespec.generate(target, d, prompt, **kwargs)
                sync()
            s = res.stats
            decode_s = time.perf_counter() - t0 - s.time_prefill
            verify_ms = timed.forward_ms_of(target, skip=s.prefill_forwards) / s.target_forwards
            row = dict(prompt_tokens=len(ids), new=s.new_tokens, tau=s.tau, prefill_s=s.time_prefill,
                       decode_tokens_per_s=s.new_tokens / decode_s, verify_device_ms_per_step=verify_ms,
                       tokens=res.sequences[0, len(ids):].tolist())  # fmt: skip
            out[f"{bname}|{label}"] = row
            print(f"  long {len(ids)} tokens {bname:5s} {label:16s} decode {row['decode_tokens_per_s']:7.1f} tok/s  tau {s.tau:.2f} "
                  f"verify {verify_ms:6.3f} ms/step (device)  prefill {s.time_prefill:.2f} s", flush=True)  # fmt: skip
        backend.reset()
    if "flash|autoregressive" in out and "sdpa|autoregressive" in out:
        out["identical_flash_vs_sdpa"] = {
            lbl: out[f"flash|{lbl}"]["tokens"] == out[f"sdpa|{lbl}"]["tokens"] for lbl, *_ in LONG_METHODS
        }
    save_json("e2e_long.json", out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf-dir", type=Path, default=Path("/tmp/xfer"))
    parser.add_argument("--prompts", type=Path, default=Path(".xfer/prompts/prompts.json"))
    parser.add_argument("--sections", default="pair,hf,projection,long")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hf-prompts", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="prompts per dataset (0 = all in the file)")
    parser.add_argument("--projection-steps", type=int, default=48)
    parser.add_argument("--long-tokens", type=int, default=128)
    args = parser.parse_args()
    prompts = json.loads(args.prompts.read_text())
    if args.limit:
        for k in ("humaneval", "mtbench"):
            prompts[k] = prompts[k][: args.limit]
    print(device_info(), flush=True)
    target, draft = load("target", args.gguf_dir), load("draft", args.gguf_dir)
    pair = None
    previous = Path("/tmp/models/e2e_pair.json")
    previous.parent.mkdir(exist_ok=True)  # an earlier call's pair results, for the projection
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        try:
            if section == "pair":
                pair = section_pair(target, draft, prompts, args)
                previous.write_text(json.dumps({"summary": pair["summary"]}))
            elif section == "hf":
                section_hf(target, draft, prompts, args)
            elif section == "projection":
                if pair is None and previous.exists():
                    pair = json.loads(previous.read_text())
                section_projection(draft, pair, args)
            elif section == "long":
                section_long(target, draft, prompts, args)
        except Exception as err:
            import traceback

            traceback.print_exc()
            save_json(f"e2e_{section}_error.json", dict(error=repr(err)))
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
