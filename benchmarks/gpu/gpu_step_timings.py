"""Step timings of the GPU path on real Qwen2.5 architecture shapes with random weights (bf16).

    python benchmarks/gpu/gpu_step_timings.py [--sections forwards,steps,crossover,warmup,long] [--out-dir OUT]

forwards   per forward, sdpa vs flash, three ways: eager, CUDA graph of the eager forward, CUDA
           graph of the torch.compile'd forward; device time and kernels per forward (profiler
           over one call); the 0.5B draft (first forward m=1, levels of 1/16/64 nodes) and the
           targets' verification at 1/16/64 nodes, 512 cached tokens
steps      whole decode steps through treespec.generate, compiled and not: wall time per step,
           device time inside model forwards, the share of the step that is not model forwards,
           and the first generate's wall time (compilation + capture)
crossover  verification forward latency (compiled + graph) of sdpa and flash against the
           context length: where flash starts to win (attention='auto' switches there)
warmup     a fresh process warms up a tree configuration, compiled, twice: with an empty inductor
           cache and again with the cache the first process left on disk
long       an 8192-token prompt: verification latency, flash vs sdpa, and a short tree decode

Random weights make the draft useless (acceptance ~0), but every step has the same fixed shapes
whatever is accepted, so step times are those of real decoding; tau comes from the real pair
(benchmarks/gpu/gpu_e2e.py, or the CPU runs for greedy). Results: OUT/step_timings.json and a
summary on stdout. GPU_BENCH_DEVICE=cpu --targets tiny --draft tiny smoke-tests the logic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from gpu_common import DEVICE, VOCAB, TimedBackend, device_info, kernel_count, random_qwen

import treespec
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.flash import FlashBackend, flash_available, reference_prefix_attention
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.bench.harness import out_dir, write_json
from treespec.bench.timing import DeviceSpan, Wall
from treespec.tree.topology import TreeTopology

VERIFY_TREES = {1: [], 16: [15], 45: [4, 2, 2, 1], 64: [3, 4, 4], 128: [127]}
# CPU smoke runs compile with aot_eager (inductor's C++ builds take minutes on a small CPU)
COMPILE_BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"
MODES = ("eager", "graph", "compiled")


def graphed_backend(bname: str, compile: bool, **kwargs) -> GraphedBackend:
    """GraphedBackend over `bname`, its forwards torch.compile'd or not (on the CPU too)."""
    return GraphedBackend(inner_backend(bname), compile=compile, compile_backend=COMPILE_BACKEND, **kwargs)


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


def time_forward(backend, model, cache, n, s, mask, pos, last_only, iters, kernels: bool = False):
    """Median latency (ms, synced) and device time (ms, events) of one forward of n new tokens
    whose block also sees s - n scratch entries written earlier in the step; with kernels, also
    the CUDA kernels one call launches (else None)."""
    ids = torch.randint(2, VOCAB, (1, n), device=DEVICE)
    keep = torch.zeros(1, dtype=torch.long, device=DEVICE)

    def one() -> None:
        if s > n:
            cache.begin_forward(s - n)  # the earlier tree nodes of this step (content irrelevant)
        backend.forward(model, cache, ids, pos, mask, last_only)

    wall, dev = [], []
    for i in range(iters + 3):
        with Wall(DEVICE) as w:
            span = DeviceSpan(DEVICE).start()
            one()
            span.stop()
        if i >= 3:  # the first calls warm up (compile, capture)
            wall.append(w.seconds * 1e3)
            dev.append(span.ms())
        cache.commit(keep, 0)  # drop the scratch entries
    count = None
    if kernels:
        count = kernel_count(one)
        cache.commit(keep, 0)
    return statistics.median(wall), statistics.median(dev), count


def draft_level(widths: list[int], d: int, prefix: int):
    """(n, s, mask (n, s), positions (1, n)) of draft level d of the tree `widths`."""
    topo = TreeTopology.from_widths(widths)
    mask = topo.ancestors[topo.level(d), 1 : topo.level_starts[d + 1]]
    return mask.shape[0], mask.shape[1], mask, torch.full((1, mask.shape[0]), prefix + d)


def forward_shapes(prefix: int, sizes: list[int]):
    """(role, label, n, s, last_only, mask (n, s), positions (1, n)): the target's verification
    of N = sizes nodes, the draft's first forward and its levels of 1, 16, 64 nodes."""
    shapes = []
    for size in sizes:
        topo = TreeTopology.from_widths(VERIFY_TREES[size])
        pos = (prefix + topo.depth)[None]
        shapes.append(("target", f"verify N={size}", topo.num_nodes, topo.num_nodes, False, topo.ancestors, pos))
    shapes.append(("draft", "draft first m=1", 1, 1, True, torch.ones(1, 1, dtype=torch.bool), torch.tensor([[prefix]])))
    for widths, d in (([1, 1], 2), ([4, 4], 2), ([4, 4, 4], 3)):  # levels of 1, 16, 64 nodes
        n, s, mask, pos = draft_level(widths, d, prefix)
        if n in sizes or n == 1:
            shapes.append(("draft", f"draft level F={n} (s={s})", n, s, False, mask, pos))
    return shapes


def section_forwards(models: dict, prefix: int, iters: int, bnames: list[str], sizes: list[int]) -> list[dict]:
    rows = []
    targets = [k for k in models if k != "0.5b"]
    for role, label, n, s, last_only, mask, pos in forward_shapes(prefix, sizes):
        for name in targets if role == "target" else ["0.5b"]:
            model = models[name]
            for bname in bnames:
                row = dict(model=name, forward=label, backend=bname, n=n, s=s, prefix=prefix)
                for mode in MODES:
                    backend = graphed_backend(bname, compile=mode == "compiled")
                    cache = backend.make_cache(model, prefix + 512)
                    run = backend.inner if mode == "eager" else backend
                    with torch.no_grad():
                        prefill(backend.inner, model, cache, torch.randint(2, VOCAB, (1, prefix), device=DEVICE))
                        m, p = mask.to(DEVICE), pos.to(DEVICE)
                        clock = Wall().start()
                        wall, dev, kernels = time_forward(run, model, cache, n, s, m, p, last_only,
                                                          max(5, iters // 5) if mode == "eager" else iters, kernels=True)  # fmt: skip
                    row.update({f"{mode}_ms": wall, f"{mode}_device_ms": dev, f"{mode}_kernels": kernels})
                    if mode != "eager":
                        row[f"{mode}_warmup_s"] = clock.stop()  # compile + capture + the timed calls
                        row[f"{mode}_capture_s"] = backend.stats.capture_seconds
                    if mode == "compiled":
                        row["compile_s"] = backend.compiler.stats.seconds
                    del cache, backend
                rows.append(row)
                r = row
                print(f"  {name:5s} {label:30s} {bname:5s} eager {r['eager_ms']:7.2f} ms ({r['eager_kernels']} k) | graph "
                      f"{r['graph_device_ms']:6.3f} ms ({r['graph_kernels']} k) | compiled+graph {r['compiled_device_ms']:6.3f} ms "
                      f"({r['compiled_kernels']} k, compile {r['compile_s']:.1f} s)", flush=True)  # fmt: skip
    return rows


def step_breakdown(target, draft, method, tree, backend, prompt_len: int, new_tokens: int) -> dict:
    """Decode with `backend`; per step: wall time, device time inside forwards, forwards."""
    timed = TimedBackend(backend)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    prompt = torch.randint(2, VOCAB, (1, prompt_len), device=DEVICE, generator=gen)
    kwargs = dict(max_new_tokens=new_tokens, method=method, tree=tree, attention=timed, eos_token_id=[])
    d = None if method == "autoregressive" else draft
    with torch.no_grad():
        with Wall() as w:
            treespec.generate(target, d, prompt, **kwargs)  # warm-up: compiles and captures every shape once
        warmup_s = w.seconds
        timed.clear()
        clock, marks = Wall(DEVICE).start(), []
        token_stream = treespec.stream(target, d, prompt, **kwargs)
        for _ in token_stream:
            marks.append((clock.stop(), len(timed.spans)))
    stats = token_stream.result.stats
    steps = len(marks) - 1  # from the end of step 1 (prefill excluded) to the end of the last
    wall = (marks[-1][0] - marks[0][0]) * 1e3  # seconds since the clock started -> ms
    fwd = timed.forward_ms(marks[0][1]) if steps else 0.0
    forwards = (marks[-1][1] - marks[0][1]) / max(steps, 1)
    return dict(method=method, tree=stats.tree, backend=stats.backend, steps=steps, step_ms=wall / max(steps, 1),
                forward_device_ms=fwd / max(steps, 1), forwards_per_step=forwards,
                non_forward_share=1 - fwd / wall if wall else 0.0, tau=stats.tau, warmup_s=warmup_s)  # fmt: skip


METHODS = [("autoregressive", None), ("linear", "chain-4"), ("tree", [4, 2, 2, 1])]


def section_steps(models: dict, prompt_len: int, new_tokens: int, bnames: list[str], eager: bool) -> list[dict]:
    rows = []
    draft = models["0.5b"]
    for target_name in [k for k in models if k != "0.5b"]:
        target = models[target_name]
        for bname in bnames:
            for compile in (True, False):
                backend = graphed_backend(bname, compile, min_capacity=prompt_len + new_tokens + 160)
                for method, tree in METHODS:
                    r = step_breakdown(target, draft, method, tree, backend, prompt_len, new_tokens)
                    r.update(target=target_name, graphs=True, compiled=compile)
                    rows.append(r)
                    print(f"  {target_name:4s} {bname:5s} {'compiled' if compile else 'graphs  '} {method:14s} {r['tree']:22s} "
                          f"step {r['step_ms']:7.3f} ms, forwards {r['forward_device_ms']:7.3f} ms device "
                          f"({r['forwards_per_step']:.0f}/step), not forwards {100 * r['non_forward_share']:5.1f}%, "
                          f"first generate {r['warmup_s']:.1f} s", flush=True)  # fmt: skip
                backend.reset()
            for method, tree in METHODS[:3] if eager else []:  # eager reference: few steps, it is slow
                r = step_breakdown(target, draft, method, tree, inner_backend(bname), prompt_len, 12)
                r.update(target=target_name, graphs=False, compiled=False)
                rows.append(r)
                print(f"  {target_name:4s} {bname:5s} eager  {method:14s} {r['tree']:22s} step {r['step_ms']:7.3f} ms, "
                      f"forwards {r['forward_device_ms']:7.3f} ms device, not forwards {100 * r['non_forward_share']:5.1f}%",
                      flush=True)  # fmt: skip
    return rows


def section_crossover(models: dict, prefixes: list[int], sizes: list[int], iters: int, compile: bool) -> list[dict]:
    """Graphed (compiled or not) verification latency of sdpa and flash against the cached context."""
    rows = []
    name = [k for k in models if k != "0.5b"][0]
    model = models[name]
    for prefix in prefixes:
        ctx = torch.randint(2, VOCAB, (1, prefix), device=DEVICE)
        for bname in backends():
            backend = graphed_backend(bname, compile=compile)
            cache = backend.make_cache(model, prefix + 256)
            with torch.no_grad():
                prefill(backend.inner, model, cache, ctx)
                for size in sizes:
                    topo = TreeTopology.from_widths(VERIFY_TREES[size])
                    pos = (prefix + topo.depth)[None].to(DEVICE)
                    wall, dev, _ = time_forward(backend, model, cache, topo.num_nodes, topo.num_nodes,
                                                topo.ancestors.to(DEVICE), pos, False, iters)  # fmt: skip
                    rows.append(dict(model=name, backend=bname, prefix=prefix, n=size, ms=wall, device_ms=dev, compiled=compile))
                    print(f"  {name:4s} context {prefix:5d} verify N={size:3d} {bname:5s} {'compiled+' if compile else ''}graph {wall:7.3f} ms "
                          f"(device {dev:7.3f})", flush=True)  # fmt: skip
            del cache, backend
    return rows


def section_warmup(args) -> list[dict]:
    """A fresh process warms up the compiled tree configuration with inductor's on-disk cache
    as this process left it (run after `steps`, which compiled the same shapes); with
    --warmup-cold, first another one with an empty cache directory."""
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="treespec_warmup_"))  # the child's output and the empty inductor cache
    for run in (["empty cache"] if args.warmup_cold else []) + ["on-disk cache"]:
        cmd = [sys.executable, __file__, "--sections", "warmup_child", "--out-dir", scratch / "child",
               "--targets", args.targets.split(",")[0], "--draft", args.draft, "--backends", args.backends.split(",")[0]]  # fmt: skip
        env = dict(os.environ)
        if run == "empty cache":
            env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor_cold")
        with Wall() as w:
            done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("WARMUP ")]
        rows.append(dict(run=run, process_s=w.seconds, returncode=done.returncode,
                         result=line[-1][7:] if line else done.stderr[-2000:]))  # fmt: skip
        print(f"  {run}: {rows[-1]['result']} (whole process {rows[-1]['process_s']:.1f} s)", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def warmup_child(models: dict, bname: str, prompt_len: int) -> None:
    """Time the first generate of tree [4, 2, 2, 1] (compile + capture of every shape) and a second."""
    target = models[[k for k in models if k != "0.5b"][0]]
    backend = graphed_backend(bname, compile=True, min_capacity=prompt_len + 256)
    prompt = torch.randint(2, VOCAB, (1, prompt_len), device=DEVICE)
    times = []
    for _ in range(2):
        with torch.no_grad(), Wall(DEVICE) as w:
            treespec.generate(target, models["0.5b"], prompt, max_new_tokens=32, tree=[4, 2, 2, 1], attention=backend,
                              eos_token_id=[])  # fmt: skip
        times.append(w.seconds)
    stats = backend.compiler.stats
    print("WARMUP " + f"first generate {times[0]:.1f} s (compiled {stats.shapes} shapes in {stats.seconds:.1f} s), "
          f"second {times[1]:.2f} s", flush=True)  # fmt: skip


def section_long(models: dict, prompt_len: int, iters: int) -> list[dict]:
    rows = []
    for name in [k for k in models if k != "0.5b"]:
        model = models[name]
        ctx = torch.randint(2, VOCAB, (1, prompt_len), device=DEVICE)
        for bname in backends():
            graphed = GraphedBackend(inner_backend(bname))
            cache = graphed.make_cache(model, prompt_len + 256)
            with torch.no_grad():
                with Wall(DEVICE) as w:
                    prefill(graphed.inner, model, cache, ctx)
                prefill_s = w.seconds
                for size in (1, 16, 64, 128):
                    topo = TreeTopology.from_widths(VERIFY_TREES[size])
                    pos = (prompt_len + topo.depth)[None].to(DEVICE)
                    wall, dev, _ = time_forward(graphed, model, cache, topo.num_nodes, topo.num_nodes, topo.ancestors.to(DEVICE), pos, False, iters)
                    rows.append(dict(kind="verify", model=name, backend=bname, prefix=prompt_len, n=size, graph_ms=wall,
                                     graph_device_ms=dev, prefill_s=prefill_s))  # fmt: skip
                    print(f"  {name:4s} prefix {prompt_len} verify N={size:3d} {bname:5s} graph {wall:7.3f} ms (device {dev:7.3f})", flush=True)
            del cache, graphed
    # end to end: tree decoding after a long prompt (random weights: tau ~1, step time is the point)
    target, draft = models[[k for k in models if k != "0.5b"][0]], models["0.5b"]
    for bname in backends():
        backend = GraphedBackend(inner_backend(bname), min_capacity=prompt_len + 256)
        r = step_breakdown(target, draft, "tree", [4, 2, 2, 1], backend, prompt_len, 48)
        r.update(kind="decode", target=[k for k in models if k != "0.5b"][0], prefix=prompt_len)
        rows.append(r)
        print(f"  decode after {prompt_len}-token prompt, tree [4,2,2,1], {bname:5s}: step {r['step_ms']:.3f} ms, "
              f"forwards {r['forward_device_ms']:.3f} ms device", flush=True)  # fmt: skip
        backend.reset()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu/gpu_step_timings.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=out_dir("outputs/gpu"), help="default: $OUT")
    parser.add_argument("--sections", default="forwards,steps,crossover,warmup")
    parser.add_argument("--backends", default="sdpa,flash", help="those of them that run here")
    parser.add_argument("--sizes", default="1,16,64", help="verification sizes of the forwards section")
    parser.add_argument("--prefixes", default="512,2048,4096,8192", help="contexts of the crossover section")
    parser.add_argument("--crossover-sizes", default="1,45")
    parser.add_argument("--crossover-no-compile", action="store_true", help="crossover with graphs of eager forwards")
    parser.add_argument("--eager-steps", action="store_true", help="steps: also the eager reference")
    parser.add_argument("--warmup-cold", action="store_true", help="warmup: also a process with an empty inductor cache")
    parser.add_argument("--targets", default="1.5b,7b")
    parser.add_argument("--draft", default="0.5b")
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--long-prefix", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    bnames = [b for b in args.backends.split(",") if b in backends()]
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    info = device_info()
    print(info, flush=True)
    with Wall(DEVICE) as w:
        models = {"0.5b": random_qwen(args.draft, seed=1)}  # keyed "0.5b" whatever --draft says
        for i, name in enumerate(args.targets.split(",")):
            models[name] = random_qwen(name, seed=2 + i)
    print(f"models built in {w.seconds:.1f} s", flush=True)
    results = dict(device=info, args=vars(args))
    for section in sections:
        clock = Wall().start()
        print(f"== {section}", flush=True)
        try:
            if section == "forwards":
                results["forwards"] = section_forwards(models, args.prefix, args.iters, bnames, ints(args.sizes))
            elif section == "steps":
                results["steps"] = section_steps(models, args.prefix, args.new_tokens, bnames, args.eager_steps)
            elif section == "crossover":
                results["crossover"] = section_crossover(
                    models, ints(args.prefixes), ints(args.crossover_sizes), args.iters, not args.crossover_no_compile
                )
            elif section == "warmup":
                results["warmup"] = section_warmup(args)
            elif section == "warmup_child":
                warmup_child(models, bnames[0], args.prefix)
            elif section == "long":
                results["long"] = section_long(models, args.long_prefix, args.iters)
        except Exception as err:  # keep the other sections' results
            import traceback

            traceback.print_exc()
            results[f"{section}_error"] = repr(err)
        print(f"   ({clock.stop():.0f} s)", flush=True)
        write_json(args.out_dir / "step_timings.json", results)


if __name__ == "__main__":
    main()
