"""Training data for a draft head: offline text, token blocks, and the target's features on them.

Sources (all offline; `DataConfig` picks them):

- `stdlib`: the Python standard library's own .py files (code, comments, docstrings), present
  on any machine with Python;
- `packages`: the .py files of installed packages (site-packages);
- `bench`: the benchmark's prompt sets already in treespec's cache (treespec.bench.datasets),
  except `exclude` (by default every set the goals are measured on: HumanEval and MT-Bench and
  the sets built from them);
- `text_dir`: every .txt/.md/.py file under a directory;
- `self_samples`: sequences sampled from the target itself at temperature 1 (the only source for
  a target without a tokenizer, such as the tiny test models);
- `answers`: the target's own greedy answers, in its chat template, to requests written offline
  (heads/requests.py: half from the standard library's functions, "write a function that
  <docstring>" and "explain this code"; half general chat: writing, role play, concepts, word
  problems), the closest offline stand-in for the chat prompts a chat model serves. They are few
  next to the files, so each of their blocks counts `answer_repeat` times in training.

Texts are tokenized, joined with the end-of-text token, and cut into blocks of `seq_len` tokens
(B_s blocks); `target_features` runs the target over them once and keeps its features f (the
last hidden state after the final norm). The target's next-token logits are its LM head applied
to f, so the soft labels p are recomputed from f during training instead of being stored.

Dimension letters: docs/dimensions.md (Lb block length, Hm hidden size, V vocabulary).
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from treespec.backends.compat import cache_kwargs
from treespec.heads.requests import chat_requests

# the prompt sets the goals are measured on, and the sets made from them: never training data
MEASURED_SETS = ("humaneval", "humaneval_edit", "mtbench", "mtbench_rewrite")


@dataclass
class DataConfig:
    """Which text a head is trained on and how it is cut (see the module docstring)."""

    stdlib: bool = True
    packages: bool = False
    bench: bool = True
    exclude: list[str] = field(default_factory=lambda: list(MEASURED_SETS))
    text_dir: str | None = None
    self_samples: int = 0  # blocks sampled from the target itself
    answers: int = 0  # requests the target answers (heads/requests.py; chat template, greedy)
    answer_tokens: int = 256  # most new tokens per answer
    answer_batch: int = 64  # requests per generate call
    answer_repeat: int = 1  # times each answer block appears among the training blocks
    max_tokens: int = 4_000_000  # tokens kept in all (train + held out)
    seq_len: int = 512  # Lb
    eval_blocks: int = 32  # held-out blocks for the final check
    seed: int = 0

    def __post_init__(self) -> None:
        missing = [name for name in MEASURED_SETS if name not in self.exclude]
        if missing:
            raise ValueError(f"data.exclude must keep {missing}: the goals are measured on those prompts, which must "
                             "never be training data")
        if self.answer_repeat < 1:
            raise ValueError(f"data.answer_repeat must be >= 1, got {self.answer_repeat}")
        if self.seq_len < 2 or self.max_tokens < self.seq_len:
            raise ValueError(f"need data.seq_len >= 2 and data.max_tokens >= seq_len, got {self.seq_len}, {self.max_tokens}")


@dataclass
class TokenBlocks:
    """Token blocks and where they came from. train: LongTensor (B_t, Lb); held_out: (B_e, Lb).
    held_out_kinds: per held-out block, the kind of text it is ('files': the stdlib, packages,
    bench and text_dir sources; 'answers'; 'self_samples'), so that the held-out check can say
    how the head does on each (a head trained mostly on code can agree well on code and poorly
    on chat)."""

    train: torch.Tensor
    held_out: torch.Tensor
    sources: dict[str, int]  # source -> tokens used
    held_out_kinds: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.train.numel() + self.held_out.numel())


def python_files(root: Path, skip: tuple[str, ...] = ("site-packages", "dist-packages", "test", "tests")) -> list[Path]:
    """Every .py file under root, sorted, outside `skip` directories (pruned while walking: the
    standard library's folder holds site-packages, which is its own source)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and d != "__pycache__"]
        out.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(out)


def text_sources(config: DataConfig) -> dict[str, list[str] | list[Path]]:
    """{source name: texts or files}, in a fixed order, files shuffled by config.seed."""
    rng = random.Random(config.seed)
    out: dict[str, list] = {}
    if config.stdlib:
        files = python_files(Path(sysconfig.get_paths()["stdlib"]))
        rng.shuffle(files)
        out["stdlib"] = files
    if config.packages:
        files = python_files(Path(sysconfig.get_paths()["purelib"]), skip=())
        rng.shuffle(files)
        out["packages"] = files
    if config.bench:
        out.update(bench_texts(config.exclude))
    if config.text_dir:
        root = Path(config.text_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data.text_dir={config.text_dir!r} is not a directory")
        files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".md", ".py") and p.is_file())
        rng.shuffle(files)
        out["text_dir"] = files
    return out


def bench_texts(exclude: list[str]) -> dict[str, list[str]]:
    """{'bench:<set>': prompt texts} for every benchmark set already cached, minus `exclude`."""
    from treespec.bench.datasets import DATASETS, DatasetError, load_prompts

    out = {}
    for name in sorted(DATASETS):
        if name in exclude:
            continue
        try:
            prompts = load_prompts(name, download=False)
        except (DatasetError, OSError, ValueError):
            continue  # not cached on this machine
        out[f"bench:{name}"] = ["\n\n".join(m["content"] for m in p.messages) for p in prompts]
    return out


def _read(item) -> str:
    if isinstance(item, Path):
        try:
            return item.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            return ""
    return item


def tokenize_sources(tokenizer, sources: dict[str, list], config: DataConfig, progress: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """One token stream (LongTensor (S,)) from the sources, up to config.max_tokens, each source
    getting an equal share first and the rest going to whichever still has text."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    share = config.max_tokens // max(1, len(sources))
    pieces: list[torch.Tensor] = []
    counts: dict[str, int] = {}
    bar = tqdm(total=config.max_tokens, desc="data: tokenizing", unit="tok", disable=not progress)
    leftovers = []
    for name, items in sources.items():
        used = 0
        for i, item in enumerate(items):
            if used >= share:
                leftovers.append((name, items[i:]))
                break
            text = _read(item)
            if not text.strip():
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: share - used] + [eos]
            pieces.append(torch.tensor(ids, dtype=torch.long))
            used += len(ids)
            bar.update(len(ids))
        counts[name] = used
    total = sum(counts.values())
    for name, items in leftovers:
        for item in items:
            if total >= config.max_tokens:
                break
            text = _read(item)
            if not text.strip():
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: config.max_tokens - total] + [eos]
            pieces.append(torch.tensor(ids, dtype=torch.long))
            counts[name] += len(ids)
            total += len(ids)
            bar.update(len(ids))
    bar.close()
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return stream, counts


@torch.no_grad()
def sample_from_target(target: PreTrainedModel, blocks: int, length: int, generator: torch.Generator,
                       progress: bool = True) -> torch.Tensor:
    """LongTensor (blocks, length) sampled from the target at temperature 1 from uniform first
    tokens (the target's own answers; what a tokenizer-less target trains on)."""
    vocab = target.get_output_embeddings().weight.shape[0]
    device = target.device
    ids = torch.randint(0, vocab, (blocks, 1), generator=generator).to(device)
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    step_ids = ids
    for _ in tqdm(range(length - 1), desc="data: sampling the target", disable=not progress):
        logits = target(input_ids=step_ids, **cache_kwargs(target, cache), use_cache=True).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1).cpu()
        step_ids = torch.multinomial(probs, 1, generator=generator).to(device)  # (blocks, 1)
        ids = torch.cat([ids, step_ids], dim=1)
    return ids.cpu()


@torch.no_grad()
def target_answers(target: PreTrainedModel, tokenizer, requests: list[str], max_new_tokens: int, batch: int,
                   progress: bool = True) -> list[torch.Tensor]:
    """Each request in the target's chat template followed by its greedy answer: LongTensor (T_i,) each."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in tqdm(range(0, len(requests), batch), desc="data: the target's answers", disable=not progress):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
                 for r in requests[start : start + batch]]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"][-1024:] for t in texts]
        width = max(map(len, enc))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=target.device)  # left padding
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=target.device)
        gen = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad)
        for row, e in zip(gen.cpu(), enc):
            answer = row[width:]
            ends = (answer == tokenizer.eos_token_id).nonzero()
            if len(ends):
                answer = answer[: int(ends[0]) + 1]
            out.append(torch.cat([torch.tensor(e), answer[answer != pad] if pad != tokenizer.eos_token_id else answer]))
    return out


def make_blocks(config: DataConfig, tokenizer, target: PreTrainedModel, progress: bool = True) -> TokenBlocks:
    """The training and held-out token blocks (see the module docstring)."""
    gen = torch.Generator().manual_seed(config.seed)
    chunks: dict[str, torch.Tensor] = {}  # kind of text -> its blocks (n_k, Lb)
    counts: dict[str, int] = {}
    if tokenizer is not None:
        sources = text_sources(config)
        if sources:
            stream, counts = tokenize_sources(tokenizer, sources, config, progress)
            n = stream.numel() // config.seq_len
            chunks["files"] = stream[: n * config.seq_len].view(n, config.seq_len)
        if config.answers:
            answered = target_answers(target, tokenizer, chat_requests(config.answers, config.seed, python_files(Path(sysconfig.get_paths()["stdlib"]))),
                                      config.answer_tokens, config.answer_batch, progress)
            stream = torch.cat(answered) if answered else torch.zeros(0, dtype=torch.long)
            n = stream.numel() // config.seq_len
            chunks["answers"] = stream[: n * config.seq_len].view(n, config.seq_len)
            counts["answers"] = n * config.seq_len
    if config.self_samples:
        chunks["self_samples"] = sample_from_target(target, config.self_samples, config.seq_len, gen, progress)
        counts["self_samples"] = config.self_samples * config.seq_len
    chunks = {k: c for k, c in chunks.items() if c.shape[0]}
    if not chunks or sum(c.shape[0] for c in chunks.values()) <= config.eval_blocks:
        raise ValueError(
            f"not enough training data: {counts or 'no source'} gives fewer than eval_blocks + 1 = {config.eval_blocks + 1} "
            f"blocks of {config.seq_len} tokens. Turn on a source (data.stdlib, data.packages, data.text_dir; "
            "data.self_samples for a target without a tokenizer) or lower data.seq_len / data.eval_blocks"
        )
    held = held_out_shares(config.eval_blocks, {k: c.shape[0] for k, c in chunks.items()})
    train, held_out, kinds = [], [], []
    for kind, c in chunks.items():
        c = c[torch.randperm(c.shape[0], generator=gen)]
        held_out.append(c[: held[kind]])
        kinds += [kind] * held[kind]
        train.append(c[held[kind] :].repeat(config.answer_repeat if kind == "answers" else 1, 1))
    train = torch.cat(train)
    train = train[torch.randperm(train.shape[0], generator=gen)]
    return TokenBlocks(train=train, held_out=torch.cat(held_out), sources=counts, held_out_kinds=kinds)


def held_out_shares(eval_blocks: int, available: dict[str, int]) -> dict[str, int]:
    """Held-out blocks per kind of text: an equal share of eval_blocks each (a small kind, such as
    the target's answers, is measured as well as a large one), never a kind's last block (it must
    train too), the rest from the kinds that have more."""
    shares = {k: min(eval_blocks // len(available), n - 1) for k, n in available.items()}
    for k in sorted(available, key=available.get, reverse=True):  # the largest kinds take what is left
        extra = min(eval_blocks - sum(shares.values()), available[k] - 1 - shares[k])
        shares[k] += max(extra, 0)
    return shares


@torch.no_grad()
def target_features(target: PreTrainedModel, blocks: torch.Tensor, batch_size: int, *, dtype: torch.dtype,
                    desc: str = "features", progress: bool = True) -> torch.Tensor:
    """The target's features f on every block: (B_s, Lb, Hm) in `dtype`, on the target's device
    (the last hidden state after the final norm, as the backends' hidden=True returns it)."""
    out = []
    device = target.device
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=not progress):
        ids = blocks[start : start + batch_size].to(device)
        h = target(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # (b, Lb, Hm)
        out.append(h.to(dtype))
    return torch.cat(out)
