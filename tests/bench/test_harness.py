"""treespec.bench.harness: the one harness of the runner and of the studies beside the package."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from treespec.bench import harness
from treespec.bench.config import DATASET_NAMES, ModelConfig
from treespec.bench.datasets import Prompt
from treespec.bench.harness import Generation, hf_generate, run_treespec, summarize
from treespec.bench.timing import DeviceSpan, Wall
from treespec.testing import tiny_pair

PROMPT = torch.tensor([[3, 5, 7, 9, 11, 13]])


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(0)


def target_greedy(target, ids, n):
    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          pad_token_id=0, temperature=None, top_k=None, top_p=None)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


# ------------------------------------------------------------------------------------ the domain table
def test_domain_table_is_read_from_the_domain_presets(tmp_path):
    (tmp_path / "domain").mkdir()
    (tmp_path / "domain" / "poetry.yaml").write_text(
        "defaults:\n  - schema\n  - /dataset@_global_.dataset: mtbench\n  - _self_\nname: poetry\nwidth: 2\n"
    )
    assert harness.domain_datasets(tmp_path) == {"poetry": "mtbench"}


def test_every_shipped_domain_names_a_known_dataset():
    table = harness.domain_datasets()
    shipped = {p.stem for p in (harness.CONFIG_DIR / "domain").glob("*.yaml")}
    assert set(table) == shipped and len(table) >= 3
    assert set(table.values()) <= set(DATASET_NAMES)


# ------------------------------------------------------------------------------------ models
def test_load_models_loads_a_pair_once_per_config():
    cfg = harness.model_config("tiny-random")
    first = harness.load_models(cfg)
    assert harness.load_models(cfg) is first and first.tokenizer is None
    assert first.target.get_output_embeddings().weight.shape[0] == cfg.vocab_size
    other = harness.load_models(replace(cfg, seed=1))
    assert other is not first
    assert not torch.equal(other.target.lm_head.weight, first.target.lm_head.weight)


def test_model_config_of_a_gguf_folder(tmp_path):
    for name in (ModelConfig(name="x").target, ModelConfig(name="x").draft):  # the config checks they exist
        (tmp_path / f"{name}.gguf").touch()
    cfg = harness.model_config(str(tmp_path), device="cuda", dtype="bfloat16")
    assert cfg.source == "pretrained" and (cfg.device, cfg.dtype) == ("cuda", "bfloat16")
    defaults = ModelConfig(name="x")
    assert cfg.target == str(tmp_path / f"{defaults.target}.gguf") and cfg.draft == str(tmp_path / f"{defaults.draft}.gguf")


# ------------------------------------------------------------------------------------ prompts
class CharTokenizer:
    """A tokenizer of one id per character, with a chat template that joins the turns."""

    def apply_chat_template(self, messages, tokenize=False, **kwargs):
        return "|".join(m["content"] for m in messages) + ">"

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [ord(c) for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def test_exported_prompts_read_back_as_the_encoded_ids(tmp_path, monkeypatch):
    sets = {"humaneval": [Prompt(id=f"he/{i}", messages=[{"role": "user", "content": "ab" * (i + 1)}]) for i in range(3)],
            "mtbench": [Prompt(id="mt/0", messages=[{"role": "user", "content": "xyz"}])]}  # fmt: skip
    monkeypatch.setattr("treespec.bench.datasets.load_prompts", lambda name, limit=None, download=True: sets[name][:limit])
    path = tmp_path / "p" / "prompts.json"
    doc = harness.export_prompts(CharTokenizer(), {"humaneval": 2, "mtbench": 5}, path, long_tokens=5)
    back = harness.read_prompts(path)
    assert [pid for pid, _ in back["humaneval"]] == ["he/0", "he/1"] and len(back["mtbench"]) == 1
    assert back["humaneval"][1][1].tolist() == [[ord(c) for c in "abab>"]]
    assert "eos" not in doc  # stop ids come from the target's generation config
    long = back["long"][0][1]
    assert long.shape[1] > 5 and long.dtype == torch.long


# ------------------------------------------------------------------------------------ generations
def test_run_treespec_is_the_targets_greedy_output(pair):
    target, draft = pair
    g = run_treespec(target, draft, PROMPT, max_new_tokens=10, tree=[2, 1], eos_token_id=[])
    assert g.tokens == target_greedy(target, PROMPT, 10)
    assert g.new_tokens == 10 and g.seconds > 0 and g.prompt_tokens == PROMPT.shape[1]
    assert sum(a + 1 for a in g.accepted_lengths) >= g.new_tokens and len(g.accepted_lengths) == g.target_forwards
    assert g.sequences[0, PROMPT.shape[1] :].tolist() == g.tokens
    rec = g.record("p0")
    assert (rec.id, rec.new_tokens, rec.target_forwards, rec.time_total) == ("p0", 10, g.target_forwards, g.seconds)
    auto = run_treespec(target, draft, PROMPT, max_new_tokens=10, method="autoregressive", eos_token_id=[])
    assert auto.tokens == g.tokens and auto.target_forwards == 10 and auto.draft_forwards == 0


def test_run_treespec_samples_reproducibly(pair):
    target, draft = pair
    runs = [run_treespec(target, draft, PROMPT, max_new_tokens=12, tree=[2, 1], eos_token_id=[], temperature=1.0, seed=s)
            for s in (3, 3, 4)]  # fmt: skip
    assert runs[0].tokens == runs[1].tokens != runs[2].tokens


@pytest.mark.parametrize("kwargs", [{}, {"static_cache": True}, {"assistant": 3}, {"assistant": None},
                                    {"prompt_lookup_tokens": 3}])  # fmt: skip
def test_hf_generate_is_the_targets_greedy_output_and_counts_forwards(pair, kwargs):
    target, draft = pair
    kwargs = dict(kwargs)
    assisted = "assistant" in kwargs
    if assisted:
        kwargs = dict(assistant_model=draft, num_assistant_tokens=kwargs["assistant"])
    before = dict(draft.generation_config.to_dict())
    g = hf_generate(target, PROMPT, max_new_tokens=10, ignore_eos=True, **kwargs)
    assert g.tokens == target_greedy(target, PROMPT, 10)
    assert draft.generation_config.to_dict() == before  # the assistant's schedule is put back
    assert g.target_forwards == len(g.accepted_lengths)  # one step per target forward
    assert sum(a + 1 for a in g.accepted_lengths) == 10
    if not assisted and not kwargs.get("prompt_lookup_tokens"):
        assert g.target_forwards == 10 and g.draft_tokens_proposed == 0 and set(g.accepted_lengths) == {0}
    if assisted:
        k = kwargs["num_assistant_tokens"]
        assert g.draft_forwards > 0 and 0 < g.draft_tokens_proposed <= (k or 20) * g.target_forwards
        if k:  # a constant schedule: k drafts a step (fewer near the end of the budget)
            assert g.draft_tokens_proposed > (k - 1) * g.target_forwards // 2


def test_hf_generate_samples_reproducibly(pair):
    target, _ = pair
    runs = [hf_generate(target, PROMPT, max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=s).tokens for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


# ------------------------------------------------------------------------------------ records
def test_summarize_pools_the_generations():
    a = Generation(tokens=[1] * 6, seconds=2.0, target_forwards=3, draft_tokens_proposed=9, accepted_lengths=[1, 1, 1],
                   ahead_steps=3, ahead_hits=1, draft_forwards=6, draft_forwards_ahead=6, tree="t1")  # fmt: skip
    b = Generation(tokens=[1] * 4, seconds=3.0, target_forwards=1, draft_tokens_proposed=3, accepted_lengths=[3],
                   accepted_from_lookup=2, tree="t2")  # fmt: skip
    s = summarize([a, b])
    assert s["prompts"] == 2 and s["new_tokens"] == 10 and s["tau"] == 10 / 4
    assert s["tokens_per_second"] == 10 / 5.0 and s["nodes_per_step"] == 12 / 4
    assert s["ahead_hit_rate"] == 1 / 3 and s["draft_forwards_per_step_beside"] == 6 / 3
    assert s["share_from_lookup"] == 2 / 10 and s["trees"] == ["t1", "t2"]
    assert "ahead_hit_rate" not in summarize([b]) and "share_from_lookup" not in summarize([a])


def test_write_json_writes_atomically(tmp_path):
    path = harness.write_json(tmp_path / "a" / "b.json", {"x": Path("p"), "y": [1, 2]})
    assert json.loads(path.read_text()) == {"x": "p", "y": [1, 2]}
    class Unwritable:
        def __str__(self):
            raise TypeError("no text")

    with pytest.raises(TypeError):  # a failed write leaves the previous file whole
        harness.write_json(path, {"x": "new", "bad": Unwritable()})
    assert json.loads(path.read_text()) == {"x": "p", "y": [1, 2]}


def test_out_dir_is_the_environments_or_the_default(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert harness.out_dir("outputs/x") == Path("outputs/x")
    monkeypatch.setenv("OUT", "/somewhere")
    assert harness.out_dir("outputs/x") == Path("/somewhere")


def test_wall_block_and_start_stop_measure_the_span():
    with Wall() as w:
        time.sleep(0.02)
    assert w.seconds >= 0.02 and w.cpu_seconds >= 0.0
    span = Wall().start()
    time.sleep(0.02)
    assert span.stop() >= 0.02 and span.seconds >= 0.02


def test_device_span_on_the_cpu_is_wall_time():
    span = DeviceSpan("cpu").start()
    time.sleep(0.02)
    assert span.stop().ms() >= 20
