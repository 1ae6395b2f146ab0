"""The round's data as the trainer sees it: documents tokenized, mixed with replay, packed into blocks, in an order
that is a pure function of (seed, step), so a resumed round reads exactly what an uninterrupted one would.

Packing: each document is BOS + tokens + EOS, documents are concatenated and
cut into seq_len blocks (the tail shorter than one block is dropped), so no
token is padding. position_ids restart at every document start, and they are
the one description of the documents every attention implementation gets
(packed_inputs): with no 2-D attention mask, transformers turns them into a
per-row block-diagonal causal mask for sdpa, eager and flex
(masking_utils.find_packed_sequence_indices); flash-attention gets the
documents' cumulative lengths over the whole micro-batch, derived from the
same positions, because transformers derives them itself only at batch size 1.
So attention never crosses documents (tests/test_packing.py). Targets that
would predict a BOS across a boundary are masked. The loss never holds the
whole micro-batch's logits (lm_loss.token_nll).
"""

from __future__ import annotations

import random

import torch

from daemon.jobs.lm_loss import IGNORE
from policies.replay import replay_tokens_for


def tokenize_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [([bos] if bos is not None else []) + d + [eos] for d in ids]


def mix_documents(new: list[list[int]], replay: list[list[int]], ratio: float, rng: random.Random) -> tuple[list[list[int]], int]:
    """New documents plus replay documents making up `ratio` of the tokens, shuffled. Returns (docs, replay tokens)."""
    target = replay_tokens_for(sum(map(len, new)), ratio) if replay else 0
    chosen, got = [], 0
    while got < target:  # cycle through shuffled replay passes when the replay set is small
        order = list(range(len(replay)))
        rng.shuffle(order)
        for i in order:
            if got >= target:
                break
            chosen.append(replay[i])
            got += len(replay[i])
    docs = new + chosen
    rng.shuffle(docs)
    return docs, got


def pack(docs: list[list[int]], seq_len: int, bos: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, position ids, targets), each [n_blocks, seq_len]; see the module docstring."""
    flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    starts = torch.zeros(len(flat), dtype=torch.bool)
    offsets = torch.tensor([0] + [len(d) for d in docs[:-1]], dtype=torch.long).cumsum(0)
    starts[offsets[offsets < len(flat)]] = True
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"round has {len(flat)} tokens, fewer than one sequence of {seq_len}")
    ids = flat[: n * seq_len].view(n, seq_len)
    starts = starts[: n * seq_len].view(n, seq_len).clone()
    starts[:, 0] = True  # a block's first token starts a new attention context
    idx = torch.arange(seq_len).expand(n, seq_len)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    pos = idx - last_start
    tgt = ids.clone()
    if bos is not None:
        tgt[ids == bos] = IGNORE
    return ids, pos, tgt


def block_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=g)


def blocks_at(n_blocks: int, seed: int, start: int, count: int) -> list[int]:
    """Blocks for stream positions [start, start+count): an endless sequence of seeded epoch permutations."""
    out, cache = [], {}
    for p in range(start, start + count):
        e = p // n_blocks
        if e not in cache:
            cache[e] = block_order(n_blocks, seed, e)
        out.append(int(cache[e][p % n_blocks]))
    return out
