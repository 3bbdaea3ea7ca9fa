"""KV-cached batched sampling of G completions per prompt, returning the log-probs of the sampled tokens.

Each prompt is prefilled once (left-padded, per-row positions, explicit mask) into rows 0, G, 2G, ... of one
preallocated cache, copied to its G rows, and then all rows decode one token per step.
Legend: P prompts, G group, N = P*G rows, Tp prompt time, Tc completion time, V vocab.
"""
from dataclasses import dataclass

import torch

from model import KVCache


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, Tp) left-padded; rows p*G .. p*G+G-1 hold prompt p
    prompt_mask: torch.Tensor  # (N, Tp) bool, True on real prompt tokens
    completion_ids: torch.Tensor  # (N, Tc); after a row's stop token: pad, outside the mask
    completion_mask: torch.Tensor  # (N, Tc) bool, from each row's length: up to and including its first stop token
    lengths: torch.Tensor  # (N,) long, tokens inside the mask
    stopped: torch.Tensor  # (N,) bool; False means truncated at max_new_tokens
    logprobs: torch.Tensor  # (N, Tc) fp32 log-prob of each sampled token at the sampling temperature, 0 outside mask
    group_size: int


def sample_token(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """Draw one id per row from logits (N, V): greedy at temperature 0, else softmax(logits / T) cut by top-k/top-p."""
    if temperature == 0:
        return logits.argmax(-1)  # (N,)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # keep the smallest set of most likely ids whose mass reaches top_p (Holtzman et al., arXiv 1904.09751)
        srt, idx = logits.sort(-1, descending=True)  # (N, V) each
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # mass before this id already reaches top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    # inverse CDF: the first id whose cumulative mass exceeds u ~ U[0, total). One random number per row, where
    # torch.multinomial or argmax(p / Exp(1)) draw V of them (9% of a CPU decode step); no host sync either.
    cdf = logits.softmax(-1).double().cumsum(-1)  # (N, V) fp64: 150k fp32 partial sums would drift
    N = cdf.shape[0]
    if isinstance(generator, (list, tuple)):  # one generator per prompt, each drawing for its G rows
        u = torch.cat([torch.rand(N // len(generator), 1, generator=g, device=cdf.device, dtype=cdf.dtype)
                       for g in generator])  # (N, 1)
    else:
        u = torch.rand(N, 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    total = cdf[:, -1:]  # (N, 1)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total even after rounding
    # right=True finds i with cdf[i-1] <= x < cdf[i], so an id of zero mass (cut by top-k/top-p, or out of the
    # tokenizer's vocabulary) is never chosen
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)  # (N,)


def token_logprob(z, tok):
    """log softmax(z)[tok] for z = logits / T, as grpo.token_logprobs computes it: no top-k/top-p renormalisation.

    The ratio pi/pi_old in the loss compares the trainer's full-softmax policy with itself, so the sampler
    reports that same quantity. Greedy (T=0) reports it at T=1.
    """
    return z.gather(-1, tok[:, None]).squeeze(-1) - z.logsumexp(-1)  # (N,)


def decode_step(model, tok, positions, cache):
    """One token per row through the cache: tok (N,), positions (N,) -> next-token logits (N, V) fp32."""
    return model(tok[:, None], positions[:, None], cache=cache)[:, -1].float()


@torch.no_grad()  # not inference_mode: the rollout's tensors are inputs to the training graph later
def generate(model, prompts, G, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(),
             generator=None, vocab_size=None, pad_id=0, compile=False, sync_every=None):
    """Sample G completions for each of the P prompts (lists of token ids); returns a Rollout of P*G rows.

    vocab_size: ids >= it are never sampled (Qwen pads its embedding past the tokenizer's vocabulary).
    generator: a torch.Generator on the model's device, an int seed, or a list of P generators, one per prompt,
    so that a prompt's completions do not depend on which other prompts share the batch (train.py uses this
    to make sampling identical for any number of ranks, and across a resume).
    sync_every: check whether all rows stopped every this many steps (default 1 on CPU, 8 on GPU).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if G < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need G >= 1, max_new_tokens >= 1, temperature >= 0; got {G}, {max_new_tokens}, {temperature}")
    dev = model.lm_head.weight.device
    if isinstance(generator, int):
        generator = torch.Generator(dev).manual_seed(generator)
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts")
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.lm_head.weight.dtype
    sync_every = sync_every or (1 if dev.type == "cpu" else 8)
    P, N = len(prompts), len(prompts) * G
    lens = torch.tensor([len(p) for p in prompts], device=dev)  # (P,)
    Tp = int(lens.max())

    # ---- prefill: each distinct prompt once, left-padded, into rows 0, G, 2G, ...; then copied to its G rows
    ids = torch.full((P, Tp), pad_id, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.tensor(p, device=dev)
    pmask = torch.arange(Tp, device=dev) >= Tp - lens[:, None]  # (P, Tp)
    cache = KVCache(model.config, N, Tp + max_new_tokens, dev, dtype)
    cache.rows = slice(None, None, G)
    h = model.forward_hidden(ids, attn_mask=pmask, cache=cache)  # (P, Tp, C)
    cache.fan_out(G)
    logits = model.lm_head(h[:, -1]).float().repeat_interleave(G, 0)  # (N, V)
    pos = lens.repeat_interleave(G)  # (N,) position of each row's next token

    # ---- decode: one token per step for all rows; finished rows emit pad and are masked out
    step = torch.compile(decode_step, dynamic=True) if compile else decode_step
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    lps = torch.zeros(N, max_new_tokens, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    length = torch.full((N,), max_new_tokens, device=dev)
    Tc = max_new_tokens
    for t in range(max_new_tokens):
        z = logits / (temperature or 1.0)  # (N, V) tempered once, for the draw and the log-prob
        masked = z
        if vocab_size is not None and vocab_size < z.shape[-1]:
            masked = z.clone()
            masked[:, vocab_size:] = float("-inf")
        tok = sample_token(masked, 1.0 if temperature else 0, top_k, top_p, generator)  # (N,)
        tok = torch.where(done, pad_id, tok)
        out[:, t] = tok
        lps[:, t] = torch.where(done, 0.0, token_logprob(z, tok))
        hit = torch.isin(tok, stops) & ~done  # a stop id in the prompt never gets here: only sampled ids count
        length = torch.where(hit, t + 1, length)
        done |= hit
        if t + 1 == max_new_tokens or ((t + 1) % sync_every == 0 and bool(done.all())):
            Tc = t + 1
            break
        logits = step(model, tok, pos + t, cache)  # (N, V)

    mask = torch.arange(Tc, device=dev) < length[:, None]  # (N, Tc)
    return Rollout(ids.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0), out[:, :Tc], mask,
                   length, done, lps[:, :Tc] * mask, G)
