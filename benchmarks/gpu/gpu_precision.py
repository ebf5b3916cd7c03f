"""bf16 tree-forward error of each backend against a float32 reference, and transformers'
compiled static-cache generate as a fused-kernel speed reference.

    python benchmarks/gpu/gpu_precision.py [--sections precision,hf_compiled] [--out-dir OUT]

precision    random-weight decoders with real attention shapes (2 layers), prefixes 0/1/1000/8000,
             trees of 1 to 128 nodes: ||logits - ref|| / ||ref|| for flash (static cache), sdpa
             (static cache) and sdpa (TreeKVCache) in bf16, ref = sdpa in float32 on the same weights
hf_compiled  transformers' generate with cache_implementation="static" (auto torch.compile) on a
             random Qwen2.5-1.5B-shaped model: what fused kernels give per token
Results: OUT/precision.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from gpu_common import DEVICE, device_info, random_qwen
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from treespec.backends.flash import FlashBackend, reference_prefix_attention
from treespec.backends.kv_cache import TreeKVCache
from treespec.backends.static_cache import StaticSdpaBackend, StaticTreeKVCache
from treespec.bench.harness import hf_generate, out_dir, write_json
from treespec.bench.timing import Wall
from treespec.tree.topology import TreeTopology

SHAPES = {"qwen2.5-0.5b": ("qwen2", 896, 14, 2), "qwen2.5-1.5b": ("qwen2", 1536, 12, 2),
          "qwen2.5-7b": ("qwen2", 3584, 28, 4), "llama-mha": ("llama", 1024, 8, 8)}  # fmt: skip
TREES = {1: [], 16: [15], 45: [4, 2, 2, 1], 64: [3, 4, 4], 128: [127], "128-deep": [1] * 127}
VOCAB = 2048


def small_model(shape, seed=0):
    arch, hidden, heads, kv = SHAPES[shape]
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = cfg_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=16384,
                     tie_word_embeddings=False)  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = model_cls(config).eval()
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
    return model  # float32


def prefilled(backend, model, cache_cls, prompt):
    cache = cache_cls.for_model(model, prompt.shape[1] + 160)
    t = prompt.shape[1] - 1
    for start in range(0, t, 512):
        c = min(512, t - start)
        causal = torch.ones(c, c, dtype=torch.bool, device=DEVICE).tril()
        backend.forward(model, cache, prompt[:, start : start + c], torch.arange(start, start + c, device=DEVICE)[None], causal, last_only=True)
        cache.commit_all()
    return cache


def section_precision(prefixes) -> list[dict]:
    flash = FlashBackend() if DEVICE == "cuda" else FlashBackend(prefix_attention=reference_prefix_attention)
    sdpa = StaticSdpaBackend()
    rows = []
    for shape in SHAPES:
        ref_model = small_model(shape)
        bf16 = small_model(shape).to(torch.bfloat16)
        bf16.load_state_dict(ref_model.state_dict())  # the fp32 weights rounded to bf16
        ref_model.load_state_dict(bf16.state_dict())  # ... and the reference uses those exact values
        for prefix in prefixes:
            gen = torch.Generator(device=DEVICE).manual_seed(prefix)
            prompt = torch.randint(2, VOCAB, (1, prefix + 1), device=DEVICE, generator=gen)
            drop = torch.zeros(1, dtype=torch.long, device=DEVICE)
            with torch.no_grad():
                setups = {
                    "fp32 reference": (sdpa, ref_model, prefilled(sdpa, ref_model, TreeKVCache, prompt)),
                    "flash bf16 (static cache)": (flash, bf16, prefilled(flash, bf16, StaticTreeKVCache, prompt)),
                    "sdpa bf16 (static cache)": (sdpa, bf16, prefilled(sdpa, bf16, StaticTreeKVCache, prompt)),
                    "sdpa bf16 (TreeKVCache)": (sdpa, bf16, prefilled(sdpa, bf16, TreeKVCache, prompt)),
                }
                errs = {k: [] for k in setups if k != "fp32 reference"}
                agree = {k: [] for k in errs}
                for size, widths in TREES.items():
                    topo = TreeTopology.from_widths(widths)
                    tokens = torch.randint(2, VOCAB, (topo.num_nodes,), device=DEVICE, generator=gen)
                    tokens[0] = prompt[0, -1]
                    pos, anc = (prefix + topo.depth.to(DEVICE))[None], topo.ancestors.to(DEVICE)
                    out = {}
                    for label, (backend, model, cache) in setups.items():
                        out[label] = backend.forward(model, cache, tokens[None], pos, anc).float()
                        cache.commit(drop, 0)
                    ref = out["fp32 reference"]
                    for label in errs:
                        errs[label].append(((out[label] - ref).norm() / ref.norm()).item())
                        agree[label].append((out[label].argmax(-1) == ref.argmax(-1)).float().mean().item())
            for label in errs:
                rows.append(dict(shape=shape, prefix=prefix, backend=label, max_rel_err=max(errs[label]),
                                 median_rel_err=statistics.median(errs[label]), argmax_agreement=min(agree[label])))  # fmt: skip
                r = rows[-1]
                print(f"  {shape:13s} prefix {prefix:5d} {label:26s} rel err median {r['median_rel_err']:.2e} max {r['max_rel_err']:.2e} "
                      f"argmax agreement (worst tree) {100 * r['argmax_agreement']:.1f}%", flush=True)  # fmt: skip
        del ref_model, bf16
    return rows


def section_hf_compiled(new_tokens: int) -> dict:
    model = random_qwen("1.5b" if DEVICE == "cuda" else "tiny", seed=3)
    prompt = torch.randint(2, model.config.vocab_size, (1, 160), device=DEVICE)
    out = {}
    for label, static in (("eager dynamic cache", False), ("static cache + auto compile", True)):
        times = []
        for i in range(3):  # the first call compiles
            g = hf_generate(model, prompt, max_new_tokens=new_tokens, static_cache=static, ignore_eos=True)
            times.append(g.seconds)
        n = g.new_tokens
        out[label] = dict(first_call_s=times[0], tokens_per_s=n / min(times[1:]), ms_per_token=1e3 * min(times[1:]) / n)
        print(f"  hf generate 1.5B-shaped {label:28s} first call {times[0]:6.1f} s, then {out[label]['tokens_per_s']:7.1f} tok/s "
              f"({out[label]['ms_per_token']:.2f} ms/token)", flush=True)  # fmt: skip
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu/gpu_precision.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sections", default="precision,hf_compiled")
    parser.add_argument("--out-dir", type=Path, default=out_dir("outputs/gpu"), help="default: $OUT")
    parser.add_argument("--prefixes", default="0,1,1000,8000")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    results = dict(device=device_info())
    print(results["device"], flush=True)
    for section in args.sections.split(","):
        clock = Wall().start()
        print(f"== {section}", flush=True)
        try:
            if section == "precision":
                results["precision"] = section_precision([int(p) for p in args.prefixes.split(",")])
            elif section == "hf_compiled":
                results["hf_compiled"] = section_hf_compiled(args.new_tokens)
        except Exception as err:
            import traceback

            traceback.print_exc()
            results[f"{section}_error"] = repr(err)
        print(f"   ({clock.stop():.0f} s)", flush=True)
        write_json(args.out_dir / "precision.json", results)


if __name__ == "__main__":
    main()
