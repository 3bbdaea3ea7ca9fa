"""KV-cached batched sampling of G completions per prompt, returning the log-probs of the sampled tokens.

The prompts' common prefix (a chat template's system message and worked examples) is prefilled once into a 1-row
cache whose keys and values every row attends to; then each prompt's own suffix once (left-padded, per-row positions,
explicit mask) into rows 0, G, 2G, ... of one preallocated cache, copied to its G rows; then the unfinished rows decode
one token per step: rows that stopped leave the batch (and the cache) at the next host check.
Legend: P prompts, G group, N = P*G rows, n <= N rows still decoding, Tp prompt time, L the prompts' shared prefix,
Tc completion time, V vocab.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from model import KVCache


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, Tp) left-padded; rows p*G .. p*G+G-1 hold prompt p
    prompt_mask: torch.Tensor  # (N, Tp) bool, True on real prompt tokens
    completion_ids: torch.Tensor  # (N, Tc); after a row's stop token: pad, outside the mask
    completion_mask: torch.Tensor  # (N, Tc) bool, from each row's length: up to and including its first stop token
    lengths: torch.Tensor  # (N,) long, tokens inside the mask
    # (play.py's whole games, and generate's injected ids: completion_ids hold the model's tokens and the
    # environment's, and the mask is True on the model's tokens only, so it is not a prefix; lengths count them)
    stopped: torch.Tensor  # (N,) bool; False means truncated at max_new_tokens
    logprobs: torch.Tensor  # (N, Tc) fp32 log-prob of each sampled token at the sampling temperature, 0 outside mask
    group_size: int


def take_rows(ro, rows):
    """The Rollout of the given rows (N',) of ro, in that order (train.py's dynamic sampling trains on a subset)."""
    f = lambda x: x[rows.to(x.device)]  # noqa: E731
    return Rollout(f(ro.prompt_ids), f(ro.prompt_mask), f(ro.completion_ids), f(ro.completion_mask), f(ro.lengths),
                   f(ro.stopped), f(ro.logprobs), ro.group_size)


def cat_rollouts(ros, pad_id):
    """One Rollout holding the rows of several in order: prompts left-padded, completions right-padded."""
    # Each padded to the longest. The padding is outside every mask, so log-probs and losses of a row do not change
    # (its positions come from its mask: model.forward_hidden).
    if len(ros) == 1:
        return ros[0]
    Tp, Tc = max(r.prompt_ids.shape[1] for r in ros), max(r.completion_ids.shape[1] for r in ros)
    left = lambda x, v: torch.nn.functional.pad(x, (Tp - x.shape[1], 0), value=v)  # noqa: E731
    right = lambda x, v: torch.nn.functional.pad(x, (0, Tc - x.shape[1]), value=v)  # noqa: E731
    cat = lambda f: torch.cat([f(r) for r in ros])  # noqa: E731
    return Rollout(cat(lambda r: left(r.prompt_ids, pad_id)), cat(lambda r: left(r.prompt_mask, False)),  # (N, Tp)
                   cat(lambda r: right(r.completion_ids, pad_id)), cat(lambda r: right(r.completion_mask, False)),
                   cat(lambda r: r.lengths), cat(lambda r: r.stopped), cat(lambda r: right(r.logprobs, 0.0)),  # (N, Tc)
                   ros[0].group_size)


def stream_seed(*key):
    """A 64-bit seed for one sampling stream, a different one for every key (ints in [0, 2**64))."""
    # Each int becomes exactly two uint32 words and the key's length closes it, so no two keys give SeedSequence the
    # same words (it reads 2**32 as [0, 1] and drops trailing zero words, which a plain list of ints would collide on).
    words = [w for k in key for w in (int(k) & 0xFFFFFFFF, int(k) >> 32)] + [len(key)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def uniforms(generator, N, device):
    """(N, 1) fp64 uniforms in [0, 1) for sample_token."""
    # generator: None, one torch.Generator, or a list of them, one per prompt, each drawing for its N / len(list)
    # rows, so that a prompt's draws do not depend on the others.
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.rand(N // len(generator), 1, generator=g, device=device, dtype=torch.float64)
                          for g in generator])  # (N, 1)
    return torch.rand(N, 1, generator=generator, device=device, dtype=torch.float64)  # (N, 1)


def sample_token(logits, temperature, top_k=0, top_p=1.0, u=None, vocab_size=None, cdf=None):
    """Draw one id per row of logits (N, V): ids (N,) and their log-probs (N,) under softmax(logits / T)."""
    # Greedy at temperature 0 (log-prob reported at T=1). Otherwise the id is drawn by inverse CDF at the row's
    # uniform u (N, 1) (see `uniforms`) from softmax(logits / T) cut to ids < vocab_size, then top-k, then top-p;
    # the log-prob is the full softmax's, as grpo.token_logprobs computes it: no renormalisation by the cuts.
    # The pi/pi_old ratio in the loss compares the trainer's full-softmax policy with itself, so the sampler
    # reports that same quantity.
    # Overwrites `logits` (it becomes exp(logits/T - max)) and writes the CDF into `cdf`, an optional (N, V) fp64
    # buffer: a decode step then makes no V-sized temporaries, whose page faults on CPU (glibc hands big blocks
    # back to the OS on free) cost more than the arithmetic.
    V = logits.shape[-1]
    vocab_size = min(vocab_size or V, V)
    greedy = temperature == 0
    if not greedy and u is None:
        raise ValueError("sample_token needs the rows' uniforms u (see `uniforms`) when temperature > 0")
    if greedy:
        tok = logits[:, :vocab_size].argmax(-1)  # (N,) on the logits: exp could round near-ties together
    else:
        logits.div_(temperature)
    cut = None
    if not greedy and 0 < top_k < vocab_size:  # on the logits, before exp can round near-ties together
        kth = logits[:, :vocab_size].topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        cut = logits < kth  # (N, V) outside the k most likely
    p = logits.sub_(logits.amax(-1, keepdim=True)).exp_()  # (N, V) unnormalised softmax
    total = p.sum(-1)  # (N,) full-vocabulary mass: the log-prob's normaliser
    if not greedy:
        p[:, vocab_size:] = 0  # ids the tokenizer cannot decode (Qwen pads its embedding past them)
        if cut is not None:
            p.masked_fill_(cut, 0)
        if top_p < 1.0:
            # keep the smallest set of most likely ids whose mass reaches top_p (Holtzman et al., arXiv 1904.09751)
            srt, idx = p.sort(-1, descending=True)  # (N, V) each
            cum = srt.cumsum(-1, dtype=torch.float64)  # (N, V)
            drop = cum - srt >= top_p * cum[:, -1:]  # the mass before this id already reaches top_p
            p.scatter_(-1, idx, srt.masked_fill_(drop, 0))
        # inverse CDF: the first id whose cumulative mass exceeds u ~ U[0, total). One random number per row,
        # where torch.multinomial or argmax(p / Exp(1)) draw V of them; no host sync.
        cdf = torch.cumsum(p, -1, dtype=torch.float64, out=cdf)  # (N, V) fp64: 150k fp32 partial sums would drift
        mass = cdf[:, -1:]  # (N, 1)
        x = torch.minimum(u * mass, torch.nextafter(mass, torch.zeros_like(mass)))  # < mass even after rounding
        # right=True finds i with cdf[i-1] <= x < cdf[i], so an id of zero mass (cut by top-k/top-p, or out of
        # the tokenizer's vocabulary) is never chosen
        tok = torch.searchsorted(cdf, x, right=True).squeeze(-1)  # (N,)
    # log softmax(z)[tok] = (z[tok] - max) - log(total); the drawn id has positive mass, so its p is uncut
    return tok, p.gather(-1, tok[:, None]).squeeze(-1).log() - total.log()  # (N,) each


@contextmanager
def packed_linears(model, rows, enable=True):
    """While open, every fp32 nn.Linear of a CPU model multiplies by a oneDNN-packed copy of its weight."""
    # PyTorch's fp32 CPU matmul is MKL's sgemm, slower than oneDNN's packed weights on the skinny (rows, C) inputs
    # of a decode step. Same fp32 products in another summation order. The packed copies cost one more copy of the
    # weights while open and a reorder per call, so they always reflect the current weights. Nothing happens on
    # other devices, other dtypes, under autocast, or with enable=False (generate's compile=True: inductor lowers
    # oneDNN-packed weights only as frozen constants).
    # A LoRA layer (lora.py) is packed with its merged weight W + (alpha / r) B A, so it keeps the packed speed and
    # computes what its forward computes in eval mode, up to rounding (tests/test_lora.py).
    dev, patched = model.lm_head.weight.device, []
    if enable and dev.type == "cpu" and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu"):
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.weight.dtype == torch.float32 and ".lora_" not in name:
                w = getattr(mod, "merged_weight", lambda: mod.weight)().detach()  # (out, in)
                w = torch.ops.mkldnn._reorder_linear_weight(w, rows)  # (out, in), oneDNN layout
                mod.forward = lambda x, w=w, b=mod.bias: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], None)
                patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward  # back to nn.Linear.forward


def common_prefix(prompts):
    """Length of the prompts' longest common token prefix, leaving every prompt at least one token of its own."""
    # A chat template's system message and worked-example turns come first and are the same in every prompt. Each
    # prompt keeps one token of its own, so the last position of every prompt is computed by its own forward.
    first, L = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        L = next((i for i in range(L) if p[i] != first[i]), L)
    return L


def feed(queue, rows, tok):
    """Put each queued row's next injected id in place of its draw (tok (n,), in place); (n,) bool: the fed rows."""
    live = rows.tolist()
    fed = [b for b, r in enumerate(live) if r in queue]
    mask = torch.zeros(len(live), dtype=torch.bool, device=tok.device)
    if fed:
        idx = torch.tensor(fed, device=tok.device)
        tok[idx] = torch.tensor([queue[live[b]].pop(0) for b in fed], device=tok.device)
        mask[idx] = True
        for b in fed:
            if not queue[live[b]]:
                del queue[live[b]]
    return mask


def paused_rows(out, rows, skip, seg, t, w, stop_texts, decode):
    """[(batch row, row)] whose text since its segment's start holds a stop text once step t's token is added."""
    # A token decodes to at least one character, so the last w tokens hold any stop text that ends at step t; one
    # that ended earlier paused the row then.
    lo = max(t - w + 1, 0)
    win = out[rows, lo:t + 1].tolist()  # (n, <= w) on the host
    hits = []
    for b, (r, ids, s) in enumerate(zip(rows.tolist(), win, skip.tolist())):
        if not s and seg[r] <= t:
            text = decode(ids[max(seg[r] - lo, 0):])
            if any(x in text for x in stop_texts):
                hits.append((b, r))
    return hits


def decode_step(model, tok, positions, cache):
    """One token per row through the cache: tok (N,), positions (N,) -> next-token logits (N, V) fp32."""
    # forward_hidden, not forward (which calls it): under FSDP (fsdp.py) the outer of two nested calls reshards the
    # root after it whatever reshard_after_forward says, so each decode step would all-gather it again
    return model.logits(model.forward_hidden(tok[:, None], positions[:, None], cache=cache)[:, -1]).float()  # (N, V)


@torch.no_grad()  # not inference_mode: the rollout's tensors are inputs to the training graph later
def generate(model, prompts, G, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(),
             generator=None, vocab_size=None, pad_id=0, compile=False, sync_every=None, share_prefix=True,
             stop_texts=(), decode=None, inject=None):
    """Sample G completions for each of the P prompts (lists of token ids); returns a Rollout of P*G rows."""
    # vocab_size: ids >= it are never sampled (Qwen pads its embedding past the tokenizer's vocabulary).
    # generator: a torch.Generator on the model's device, an int seed, or a list of P generators, one per prompt,
    # so that a prompt's completions do not depend on which other prompts share the batch (train.py uses this
    # to make sampling identical for any number of ranks, and across a resume).
    # sync_every: every this many steps (default 1 on CPU, 8 on GPU), check on the host which rows have finished:
    # stop if all have, else drop the finished ones from the batch.
    # share_prefix: prefill the prompts' longest common prefix once for all of them (`common_prefix`); the tokens
    # and log-probs are those of prefilling each prompt whole (up to float rounding in another summation order).
    # On CPU the model's linears run on oneDNN-packed copies of the weights while this runs (`packed_linears`).
    # stop_texts: strings of any number of tokens (a tool call's closing tag): once a row's text since its last pause
    # holds one, inject(row, the segment's ids) gives the ids the row goes on with (a tool's result), fed one per
    # step in place of a draw and outside the mask, or None to end the row there. A token may run past the text
    # ("</calc>." is kept whole: nothing is re-tokenized). The host then reads every step (sync_every 1), and
    # decode(ids) -> text is the tokenizer's. max_new_tokens counts the injected ids too.
    if stop_texts and decode is None:
        raise ValueError("generate's stop_texts need decode, the tokenizer's ids -> text")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if G < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need G >= 1, max_new_tokens >= 1, temperature >= 0; "
                         f"got {G}, {max_new_tokens}, {temperature}")
    dev = model.lm_head.weight.device
    if isinstance(generator, int):
        generator = torch.Generator(dev).manual_seed(generator)
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts")
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.lm_head.weight.dtype
    sync_every = 1 if stop_texts else sync_every or (1 if dev.type == "cpu" else 8)
    P, N = len(prompts), len(prompts) * G
    lens = torch.tensor([len(p) for p in prompts], device=dev)  # (P,)
    Tp = int(lens.max())

    # ---- prefill: the prompts' common prefix once, into row 0, copied to every row; then each distinct prompt's
    # own suffix once, left-padded after it, into rows 0, G, 2G, ...; then copied to its G rows
    ids = torch.full((P, Tp), pad_id, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.tensor(p, device=dev)
    pmask = torch.arange(Tp, device=dev) >= Tp - lens[:, None]  # (P, Tp)
    L = common_prefix(prompts) if share_prefix and P > 1 else 0
    cache = KVCache(model.config, N, Tp - L + max_new_tokens, dev, dtype)
    # each row's cache: [padding] [its own suffix] [completion], after the prefix's (cache.shared, stored once);
    # positions count real tokens only (as in one forward of the whole prompt), so the padding changes nothing
    sids = torch.full((P, Tp - L), pad_id, dtype=torch.long, device=dev)  # each prompt's suffix, left-padded
    for i, p in enumerate(prompts):
        sids[i, Tp - len(p):] = torch.tensor(p[L:], device=dev)
    smask = torch.arange(Tp - L, device=dev) >= Tp - lens[:, None]  # (P, Tp-L): as much padding as the prompt
    spos = L + (smask.long().cumsum(-1) - 1).clamp(min=0)  # (P, Tp-L)
    pos = lens.repeat_interleave(G)  # (N,) position of each row's first completion token
    step = torch.compile(decode_step, dynamic=True) if compile else decode_step
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    lps = torch.zeros(N, max_new_tokens, device=dev)
    stopped = torch.zeros(N, dtype=torch.bool, device=dev)
    length = torch.full((N,), max_new_tokens, device=dev)
    cdf = torch.empty(N, model.lm_head.out_features, dtype=torch.float64, device=dev)  # sample_token's scratch
    rows = torch.arange(N, device=dev)  # (n,) which of the N rows each batch row is: shrinks as rows finish
    fin = torch.zeros(N, dtype=torch.bool, device=dev)  # (n,) batch rows finished since the last compaction
    Tc = max_new_tokens
    # stop_texts: each row's current segment starts at step seg[row]; queue[row]: ids still to feed it; forced: the
    # (row, step) slots that hold fed ids, outside the mask
    seg, queue, w = [0] * N, {}, max(map(len, stop_texts), default=0)
    forced = torch.zeros(N, max_new_tokens, dtype=torch.bool, device=dev)
    with packed_linears(model, N, enable=not compile):  # CPU only
        if L:  # the prefix's keys/values: one row, read by every row's attention (model.attend_shared)
            cache.shared = KVCache(model.config, 1, L, dev, dtype)
            model.forward_hidden(torch.tensor([prompts[0][:L]], device=dev), cache=cache.shared)  # (1, L, C) unused
        cache.rows = slice(None, None, G)
        h = model.forward_hidden(sids, positions=spos, attn_mask=smask, cache=cache)  # (P, Tp-L, C)
        cache.fan_out(G)
        logits = model.logits(h[:, -1]).float().repeat_interleave(G, 0)  # (N, V) fp32, also under autocast

        # ---- decode: one token per step for every unfinished row
        for t in range(max_new_tokens):
            u = uniforms(generator, N, dev)[rows] if temperature else None  # all N drawn: streams never shift
            tok, lp = sample_token(logits, temperature, top_k, top_p, u, vocab_size, cdf[:len(rows)])  # (n,) each
            tok = tok.masked_fill(fin, pad_id)  # finished rows still in the batch emit pad, outside the mask
            # rows given an injected id this step (n,) bool; plain sampling (no queue) adds no op per step
            fed = feed(queue, rows, tok) if queue else None
            done = fin if fed is None else fin | fed
            if fed is not None:
                forced[rows, t] = fed
            out[rows, t] = tok
            lps[rows, t] = lp.masked_fill(done, 0.0)
            hit = torch.isin(tok, stops) & ~done  # a stop id in the prompt never gets here: only sampled ids
            length[rows] = torch.where(hit, t + 1, length[rows])
            stopped[rows] |= hit
            fin |= hit
            # host work, every step: a row whose text just completed a stop text pauses (not at the budget's last
            # token: nothing could be fed after it, so that turn ends cut, as any other)
            if stop_texts and t + 1 < max_new_tokens:
                for b, r in paused_rows(out, rows, fin if fed is None else fin | fed, seg, t, w, stop_texts, decode):
                    more = inject(r, out[r, seg[r]:t + 1].tolist()) if inject else None
                    if more:
                        queue[r], seg[r] = list(more), t + 1 + len(more)
                    else:  # the row ends here, as on a stop id
                        length[r], stopped[r], fin[b] = t + 1, True, True
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % sync_every == 0 and bool(fin.any()):  # the host sync that stopping needs anyway
                if bool(fin.all()):
                    Tc = t + 1
                    break
                # drop finished rows from the batch: the weights are read once per step whatever the batch,
                # but the matmul FLOPs, attention and sampling all shrink with it
                keep = (~fin).nonzero().squeeze(1)  # (n',)
                cache.keep(keep)
                rows, tok, fin = rows[keep], tok[keep], fin[keep]
            logits = step(model, tok, pos[rows] + t, cache)  # (n, V)

    mask = (torch.arange(Tc, device=dev) < length[:, None]) & ~forced[:, :Tc]  # (N, Tc): the model's own tokens
    return Rollout(ids.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0), out[:, :Tc], mask,
                   mask.sum(1), stopped, lps[:, :Tc] * mask, G)
