"""Export tokenized benchmark prompts for the GPU machine (it has no registry access and needs
no tokenizer): HumanEval and MT-Bench (first turn) through the Qwen2.5-Coder chat template, plus
one long prompt (HumanEval problems concatenated past 8,300 tokens, then one request).

    python -m treespec.bench.gpu_prompts [--out .xfer/prompts/prompts.json] [--limit 24]

Writes {"humaneval": [{"id", "ids"}], "mtbench": [...], "long": [...], "eos": [...]}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from treespec.bench.datasets import Prompt, encode_prompt, load_prompts
from treespec.loading.models import load_tokenizer

LONG_TOKENS = 8300


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(".xfer/prompts/prompts.json"))
    parser.add_argument("--limit", type=int, default=24)
    args = parser.parse_args()
    tok = load_tokenizer("qwen2.5-coder-1.5b-instruct")
    out = {}
    for name in ("humaneval", "mtbench"):
        out[name] = [{"id": p.id, "ids": encode_prompt(tok, p)[0].tolist()} for p in load_prompts(name, limit=args.limit)]
    context = ""
    for p in load_prompts("humaneval"):
        context += p.messages[-1]["content"] + "\n\n"
        if len(tok(context).input_ids) > LONG_TOKENS:
            break
    request = context + "Write a single Python module that implements all of the functions above."
    long = Prompt(id="humaneval-concat", messages=[{"role": "user", "content": request}])
    out["long"] = [{"id": long.id, "ids": encode_prompt(tok, long)[0].tolist()}]
    out["eos"] = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out))
    print({k: len(v) for k, v in out.items()}, "long prompt tokens:", len(out["long"][0]["ids"]))


if __name__ == "__main__":
    main()
