"""GRPO: group-relative advantages, chunked token log-probs, and the per-token clipped loss with k3 KL.

The objective (DeepSeekMath, arXiv 2402.03300, eq. 3), maximised over theta, for a question q and a group of
G outputs o_1..o_G sampled from pi_old:

    J(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min( r_it * A_it, clip(r_it, 1-eps, 1+eps) * A_it ) - beta * D_it } ]
    r_it  = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
    A_it  = (R_i - mean(R_1..R_G)) / std(R_1..R_G)            (outcome supervision, sec. 4.1.2: same for all t)
    D_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1        (k3, eq. 4; Schulman 2020, "Approximating KL")

The loss is -J. Where this code departs from the paper or offers options:
 1. A group's std gets + eps (default 1e-4, as TRL), and a constant group gets exactly zero advantage for any
    eps >= 0 (the paper leaves 0/0 undefined). A group of one gets zero advantage too.
 2. std is unbiased (Bessel) by default, as TRL, verl and the HF course; `unbiased=False` gives np.std, as
    GRPO-Zero and the DeepLearning.AI course. `scale="batch"` divides by the std of the whole batch (TRL's
    scale_rewards="batch"; over every rank, which the caller passes as `batch_std`); `scale="none"` does not
    divide at all (Dr. GRPO, arXiv 2503.20783).
 3. eps is split into eps_low / eps_high (DAPO's clip-higher, arXiv 2503.14476, uses eps_high = 0.28);
    eps_high defaults to eps_low, which is the paper.
 4. `loss_type` chooses the aggregation: "grpo" is eq. 3 (mean over each sequence's own tokens, then over
    sequences); "token" (DAPO) divides the sum over all completion tokens by their count in the whole
    optimizer batch; "dr_grpo" divides the sum by (number of sequences x max_new_tokens), as TRL and Oat do,
    not by max_new_tokens alone as verl does (that differs from ours by a constant factor, the batch size).
 5. The normaliser is an argument, computed once for the whole optimizer batch (`loss_normalizer`), so
    micro-batches with gradient accumulation give exactly the gradient of one big batch.
 6. With beta == 0 the KL term, and the reference model, are skipped entirely.
 7. A subtlety kept as in the paper: k3 is an unbiased estimate of the *reverse* KL(pi || ref) when tokens
    come from pi, but as a loss term its gradient d/dtheta E_pi[k3] is not computed through the sampling
    distribution, and in expectation it equals the gradient of the *forward* KL(ref || pi), not of the KL
    it estimates (see verl's `low_var_kl` comment; DeepSeekMath appendix A.1.4, eq. 19-20, where the KL
    term's gradient coefficient is pi_ref/pi_theta - 1). It still pulls pi towards ref, which is its job.
 8. The log-probs are of logits / temperature, the distribution the sampler drew from (sample.py); top-k /
    top-p are not renormalised into them.
 9. `ratio_level="sequence"` is GSPO (Zheng et al. 2025, arXiv 2507.18071, eq. 7), the ratio of Qwen3's RL: one
    ratio per sequence, the geometric mean of its token ratios, s_i = exp(1/|o_i| sum_t (log pi - log pi_old)),
    clipped per sequence and shared by its tokens, so with loss_type "grpo" the loss is GSPO's
    -1/G sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i). The paper clips far tighter than GRPO:
    eps_low 3e-4, eps_high 4e-4 (a mean of log-ratios moves much less than one token's). As in TRL 1.16
    (importance_sampling_level="sequence", the same mean over the mask), the k3 term stays per token. With
    loss_type "token" or "dr_grpo" the shared per-token terms are summed, which weights each sequence by its
    length: GSPO's own objective is loss_type "grpo".
10. `is_weight` (N, T), when given, multiplies each token's policy-gradient term (not the KL term), detached:
    truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; verl PR 2953, TRL PR 3867), w = min(pi_old_trainer / pi_sampler, C), corrects for
    tokens drawn from a sampler whose probabilities differ from the trainer's (bf16, other kernels). It needs
    pi_sampler to be the distribution the token was drawn from: with top-k / top-p the sampler's log-probs are
    of the full softmax (note 8), not of the truncated one it drew from, so train.py refuses TIS with them (and
    logs no mismatch), and it refuses LoRA dropout with TIS or mu > 1, where pi_old would be a dropout sample.
11. `loss_normalizer(..., keep=)` counts only kept rows: overlong filtering (DAPO, arXiv 2503.14476, sec. 3.4)
    zeroes truncated completions' masks, and the normaliser then excludes them: "grpo" divides by the kept
    sequences, "token" by their tokens, "dr_grpo" by kept sequences x max_new_tokens.
12. Not a departure, a note on cost: `token_logprobs` forwards each distinct prompt once and only the completions
    G times, attending to the prompt's keys/values (for the policy's update and the reference alike). The values
    and gradients are those of G full forwards (same math, fewer FLOPs: the full forwards recompute the prompt in
    each of the G rows). Above that, `SharedPrefix` forwards the prefix all prompts share (the chat template's
    system turn and worked examples) once per optimizer batch, for all its micro-batches.
Legend: P prompts, G group, N = P*G rows, U distinct prompts, T completion time, Tp prompt time, L shared prompt
prefix, C hidden, V vocab, M masked tokens, K kv heads, D head dim.
"""
import torch
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("grpo", "token", "dr_grpo")
RATIO_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------- 1. group advantages

def group_advantages(rewards, G=None, scale="group", unbiased=True, eps=1e-4, batch_std=None):
    """Group-relative advantages: (advantages shaped like rewards, fraction of zero-std groups)."""
    # A_i = (r_i - mean(group)) / (std + eps)
    # rewards: (P, G), or flat (P*G,) with G given. A group whose rewards are all equal gets exactly 0.
    # batch_std: with scale "batch", the std to divide by when the batch is larger than `rewards` (data-parallel
    # ranks each holding a part: the caller reduces it over all of them); None: the std of `rewards`.
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    shape = rewards.shape
    r = rewards.float().reshape(-1, G) if G is not None else rewards.float()  # (P, G)
    if r.dim() != 2:
        raise ValueError(f"rewards must be (P, G), or flat with G given; got shape {tuple(shape)}")
    G = r.shape[1]
    const = r.amax(1) == r.amin(1)  # (P,) zero-std groups, tested exactly (a computed std can be 1e-17)
    centered = r - r.mean(1, keepdim=True)  # (P, G)
    # the float32 mean of a near-tie group can round onto a member ([1, 1+2^-23] -> 1): re-centre (two-pass)
    centered = torch.where(const[:, None], 0.0, centered - centered.mean(1, keepdim=True))
    if scale == "none" or G == 1:
        adv = centered
    else:
        x = centered if scale == "group" else r.reshape(1, -1) - r.mean()  # pre-centred, for the same reason
        std = x.std(dim=1, keepdim=True, unbiased=unbiased)  # (P|1, 1)
        if scale == "batch" and batch_std is not None:
            std = torch.full((1, 1), float(batch_std))  # (1, 1)
        adv = torch.where(const[:, None], 0.0, centered / (std + eps))  # where() keeps 0/0 out for eps=0
    return adv.reshape(shape), const.float().mean().item()


# ----------------------------------------------------------------------------- 2. token log-probs

def _chunk_logprobs(h, lm_head_w, target, temperature, entropy=False):
    """log softmax(h W^T / T)[target] for one chunk of hidden states h (M, C) -> (M,) fp32, also under autocast."""
    # With entropy, also the entropy (M,) of that softmax, without gradient.
    # fp32 matmul even under bf16 autocast: bf16 logits would carry up to ~0.1 nats of rounding (model.logits)
    with torch.autocast(h.device.type, enabled=False):
        z = (h.float() @ lm_head_w.float().t()) / temperature  # (M, V): the only V-sized tensor, one chunk at a time
    lse = z.logsumexp(-1)  # (M,)
    lp = z.gather(-1, target[:, None]).squeeze(-1) - lse  # (M,)
    if not entropy:
        return lp
    with torch.no_grad():  # H = -sum p log p = logsumexp(z) - sum p z, with p = softmax(z)
        zd = z.detach()
        ent = lse.detach() - torch.softmax(zd, -1).mul_(zd).sum(-1)  # (M,): one more (M, V) tensor, not two
    return lp, ent


def distinct_prompts(prompt_ids, prompt_mask):
    """(first (U,), inverse (N,)): one row holding each distinct prompt, and which of them each row holds."""
    # Rows are equal when their real tokens and padding are: the ids under the padding are ignored (junk there
    # changes nothing, the mask keeps it out of every real position). Any row order; ties go to the lowest row.
    N = prompt_ids.shape[0]
    key = prompt_ids.masked_fill(~prompt_mask.bool(), -1)  # (N, Tp): -1 marks padding, never a token id
    inv = torch.unique(key, dim=0, return_inverse=True)[1]  # (N,)
    rows = torch.arange(N, device=inv.device)
    first = torch.full((int(inv.max()) + 1,), N, device=inv.device).scatter_reduce(0, inv, rows, "amin")  # (U,)
    return first, inv


def shared_slots(inv):
    """(slots (N,), c): where each row sits among the U x c rows that `spread` expands to; c: most rows a prompt has."""
    counts = torch.bincount(inv)  # (U,)
    order = torch.sort(inv, stable=True)[1]  # (N,): rows grouped by prompt, each prompt's rows in row order
    starts = counts.cumsum(0) - counts  # (U,)
    nth = torch.empty_like(inv)
    nth[order] = torch.arange(len(inv), device=inv.device) - starts[inv[order]]  # (N,) i-th row of its prompt
    c = int(counts.max())
    return inv * c + nth, c


def spread(x, slots, c):
    """x[inv] (N, ...) from the distinct prompts' x (U, ...); backward sums each prompt's rows in a fixed order."""
    # x[inv] back-propagates by an accumulating scatter, which on CPU adds a prompt's row gradients in whatever
    # order its threads reach them (the bits differ run to run). Expanding each prompt c times and picking every
    # slot at most once makes backward a sum over c instead: a reduction, in the same order every time.
    wide = x.unsqueeze(1).expand(x.shape[0], c, *x.shape[1:]).reshape(-1, *x.shape[1:])  # (U*c, ...)
    return wide.index_select(0, slots)  # (N, ...)


def common_prefix(prompt_ids, prompt_mask):
    """Length of the rows' longest common prompt prefix (real tokens), leaving every row one token of its own."""
    # Rows are left-padded (sample.Rollout): row i's real tokens are its last n_i. Each keeps one token of its own,
    # so the hidden state that predicts its first completion token comes from its own suffix forward.
    if prompt_ids.shape[0] == 0:
        return 0
    Tp = prompt_ids.shape[1]
    n = prompt_mask.sum(1)  # (N,)
    m = int(n.min()) - 1
    if m <= 0:
        return 0
    start = Tp - n  # (N,) where each row's real tokens begin
    # (m: the most tokens a prefix may have, the shortest prompt's length - 1)
    lead = prompt_ids.gather(1, start[:, None] + torch.arange(m, device=n.device))  # (N, m) each row's first m
    same = (lead == lead[:1]).all(0)  # (m,)
    return m if bool(same.all()) else int((~same).int().argmax())


class SharedPrefix:
    """The prompt prefix all rows of a batch share, forwarded once: its length and each layer's keys/values."""
    # A chat template's system turn and worked examples are the same in every prompt, and at the default
    # --micro-batch G a micro-batch holds one prompt: forwarded per micro-batch, the prefix would be recomputed
    # P times per forward pass. Here it is forwarded once per optimizer batch, and every micro-batch attends to
    # its keys/values (token_logprobs(..., prefix=)). Under autograd the micro-batches see detached copies
    # (leaves): each micro-batch's backward adds into their .grad, and backward() sends the sum through the one
    # prefix forward, which by linearity is the gradient of the whole batch. Memory: the prefix's activations
    # (one row) and the leaves' gradients, held across the micro-batches.
    # fixed: always one forward (a 1-token one when nothing is shared) and, under autograd, one backward, so
    # that a sharded model (fsdp.py) makes the same collectives on every rank.
    def __init__(self, model, prompt_ids, prompt_mask, fixed=False):
        self.length = common_prefix(prompt_ids, prompt_mask)
        self.kv, self._out = None, None
        if not self.length and not fixed:
            return
        dev = prompt_ids.device
        if self.length:
            row = prompt_ids[:1, prompt_ids.shape[1] - int(prompt_mask[0].sum()):]  # (1, n_0) row 0's real tokens
            ids = row[:, :self.length]  # (1, L)
        else:
            ids = torch.zeros(1, 1, dtype=torch.long, device=dev)  # fixed: a forward no row attends to
        kv = model.forward_hidden(ids, return_kv=True)[1]  # layers x 2 x (1, K, L, D)
        # (with LoRA a frozen projection's keys/values in the first layer need no gradient: left as they are)
        out = [t for pair in kv for t in pair if t.requires_grad]
        if out:
            # fp32 leaves, also under autocast (where v is bf16): the micro-batches' gradients add up in fp32, as the
            # parameters' do; each use casts back to the forward's dtype
            leaf = {id(t): t.detach().float().requires_grad_() for t in out}
            kv = [tuple(leaf[id(t)].to(t.dtype) if id(t) in leaf else t for t in pair) for pair in kv]
            self._out, self._leaves = out, list(leaf.values())
        self.kv = kv if self.length else None

    def backward(self):
        """Send the micro-batches' summed gradients through the prefix forward (with fixed, also when they are 0)."""
        if self._out is None:
            return
        grads = [(t.grad if t.grad is not None else torch.zeros_like(t)).to(o.dtype)
                 for t, o in zip(self._leaves, self._out)]
        torch.autograd.backward(self._out, grads)
        self._out = self._leaves = None


def token_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0, chunk=1024,
                   share_prompt=True, entropy=False, fixed_forwards=False, prefix=None):
    """Log-prob of each completion token under `model` at `temperature`: (N, T) fp32, 0 outside completion_mask."""
    # With entropy, returns (log-probs, entropies) where entropies (N, T) are of the whole next-token distribution
    # at each completion position (no gradient), computed in the same chunks, so no (N, T, V) tensor exists.
    # Hidden states come from one forward over prompt + completion, or, when rows share prompts (GRPO's G rows of
    # a group) and share_prompt, from a forward of the U distinct prompts (keys/values returned) and then one of
    # the completions alone attending to them (note 12): each layer's prompt k, v are spread out to the N rows
    # (differentiable: `spread`, so the G rows' gradients sum into the one prompt forward in a fixed order), the
    # prompt's last hidden state predicts completion token 0, and completion positions 0..T-2 predict tokens
    # 1..T-1, at the positions and under the mask that the full forward gives them. Same values and gradients (up
    # to float rounding).
    # fixed_forwards: always the two forwards (the distinct prompts, then the completions), whatever the rows share
    # and however long the completions, so that a sharded model (fsdp.py) reduces its gradients in the same
    # collectives on every rank; the values and gradients are the same.
    # prefix: a SharedPrefix of these rows (made over the whole optimizer batch): its L tokens, the same first L of
    # every row's prompt, are not forwarded again; the prompts' forward covers their suffixes only, attending to
    # its keys/values, as the completions do.
    # lm_head and log_softmax run only at masked completion positions, `chunk` tokens at a time. Under autograd
    # each chunk is checkpointed, so backward recomputes its (chunk, V) logits instead of keeping all of them:
    # peak memory scales with chunk, not T*V.
    N, Tp = prompt_ids.shape
    T = completion_ids.shape[1]
    L = prefix.length if prefix is not None else 0
    if L:  # from here on the prompts are their suffixes after the shared L tokens, still left-padded
        # dropping L columns leaves a short row's prefix tokens where its padding was: the mask counts only the
        # last n - L, whatever ids lie before them
        n = prompt_mask.sum(1, keepdim=True)  # (N, 1)
        Tp = Tp - L
        prompt_ids, prompt_mask = prompt_ids[:, L:], torch.arange(Tp, device=n.device) >= Tp + L - n  # (N, Tp) each

    def pre(rows, mask):  # the shared prefix's keys/values for `rows` rows (a view), and the mask with its L keys
        ones = torch.ones(mask.shape[0], L, dtype=torch.bool, device=mask.device)
        kv = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix.kv] if L else None
        return kv, torch.cat([ones, mask], 1)  # layers x 2 x (rows, K, L, D), (rows, L + S)

    # completion positions after a row's stop are attended by nobody before them (causal), so they can be "real"
    attn = torch.cat([prompt_mask, torch.ones_like(completion_mask)], 1)  # (N, Tp+T)
    first, inv = distinct_prompts(prompt_ids, prompt_mask) if share_prompt and N > 1 else (None, None)
    if fixed_forwards and first is None:
        first = inv = torch.arange(N, device=prompt_ids.device)  # (N,) each row its own prompt
    if not fixed_forwards and (first is None or len(first) == N):  # nothing shared: one forward of prompt + completion
        ids = torch.cat([prompt_ids, completion_ids], 1)  # (N, Tp+T)
        past, mask = pre(N, attn)
        h = model.forward_hidden(ids, attn_mask=mask, past=past)[:, Tp - 1:-1]  # (N, T, C): t-1 predicts token t
    else:
        past, mask = pre(len(first), prompt_mask[first])
        hp, kv = model.forward_hidden(prompt_ids[first], attn_mask=mask, past=past, return_kv=True)  # (U, Tp, C)
        slots, c = shared_slots(inv)
        h = spread(hp[:, -1:], slots, c)  # (N, 1, C): the prompt's last position predicts completion token 0
        if T > 1 or fixed_forwards:
            Tc = max(T - 1, 1)  # with fixed_forwards and T == 1 a forward whose output is cut off below
            shared, mask = pre(N, attn[:, :Tp + Tc])
            past = [(spread(k, slots, c), spread(v, slots, c)) for k, v in kv]  # layers x 2 x (N, K, Tp, D)
            if L:
                past = [(torch.cat([sk, k], 2), torch.cat([sv, v], 2))
                        for (sk, sv), (k, v) in zip(shared, past)]  # layers x 2 x (N, K, L+Tp, D)
            hc = model.forward_hidden(completion_ids[:, :Tc], attn_mask=mask, past=past)  # (N, Tc, C)
            h = torch.cat([h, hc], 1)  # (N, 1+Tc, C)
        h = h[:, :T]  # (N, T, C): T == 0 keeps no column
    hm, target = h[completion_mask], completion_ids[completion_mask]  # (M, C), (M,)
    w, temp = model.lm_head.weight, temperature or 1.0
    parts = []
    for s in range(0, hm.shape[0], chunk):
        args = (hm[s:s + chunk], w, target[s:s + chunk], temp, entropy)
        grad = torch.is_grad_enabled() and (hm.requires_grad or w.requires_grad)
        out = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args)
        parts.append(out if entropy else (out,))
    res = []
    for k in range(2 if entropy else 1):  # log-probs, then entropies
        full = torch.zeros(completion_ids.shape, device=h.device, dtype=torch.float32)  # (N, T)
        res.append(full.masked_scatter(completion_mask, torch.cat([p[k] for p in parts])) if parts else full)
    return tuple(res) if entropy else res[0]


# ----------------------------------------------------------------------------- 3. the loss

def k3(logp, ref_logp):
    """k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for KL(pi || ref) under tokens drawn from pi."""
    d = ref_logp - logp
    return torch.expm1(d) - d  # exp(d) - d - 1 rounds below 0 for small d (-1.1e-16 at d = 1e-8 in float64)


def loss_normalizer(loss_type, completion_mask, max_new_tokens=None, keep=None):
    """The denominator of the loss for one whole optimizer batch; pass it to every micro-batch's grpo_loss."""
    # grpo: number of sequences (each already averaged over its own tokens); token: number of completion
    # tokens; dr_grpo: number of sequences x max_new_tokens. keep (N,) bool: count only those rows (note 11);
    # pass the mask with the dropped rows zeroed, so that "token" counts their tokens out too.
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    rows = completion_mask.shape[0] if keep is None else int(keep.sum())
    if loss_type == "grpo":
        return float(max(rows, 1))
    if loss_type == "token":
        return float(max(int(completion_mask.sum()), 1))
    if max_new_tokens is None:
        raise ValueError("dr_grpo needs max_new_tokens")
    return float(max(rows, 1) * max_new_tokens)


def tis_weights(old_logp, sampler_logp, mask, cap):
    """TIS weights (note 10): min(pi_old / pi_sampler, cap) per token (N, T), 0 outside the mask, without gradient."""
    with torch.no_grad():
        m = mask.bool()
        d = (old_logp - sampler_logp).masked_fill(~m, 0.0)  # (N, T) log-ratio; padding zeroed before exp
        return torch.exp(d).clamp(max=cap) * m


def mismatch(old_logp, sampler_logp, mask, low=0.8, high=1.25):
    """How far the sampler's token log-probs are from the trainer's: {abs, max, out, tokens} over the masked tokens."""
    # Sums over the masked tokens, so they add over micro-batches and ranks: abs: sum |delta|, max: max |delta|,
    # out: tokens whose ratio pi_old / pi_sampler is outside [low, high], tokens: the number of masked tokens.
    with torch.no_grad():
        m = mask.bool()
        d = (old_logp - sampler_logp).float()[m]  # (M,)
        r = torch.exp(d)
        return {"abs": d.abs().sum().item(), "max": d.abs().max().item() if d.numel() else 0.0,
                "out": ((r < low) | (r > high)).sum().item(), "tokens": int(m.sum())}


def grpo_loss(logp, old_logp, advantages, mask, normalizer, loss_type="grpo", ref_logp=None,
              beta=0.04, eps_low=0.2, eps_high=None, ratio_level="token", is_weight=None):
    """The clipped surrogate with k3 penalty, summed over this micro-batch and divided by `normalizer`."""
    # logp, old_logp, ref_logp: (N, T) token log-probs (logp carries the gradient); advantages (N,); mask (N, T).
    # ratio_level: "token" (the paper) or "sequence" (GSPO, note 9); is_weight: (N, T) TIS weights (note 10).
    # Returns (loss, stats) with stats the masked means of k3 KL, the ratio, and the fractions of tokens
    # clipped at the low side (A < 0, ratio < 1-eps_low) and the high side (A > 0, ratio > 1+eps_high).
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    eps_high = eps_low if eps_high is None else eps_high
    m = mask.bool()
    mf = m.float()
    # zero the padding before any exp: a huge value there would give inf * 0 = NaN
    logp, old_logp = logp.masked_fill(~m, 0.0), old_logp.masked_fill(~m, 0.0)
    A = advantages.float()[:, None]  # (N, 1)
    log_ratio = logp - old_logp  # (N, T)
    if ratio_level == "sequence":  # GSPO: the mean over the sequence's own tokens, shared by all of them (note 9)
        log_ratio = ((log_ratio * mf).sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    ratio = torch.exp(log_ratio)  # (N, T)
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    per_token = -surrogate
    if is_weight is not None:  # TIS (note 10): a constant per token, on the policy-gradient term only
        per_token = per_token * is_weight.detach()
    kl = None
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        kl = k3(logp, ref_logp.masked_fill(~m, 0.0))  # (N, T)
        per_token = per_token + beta * kl
    per_token = per_token * mf
    if loss_type == "grpo":
        loss = (per_token.sum(1) / mf.sum(1).clamp(min=1)).sum() / normalizer  # eq. 3: 1/G sum_i 1/|o_i| sum_t
    else:
        loss = per_token.sum() / normalizer

    with torch.no_grad():
        n = mf.sum().clamp(min=1)
        stats = {
            "kl": ((kl * mf).sum() / n).item() if kl is not None else 0.0,
            "ratio": ((ratio * mf).sum() / n).item(),
            "clip_low": (((ratio < 1 - eps_low) & (A < 0) & m).sum() / n).item(),
            "clip_high": (((ratio > 1 + eps_high) & (A > 0) & m).sum() / n).item(),
            "tokens": int(mf.sum().item()),
        }
    return loss, stats
