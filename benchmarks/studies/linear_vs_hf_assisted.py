"""Where the time of one generation goes: treespec `method="linear"` against transformers'
`generate(assistant_model=...)` with the same k, on the same prompt, alternating, every model
forward timed by a forward hook (wall time). Answers: is a forward slower in one of them, or
does one of them make more forwards?

    python benchmarks/studies/linear_vs_hf_assisted.py --dataset bfcl --index 1 --k 7 --reps 4

Needs the real pair in the cache (treespec-demo puts it there). CPU, fp32, 2 threads.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from treespec.bench.datasets import encode_prompt, load_prompts
from treespec.bench.harness import hf_generate, load_models, model_config, run_treespec
from treespec.bench.timing import Wall


class ForwardTimer:
    """Forward hooks that record (new tokens, seconds) of every call of each model."""

    def __init__(self, **models):
        self.calls: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._handles = []
        for name, model in models.items():
            self._attach(name, model)

    def _attach(self, name, model):
        started = {}

        def pre(_m, args, kwargs):
            x = kwargs.get("input_ids", args[0] if args else None)
            started["n"], started["wall"] = x.shape[1], Wall(x.device).start()

        def post(_m, _args, _kwargs, _out):
            self.calls[name].append((started["n"], started["wall"].stop()))

        self._handles += [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True),
        ]

    def report(self, label: str, total: float) -> str:
        lines = [f"== {label}: total {total:.2f} s"]
        for name, calls in self.calls.items():
            by = defaultdict(list)
            for n, dt in calls:
                by["prefill" if n > 16 else f"n={n}"].append(dt * 1000)
            parts = [f"{k}: {len(v)}x median {sorted(v)[len(v) // 2]:.0f} ms" for k, v in sorted(by.items())]
            lines.append(f"  {name}: {len(calls)} forwards, {sum(dt for _, dt in calls):.2f} s; " + ", ".join(parts))
        inside = sum(dt for calls in self.calls.values() for _, dt in calls)
        lines.append(f"  outside model forwards: {total - inside:.2f} s")
        self.calls.clear()
        return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/studies/linear_vs_hf_assisted.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default="pretrained", help="'pretrained' (the default pair) or a GGUF folder")
    ap.add_argument("--dataset", default="bfcl")
    ap.add_argument("--index", type=int, default=1)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    pair = load_models(model_config(args.model))
    target, draft, tok = pair.target, pair.draft, pair.tokenizer
    prompt = load_prompts(args.dataset, limit=args.index + 1)[args.index]
    ids = encode_prompt(tok, prompt)  # (1, T)
    print(f"{prompt.id}: {ids.shape[1]} prompt tokens, k={args.k}, max_new_tokens={args.max_new_tokens}")
    timer = ForwardTimer(target=target, draft=draft)
    for rep in range(args.reps):
        r = run_treespec(target, draft, ids, max_new_tokens=args.max_new_tokens, method="linear", tree=[1] * args.k)
        print(timer.report(f"rep {rep} treespec linear ({r.new_tokens} tokens)", r.seconds))
        # like for like: k drafts every step, no confidence early stop
        h = hf_generate(target, ids, max_new_tokens=args.max_new_tokens, assistant_model=draft, num_assistant_tokens=args.k)
        print(timer.report(f"rep {rep} hf assisted ({h.new_tokens} tokens, same tokens as treespec: {h.tokens == r.tokens})",
                           h.seconds))  # fmt: skip


if __name__ == "__main__":
    main()
