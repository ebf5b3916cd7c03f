"""What the chi-square tests share (imported by the test files; not a test file itself).

* `pvalue` / `sample_pvalue`: the goodness-of-fit test, cells expecting < 5 pooled.
* The synthetic Markov language of the verifier tests (test_rejection, test_traversal,
  test_block): p1, p2[x] for the target and q1, q2[x] for the draft over V = 8 tokens
  (`make_case`, `logit_case`), draft trees drawn level by level (`draw_trees`), the per-node
  laws (`rows_for`), the emitted sequence (`emitted`) and its p-values (`pvalues`).
* End to end through `treespec.generate` (test_sampling_e2e, test_lookup, test_traversal,
  test_block, test_padded_vocab): the standard tiny pair (`e2e_pair`), the target's exact law
  of the first two tokens from its logits (`exact_joint`), and counts of sampled tokens
  (`sample_counts`).

Every generator is seeded, so the tests are deterministic.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from scipy.stats import chisquare

import treespec
from treespec.acceptance.rejection import sample_children
from treespec.acceptance.sampling import SamplingConfig, logits_to_probs
from treespec.testing import tiny_model
from treespec.tree.topology import TreeTopology

V = 8  # vocabulary of the synthetic language and of the end-to-end tiny pair
ALPHA = 1e-3  # a correct sampler must pass at this level...
POWER = 1e-6  # ...and a broken one must be rejected at this level


# --------------------------------------------------------------------------- the test
def pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of counts to probs (same number of cells, any shape; probs
    need not be normalised). Cells expecting < 5 are pooled into one. A count in a cell of
    probability 0 (an impossible outcome) gives 0.0."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    probs = probs / probs.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert keep.sum() >= 3, "degenerate distribution: the test would have no power"
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def sample_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """`pvalue` of integer samples (B,) against probs (C,)."""
    return pvalue(torch.bincount(samples, minlength=probs.numel()), probs)


# --------------------------------------------------------------------------- synthetic language
def _dirichlet(gen: torch.Generator, shape, alpha: float) -> torch.Tensor:
    g = torch._standard_gamma(torch.full(shape, alpha, dtype=torch.float64), generator=gen)
    return g / g.sum(-1, keepdim=True)


def _support_mask(gen: torch.Generator, rows: int, lo: int, hi: int) -> torch.Tensor:
    """(rows, V) bool: each row keeps a random subset of lo..hi tokens."""
    keys = torch.rand(rows, V, generator=gen, dtype=torch.float64)
    sizes = torch.randint(lo, hi + 1, (rows, 1), generator=gen)
    ranks = keys.argsort(-1).argsort(-1)
    return ranks < sizes


def make_case(name: str, seed: int = 0):
    """(p1 (V,), p2 (V, V), q1 (V,), q2 (V, V)) float32, rows summing to 1.

    close: q = 0.85 p + 0.15 noise. far: p and q independent and peaked (Dirichlet 0.5).
    zeros: q has zeros where p has mass (support 2..4 tokens, so width-3 nodes often have
    invalid slots without replacement and many duplicates i.i.d.) and p has zeros where q has
    mass (support 4..7 tokens).
    """
    gen = torch.Generator().manual_seed(1000 + seed)
    if name == "close":
        p = _dirichlet(gen, (V + 1, V), 1.0)
        q = 0.85 * p + 0.15 * _dirichlet(gen, (V + 1, V), 1.0)
    elif name == "far":
        p = _dirichlet(gen, (V + 1, V), 0.5)
        q = _dirichlet(gen, (V + 1, V), 0.5)
    elif name == "zeros":
        p = _dirichlet(gen, (V + 1, V), 1.0) * _support_mask(gen, V + 1, 4, 7)
        q = _dirichlet(gen, (V + 1, V), 1.0) * _support_mask(gen, V + 1, 2, 4)
    else:  # pragma: no cover
        raise KeyError(name)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    p, q = p.float(), q.float()
    return p[0], p[1:], q[0], q[1:]


def logit_case(cfg: SamplingConfig, seed: int):
    """(p1, p2, q1, q2) from random logits processed by `cfg` (q: the target's logits plus noise,
    as a draft model's would be)."""
    gen = torch.Generator().manual_seed(seed)
    tl = 2.0 * torch.randn(V + 1, V, generator=gen)
    dl = tl + 1.5 * torch.randn(V + 1, V, generator=gen)
    p, q = logits_to_probs(tl, cfg), logits_to_probs(dl, cfg)
    return p[0], p[1:], q[0], q[1:]


def rows_for(tokens: torch.Tensor, depth: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """(B, N, V): d1 at the root, d2[token] at every other node (the law of the next token)."""
    rows = d2[tokens]  # (B, N, V)
    rows[:, depth == 0] = d1
    return rows


def draw_trees(topo: TreeTopology, q1, q2, batch: int, without_replacement: bool, gen: torch.Generator):
    """Sample a draft tree per trial, level by level: (tokens (B, N), valid (B, N))."""
    n = topo.num_nodes
    tokens = torch.zeros(batch, n, dtype=torch.long)
    valid = torch.ones(batch, n, dtype=torch.bool)
    for d in range(topo.max_depth):
        lvl, nxt = topo.level(d), topo.level(d + 1)
        width = lvl.stop - lvl.start
        q_rows = q1.expand(batch, width, V) if d == 0 else q2[tokens[:, lvl]]
        tok, ok = sample_children(q_rows, topo.level_width(d), without_replacement=without_replacement, generator=gen)
        par, rank = topo.level_children(d)
        tokens[:, nxt] = tok[:, par, rank]
        valid[:, nxt] = ok[:, par, rank] & valid[:, lvl][:, par]
    return tokens, valid


def emitted(topo, tokens, acc, p2, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, length): accepted tokens, then next_token, then fresh draws from p2[previous]."""
    batch = tokens.shape[0]
    on_path = tokens.gather(1, acc.path[:, 1:])  # (B, D)
    seq = torch.zeros(batch, length, dtype=torch.long)
    for t in range(length):
        fresh = torch.multinomial(p2[seq[:, t - 1]], 1, generator=gen)[:, 0] if t > 0 else None
        val = acc.next_token if fresh is None else torch.where(acc.num_accepted == t, acc.next_token, fresh)
        if t < topo.max_depth:
            val = torch.where(acc.num_accepted > t, on_path[:, t], val)
        seq[:, t] = val
    return seq


def pvalues(seq: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> dict[str, float]:
    """p-values of the first token vs p1, the first two vs p1[x1] p2[x1, x2], and (if there)
    the first three vs p1[x1] p2[x1, x2] p2[x2, x3]."""
    joint2 = p1[:, None] * p2
    out = {
        "x1": sample_pvalue(seq[:, 0], p1),
        "x1x2": sample_pvalue(seq[:, 0] * V + seq[:, 1], joint2),
    }
    if seq.shape[1] > 2:
        joint3 = joint2[:, :, None] * p2[None, :, :]
        out["x1x2x3"] = sample_pvalue((seq[:, 0] * V + seq[:, 1]) * V + seq[:, 2], joint3)
    return out


# --------------------------------------------------------------------------- end to end
E2E_PROMPT = torch.tensor([[3, 7]])


def e2e_pair():
    """(target, draft) over V tokens. init 0.15: p and q far apart (total variation 0.4-0.6 at
    the first token) yet overlapping, and no sampling setting of the tests collapses p to a
    single token (which would leave nothing to test)."""
    target = tiny_model(11, vocab_size=V, init_std=0.15)
    draft = tiny_model(12, vocab_size=V, hidden_size=16, num_layers=1, init_std=0.15)
    return target, draft


def exact_joint(target, prompt: torch.Tensor, cfg: SamplingConfig, tokens: int = 2) -> torch.Tensor:
    """p(x1) p(x2 | x1) ... p(x_n | x_<n) after `prompt` (1, T) for n = `tokens`, from the
    target's logits: FloatTensor (V,) * n (V^(n-1) prefixes are scored, so keep n small)."""
    with torch.no_grad():
        joint = logits_to_probs(target(prompt).logits[0, -1], cfg)  # (V,)
        v = joint.shape[0]
        seqs = prompt  # (V^(k-1), T+k-1): every continuation of k-1 tokens
        for _ in range(tokens - 1):
            n = seqs.shape[0]
            seqs = torch.cat([seqs.repeat_interleave(v, 0), torch.arange(v).repeat(n)[:, None]], dim=1)
            nxt = logits_to_probs(target(seqs).logits[:, -1], cfg)  # (V^k, V)
            joint = (joint.reshape(-1, 1) * nxt.view(n, v, v).reshape(n * v, v)).view(*joint.shape, v)
    return joint


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run ops on a few hundred numbers, where torch's intra-op threads only add
    synchronisation: one generate call is ~3x slower with 2 threads than with 1 on a loaded
    2-core machine. The caller's thread count comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Samples:
    """counts: FloatTensor (V,) * new_tokens, how often each sequence of the first new_tokens
    tokens was generated; the stats' accepted counts summed over all draws."""

    counts: torch.Tensor
    accepted_from_model: int
    accepted_from_lookup: int
    ahead_hits: int = 0  # steps whose next tree was drafted ahead (overlap=...)


def sample_counts(target, draft, prompt: torch.Tensor, cfg: SamplingConfig, *, seed: int, draws: int,
                  new_tokens: int = 2, **generate_kwargs) -> Samples:
    """`draws` independent generations of `new_tokens` tokens after `prompt` at the sampling
    settings `cfg`, one seeded generator for all; generate_kwargs (method, tree, lookup,
    acceptance, ...) go to `treespec.generate`."""
    g = torch.Generator().manual_seed(seed)
    v = target.get_output_embeddings().weight.shape[0]
    counts = torch.zeros((v,) * new_tokens)
    from_model = from_lookup = hits = 0
    t = prompt.shape[1]
    with one_thread():
        for _ in range(draws):
            out = treespec.generate(target, draft, prompt, max_new_tokens=new_tokens, eos_token_id=[], generator=g,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, **generate_kwargs)
            counts[tuple(out.sequences[0, t:].tolist())] += 1
            from_model += out.stats.accepted_from_model
            from_lookup += out.stats.accepted_from_lookup
            hits += out.stats.ahead_hits
    return Samples(counts, from_model, from_lookup, hits)
