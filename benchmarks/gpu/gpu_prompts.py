"""Export tokenized benchmark prompts for the GPU machine (it has no registry access and needs
no tokenizer): HumanEval and MT-Bench (first turn) through the target's chat template, plus one
long prompt (HumanEval problems concatenated past --long-tokens tokens, then one request).

    python benchmarks/gpu/gpu_prompts.py --out PROMPTS.json [--limit 24]

Writes {"humaneval": [{"id", "ids"}], "mtbench": [...], "long": [...]} (treespec.bench.harness
.export_prompts); the GPU studies read it with --prompts and stop where the target's generation
config says.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from treespec.bench.harness import export_prompts
from treespec.loading.models import DEFAULT_TARGET, load_tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu/gpu_prompts.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--long-tokens", type=int, default=8300)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="whose tokenizer encodes the prompts")
    args = parser.parse_args(argv)
    out = export_prompts(load_tokenizer(args.target), {"humaneval": args.limit, "mtbench": args.limit}, args.out,
                         long_tokens=args.long_tokens)  # fmt: skip
    print({k: len(v) for k, v in out.items()}, "long prompt tokens:", len(out["long"][0]["ids"]))


if __name__ == "__main__":
    main()
