"""Step timings of the GPU path on real Qwen2.5 architecture shapes with random weights (bf16).

    python benchmarks/gpu_step_timings.py [--sections forwards,steps,long] [--quick]

forwards  per forward, eager vs CUDA graphs, sdpa vs flash: target verification at tree sizes
          1/16/45/64/128 (1.5B and 7B shapes, 512 cached tokens) and the 0.5B draft's forwards
          (first forward over m pending tokens, and the levels of the [4, 2, 2, 1] tree and a chain)
steps     whole decode steps through treespec.generate: wall time per step, device time inside
          model forwards, and the share of the step that is not model forwards
long      an 8192-token prompt: verification latency, flash vs sdpa (both graphed), and a short
          tree decode end to end

Random weights make the draft useless (acceptance ~0), but every step has the same fixed shapes
whatever is accepted, so step times are those of real decoding; tau comes from the real pair
(benchmarks/gpu_e2e.py). Results: $OUT/step_timings.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpu_common import DEVICE, TimedBackend, VOCAB, device_info, event, random_qwen, save_json, sync

import treespec
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FlashBackend, flash_available, reference_prefix_attention
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.tree.topology import TreeTopology

VERIFY_TREES = {1: [], 16: [15], 45: [4, 2, 2, 1], 64: [3, 4, 4], 128: [127]}


def inner_backend(name: str):
    if name == "sdpa":
        return StaticSdpaBackend()
    # CPU smoke runs use the dense stand-in for flash-attn
    return FlashBackend() if DEVICE == "cuda" else FlashBackend(prefix_attention=reference_prefix_attention)


def backends() -> list[str]:
    return ["sdpa", "flash"] if flash_available() or DEVICE != "cuda" else ["sdpa"]


def prefill(backend, model, cache, tokens: torch.Tensor) -> None:
    t = tokens.shape[1]
    for start in range(0, t, 512):
        c = min(512, t - start)
        causal = torch.ones(c, c, dtype=torch.bool, device=DEVICE).tril()
        pos = torch.arange(start, start + c, device=DEVICE)[None]
        backend.forward(model, cache, tokens[:, start : start + c], pos, causal, last_only=True)
        cache.commit_all()


def time_forward(backend, model, cache, n, s, mask, pos, last_only, iters):
    """Median latency (ms, synced) and device time (ms, events) of one forward of n new tokens
    whose block also sees s - n scratch entries written earlier in the step."""
    ids = torch.randint(2, VOCAB, (1, n), device=DEVICE)
    keep = torch.zeros(1, dtype=torch.long, device=DEVICE)
    wall, dev = [], []
    for i in range(iters + 3):
        if s > n:
            cache.begin_forward(s - n)  # the earlier tree nodes of this step (content irrelevant)
        sync()
        a, b = event(), event()
        t0 = time.perf_counter()
        a.record()
        backend.forward(model, cache, ids, pos, mask, last_only)
        b.record()
        sync()
        if i >= 3:  # the first calls warm up (and, graphed, capture)
            wall.append((time.perf_counter() - t0) * 1e3)
            dev.append(a.elapsed_time(b))
        cache.commit(keep, 0)  # drop the scratch entries
    return statistics.median(wall), statistics.median(dev)


def forward_shapes(prefix: int):
    """(role, label, n, s, last_only, mask (n, s), positions (1, n))."""
    shapes = []
    for size, widths in VERIFY_TREES.items():
        topo = TreeTopology.from_widths(widths)
        pos = (prefix + topo.depth)[None]
        shapes.append(("target", f"verify N={size}", topo.num_nodes, topo.num_nodes, False, topo.ancestors, pos))
    for m in (1, 2):
        shapes.append(("draft", f"draft first m={m}", m, m, True, torch.ones(m, m, dtype=torch.bool).tril(),
                       torch.arange(prefix - m + 1, prefix + 1)[None]))  # fmt: skip
    for widths in ([4, 2, 2, 1], [1, 1, 1, 1]):
        topo = TreeTopology.from_widths(widths)
        for d in range(1, topo.max_depth):
            lvl = topo.level(d)
            mask = topo.ancestors[lvl, 1 : topo.level_starts[d + 1]]
            f = mask.shape[0]
            shapes.append(("draft", f"draft level {d} of {widths} (F={f}, s={mask.shape[1]})", f, mask.shape[1], False,
                           mask, torch.full((1, f), prefix + d)))  # fmt: skip
    return shapes


def section_forwards(models: dict, prefix: int, iters: int) -> list[dict]:
    rows = []
    for target_name in [k for k in models if k != "0.5b"]:
        for role, label, n, s, last_only, mask, pos in forward_shapes(prefix):
            name = target_name if role == "target" else "0.5b"
            if role == "draft" and target_name != next(k for k in models if k != "0.5b"):
                continue  # draft shapes once
            model = models[name]
            for bname in backends():
                inner = inner_backend(bname)
                graphed = GraphedBackend(inner)
                cache = graphed.make_cache(model, prefix + 512)
                with torch.no_grad():
                    prefill(inner, model, cache, torch.randint(2, VOCAB, (1, prefix), device=DEVICE))
                    m, p = mask.to(DEVICE), pos.to(DEVICE)
                    eager_wall, eager_dev = time_forward(inner, model, cache, n, s, m, p, last_only, max(5, iters // 5))
                    graph_wall, graph_dev = time_forward(graphed, model, cache, n, s, m, p, last_only, iters)
                rows.append(dict(model=name, forward=label, backend=bname, n=n, s=s, prefix=prefix,
                                 eager_ms=eager_wall, eager_device_ms=eager_dev, graph_ms=graph_wall,
                                 graph_device_ms=graph_dev, capture_s=graphed.stats.capture_seconds))  # fmt: skip
                r = rows[-1]
                print(f"  {name:5s} {label:46s} {bname:5s} eager {r['eager_ms']:7.2f} ms | graph {r['graph_ms']:6.3f} ms "
                      f"(device {r['graph_device_ms']:6.3f})", flush=True)  # fmt: skip
                del cache, graphed
    return rows


def step_breakdown(target, draft, method, tree, backend, prompt_len: int, new_tokens: int) -> dict:
    """Decode with `backend`; per step: wall time, device time inside forwards, forwards."""
    timed = TimedBackend(backend)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    prompt = torch.randint(2, VOCAB, (1, prompt_len), device=DEVICE, generator=gen)
    kwargs = dict(max_new_tokens=new_tokens, method=method, tree=tree, attention=timed, eos_token_id=[])
    d = None if method == "autoregressive" else draft
    with torch.no_grad():
        treespec.generate(target, d, prompt, **kwargs)  # warm-up: captures every shape once
        timed.events.clear()
        marks = []
        token_stream = treespec.stream(target, d, prompt, **kwargs)
        for _ in token_stream:
            marks.append((time.perf_counter(), len(timed.events)))
    stats = token_stream.result.stats
    steps = len(marks) - 1  # from the end of step 1 (prefill excluded) to the end of the last
    wall = (marks[-1][0] - marks[0][0]) * 1e3
    fwd = timed.forward_ms(marks[0][1]) if steps else 0.0
    forwards = (marks[-1][1] - marks[0][1]) / max(steps, 1)
    return dict(method=method, tree=stats.tree, backend=stats.backend, steps=steps, step_ms=wall / max(steps, 1),
                forward_device_ms=fwd / max(steps, 1), forwards_per_step=forwards,
                non_forward_share=1 - fwd / wall if wall else 0.0, tau=stats.tau)  # fmt: skip


METHODS = [("autoregressive", None), ("linear", "chain-4"), ("tree", [4, 2, 2, 1]), ("tree", [8, 2, 1])]


def section_steps(models: dict, prompt_len: int, new_tokens: int) -> list[dict]:
    rows = []
    draft = models["0.5b"]
    for target_name in [k for k in models if k != "0.5b"]:
        target = models[target_name]
        for bname in backends():
            backend = GraphedBackend(inner_backend(bname), min_capacity=prompt_len + new_tokens + 160)
            for method, tree in METHODS:
                r = step_breakdown(target, draft, method, tree, backend, prompt_len, new_tokens)
                r.update(target=target_name, graphs=True)
                rows.append(r)
                print(f"  {target_name:4s} {bname:5s} graphs {method:14s} {r['tree']:22s} step {r['step_ms']:7.3f} ms, "
                      f"forwards {r['forward_device_ms']:7.3f} ms device ({r['forwards_per_step']:.0f}/step), "
                      f"not forwards {100 * r['non_forward_share']:5.1f}%", flush=True)  # fmt: skip
            backend.reset()
            for method, tree in METHODS[:3]:  # eager reference: few steps, it is slow
                r = step_breakdown(target, draft, method, tree, inner_backend(bname), prompt_len, 12)
                r.update(target=target_name, graphs=False)
                rows.append(r)
                print(f"  {target_name:4s} {bname:5s} eager  {method:14s} {r['tree']:22s} step {r['step_ms']:7.3f} ms, "
                      f"forwards {r['forward_device_ms']:7.3f} ms device, not forwards {100 * r['non_forward_share']:5.1f}%",
                      flush=True)  # fmt: skip
    return rows


def section_long(models: dict, prompt_len: int, iters: int) -> list[dict]:
    rows = []
    for name in [k for k in models if k != "0.5b"]:
        model = models[name]
        ctx = torch.randint(2, VOCAB, (1, prompt_len), device=DEVICE)
        for bname in backends():
            graphed = GraphedBackend(inner_backend(bname))
            cache = graphed.make_cache(model, prompt_len + 256)
            with torch.no_grad():
                t0 = time.perf_counter()
                prefill(graphed.inner, model, cache, ctx)
                sync()
                prefill_s = time.perf_counter() - t0
                for size in (1, 16, 64, 128):
                    topo = TreeTopology.from_widths(VERIFY_TREES[size])
                    pos = (prompt_len + topo.depth)[None].to(DEVICE)
                    wall, dev = time_forward(graphed, model, cache, topo.num_nodes, topo.num_nodes, topo.ancestors.to(DEVICE), pos, False, iters)
                    rows.append(dict(kind="verify", model=name, backend=bname, prefix=prompt_len, n=size, graph_ms=wall,
                                     graph_device_ms=dev, prefill_s=prefill_s))  # fmt: skip
                    print(f"  {name:4s} prefix {prompt_len} verify N={size:3d} {bname:5s} graph {wall:7.3f} ms (device {dev:7.3f})", flush=True)
            del cache, graphed
    # end to end: tree decoding after a long prompt (random weights: tau ~1, step time is the point)
    target, draft = models[[k for k in models if k != "0.5b"][0]], models["0.5b"]
    for bname in backends():
        backend = GraphedBackend(inner_backend(bname), min_capacity=prompt_len + 256)
        prompt = torch.randint(2, VOCAB, (1, prompt_len), device=DEVICE)
        r = step_breakdown(target, draft, "tree", [4, 2, 2, 1], backend, prompt_len, 48)
        r.update(kind="decode", target=[k for k in models if k != "0.5b"][0], prefix=prompt_len)
        rows.append(r)
        print(f"  decode after {prompt_len}-token prompt, tree [4,2,2,1], {bname:5s}: step {r['step_ms']:.3f} ms, "
              f"forwards {r['forward_device_ms']:.3f} ms device", flush=True)  # fmt: skip
        backend.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="forwards,steps,long")
    parser.add_argument("--targets", default="1.5b,7b")
    parser.add_argument("--draft", default="0.5b")
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--long-prefix", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    sections = args.sections.split(",")
    info = device_info()
    print(info, flush=True)
    t0 = time.perf_counter()
    models = {"0.5b": random_qwen(args.draft, seed=1)}  # keyed "0.5b" whatever --draft says
    for i, name in enumerate(args.targets.split(",")):
        models[name] = random_qwen(name, seed=2 + i)
    print(f"models built in {time.perf_counter() - t0:.1f} s", flush=True)
    results = dict(device=info, args=vars(args))
    for section in sections:
        t1 = time.perf_counter()
        print(f"== {section}", flush=True)
        try:
            if section == "forwards":
                results["forwards"] = section_forwards(models, args.prefix, args.iters)
            elif section == "steps":
                results["steps"] = section_steps(models, args.prefix, args.new_tokens)
            elif section == "long":
                results["long"] = section_long(models, args.long_prefix, args.iters)
        except Exception as err:  # keep the other sections' results
            import traceback

            traceback.print_exc()
            results[f"{section}_error"] = repr(err)
        print(f"   ({time.perf_counter() - t1:.0f} s)", flush=True)
        save_json("step_timings.json", results)


if __name__ == "__main__":
    main()
