"""What a user gets on a GPU: treespec's public API against transformers, interleaved per prompt.

Every row runs through the API as README shows it:
    kept      a `treespec.Speculator` made once, `.generate` per prompt
    generate  plain repeated `treespec.generate(target, draft, ids, ...)` (it keeps one Speculator
              per models and options for you)
    hf        transformers' `target.generate(...)`: with `cache_implementation="static"` (which
              transformers compiles), or with `assistant_model=draft` (its speculative decoding)
Each row reports its first call (warm-up included), time to first token and steady tokens/s over
the prompts, and whether its tokens equal the autoregressive row's. Besides the rows: per-forward
costs (1 target token, draft levels) at 512 cached tokens, the fused forwards' two ways of
attention, the time to first token of a 500-token prompt, and the cost of a large max_context for
a short prompt.

    python benchmarks/gpu/user_api.py --prompts prompts.json --model ~/.cache/treespec/gguf --out outputs/user_api [--per-set 20]
    python benchmarks/gpu/user_api.py --random --out outputs/user_api     # random weights of the same shapes
    python benchmarks/gpu/user_api.py --random --rows "" --extras attention --out outputs/user_api  # an extra alone
    ... --head qwen2.5-coder-1.5b-instruct                        # adds the draft-head rows
    GPU_BENCH_DEVICE=cpu python benchmarks/gpu/user_api.py --random --head random --per-set 2 --new-tokens 6
                                # the script's logic on the CPU: tiny random models, an untrained head

prompts.json: {"humaneval": [{"id", "ids"}], "mtbench": [...]}, token ids through the
Qwen2.5-Coder chat template (benchmarks/gpu/gpu_prompts.py writes it where a tokenizer is at
hand); the stop ids are the target's generation config's. Results are written to OUT/user_api.json after every prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_common import DEVICE, device_ms, kernel_count, random_qwen, sync

import treespec
from treespec.backends.cuda_graphs import GraphedBackend

ROWS = {  # label: (kind, options)
    "AR": ("kept", dict(method="autoregressive")),
    "tree [4,2,2,1]": ("kept", dict(method="tree", tree=[4, 2, 2, 1])),
    "tree [2,2,1,1,1]": ("kept", dict(method="tree", tree=[2, 2, 1, 1, 1])),
    "chain-4": ("kept", dict(method="linear", tree="chain-4")),
    "generate() tree [4,2,2,1]": ("generate", dict(method="tree", tree=[4, 2, 2, 1])),
    "head tree [4,2,2,1]": ("head", dict(method="tree", tree=[4, 2, 2, 1])),
    "head tree [4,2,2,1,1]": ("head", dict(method="tree", tree=[4, 2, 2, 1, 1])),  # 60 nodes
    "head chain-5": ("head", dict(method="linear", tree="chain-5")),
    # the same tree with each draft level its own graph (GraphedBackend.capture_runs off): what
    # capturing a step's draft levels as one graph saves
    "head tree [4,2,2,1,1] per level": ("head", dict(method="tree", tree=[4, 2, 2, 1, 1], per_level=True)),
    "tree [4,2,2,1] per level": ("kept", dict(method="tree", tree=[4, 2, 2, 1], per_level=True)),
    # fused forwards (fuse=True: one q/k/v and one gate/up matmul per layer, backends/fused.py)
    "AR fused": ("kept", dict(method="autoregressive", fuse=True)),
    "tree [4,2,2,1] fused": ("kept", dict(method="tree", tree=[4, 2, 2, 1], fuse=True)),
    "chain-4 fused": ("kept", dict(method="linear", tree="chain-4", fuse=True)),
    "head tree [4,2,2,1,1] fused": ("head", dict(method="tree", tree=[4, 2, 2, 1, 1], fuse=True)),
    "HF static": ("hf", dict(cache_implementation="static")),
    "HF assisted": ("hf", dict(assistant=True)),
}


def load_pair(args) -> tuple:
    if args.random:  # gpu_common beside this script: the Qwen2.5 shapes with random weights (tiny ones on the CPU)
        if DEVICE == "cuda":
            return random_qwen("1.5b", 0, vocab_size=151936), random_qwen("0.5b", 1, vocab_size=151936)
        return random_qwen("tiny", 0, torch.float32, vocab_size=512), random_qwen("tiny", 1, torch.float32, vocab_size=512)
    from treespec.loading.models import load_model

    g = Path(args.model).expanduser()
    kw = dict(dtype=torch.bfloat16, device=DEVICE, cache_converted=False)

    def one(name: str):  # a converted checkpoint folder <name>/ when there is one, else <name>.gguf
        return load_model(str(g / name if (g / name / "config.json").is_file() else g / f"{name}.gguf"), **kw).eval()

    draft = "qwen2.5-coder-0.5b-instruct"
    if not (g / draft / "config.json").is_file() and not (g / f"{draft}.gguf").is_file():
        print(f"no {draft} under {g}: the rows that use the 0.5B draft fail, the others run", flush=True)
        return one("qwen2.5-coder-1.5b-instruct"), None
    return one("qwen2.5-coder-1.5b-instruct"), one(draft)


def synthetic_prompts(n: int, length: int, seed: int, vocab: int = 20000) -> list[dict]:
    """n prompts of random ids below min(vocab, 20000) (above the special ids)."""
    gen = torch.Generator().manual_seed(seed)
    high = min(vocab, 20000)
    return [{"id": f"synthetic-{i}", "ids": torch.randint(high // 200, high, (length,), generator=gen).tolist()}
            for i in range(n)]  # fmt: skip


class FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.first is None:
            sync()
            self.first = time.perf_counter()

    def end(self):
        pass


class Runner:
    """One object per row: runs a prompt and returns its record."""

    def __init__(self, label, kind, options, target, draft, max_context, eos, head=None):
        if kind == "head":  # a draft head trained for the target (treespec-train-head), kept like a draft
            kind, draft = "kept", head
        self.label, self.kind, self.options = label, kind, dict(options)
        self.target, self.draft, self.eos = target, draft, eos
        self.uses_draft = options.get("method") != "autoregressive" and not (kind == "hf" and "assistant" not in options)
        self.speculator = None
        per_level = self.options.pop("per_level", False)
        if kind == "kept":
            self.speculator = treespec.Speculator(target, draft if self.uses_draft else None, max_context=max_context,
                                                  **self.options)
            if per_level and isinstance(self.speculator.backend, GraphedBackend):  # on a GPU; the CPU has no graphs
                self.speculator.backend.capture_runs = False

    def __call__(self, ids: list[int], new_tokens: int) -> dict:
        prompt = torch.tensor([ids], device=DEVICE)
        sync()
        t0 = time.perf_counter()
        if self.kind == "hf":
            first = FirstToken()
            kw = dict(self.options)
            if kw.pop("assistant", False):
                kw["assistant_model"] = self.draft
            with torch.no_grad():
                seq = self.target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                           temperature=None, top_p=None, top_k=None, max_new_tokens=new_tokens,
                                           eos_token_id=self.eos or None, pad_token_id=self.eos[-1] if self.eos else 0, streamer=first, **kw)  # fmt: skip
            sync()
            seconds = time.perf_counter() - t0
            tokens = seq[0, len(ids):].tolist()
            return dict(tokens=tokens, seconds=seconds, new=len(tokens), ttft=(first.first or t0) - t0, forwards=None)
        if self.kind == "kept":
            out = self.speculator.generate(prompt, max_new_tokens=new_tokens, eos_token_id=self.eos)
        else:
            out = treespec.generate(self.target, self.draft if self.uses_draft else None, prompt,
                                    max_new_tokens=new_tokens, eos_token_id=self.eos, **self.options)
        sync()
        seconds = time.perf_counter() - t0
        s = out.stats
        return dict(tokens=out.sequences[0, len(ids):].tolist(), seconds=seconds, new=s.new_tokens,
                    ttft=s.time_to_first_token, forwards=s.target_forwards,
                    host_split=dict(draft=s.time_draft, verify=s.time_verify, other=s.time_other))  # fmt: skip


@torch.no_grad()  # backend forwards write the caches in place: never on tensors autograd tracks
def forward_ms(owner, model, sizes) -> dict:
    """{n: ms and kernels} of `model`'s forward over n new tokens at 512 cached tokens, through the
    backend of a kept Speculator of `owner` (max_context 2048, as the rows): CUDA events over graph
    replays. Each size compiles."""
    spec = treespec.Speculator(owner, None, method="autoregressive", max_context=2048)
    backend = spec.backend
    cache = backend.make_cache(model, spec.plan.capacities(2048)[0], "target")
    for start in (0, 256):  # 512 committed tokens, in two fixed-size prefill chunks
        ids = torch.randint(1, 500, (1, 256), device=DEVICE)
        pos = torch.arange(start, start + 256, device=DEVICE)[None]
        backend.forward(model, cache, ids, pos, torch.ones(256, 256, dtype=torch.bool, device=DEVICE).tril(),
                        last_only=True)  # fmt: skip
        cache.commit_all()
    drop = torch.zeros(max(sizes), dtype=torch.long, device=DEVICE)
    out = {}
    for n in sizes:
        ids = torch.randint(1, 500, (1, n), device=DEVICE)
        pos = torch.arange(512, 512 + n, device=DEVICE)[None]
        mask = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()

        def once():
            backend.forward(model, cache, ids, pos, mask)
            cache.commit(drop[:n], 0)

        for _ in range(3):  # compile, capture, replay
            once()
        out[n] = dict(ms=round(device_ms(once, 50), 3), kernels=kernel_count(once))
    spec.close()
    return out


def forward_costs(target, draft, head=None) -> dict:
    """The target over 1 token, the draft (and the head) over 1 and 16 (a head level reads
    whatever features its buffer holds: the cost is the same); the target and draft also fused
    (fuse=True's forwards)."""
    from treespec.backends.fused import fuse

    # (name, the model whose Speculator makes the backend, the forward measured, sizes)
    models = [("target", target, target, (1,)), ("target fused", target, fuse(target), (1,))]
    if draft is not None:
        models += [("draft", draft, draft, (1, 16)), ("draft fused", draft, fuse(draft), (1, 16))]
    if head is not None:
        models.append(("head", target, head, (1, 16)))
    return {f"{name} n={n}": cost for name, owner, model, sizes in models
            for n, cost in forward_ms(owner, model, sizes).items()}  # fmt: skip


def attention_costs(target, draft) -> dict:
    """The fused forwards with their attention both ways (`fuse`'s matmul_attention_rows): sdpa,
    and matmul-softmax-matmul; the target over 1-256 tokens, the draft over 1 and 8."""
    from treespec.backends.fused import fuse

    out = {}
    for way, rows in (("sdpa", 0), ("matmul", 1 << 30)):
        for name, model, sizes in (("target", target, (1, 16, 64, 256)), ("draft", draft, (1, 8))):
            if model is not None:
                for n, cost in forward_ms(model, fuse(model, rows), sizes).items():
                    out[f"{name} fused, {way} n={n}"] = cost
    return out


def median(xs):
    return round(statistics.median(xs), 4) if xs else None


def summarize(rows: dict, base: str) -> dict:
    """Per set and row: tokens/s over the prompts the row ran (the transformers rows run fewer),
    median time to first token, tau; against `base` on the same prompts: the speed ratio and
    how many outputs equal base's."""
    out = {}
    for dname, by in rows.items():
        ref = by.get(base)
        for label, recs in by.items():
            n = len(recs) if ref is None else min(len(recs), len(ref))
            recs = recs[:n]
            new, sec = sum(r["new"] for r in recs), sum(r["seconds"] for r in recs)
            fw = [r["forwards"] for r in recs if r["forwards"] is not None]
            d = dict(prompts=n, tok_s=round(new / sec, 1), ttft_ms=round(1000 * median([r["ttft"] for r in recs]), 2))
            if fw:
                d["tau"] = round(new / max(sum(fw), 1), 2)
            if ref:
                rnew, rsec = sum(r["new"] for r in ref[:n]), sum(r["seconds"] for r in ref[:n])
                d[f"x_{base}"] = round((new / sec) / (rnew / rsec), 3)
                d[f"same_as_{base}"] = f"{sum(a['tokens'] == b['tokens'] for a, b in zip(recs, ref))}/{n}"
            out[f"{dname} | {label}"] = d
    return out


def per_prompt(rows: dict) -> dict:
    """The rows' records without their tokens: what the summary is computed from."""
    return {dname: {label: [{k: v for k, v in r.items() if k != "tokens"} for r in recs] for label, recs in by.items()}
            for dname, by in rows.items()}  # fmt: skip


def warmup_in_new_process(args) -> list[float]:
    """Warm-up seconds of one kept tree Speculator in two fresh processes (the second finds
    inductor's on-disk cache the first filled)."""
    times = []
    for _ in range(2):
        cmd = [sys.executable, __file__, "--warmup-only", "--random"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        line = [x for x in res.stdout.splitlines() if x.startswith("WARMUP ")]
        times.append(float(line[-1].split()[1]) if line else float("nan"))
        if not line:
            print(res.stdout[-2000:], res.stderr[-3000:], flush=True)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu/user_api.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--prompts")
    ap.add_argument("--model", help="a folder holding the pair's <name>.gguf files (e.g. ~/.cache/treespec/gguf)")
    ap.add_argument("--random", action="store_true", help="random-weight Qwen2.5 0.5B/1.5B shapes, synthetic prompts")
    ap.add_argument("--out", default="user_api_out")
    ap.add_argument("--per-set", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rows", default=None, help="labels separated by ';' (default: all)")
    ap.add_argument("--hf-per-set", type=int, default=5, help="prompts per set for the transformers rows")
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--head", default=None,
                    help="a draft head (name or file, treespec-train-head) for the 'head ...' rows; 'random': untrained")
    ap.add_argument("--deadline", type=float, default=300.0,
                    help="seconds of timed prompts after the rows' first calls; the run stops between prompts")
    ap.add_argument("--extras", default="costs,ttft,context", help="costs, attention, ttft, context, newprocess")
    ap.add_argument("--warmup-only", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    target, draft = load_pair(args)
    if args.warmup_only:  # fills inductor's on-disk cache: a later process compiles these rows' shapes faster
        for label in (args.rows or "tree [4,2,2,1]").split(";"):
            kind, options = ROWS[label]
            if kind != "kept":
                continue
            uses_draft = options.get("method") != "autoregressive"
            options = {k: v for k, v in options.items() if k != "per_level"}
            spec = treespec.Speculator(target, draft if uses_draft else None, max_context=args.max_context, **options)
            print("WARMUP", round(spec.warm_up(), 1), label, flush=True)
            spec.close()
        return
    print(f"loaded in {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.random:
        prompts = {"synthetic": synthetic_prompts(args.per_set, 200, 0, target.config.vocab_size)}
        eos = []
    else:
        data = json.loads(Path(args.prompts).read_text())
        configured = target.generation_config.eos_token_id
        eos = data.get("eos") or (configured if isinstance(configured, list) else [configured] if configured is not None else [])
        prompts = {k: data[k][: args.per_set] for k in ("humaneval", "mtbench")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               new_tokens=args.new_tokens, first_call_s={}, rows={}, extras={})  # fmt: skip

    def save():
        slim = {k: v for k, v in res.items() if k != "rows"}
        slim["summary"] = summarize(res["rows"], "AR")
        slim["per_prompt"] = per_prompt(res["rows"])
        (out_dir / "user_api.json").write_text(json.dumps(slim, indent=1))

    head = None
    if args.head == "random":  # an untrained head: the rows' logic without a trained file
        from treespec.heads.model import DraftHead

        head = DraftHead.for_target(target, name="random").to(DEVICE).requires_grad_(False)
    elif args.head:
        from treespec.heads import load_head

        head = load_head(target, args.head)
    labels = [k for k in ROWS if (args.rows is None or k in args.rows.split(";")) and (head or ROWS[k][0] != "head")]
    runners = {}
    first_prompt = next(iter(prompts.values()))[0]["ids"]
    for label in labels:  # the first call of each row: warm-up (compiling, capturing) included
        kind, options = ROWS[label]
        t0 = time.perf_counter()
        try:
            runners[label] = Runner(label, kind, options, target, draft, args.max_context, eos, head)
            runners[label](first_prompt, args.new_tokens)
            res["first_call_s"][label] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the others go on
            res["first_call_s"][label] = f"failed: {e!r}"[:400]
            runners.pop(label, None)
        print(f"first call {label:28s} {res['first_call_s'][label]}", flush=True)
        save()
    t_timed = time.perf_counter()  # the deadline counts from here: first calls (warm-ups) can take minutes
    for i in range(args.per_set if runners else 0):  # --rows '' runs the extras alone
        for dname, plist in prompts.items():
            if i >= len(plist) or time.perf_counter() - t_timed > args.deadline:
                continue
            for label, run in runners.items():
                if run.kind == "hf" and i >= args.hf_per_set:
                    continue
                rec = run(plist[i]["ids"], args.new_tokens)
                res["rows"].setdefault(dname, {}).setdefault(label, []).append(rec)
            line = ", ".join(f"{lab} {recs[-1]['new'] / recs[-1]['seconds']:.0f}" for lab, recs in res["rows"][dname].items()
                             if len(recs) == i + 1)  # fmt: skip
            print(f"{dname} {plist[i]['id']}: {line}  ({time.perf_counter() - t_start:.0f} s)", flush=True)
            save()
    extras = [e for e in args.extras.split(",") if e]
    try:
        run_extras(extras, res, save, runners, target, draft, head, eos, args)
    except Exception as e:  # noqa: BLE001 - the rows are saved; say what failed
        res["extras"]["failed"] = repr(e)[:400]
        save()
    for k, v in summarize(res["rows"], "AR").items():
        print(f"{k:45s} {v}", flush=True)
    print(json.dumps(res["extras"], indent=1), flush=True)


def run_extras(extras, res, save, runners, target, draft, head, eos, args) -> None:
    """The measurements beside the rows (--extras)."""
    if "costs" in extras:
        res["extras"]["forward_ms_at_512"] = forward_costs(target, draft, head)
        save()
    if "attention" in extras:
        res["extras"]["attention_ms_at_512"] = attention_costs(target, draft)
        save()
    if "ttft" in extras:  # a 500-token prompt, target and draft prefilled, first token out
        ids = synthetic_prompts(1, 500, 1, target.config.vocab_size)[0]["ids"]
        labels = [k for k in ("tree [4,2,2,1]", "tree [4,2,2,1] fused", "AR", "AR fused") if k in runners]
        for label in labels or ["tree [4,2,2,1]"]:
            spec = runners.get(label) or Runner("t", "kept", ROWS[label][1], target, draft, args.max_context, eos)
            ttfts = [spec(ids, 1)["ttft"] for _ in range(6)][1:]
            res["extras"].setdefault("ttft_500_ms", {})[label] = dict(
                median=round(1000 * statistics.median(ttfts), 2), all=[round(1000 * t, 2) for t in ttfts])
        save()
    if "context" in extras:  # a 100-token prompt with a small and a large max_context, interleaved
        ids = synthetic_prompts(1, 100, 2, target.config.vocab_size)[0]["ids"]
        ar = ROWS["AR"][1]
        runs = {"1024": Runner("s", "kept", ar, target, None, 1024, []),  # 'auto': sdpa below FLASH_MIN_CONTEXT
                "8192": Runner("l", "kept", ar, target, None, 8192, []),  # 'auto': flash when it imports
                "8192 sdpa": Runner("l", "kept", dict(ar, attention="sdpa"), target, None, 8192, [])}
        rates = {k: [] for k in runs}
        for r in range(4):
            for key, run in runs.items():
                rec = run(ids, args.new_tokens)
                if r:
                    rates[key].append(rec["new"] / rec["seconds"])
        res["extras"]["max_context_tok_s"] = {f"{k} ({run.speculator.backend.name})": round(statistics.median(rates[k]), 1)
                                              for k, run in runs.items()}  # fmt: skip
        save()
    if "newprocess" in extras:
        res["extras"]["warmup_s_two_fresh_processes"] = warmup_in_new_process(args)
        save()


if __name__ == "__main__":
    main()
