"""treespec-demo's flow on the tiny pair (the real pair needs a download): it decodes with a tree and
with the target alone, prints both speeds, and exits 0 only when the outputs are identical."""

from __future__ import annotations

import pytest
import torch

from treespec.bench import demo
from treespec.loading.models import ModelPair
from treespec.testing import tiny_pair


class TinyTokenizer:
    """Token ids as text: enough for the demo's chat template and its streaming decode."""

    def apply_chat_template(self, messages, add_generation_prompt=True, return_tensors="pt", return_dict=True):
        ids = [2 + ord(c) % 60 for c in messages[-1]["content"][:12]]
        return {"input_ids": torch.tensor([ids])}

    def decode(self, tokens):
        return "".join(f"<{t}>" for t in tokens)


def test_demo_runs_on_the_tiny_pair(monkeypatch, capsys):
    target, draft = tiny_pair(0)
    loaded = []

    def load_pair(target_spec, draft_spec, cache_converted=True):
        loaded.append((target_spec, draft_spec))
        return ModelPair(target, draft, TinyTokenizer(), {})

    monkeypatch.setattr(demo, "load_pair", load_pair)
    assert demo.main(["--tree", "2,1", "--max-new-tokens", "8", "--no-warmup", "--target", "t", "--draft", "d"]) == 0
    out = capsys.readouterr().out
    assert loaded == [("t", "d")]
    assert "identical output: True" in out and "speedup" in out and "tokens/s" in out


def test_demo_exits_1_when_the_outputs_differ(monkeypatch, capsys):
    target, draft = tiny_pair(0)
    monkeypatch.setattr(demo, "load_pair", lambda *a, **k: ModelPair(target, draft, TinyTokenizer(), {}))
    real = demo.treespec.generate

    def other_baseline(*args, **kwargs):  # a baseline that is not the target's own output
        out = real(*args, **kwargs)
        out.sequences[0, -1] += 1
        return out

    monkeypatch.setattr(demo.treespec, "generate", other_baseline)
    assert demo.main(["--tree", "2,1", "--max-new-tokens", "8", "--no-warmup"]) == 1
    assert "identical output: False" in capsys.readouterr().out


def test_bad_tree_argument_says_what_is_accepted():
    with pytest.raises(SystemExit, match="widths like 4,2,2,1"):
        demo.parse_tree("wide-ish", "code")
