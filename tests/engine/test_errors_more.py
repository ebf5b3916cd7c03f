"""One error hierarchy, and the inputs that used to fail unclearly: each gets a treespec error
that names the argument or config key and the fix, raised before any model work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import treespec
from treespec.errors import ArgumentError, ConfigError, TreespecError

P = torch.tensor([[3, 4, 5]])
ROOT = Path(__file__).resolve().parents[2]


def test_the_hierarchy_keeps_the_old_names_and_bases():
    from treespec.backends.base import CacheFullError, UnsupportedModelError
    from treespec.bench.config import ConfigError as BenchConfigError
    from treespec.drafting.base import TreeConfigError
    from treespec.engine.checks import ArgumentError as ChecksArgumentError
    from treespec.loading.models import IncompatibleModelsError, IncompatibleTokenizersError, ModelLoadError
    from treespec.loading.weights import WeightsError

    assert ChecksArgumentError is ArgumentError and BenchConfigError is ConfigError
    for cls, old_base in [(ArgumentError, ValueError), (ConfigError, ValueError), (treespec.TreeShapeError, ValueError),
                          (TreeConfigError, treespec.TreeShapeError), (UnsupportedModelError, ValueError),
                          (CacheFullError, RuntimeError), (WeightsError, RuntimeError), (ModelLoadError, RuntimeError),
                          (IncompatibleTokenizersError, ValueError), (IncompatibleModelsError, ValueError)]:  # fmt: skip
        assert issubclass(cls, TreespecError) and issubclass(cls, old_base), cls
        assert getattr(treespec, cls.__name__) is cls  # exported
    assert issubclass(WeightsError, treespec.CacheError) and issubclass(CacheFullError, treespec.CacheError)
    assert not issubclass(ValueError, TreespecError)  # the check can fail


def test_sampling_settings_raise_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="top_p must be in") as info:
        treespec.SamplingConfig(temperature=1.0, top_p=1.5)
    assert info.value.key == "top_p"


def test_config_classes_raise_config_errors_naming_the_field():
    with pytest.raises(treespec.TreeConfigError, match="OverlapConfig.levels must be an int >= 1") as info:
        treespec.OverlapConfig(levels=0)
    assert info.value.key == "levels"
    with pytest.raises(treespec.TreeConfigError, match="lookup branches must be an int >= 1") as info:
        treespec.LookupConfig(branches=0)
    assert info.value.key == "branches"


def _gen(target, draft, **kwargs):
    args = dict(max_new_tokens=4)
    args.update(kwargs)
    return treespec.generate(target, draft, args.pop("input_ids", P), **args)


def test_block_acceptance_with_tree_auto_says_auto_chooses_later(target, unrelated_draft):
    with pytest.raises(ArgumentError, match=r"tree='auto' chooses its tree .* only after measuring this machine; pass a chain") as info:
        _gen(target, unrelated_draft, method="linear", tree="auto", acceptance="block", temperature=1.0)
    assert info.value.argument == "acceptance"


@pytest.mark.parametrize("tree", ["dynamic", "adaptive", treespec.DynamicTreeConfig()])
def test_linear_with_a_growing_tree_says_use_method_tree(target, unrelated_draft, tree):
    with pytest.raises(treespec.TreeShapeError, match=r"method='linear' drafts one chain: use method='tree'"):
        _gen(target, unrelated_draft, method="linear", tree=tree)


def test_auto_tree_budget_below_the_default_depth():
    config = treespec.AutoTreeConfig(budget=4)  # the default max_depth 8 is capped, not blamed
    assert (config.budget, config.max_depth) == (4, 4)
    assert treespec.AutoTreeConfig(budget=np.int64(16), max_depth=3).max_depth == 3
    with pytest.raises(ConfigError, match=r"AutoTreeConfig.max_depth must be a whole number in 1\.\.") as info:
        treespec.AutoTreeConfig(budget=4, max_depth=0)
    assert info.value.key == "max_depth"


@pytest.mark.parametrize("tree", [[np.int64(2)], np.array([2, 1]), torch.tensor([2, 1])])
def test_numpy_and_torch_widths_are_widths(target, unrelated_draft, tree):
    want = _gen(target, unrelated_draft, tree=[int(w) for w in np.asarray(tree).tolist()], eos_token_id=[]).sequences
    assert torch.equal(_gen(target, unrelated_draft, tree=tree, eos_token_id=[]).sequences, want)


@pytest.mark.parametrize("tree,match", [(np.array([2.5, 1]), "whole numbers"), (np.array(2), "widths list")])
def test_bad_numpy_widths(target, unrelated_draft, tree, match):
    with pytest.raises(treespec.TreeShapeError, match=match):
        _gen(target, unrelated_draft, tree=tree)


@pytest.mark.parametrize("value", ["yes", 1, "False"])
def test_compile_must_be_a_bool_or_none(target, value):
    with pytest.raises(ArgumentError, match=r"compile must be True, False or None") as info:
        _gen(target, None, method="autoregressive", compile=value)
    assert info.value.argument == "compile"


def test_a_streamer_without_put_and_end_is_refused_before_the_prefill(target, monkeypatch):
    from treespec.engine.loop import SpeculativeEngine

    def no_prefill(*args, **kwargs):
        raise AssertionError("the prefill ran before the streamer was checked")

    monkeypatch.setattr(SpeculativeEngine, "prefill", no_prefill)
    with pytest.raises(ArgumentError, match=r"streamer must have put\(token_ids\) and end\(\) methods, like transformers' TextStreamer"):
        treespec.stream(target, None, P, max_new_tokens=4, method="autoregressive", streamer="foo")


@pytest.mark.parametrize("which", ["target", "draft"])
def test_a_model_name_instead_of_a_model(target, unrelated_draft, which):
    models = {"target": target, "draft": unrelated_draft, which: "qwen2.5-coder-0.5b-instruct"}
    with pytest.raises(ArgumentError, match=rf"{which} is 'qwen2.5-coder-0.5b-instruct', a name or path.*"
                       r"treespec\.loading\.load_model\('qwen2\.5-coder-0\.5b-instruct'\)") as info:  # fmt: skip
        _gen(models["target"], models["draft"])
    assert info.value.argument == which
    with pytest.raises(ArgumentError, match="must be a transformers causal LM"):
        _gen(target, 42)


@pytest.mark.parametrize("eos", [-5, [3, -1], torch.tensor([-2])])
def test_negative_eos_token_id(target, eos):
    with pytest.raises(ArgumentError, match=r"eos_token_id must hold token ids >= 0"):
        _gen(target, None, method="autoregressive", eos_token_id=eos)


# ------------------------------------------------------------------------------- the bench
def _bench(*args: str) -> subprocess.CompletedProcess:
    """treespec-bench as a user runs it, with a probe that records whether torch was imported
    by the time it exits (the config check must come before torch and transformers)."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules)))\n"
             "sys.argv = ['treespec-bench'] + sys.argv[1:]\n"
             "from treespec.bench.run import main\n"
             "main()\n")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    "override,message",
    [("model.device=tpu", "model.device must be one of ['cpu', 'cuda', 'mps']"),
     ("method.attention=bogus", "method.attention must be one of ['auto', 'sdpa', 'flash'], got 'bogus'"),
     ("model.target=qwen-coder-7b", "model.target=qwen-coder-7b: unknown model name; use one of qwen2.5-coder"),
     ("model.draft=./no/such/dir", "model.draft=./no/such/dir: no such file or directory"),
     ("model=qwen-big", "model=qwen-big: no such config group option; choose one of ['qwen-coder', 'tiny-random']"),
     ("method.name=tree,beam", "method.name must be one of"),
     ("max_new_tokens=abc", "max_new_tokens must be a whole number, got 'abc'"),
     ("+domain.widht=3", "unknown key 'domain.widht': DomainConfig has")],
)  # fmt: skip
def test_bench_config_errors_exit_2_before_torch(override, message):
    proc = _bench(override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "torch imported: False" in proc.stderr


def test_the_bench_probe_sees_torch_when_it_is_imported():
    """The companion of the test above: the probe reports an import of torch (a value only the
    full check judges, a negative max_new_tokens, is answered after the import)."""
    proc = _bench("model=tiny-random", "max_new_tokens=-1")
    out = proc.stdout + proc.stderr  # Hydra's log goes to stdout
    assert proc.returncode == 2 and "bad config: max_new_tokens must be >= 1" in out, out[-2000:]
    assert "torch imported: True" in proc.stderr and "Traceback" not in out
