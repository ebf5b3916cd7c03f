"""Draft heads (treespec.heads, drafting/head.py): exactness with every tree policy, the features
the engine hands the head, losslessness at T > 0 (chi-square, with a broken verifier caught),
training on a learnable tiny target, the CLI, and refusing a head made for another target."""

import time

import pytest
import torch

import treespec
import treespec.acceptance.rejection as rejection
import treespec.drafting.head as head_drafting
from chisq import ALPHA, E2E_PROMPT as PROMPT, POWER, e2e_pair, exact_joint, pvalue, sample_counts
from treespec.acceptance.sampling import SamplingConfig
from treespec.backends.cuda_graphs import GraphedBackend
from treespec.backends.static_cache import StaticSdpaBackend
from treespec.drafting.dynamic import DynamicTreeConfig
from treespec.heads import load_head
from treespec.heads.features import DataConfig, sample_from_target, target_features, tokenize_sources
from treespec.heads.model import DraftHead, HeadMismatchError
from treespec.heads.store import head_path, save_head
from treespec.heads.train import TrainConfig, evaluate, shifted, train
from treespec.testing import tiny_cycle_model, tiny_model


@pytest.fixture(scope="module")
def pair():
    target = tiny_model(0)
    return target, DraftHead.for_target(target, name="tiny", seed=3)


def greedy_reference(target, ids, n):
    return target.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


POLICIES = [
    dict(tree=[2, 2, 1]),
    dict(method="linear", tree="chain-4"),
    dict(tree="dynamic"),
    dict(tree="adaptive"),
    dict(tree=[3, 2], attention="compiled"),  # static caches, compiled forwards (the GPU path minus graphs)
]


@pytest.mark.parametrize("kwargs", POLICIES, ids=lambda k: "-".join(map(str, k.values())))
def test_greedy_with_a_head_is_the_targets_own_output(pair, kwargs):
    target, head = pair
    if kwargs.get("attention") == "compiled":
        kwargs = dict(kwargs, attention=GraphedBackend(StaticSdpaBackend(), compile=True, compile_backend="aot_eager"))
    ids = torch.randint(2, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    out = treespec.generate(target, head, ids, max_new_tokens=24, eos_token_id=[], **kwargs)
    assert torch.equal(out.sequences, greedy_reference(target, ids, 24))
    assert out.stats.tree.endswith("(draft head)")


def test_greedy_with_a_head_and_an_auto_tree(pair, monkeypatch, tmp_path):
    from treespec.engine import calibrate

    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "CPU_TARGET_SIZES", (1, 2, 4))
    monkeypatch.setattr(calibrate, "CPU_DRAFT_SIZES", (1, 2))
    target, head = pair
    ids = torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    out = treespec.generate(target, head, ids, max_new_tokens=16, tree="auto", eos_token_id=[])
    assert torch.equal(out.sequences, greedy_reference(target, ids, 16))


def test_the_head_reads_the_targets_features_at_every_step(pair, monkeypatch):
    """The root's and the first child's q in generation equal the head run offline on the final
    sequence with the target's features (the root) and the root's predicted feature (the child):
    the engine hands over the right features after every kind of step (accepted or not)."""
    target, head = pair
    seen = []
    original = head_drafting.HeadDrafter.draft

    def recording(self, pending, root_pos):
        tree = original(self, pending, root_pos)
        seen.append((root_pos, tree.tokens[1].item(), tree.q_logits[0].clone(), tree.q_logits[1].clone()))
        return tree

    monkeypatch.setattr(head_drafting.HeadDrafter, "draft", recording)
    ids = torch.randint(2, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    out = treespec.generate(target, head, ids, max_new_tokens=20, tree=[2, 2], eos_token_id=[])
    seq = out.sequences
    with torch.no_grad():
        feats_in = shifted(target_features(target, seq, 1, dtype=torch.float32, progress=False))  # (1, S, Hm)
        assert len(seen) > 3
        for root_pos, child, q_root, q_child in seen:
            pos = torch.arange(root_pos + 2)[None]
            f_root = head.step(seq[:, : root_pos + 1], feats_in[:, : root_pos + 1], pos[:, :-1])[:, -1]  # (1, Hm)
            torch.testing.assert_close(head.logits(f_root)[0], q_root, atol=1e-4, rtol=1e-4)
            ids_child = torch.cat([seq[:, : root_pos + 1], torch.tensor([[child]])], dim=1)
            f_child = head.step(ids_child, torch.cat([feats_in[:, : root_pos + 1], f_root[:, None]], dim=1), pos)[:, -1]
            torch.testing.assert_close(head.logits(f_child)[0], q_child, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ losslessness at T > 0
@pytest.fixture(scope="module")
def e2e_head():
    target, _ = e2e_pair()
    return target, DraftHead.for_target(target, name="e2e", seed=5)


SAMPLED = [
    ("tree", [3, 2], "rejection", SamplingConfig(temperature=1.0)),
    ("tree", [2, 2], "traversal", SamplingConfig(temperature=0.8, top_k=6)),
    ("linear", "chain-3", "block", SamplingConfig(temperature=1.0)),
    ("tree", DynamicTreeConfig(width=2, children=3, depth=3, budget=8), "rejection", SamplingConfig(temperature=1.0)),
]


@pytest.mark.parametrize("method,tree,acceptance,cfg", SAMPLED, ids=["tree-rejection", "tree-traversal", "chain-block", "dynamic-rejection"])
def test_sampling_with_a_head_keeps_the_targets_distribution(e2e_head, method, tree, acceptance, cfg):
    target, head = e2e_head
    counts = sample_counts(target, head, PROMPT, cfg, seed=sum(map(ord, f"{method}{tree}{acceptance}")), draws=700, method=method, tree=tree,
                           acceptance=acceptance).counts
    joint = exact_joint(target, PROMPT, cfg)
    assert pvalue(counts.sum(1), joint.sum(1)) > ALPHA
    assert pvalue(counts, joint) > ALPHA


def test_a_verifier_that_trusts_the_head_fails_the_same_test(e2e_head, monkeypatch):
    target, head = e2e_head
    monkeypatch.setattr(rejection, "_accept_prob", lambda rx, qx: torch.ones_like(rx))
    cfg = SamplingConfig(temperature=1.0)
    counts = sample_counts(target, head, PROMPT, cfg, seed=9, draws=600, method="tree", tree=[3, 2]).counts
    assert pvalue(counts, exact_joint(target, PROMPT, cfg)) < POWER


# ------------------------------------------------------------------ training
def test_training_on_a_learnable_target_reaches_80_percent_agreement():
    started = time.perf_counter()
    target = tiny_cycle_model(0).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    blocks = sample_from_target(target, 96, 32, gen, progress=False)
    feats = target_features(target, blocks, 64, dtype=torch.float32, progress=False)
    head = DraftHead.for_target(target, name="cycle")
    held, held_feats = blocks[:16], feats[:16]
    before = evaluate(head, held, held_feats, progress=False)[0].agreement
    train(head, blocks[16:], feats[16:], TrainConfig(steps=150, batch_size=16, lr=3e-3, token_weight=1.0), progress=False)
    after = evaluate(head, held, held_feats, progress=False)[0].agreement
    assert before < 0.4  # chance is 1/8
    assert after >= 0.8
    assert time.perf_counter() - started < 120  # a guard limit, not a speed claim


def test_a_trained_head_is_accepted_more_in_generation(tmp_path, monkeypatch):
    """Trained on its target, a head's drafts are accepted far more often than an untrained one's."""
    target = tiny_cycle_model(0).requires_grad_(False)
    blocks = sample_from_target(target, 80, 32, torch.Generator().manual_seed(1), progress=False)
    feats = target_features(target, blocks, 64, dtype=torch.float32, progress=False)
    fresh = DraftHead.for_target(target, name="cycle")
    trained = DraftHead.for_target(target, name="cycle")
    train(trained, blocks, feats, TrainConfig(steps=120, batch_size=16, lr=3e-3, token_weight=1.0), progress=False)
    trained.requires_grad_(False)
    ids = torch.tensor([[0, 3, 5]])
    tau = [treespec.generate(target, h, ids, max_new_tokens=40, method="linear", tree="chain-4", eos_token_id=[]).stats.tau
           for h in (fresh, trained)]
    assert tau[1] > 3.0 > tau[0]


def test_tokenized_sources_are_counted_and_capped():
    class Chars:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + ord(c) % 50 for c in text]}

    config = DataConfig(stdlib=False, bench=False, max_tokens=30, seq_len=4)
    stream, counts = tokenize_sources(Chars(), {"a": ["x" * 100], "b": ["yy", "zzz"]}, config, progress=False)
    assert stream.numel() == sum(counts.values()) <= 30 + 3  # one end-of-text token per text
    assert counts["b"] == 3 + 4 and counts["a"] > 15  # b runs out, a takes the rest


def test_requests_written_from_the_standard_library_and_chat_templates():
    import sysconfig
    from pathlib import Path

    from treespec.heads.features import python_files
    from treespec.heads.requests import chat_requests, code_requests, prose_requests

    files = python_files(Path(sysconfig.get_paths()["stdlib"]))
    requests = code_requests(6, 0, files)
    assert len(requests) == 6 and len(set(requests)) == 6
    assert all(r.startswith("Write a Python function") for r in requests[0::2])
    assert all(r.startswith("Explain what this Python function does") and "```python" in r for r in requests[1::2])
    prose = prose_requests(40, seed=0)
    assert len(set(prose)) >= 35 and not any("```" in r or "Python" in r for r in prose)
    assert [r.startswith("Write ") for r in prose[:4]] == [True, False, False, False]  # writing, role, concept, problem
    mixed = chat_requests(9, 1, files)
    assert len(mixed) == 9 and sum(r in prose_requests(4, 1) for r in mixed) == 4  # half and half, interleaved
    assert mixed[1] == prose_requests(4, 1)[0]


def test_answer_blocks_count_answer_repeat_times_in_training(monkeypatch):
    from treespec.heads import features

    monkeypatch.setattr(features, "text_sources", lambda config: {})
    monkeypatch.setattr(features, "target_answers", lambda *a, **k: [torch.arange(10 * 8)])
    monkeypatch.setattr(features, "chat_requests", lambda count, seed, files: ["a request"] * count)
    blocks = {}
    for repeat in (1, 3):
        config = DataConfig(stdlib=False, bench=False, answers=2, answer_repeat=repeat, seq_len=8, eval_blocks=2,
                            self_samples=0)
        blocks[repeat] = features.make_blocks(config, tokenizer=object(), target=None, progress=False)
    assert blocks[1].train.shape[0] == 8 and blocks[3].train.shape[0] == 24
    assert sorted(map(tuple, blocks[3].train.tolist())) == sorted(sorted(map(tuple, blocks[1].train.tolist())) * 3)
    with pytest.raises(ValueError, match="answer_repeat"):
        DataConfig(answer_repeat=0)


def test_the_measured_prompt_sets_cannot_be_training_data(monkeypatch):
    with pytest.raises(ValueError, match="humaneval"):
        DataConfig(exclude=["mtbench"])
    from treespec.bench import datasets
    from treespec.heads import features

    asked = []

    def cached(name, download=True):
        asked.append(name)
        return [datasets.Prompt(name, [{"role": "user", "content": f"a {name} prompt"}])]

    monkeypatch.setattr(datasets, "load_prompts", cached)
    sources = features.text_sources(DataConfig(stdlib=True, bench=True))
    assert sources["stdlib"] and all(p.suffix == ".py" for p in sources["stdlib"][:50])
    bench = {k for k in sources if k.startswith("bench:")}
    assert bench == {f"bench:{n}" for n in datasets.DATASETS if n not in features.MEASURED_SETS} != set()
    assert not set(asked) & set(features.MEASURED_SETS)  # never even read


# ------------------------------------------------------------------ the command, files, wrong heads
def test_the_command_trains_saves_and_the_head_loads_by_name(tmp_path, monkeypatch, capsys):
    from treespec.heads import cli

    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["treespec-train-head", "train_head=tiny", "progress=false", "name=cycle-head"])
    cli.main()
    out = capsys.readouterr().out
    assert "self_samples" in out and "top-1 agreement" in out
    assert head_path("cycle-head").is_file()
    target = tiny_cycle_model(0)
    for head in (load_head(target, "cycle-head"), load_head(target)):
        ids = torch.tensor([[2, 4]])
        res = treespec.generate(target, head, ids, max_new_tokens=12, tree=[2, 1], eos_token_id=[])
        assert torch.equal(res.sequences, greedy_reference(target, ids, 12))


def test_a_head_for_another_target_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    target = tiny_model(0)
    save_head(DraftHead.for_target(target, name="t0"), head_path("t0"))
    other_weights = tiny_model(7)  # same shapes, other weights
    with pytest.raises(HeadMismatchError, match="trained for 't0'.*weights hash"):
        load_head(other_weights, "t0")
    other_size = tiny_model(0, hidden_size=48)
    with pytest.raises(HeadMismatchError, match="hidden size 32.*48"):
        load_head(other_size, "t0")
    with pytest.raises(FileNotFoundError, match="treespec-train-head"):
        load_head(other_weights)
    # a head bound to one target object, passed with another
    head = load_head(target, "t0")
    with pytest.raises(HeadMismatchError, match="another model object"):
        treespec.generate(tiny_model(0), head, torch.tensor([[1, 2]]), max_new_tokens=4)


def test_options_a_head_does_not_support_are_refused(pair):
    target, head = pair
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="overlap=True is not supported with a draft head"):
        treespec.generate(target, head, ids, max_new_tokens=4, tree=[2, 2], overlap=True)
    with pytest.raises(ValueError, match="lookup=True is not supported with a draft head"):
        treespec.generate(target, head, ids, max_new_tokens=4, tree=[2, 2], lookup=True)


def test_a_head_loop_compiles_nothing_after_the_first_call(pair):
    """As with a draft model (tests/engine/test_speculator.py): 10 generate calls with random
    prompt lengths (short ones, and ones cut into padded chunks) and output lengths. The head
    prefills in the target's fixed chunk sizes, so every dynamo graph is made in the first call;
    every output is the target's own greedy output."""
    import random

    from treespec.engine import speculator as kept_module

    target, head = pair
    torch._dynamo.reset()
    treespec.release()
    backend = GraphedBackend(StaticSdpaBackend(), compile=True, compile_backend="aot_eager")
    rng = random.Random(1)
    graphs = []
    for i in range(10):
        t = [3, 150, 11, 40, 7, 90, 14, 2, 33, 120][i]
        prompt = torch.randint(2, 64, (1, t), generator=torch.Generator().manual_seed(i))
        new = rng.randint(1, 20)
        out = treespec.generate(target, head, prompt, max_new_tokens=new, tree=[2, 1], attention=backend, eos_token_id=[])
        assert torch.equal(out.sequences, greedy_reference(target, prompt, new))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 9, graphs
    assert len(kept_module.KEPT) == 1
    treespec.release()
    torch._dynamo.reset()


def test_each_kind_of_text_gets_an_equal_share_of_the_held_out_blocks():
    from treespec.heads.features import held_out_shares

    assert held_out_shares(32, {"files": 11000, "answers": 213}) == {"files": 16, "answers": 16}
    assert held_out_shares(32, {"files": 11000, "answers": 5}) == {"files": 28, "answers": 4}  # keeps one to train on
    assert held_out_shares(8, {"self_samples": 96}) == {"self_samples": 8}


def test_the_held_out_check_is_reported_per_kind_of_text(tmp_path, monkeypatch):
    """Text files and the target's own samples are held out in equal shares and measured apart, so
    that a head that does well on one and poorly on the other shows it."""
    from treespec.heads import pipeline
    from treespec.heads.features import make_blocks

    class Chars:  # a tokenizer of characters, for the text files
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + ord(c) % 7 for c in text]}

    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n" * 40)
    config = DataConfig(stdlib=False, packages=False, bench=False, text_dir=str(tmp_path), self_samples=24,
                        max_tokens=600, seq_len=32, eval_blocks=8)  # fmt: skip
    target = tiny_cycle_model(0).requires_grad_(False)
    blocks = make_blocks(config, Chars(), target, progress=False)
    assert sorted(blocks.held_out_kinds) == ["files"] * 4 + ["self_samples"] * 4
    assert blocks.train.shape[0] + blocks.held_out.shape[0] == blocks.tokens // 32

    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(pipeline, "make_blocks", lambda *a, **k: blocks)
    run = pipeline.HeadTrainConfig(target="tiny-cycle", device="cpu", dtype="float32", save_dtype="float32",
                                   max_minutes=1, progress=False, feature_batch=64,
                                   data=DataConfig(stdlib=False, bench=False, self_samples=24, seq_len=32),
                                   train=TrainConfig(steps=20, batch_size=8, lr=3e-3))  # fmt: skip
    lines = []
    summary = pipeline.run(run, log=lines.append)
    by_kind = summary.training["held_out_by_kind"]
    assert sorted(by_kind) == ["files", "self_samples"] and all(len(v) == 2 for v in by_kind.values())
    assert any(line.strip().startswith("files: depth 1") for line in lines)
