"""Run one benchmark cell: a (model pair, method, dataset, domain preset, sampling) over N prompts.

Library code: takes a typed `BenchConfig` (treespec.bench.config), never Hydra. The Hydra app
(`treespec.bench.run`) composes the config and writes what `run_cell` returns as JSON.

Loaded model pairs are kept in a process-wide cache keyed by their config, so the jobs of one
Hydra multirun (run one after another in one process) load the weights once.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import sys
import zlib
from dataclasses import asdict, replace
from typing import Any

import torch

from treespec.drafting.policy import resolve_policy
from treespec.tree.auto import AutoTreeConfig
from treespec.tree.topology import TreeTopology

from treespec.bench.config import BenchConfig
from treespec.bench.harness import LoadedPair, hf_generate, load_models
from treespec.bench.metrics import PromptRecord, aggregate
from treespec.bench.results import ResultsSink, status
from treespec.bench.timing import Wall

log = logging.getLogger(__name__)

RESULTS_SCHEMA = "treespec-bench/v1"


def build_prompts(cfg: BenchConfig, pair: LoadedPair) -> list[tuple[str, torch.Tensor]]:
    """[(prompt id, LongTensor (1, T))] for the cell. Tokenizer-less models get random token-id
    prompts (seeded by the dataset name and offset), so smoke runs never download anything."""
    ds = cfg.dataset
    device = pair.target.device
    if pair.tokenizer is None or ds.name == "synthetic":
        from treespec.bench.datasets import synthetic_prompts

        vocab = pair.target.get_output_embeddings().weight.shape[0]
        seed = zlib.crc32(ds.name.encode()) + ds.offset
        prompts = synthetic_prompts(
            ds.num_prompts, vocab, min_len=ds.synthetic_min_len, max_len=ds.synthetic_max_len, seed=seed
        )
        return [(f"{ds.name}/synthetic/{ds.offset + i}", ids.to(device)) for i, (_, ids) in enumerate(prompts)]
    from treespec.bench.datasets import encode_prompt, load_prompts

    prompts = load_prompts(ds.name, limit=ds.num_prompts, offset=ds.offset)
    if len(prompts) < ds.num_prompts:
        log.warning("%s has only %d prompts from offset %d", ds.name, len(prompts), ds.offset)
    return [(p.id, encode_prompt(pair.tokenizer, p).to(device)) for p in prompts]


def tree_for(cfg: BenchConfig):
    """The `tree=` argument of the method: per-level widths (the domain preset, or a chain for
    linear), a dynamic/adaptive config or an optimized TreeTopology (cfg.tree); None for
    autoregressive and hf_assisted."""
    method = cfg.method.name
    if method == "tree":
        spec = cfg.tree.spec(cfg.domain.name)
        return cfg.domain.tree_widths if spec is None else spec
    if method == "linear":
        return [1] * cfg.domain.linear_k
    return None


def tree_label(cfg: BenchConfig):
    """A JSON-friendly description of the tree: a widths list, or the policy's description
    (for auto, where its profile comes from: each prompt's record says what was chosen)."""
    tree = tree_for(cfg)
    if tree is None or isinstance(tree, list):
        return tree
    if isinstance(tree, TreeTopology):
        return f"optimized: {tree.describe()}"
    if isinstance(tree, AutoTreeConfig):
        return f"auto: profile {cfg.tree.profile_path(cfg.domain.name) or 'default'}, budget {tree.budget}, max_depth {tree.max_depth}"
    return f"{cfg.tree.name}: {tree}"


def recorded_config(cfg: BenchConfig, synthetic: bool) -> dict:
    """The config as the run used it: the keys it did not read are left out (the tiny pair's
    shape or the pretrained pair's names, the other tree policies' settings, sampling settings
    under greedy decoding), the domain's tree resolved to its widths, and the dataset that
    produced the prompts (synthetic: random token ids, when the models have no tokenizer)."""
    d = asdict(cfg)
    method = cfg.method.name
    unused = ("target", "draft") if cfg.model.source == "tiny-random" else ("seed", "vocab_size", "hidden_size", "num_layers")
    for key in unused:
        d["model"].pop(key)
    if method.startswith("hf_"):
        d["method"] = {"name": method}
    domain = {"name": cfg.domain.name}
    if method == "tree" and cfg.tree.name == "preset":
        domain["widths"] = cfg.domain.tree_widths
    if method in ("linear", "hf_assisted", "hf_prompt_lookup"):
        domain["linear_k"] = cfg.domain.linear_k
    d["domain"] = domain
    if method == "tree":
        d["tree"] = {key: d["tree"][key] for key in cfg.tree.active_keys()}
        if cfg.tree.name == "auto":
            d["tree"]["profile_file"] = str(cfg.tree.profile_path(cfg.domain.name) or "default (treespec.tree.auto.DEFAULT_PROFILE)")
    else:
        d["tree"] = None
    ds = d["dataset"]
    if synthetic:
        ds["replaces"], ds["name"] = (ds["name"], "synthetic") if ds["name"] != "synthetic" else (None, "synthetic")
    else:
        ds.pop("synthetic_min_len"), ds.pop("synthetic_max_len")
    if cfg.sampling.greedy:
        d["sampling"] = {"name": cfg.sampling.name, "temperature": 0.0}
    return d


def draft_nodes(cfg: BenchConfig) -> int:
    """Draft tokens proposed per step (the tree size; k for linear and hf_assisted; the most
    a dynamic or adaptive policy can propose)."""
    method = cfg.method.name
    if method in ("autoregressive", "hf_generate", "hf_static"):
        return 0
    if method in ("hf_assisted", "hf_prompt_lookup"):
        return cfg.domain.linear_k
    return resolve_policy(tree_for(cfg), method).draft_nodes(cfg.sampling.greedy)


# ------------------------------------------------------------------------------------ methods
_BACKENDS: dict[tuple, Any] = {}


def _backend(cfg: BenchConfig, pair: LoadedPair, ids: torch.Tensor, max_new: int):
    """One treespec backend per (attention, compile, device, dtype) for the whole process, so
    that every prompt of a run replays the CUDA graphs (and compiled forwards) made for the
    first. Its static caches get room for twice the first prompt's need (min_capacity), so that
    a longer prompt later rarely reallocates them: a new capacity is a new shape, with new
    graphs and new compilations."""
    from treespec.backends.cuda_graphs import GraphedBackend
    from treespec.backends.factory import make_backend

    m = cfg.method
    key = (m.attention, m.compile, str(ids.device), pair.target.dtype)
    if key not in _BACKENDS:
        _BACKENDS[key] = make_backend(m.attention, ids.device, pair.target.dtype, compile=m.compile,
                                      context_length=ids.shape[1] + max_new)  # fmt: skip
    backend = _BACKENDS[key]
    if isinstance(backend, GraphedBackend):
        backend.min_capacity = max(backend.min_capacity, 2 * (ids.shape[1] + max_new) + 256)
    return backend


def _generate_treespec(cfg: BenchConfig, pair: LoadedPair, ids: torch.Tensor, max_new: int, seed: int,
                       progress: str | None = None):
    import treespec

    method = cfg.method.name
    s = cfg.sampling
    gen = torch.Generator(device=ids.device).manual_seed(seed) if not s.greedy else None
    kwargs = {}
    if not s.greedy:
        kwargs.update(temperature=float(s.temperature), top_k=s.top_k, top_p=float(s.top_p), generator=gen,
                      acceptance=s.acceptance)
    result = treespec.generate(
        pair.target,
        None if method == "autoregressive" else pair.draft,
        ids,
        max_new_tokens=max_new,
        method=method,
        tree=tree_for(cfg),
        eos_token_id=[] if cfg.ignore_eos else None,
        attention=_backend(cfg, pair, ids, max_new),
        lookup=cfg.lookup,
        overlap=cfg.overlap and method != "autoregressive",
        streamer=_StepRecorder(_token_bar(progress, max_new)) if progress else None,
        **kwargs,
    )
    st = result.stats
    return result.sequences, PromptRecord(
        id="",
        prompt_tokens=ids.shape[1],
        new_tokens=st.new_tokens,
        target_forwards=st.target_forwards,
        draft_forwards=st.draft_forwards,
        prefill_forwards=st.prefill_forwards,
        draft_tokens_proposed=st.draft_tokens_proposed,
        accepted_lengths=list(st.accepted_lengths),
        accepted_from_lookup=st.accepted_from_lookup,
        time_total=st.time_total,
        time_prefill=st.time_prefill,
        time_draft=st.time_draft,
        time_verify=st.time_verify,
        time_other=st.time_other,
        tree=st.tree,
        tree_choice=st.tree_choice or None,
    )


class _StepRecorder:
    """A transformers-style streamer that shows the tokens of each step on a bar (the first put
    is the prompt)."""

    def __init__(self, bar=None):
        self.calls: list[int] = []
        self.bar = bar

    def put(self, value):
        self.calls.append(int(value.numel()))
        if self.bar is not None and len(self.calls) > 1:
            self.bar.update(self.calls[-1])

    def end(self):
        if self.bar is not None:
            self.bar.close()


def _token_bar(desc: str | None, total: int):
    """A token progress bar on stderr (None without a description): a long generation is never
    silent. Its updates cost microseconds per step, inside the timed span."""
    if desc is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False, file=sys.stderr, dynamic_ncols=True)


HF_METHODS = ("hf_generate", "hf_static", "hf_assisted", "hf_prompt_lookup")


def _generate_hf(cfg: BenchConfig, pair: LoadedPair, ids: torch.Tensor, max_new: int, seed: int,
                 progress: str | None = None):
    """A transformers baseline (HF_METHODS) through the harness's hf_generate. hf_assisted is like
    for like with method=linear: num_assistant_tokens = domain.linear_k, constant schedule."""
    method, s, k = cfg.method.name, cfg.sampling, cfg.domain.linear_k
    sampled = {} if s.greedy else dict(temperature=float(s.temperature), top_k=s.top_k, top_p=float(s.top_p))
    run = hf_generate(
        pair.target, ids, max_new_tokens=max_new, seed=seed, ignore_eos=cfg.ignore_eos,
        assistant_model=pair.draft if method == "hf_assisted" else None,
        num_assistant_tokens=k if method == "hf_assisted" else None,
        static_cache=method == "hf_static",  # transformers compiles the forward itself on CUDA
        prompt_lookup_tokens=k if method == "hf_prompt_lookup" else 0,  # n-gram drafts, no draft model
        **sampled,
    )  # fmt: skip
    return run.sequences, run.record()


def generate_one(cfg: BenchConfig, pair: LoadedPair, ids: torch.Tensor, max_new: int, seed: int,
                 progress: str | None = None):
    """(sequences (1, T+new), PromptRecord without id/outputs) for one prompt; `progress`: the
    description of a token progress bar on stderr (None: no bar)."""
    if cfg.method.name in HF_METHODS:
        return _generate_hf(cfg, pair, ids, max_new, seed, progress)
    return _generate_treespec(cfg, pair, ids, max_new, seed, progress)


# ------------------------------------------------------------------------------------ a cell
def cell_info(cfg: BenchConfig, synthetic: bool = False) -> dict:
    """The identity of a cell: what the report groups and labels by. `dataset` is the set that
    produced the prompts: "synthetic" (random token ids) when the models have no tokenizer, with
    the configured set it replaced in `dataset_replaced`."""
    replaced = cfg.dataset.name if synthetic and cfg.dataset.name != "synthetic" else None
    return {
        "model": cfg.model.name,
        "method": cfg.method.name,
        "dataset": "synthetic" if synthetic else cfg.dataset.name,
        "dataset_replaced": replaced,
        "domain": cfg.domain.name,
        "tree": tree_label(cfg),
        "linear_k": cfg.domain.linear_k if cfg.method.name in ("linear", "hf_assisted", "hf_prompt_lookup") else None,
        "draft_nodes": draft_nodes(cfg),
        "sampling": cfg.sampling.name,
        "temperature": float(cfg.sampling.temperature),
        "top_k": cfg.sampling.top_k,
        "top_p": float(cfg.sampling.top_p),
        "acceptance": cfg.sampling.acceptance,
        "max_new_tokens": cfg.max_new_tokens,
        "num_prompts": cfg.dataset.num_prompts,
        "offset": cfg.dataset.offset,
        "ignore_eos": cfg.ignore_eos,
        "lookup": cfg.lookup,
        "overlap": cfg.overlap,
    }


def environment() -> dict:
    import transformers

    import treespec

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "treespec": treespec.__version__,
    }


def run_cell(cfg: BenchConfig, *, pair: LoadedPair | None = None, sink: ResultsSink | None = None) -> dict:
    """Run every prompt of the cell and return the results document (JSON-ready):
    {"schema", "cell", "config", "environment", "status", "prompts": [record...], "aggregate": {...}}.
    `sink` receives the document after every prompt (treespec.bench.results)."""
    return _with_threads(cfg, lambda: _run_cells([cfg], pair, sink)[0])


def run_interleaved(cfg: BenchConfig, *, pair: LoadedPair | None = None, sink: ResultsSink | None = None) -> dict[str, dict]:
    """One cell per method of cfg.interleave (or just cfg.method), run prompt by prompt: every
    method generates prompt i before any method starts prompt i+1, in an order that rotates
    with i. Returns {method: results document}; `sink` receives each method's document after
    each of its prompts, and once more, marked incomplete, if the run stops early."""
    methods = list(cfg.interleave) or [cfg.method.name]
    cfgs = [_with_method(cfg, m) for m in methods]
    return _with_threads(cfg, lambda: dict(zip(methods, _run_cells(cfgs, pair, sink))))


def _with_method(cfg: BenchConfig, method: str) -> BenchConfig:
    out = replace(cfg, method=replace(cfg.method, name=method), interleave=[])
    return out


def _with_threads(cfg: BenchConfig, fn):
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run_cells(cfgs: list[BenchConfig], pair: LoadedPair | None, sink: ResultsSink | None = None) -> list[dict]:
    """Cells that differ only in their method, interleaved prompt by prompt."""
    cfg0 = cfgs[0]
    with Wall() as load:
        pair = pair or load_models(cfg0.model)
    load_s = load.seconds
    prompts = build_prompts(cfg0, pair)
    ids_of = [pid for pid, _ in prompts]
    env = dict(environment(), model_load_seconds=load_s, interleaved_with=[c.method.name for c in cfgs])
    synthetic = pair.tokenizer is None or cfg0.dataset.name == "synthetic"
    records: list[list[PromptRecord]] = [[] for _ in cfgs]

    def doc(k: int, stopped_by: BaseException | None = None) -> dict:
        cfg, recs = cfgs[k], records[k]
        return {
            "schema": RESULTS_SCHEMA,
            "cell": cell_info(cfg, synthetic),
            "config": recorded_config(cfg, synthetic=synthetic),
            "environment": env,
            "status": status(ids_of, len(recs), stopped_by),
            "prompts": [r.as_dict() for r in recs],
            "aggregate": aggregate(recs),
        }

    def emit(k: int, stopped_by: BaseException | None = None) -> None:
        if sink is not None:
            sink.write(cfgs[k].method.name, doc(k, stopped_by))

    for k in range(len(cfgs)):  # every method is on disk from the start, with all its prompts missing
        emit(k)
    try:
        _measure(cfgs, pair, prompts, records, emit)
    except BaseException as err:  # Ctrl-C included: what was measured is kept, marked incomplete
        log.error("the run stopped after %d of %d prompts (%s); the results so far are kept, marked incomplete",
                  min(map(len, records)), len(prompts), type(err).__name__)  # fmt: skip
        for k in range(len(cfgs)):
            emit(k, err)
        raise
    docs = [doc(k) for k in range(len(cfgs))]
    for k in range(len(cfgs)):
        emit(k)
    return docs


def _measure(cfgs: list[BenchConfig], pair: LoadedPair, prompts, records: list[list[PromptRecord]], emit) -> None:
    """Generate every prompt with every method (rotating who goes first), appending to records
    and emitting each method's document after each of its prompts."""
    cfg0 = cfgs[0]
    if cfg0.warmup_tokens and prompts:
        per_token = 0.0
        for cfg in cfgs:
            log.info("warm-up of %s (untimed) ...", cfg.method.name)
            _, rec = generate_one(cfg, pair, prompts[0][1], cfg0.warmup_tokens, cfg0.sampling.seed)
            per_token += (rec.time_total - rec.time_prefill) / max(rec.new_tokens, 1)
        seconds = per_token * cfg0.max_new_tokens * len(prompts)
        log.info("estimated time: about %s for %d prompts x %d methods x up to %d tokens (from the warm-up's "
                 "per-token times; prefills and early EOS change it)", _duration(seconds), len(prompts), len(cfgs),
                 cfg0.max_new_tokens)  # fmt: skip

    from tqdm.auto import tqdm

    label = "+".join(c.method.name for c in cfgs) + f"/{cfg0.domain.name}/{cfg0.dataset.name}"
    bar = tqdm(prompts, desc=label, unit="prompt", disable=not cfg0.progress, dynamic_ncols=True, file=sys.stderr)
    for i, (pid, ids) in enumerate(bar):
        for j in range(len(cfgs)):
            k = (i + j) % len(cfgs)  # rotate who goes first
            cfg = cfgs[k]
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            desc = f"{cfg.method.name} {i + 1}/{len(prompts)}" if cfg.progress else None
            seqs, rec = generate_one(cfg, pair, ids, cfg.max_new_tokens, cfg.sampling.seed + cfg.dataset.offset + i, desc)
            rec.id, rec.loadavg = pid, load
            if cfg.keep_outputs:
                out = seqs[0, ids.shape[1] :].tolist()
                rec.output_ids = out
                if pair.tokenizer is not None:
                    rec.output_text = pair.tokenizer.decode(out, skip_special_tokens=False)
            records[k].append(rec)
            log.info("prompt %d/%d (%s) %s: %d tokens, tau %.2f, %.2f tokens/s", i + 1, len(prompts), pid,
                     cfg.method.name, rec.new_tokens, rec.tau, rec.tokens_per_second)  # fmt: skip
            emit(k)
        post = {c.method.name[:6]: f"{aggregate(r)['tau']:.2f}" for c, r in zip(cfgs, records)}
        bar.set_postfix(tau=post if len(cfgs) > 1 else next(iter(post.values())))
    bar.close()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
