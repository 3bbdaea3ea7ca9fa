"""GRPO fine-tuning, end to end: python train.py --task gsm8k [--model Qwen/Qwen2.5-0.5B-Instruct] [--out runs/NAME]

This file is the algorithm: the run's state, one function per stage of a step, in step order, then set-up and
train_loop() (main() calls it), whose loop shows the stages in order and nothing else:
  1. next_prompts   this rank's share of the step's prompts (a seeded permutation per epoch)
  2. rollout        G completions per prompt from the current policy (sample.py; whole games: play.py)
  3. score          each reward function (tasks.py -> rewards.py), the judge's with --judge (judge.py), and the
                    task's 0/1 metrics
     3b. refill     with --dynamic-sampling (DAPO): more rounds of prompts until P groups have a reward spread
  4. advantages     group-relative: (r - mean(group)) / (std(group) + eps)                   (grpo.py)
  5. reference_logprobs, old_logprobs   the frozen reference's (beta > 0) and pi_old's (mu > 1) token log-probs
  6. update         clipped surrogate - beta * k3, backward over micro-batches, optimizer step(s)   (grpo.py)
  7. log_step       one metrics.jsonl line, reduced over ranks; then eval and checkpoint on schedule
     7b. log_rollouts every group's completions, rewards and advantages to rollouts.jsonl (rollouts.py)
The plumbing lives in files named for it: config.py (flags, checks, device), checkpoint.py (run dir, save,
resume, Ctrl-C), ranks.py (torch.distributed helpers, fail_together), fsdp.py (--fsdp: sharded weights, gathered
once per rollout and per phase of a step), evaluate.py (held-out evaluation), plot.py (curves, evaluations side
by side) and report.py (--report-to TensorBoard/W&B, the console's heartbeat). What to train on lives in tasks.py:
adding a task never touches this file.

Dtype policy, set here once (--dtype; measured in docs/results.md): weights, optimizer state and checkpoints are fp32.
With bf16 (the default on CUDA; on CPU only when asked) every forward runs under bf16 autocast: sampler, token
log-probs, reference, evaluation. Two rules keep it exact: the reference holds the policy's fp32 weights under the
same autocast (so the KL is exactly 0 at step 1), and lm_head and log_softmax run in fp32 (bf16 logits would
move the ratio by rounding alone). The judge (--judge), frozen and never compared with the policy, is loaded in
bf16 under bf16. --fsdp keeps this policy: fp32 shards, gathered fp32, the same autocast (fsdp.py).
Legend: P prompts per rank per step, G group, N = P*G rows, n rows trained on, T completion time.
"""
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

import fsdp
import judge
import lora
import report
from checkpoint import (append_jsonl, base_model_of, check_resume, interrupted, last_checkpoint, load_judge,
                        load_policy, load_reference, prepare_out, read_jsonl, read_resume, resolve_judge, resolve_model,
                        save, start_records)
from config import BadInput, TrainConfig, check_settings, describe, parse_args, pick_device
from evaluate import completion_texts, evaluate_and_record
from grpo import SharedPrefix, group_advantages, grpo_loss, loss_normalizer, mismatch, tis_weights, token_logprobs
from model import Transformer, is_hub_id
from play import play
from plot import plot
from ranks import (all_max, all_or, all_sum, fail_together, finish, gather_records, oom_advice, start_ranks, sum_grads,
                   world_and_rank)
from rewards import combine
from rollouts import append_groups, step_groups
from sample import Rollout, cat_rollouts, generate, stream_seed, take_rows
from tasks import TASKS, Task, TaskError, example_view, judge_view, prompt_text
from tokenizer import Tokenizer


@dataclass
class Run:
    """Everything a step needs, built once by setup(): the stages read it, the loop in main() owns it."""
    cfg: TrainConfig
    task: Task
    train: list
    test: list
    tok: Tokenizer
    tok_files: dict  # {name: bytes} of the tokenizer files, written into every checkpoint
    model: Transformer
    ref: Transformer  # frozen initial weights; None when beta == 0, with LoRA (adapters off) or --eval-only
    judge: judge.Judge  # the frozen judge of --judge (judge.py); None without one (or with --eval-only)
    opt: torch.optim.Optimizer  # None with --eval-only
    amp: object  # a context-manager factory: bf16 autocast, or nothing with fp32 (the dtype policy)
    device: torch.device
    rank: int
    world: int
    games: bool  # train on whole episodes (wordle's games, calculator episodes): play.py's multi-turn rollouts
    eval_games: bool  # evaluate on whole episodes, greedy
    P: int  # prompts per rank per step
    start: int  # last completed step (0 for a new run)
    log: object  # print on rank 0, a no-op elsewhere
    base_model: str  # checkpoint.fingerprint of --model (the run's initial weights), saved with every checkpoint
    report: report.Reporter  # --report-to: TensorBoard, W&B (report.py); does nothing without them, off rank 0


def lr_at(step, cfg):
    """Linear warmup to cfg.lr over warmup_steps, then cosine down to min_lr_ratio * lr at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ----------------------------------------------------------------------------- the stages of a step
# Each stage is a function of the Run and what the earlier stages returned, so a forker can replace one (a
# different reward mixing, another advantage estimator, a rollout engine) without touching the rest.

def data_indices(step, cfg, n):
    """(global dataset indices, global data positions) of a step's prompts: a fresh seeded permutation each epoch."""
    # A pure function of (seed, step): no data-loader state to checkpoint, and resume or a change of rank count
    # draws exactly the prompts the uninterrupted run would have.
    pos = np.arange((step - 1) * cfg.prompts_per_step, step * cfg.prompts_per_step)
    return [int(np.random.default_rng([cfg.seed, int(q) // n]).permutation(n)[q % n]) for q in pos], pos


def step_prompts(run, step, round_=0):
    """Every rank's prompts of a step's round: (their dataset indices, each one's sampling-stream key)."""
    # round_ > 0 is an extra round of --dynamic-sampling. A key names a prompt's place in the run: (0, its data
    # position, 0, 0), or in an extra round (1, step, round, its index in the round).
    cfg, n = run.cfg, len(run.train)
    if round_ == 0:
        idx, pos = data_indices(step, cfg, n)
        return idx, [(0, int(q), 0, 0) for q in pos]
    # drawn from (seed, step, round) alone, so the data order, resume and rank count stay as without them
    idx = np.random.default_rng([cfg.seed, step, round_]).integers(n, size=cfg.prompts_per_step).tolist()
    return idx, [(1, step, round_, j) for j in range(cfg.prompts_per_step)]


def next_prompts(run, step, round_=0):
    """1. This rank's share of the step's prompts: (examples, each one's sampling-stream key)."""
    # Rank r takes prompts r*P .. r*P+P-1 of the step's global batch, so the split never changes what is drawn.
    idx, keys = step_prompts(run, step, round_)
    sl = slice(run.rank * run.P, (run.rank + 1) * run.P)
    return [run.train[i] for i in idx[sl]], keys[sl]


@dataclass
class Sampled:
    """What rollout() drew: N rows, prompt p's G completions (or games) at rows p*G .. p*G+G-1."""
    ro: Rollout
    texts: list  # (N,) decoded completions, or whole games' trajectories
    extra: list  # (N,) per-row fields for the rewards: {} or {"game": the game's record}
    seconds: float


def rollout(run, examples, keys):
    """2. G completions per prompt from the current policy (sample.py), or G whole games per example (play.py)."""
    cfg, G = run.cfg, run.cfg.group_size
    run.model.eval()
    t0 = time.time()
    with fsdp.gathered(run.model):  # --fsdp: the weights all-gathered once for the whole rollout, resharded after
        if run.games:  # G games per example, played to the end; the game's replies are outside the loss mask
            games = [run.task.game(ex) for ex in examples for _ in range(G)]
            # a generator per game, from (seed, the prompt's key, game): independent of rank and batch, as below
            gens = [torch.Generator(run.device).manual_seed(stream_seed(cfg.seed, *k, j)) for k in keys
                    for j in range(G)]
            ro, texts = play(run.model, run.tok, games, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, generators=gens,
                             group_size=G, amp=run.amp(), compile=cfg.compile, share_prefix=cfg.share_prefix)
            return Sampled(ro=ro, texts=texts, extra=[{"game": g.record()} for g in games], seconds=time.time() - t0)
        # One generator per prompt, seeded by (seed, the prompt's key): a prompt's completions do not depend on which
        # rank drew it or on what else is in the batch, so N ranks sample what 1 process would (up to float rounding:
        # the prefix the batch's prompts share, prefilled once, depends on the batch, as the matmuls' order does).
        gens = [torch.Generator(run.device).manual_seed(stream_seed(cfg.seed, *k)) for k in keys]
        prompts = [run.tok.encode_chat(run.task.prompt(ex)) for ex in examples]
        with run.amp():
            ro = generate(run.model, prompts, G=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, stop_ids=run.tok.stop_ids, generator=gens,
                          vocab_size=run.tok.vocab_size, pad_id=run.tok.pad_id, compile=cfg.compile,
                          share_prefix=cfg.share_prefix)
    return Sampled(ro=ro, texts=completion_texts(run.tok, ro), extra=[{}] * len(ro.lengths), seconds=time.time() - t0)


@dataclass
class Scored:
    """Rollouts with their rewards and metrics; row i belongs to prompt i // G."""
    ro: Rollout
    texts: list  # (N,)
    extra: list  # (N,) the rows' extra fields: {} or {"game": the game's record} (Sampled.extra)
    total: torch.Tensor  # (N,) the weighted total reward
    per_fn: dict  # {reward function's name: (N,) its unweighted values}
    task_metrics: dict  # {the task's metric (acc_*, ...): (N,) 0/1 values}
    ratios: dict  # {the task's ratio (tool/*): (N,) (numerator, denominator) pairs}; {} for a task without any
    judge_mass: list  # (N,) the judge's P(yes) + P(no) (judge.py); None without a judge
    sample_s: float
    judge_s: float


def score(run, examples, sampled):
    """3. Each reward function, their weighted total, the task's metrics, and with --judge the judge's verdicts."""
    # Every reward sees the example's fields, the row's extra fields (a game's record) and `prompt`, the prompt's
    # text, so a format reward can refuse reasoning copied from the instruction (rewards.well_formed). Whole
    # games are scored by the task's game rewards and metrics.
    G, task, texts = run.cfg.group_size, run.task, sampled.texts
    reward_list, metric_fns = (task.game_rewards, task.game_metrics) if run.games else (task.rewards, task.metrics)
    rows = [{**examples[i // G], **sampled.extra[i]} for i in range(len(texts))]
    t0, mass = time.time(), None
    if run.judge is not None:  # one batched forward per group (judge.py); the reward reads the row's score
        with run.amp():
            views = [judge_view(task, ex) for ex in examples]  # (question, reference or None) per prompt
            judged = [run.judge.score(q, texts[p * G:(p + 1) * G], ref) for p, (q, ref) in enumerate(views)]
        scores, mass = [torch.cat(t).tolist() for t in zip(*judged)] if judged else ([], [])
        for r, s in zip(rows, scores):
            r["judge"] = s
        reward_list = reward_list + [(run.cfg.judge_weight, judge.judge)]
    judge_s = time.time() - t0
    ptexts = [prompt_text(task.prompt(ex)) for ex in examples]  # once per prompt, not per completion
    scored = [combine(reward_list, t, prompt=ptexts[i // G], **ex) for i, (t, ex) in enumerate(zip(texts, rows))]
    return Scored(ro=sampled.ro, texts=texts, extra=sampled.extra,
                  total=torch.tensor([tot for tot, _ in scored]),  # (N,)
                  per_fn={k: [per[k] for _, per in scored] for k in (scored[0][1] if scored else {})},
                  task_metrics={k: [f(t, **ex) for t, ex in zip(texts, rows)] for k, f in metric_fns.items()},
                  ratios={k: [f(t, **ex) for t, ex in zip(texts, rows)]  # of episodes (tool/*: of their calls)
                          for k, f in ((task.ratios or {}) if run.games else {}).items()},
                  judge_mass=mass, sample_s=sampled.seconds, judge_s=judge_s)


@dataclass
class Batch:
    """What a step trains on: the rows kept of all that was drawn and scored (all of them without refill)."""
    drawn: Scored  # every row of every round, rank-local
    ro: Rollout  # (n rows) the rows to train on (drawn.ro holds every row, for the log)
    rows: torch.Tensor  # (n,) their indices in drawn; None: all of them
    ds: dict  # --dynamic-sampling's global counts (ds_rounds, ds_groups_drawn, ds_groups_kept); None without it


def informative(run, total):
    """Whether each group of the round has a reward spread: (rounds' global prompts,) bool, the same on every rank."""
    G, P, PG = run.cfg.group_size, run.P, run.cfg.prompts_per_step
    r = total.view(-1, G)  # (P, G)
    flags = torch.zeros(PG, dtype=torch.bool)
    flags[run.rank * P:(run.rank + 1) * P] = r.amax(1) != r.amin(1)
    return all_or(flags, run.world)  # each rank filled its own slice


def merge_rounds(parts, pad_id):
    """One Scored holding the rows of several rounds, in round order."""
    first = parts[0]
    return Scored(ro=cat_rollouts([p.ro for p in parts], pad_id), texts=sum((p.texts for p in parts), []),
                  extra=sum((p.extra for p in parts), []),
                  total=torch.cat([p.total for p in parts]),  # (N * rounds,)
                  per_fn={k: sum((p.per_fn[k] for p in parts), []) for k in first.per_fn},
                  task_metrics={k: sum((p.task_metrics[k] for p in parts), []) for k in first.task_metrics},
                  ratios={k: sum((p.ratios[k] for p in parts), []) for k in first.ratios},
                  judge_mass=None if first.judge_mass is None else sum((p.judge_mass for p in parts), []),
                  sample_s=sum(p.sample_s for p in parts), judge_s=sum(p.judge_s for p in parts))


def refill(run, step, scored):
    """3b. --dynamic-sampling: more rounds of prompts until the step has P groups with a reward spread."""
    # DAPO (arXiv 2503.14476, sec. 3.3): while fewer than --prompts-per-step groups have a spread, draw another round
    # (at most --dynamic-max-rounds), then train on the first --prompts-per-step that have one. Every rank takes part in
    # every round and in each round's exchange of flags, so they stop together, and the groups kept are those one
    # process would keep: N ranks train on what 1 process would. A rank may keep fewer groups than another, or none
    # (update() handles both without skewing the normaliser).
    cfg, PG = run.cfg, run.cfg.prompts_per_step
    parts, flags = [scored], [informative(run, scored.total)]
    while sum(int(f.sum()) for f in flags) < PG and len(flags) <= cfg.dynamic_max_rounds:
        with fail_together(cfg, run.world, step):
            examples, keys = next_prompts(run, step, len(flags))
            parts.append(score(run, examples, rollout(run, examples, keys)))
        flags.append(informative(run, parts[-1].total))
    rows, kept = pick_rows(flags, run.rank, run.P, cfg.group_size)
    with fail_together(cfg, run.world, step):  # no collective inside; a rank out of memory here tells the others
        drawn = merge_rounds(parts, run.tok.pad_id)
        ro = take_rows(drawn.ro, rows)
    ds = {"ds_rounds": len(flags) - 1, "ds_groups_drawn": len(flags) * PG, "ds_groups_kept": kept}
    return Batch(drawn=drawn, ro=ro, rows=rows, ds=ds)


def pick_rows(flags, rank, P, G):
    """(this rank's rows to train on (n,), groups kept globally) from each round's global informative flags (PG,)."""
    # The first PG informative groups in global order, round by round, prompt by prompt; rank r holds prompts
    # r*P .. r*P+P-1 of every round, and its rows of round k start at k*P*G (cat_rollouts' order).
    PG, rows, kept = len(flags[0]), [], 0
    for k, f in enumerate(flags):
        for j in range(PG):
            if f[j] and kept < PG:
                kept += 1
                if rank * P <= j < (rank + 1) * P:
                    start = k * P * G + (j - rank * P) * G
                    rows += range(start, start + G)
    return torch.tensor(rows, dtype=torch.long), kept


@dataclass
class Advantages:
    """What advantages() computed: one value per row trained on, and the share of flat groups."""
    values: torch.Tensor  # (n,) one per row trained on, on the training device
    zero_std_frac: float  # the share of all the groups drawn whose rewards have no spread


def batch_std(run, r):
    """The std of the rewards of every rank's rows to train on (two passes: the global mean, then the spread)."""
    s = all_sum({"n": float(r.numel()), "sum": r.double().sum().item()}, run.world)
    mean = s["sum"] / max(s["n"], 1)
    ss = all_sum({"ss": ((r.double() - mean) ** 2).sum().item()}, run.world)["ss"]
    return math.sqrt(ss / max(s["n"] - int(run.cfg.adv_unbiased_std), 1))


def advantages(run, batch):
    """4. Group-relative advantages of the rows to train on, and the share of zero-spread groups."""
    # A group never spans ranks, so its mean and std are exact locally; --adv-scale batch divides by the std of the
    # whole batch, over every rank and (with --dynamic-sampling) of the kept groups alone (grpo.py, departure 2).
    # A zero-std group gets 0: it teaches nothing, and says so in the log.
    cfg, total = run.cfg, batch.drawn.total
    kept = total if batch.rows is None else total[batch.rows]  # (n,)
    std = batch_std(run, kept) if cfg.adv_scale == "batch" else None
    opts = dict(scale=cfg.adv_scale, unbiased=cfg.adv_unbiased_std, eps=cfg.adv_eps)
    adv, zero_std = group_advantages(total, cfg.group_size, **opts)
    if batch.rows is not None or std is not None:
        adv = group_advantages(kept, cfg.group_size, **opts, batch_std=std)[0]
    return Advantages(values=adv.to(run.device), zero_std_frac=zero_std)


def micro_batches(run, ro):
    """Row slices of at most --micro-batch rows: memory changes with it, the gradient does not."""
    return [slice(s, s + run.cfg.micro_batch) for s in range(0, ro.completion_mask.shape[0], run.cfg.micro_batch)]


def shared_prefix(run, m, ro):
    """The prompt prefix every row shares (system turn, worked examples), forwarded once for all micro-batches."""
    # --fsdp, in the update: a forward and a backward on every rank, whatever its rows share (grpo.SharedPrefix), so
    # that each backward's reduce-scatters match the other ranks'. With LoRA dropout one mask covers the prefix for
    # all rows, as it already covers a prompt for its G rows.
    if not run.cfg.share_prefix:
        return None
    return SharedPrefix(m, ro.prompt_ids, ro.prompt_mask, fixed=fsdp.is_sharded(m) and torch.is_grad_enabled())


def logprobs(run, m, ro, sl, entropy=False, prefix=None):
    """Token log-probs (rows, T) of the completions under model m at the sampling temperature (and entropies)."""
    # --fsdp: the same two forwards on every rank, whatever its rows, so its backward's reduce-scatters match theirs
    return token_logprobs(m, ro.prompt_ids[sl], ro.prompt_mask[sl], ro.completion_ids[sl], ro.completion_mask[sl],
                          temperature=run.cfg.temperature, chunk=run.cfg.logprob_chunk, entropy=entropy,
                          fixed_forwards=fsdp.is_sharded(m), prefix=prefix)


def loss_mask(run, ro):
    """(n, T) bool: the tokens the loss sees; --mask-truncated leaves out completions that did not stop (note 11)."""
    return ro.completion_mask & ro.stopped[:, None] if run.cfg.mask_truncated else ro.completion_mask


@torch.no_grad()
def reference_logprobs(run, ro):
    """5. The frozen reference's token log-probs (n, T) for the k3 KL term; None when beta == 0 or nothing to learn."""
    if run.cfg.beta == 0:
        return None
    # --fsdp: all-gathered once, on every rank (a collective) before any rank-local early return
    with run.amp(), fsdp.gathered(run.ref if run.ref is not None else run.model):
        mbs = micro_batches(run, ro)
        if not mbs or not loss_mask(run, ro).any():  # no rows, or every one cut: the KL is moot
            return None
        m = run.ref if run.ref is not None else run.model
        with lora.adapters_off(run.model) if run.ref is None else nullcontext():  # LoRA: the base model, adapters off
            prefix = shared_prefix(run, m, ro)
            return torch.cat([logprobs(run, m, ro, sl, prefix=prefix) for sl in mbs])


@torch.no_grad()
def old_logprobs(run, ro):
    """5. pi_old's token log-probs (n, T): the policy's before the first of mu > 1 update passes; None with mu 1."""
    # With mu == 1 pi_old is the policy itself, so the ratio is exp(lp - lp.detach()) == 1 with the right gradient,
    # and no extra forward is needed. The sampler's log-probs are not used as pi_old: under autocast or a
    # different batch make-up they can differ from the trainer's by rounding.
    if run.cfg.mu == 1:
        return None
    with run.amp(), fsdp.gathered(run.model):  # on every rank, as above
        mbs = micro_batches(run, ro)
        if not mbs:
            return None
        prefix = shared_prefix(run, run.model, ro)
        return torch.cat([logprobs(run, run.model, ro, sl, prefix=prefix) for sl in mbs])


def observe(sums, ent, old, ro, sl):
    """Add a micro-batch's policy entropy and sampler mismatch to the step's sums, over every sampled token."""
    # The mismatch is what --tis-cap corrects: ~0 with sampler and trainer in one precision, larger with bf16
    # rollouts or a compiled decode step.
    mm = mismatch(old, ro.logprobs[sl], ro.completion_mask[sl])
    sums["entropy"] += (ent * ro.completion_mask[sl]).sum().item()
    sums["mm_abs"] += mm["abs"]
    sums["mm_out"] += mm["out"]
    sums["sampled_tokens"] += mm["tokens"]
    sums["mm_max"] = max(sums["mm_max"], mm["max"])


def reduce_grads(run):
    """Sum the gradients over ranks (DDP: an all_reduce each); with --fsdp every backward already reduce-scattered."""
    if not fsdp.is_sharded(run.model):
        sum_grads(trainable(run.model), run.world)


@dataclass
class Updated:
    """What update() did: the step's sums for the log, the grad norm and the learning rate."""
    sums: dict  # this rank's sums over the step: loss, token-weighted kl/ratio/clip fractions, entropy, mismatch
    grad_norm: torch.Tensor  # of the last pass, before clipping
    lr: float


def micro_batch_loss(run, step, sl, *, ro, adv, mask, norm, ref_lp, old_lp, first_pass, sums, prefix):
    """One micro-batch's share of the loss (the caller runs its backward); adds its numbers to the step's sums."""
    cfg, model = run.cfg, run.model
    with run.amp():  # on the first pass also the entropy (a softmax per chunk, for a metric)
        out = logprobs(run, model, ro, sl, entropy=first_pass, prefix=prefix)
        lp, ent = out if first_pass else (out, None)
    old = lp.detach() if old_lp is None else old_lp[sl]  # the trainer's pi_old
    if first_pass:
        observe(sums, ent, old, ro, sl)
    w = tis_weights(old, ro.logprobs[sl], mask[sl], cfg.tis_cap) if cfg.tis_cap else None
    loss, st = grpo_loss(lp, old, adv[sl], mask[sl], normalizer=norm, loss_type=cfg.loss_type,
                         ref_logp=None if ref_lp is None else ref_lp[sl],
                         beta=0.0 if ref_lp is None else cfg.beta,  # None: no token to learn from
                         eps_low=cfg.eps_low, eps_high=cfg.eps_high, ratio_level=cfg.ratio_level, is_weight=w)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}: {st}; advantages "
                                 f"[{adv.min().item():.3g}, {adv.max().item():.3g}]; {last_checkpoint(cfg)}")
    sums["loss"] += loss.item()
    for k in ("kl", "ratio", "clip_low", "clip_high"):
        sums[k] += st[k] * st["tokens"]  # token-weighted, so the logged means are per token
    sums["tokens"] += st["tokens"]
    return loss


def update(run, step, *, ro, adv, ref_lp, old_lp):
    """6. mu optimizer steps on the rows to train on: the clipped surrogate minus beta * k3, over micro-batches."""
    cfg, model, opt = run.cfg, run.model, run.opt
    mbs = micro_batches(run, ro)
    # --mask-truncated: the loss sees only completions that stopped (grpo.py, note 11); log-probs, entropy and the
    # mismatch still cover every sampled token
    keep = ro.stopped if cfg.mask_truncated else None
    mask = loss_mask(run, ro)  # (n, T)
    # One normaliser for the whole optimizer batch, summed over ranks (grpo.py, departure 5): each micro-batch's
    # loss is already divided by it, so accumulating gradients over micro-batches and summing them over ranks
    # gives exactly the gradient of one big single-process batch.
    # a rank with nothing to train on (dynamic sampling, overlong filtering) adds 0, and only the sum is kept >= 1
    norm = loss_normalizer(cfg.loss_type, mask, cfg.max_new_tokens, keep) if mask.any() else 0.0
    norm = all_sum({"n": norm}, run.world)["n"]
    empty, norm = norm == 0, max(norm, 1.0)  # empty: no rank has a token to learn from; no optimizer step either
    model.train()
    sums = dict.fromkeys(("loss", "kl", "ratio", "clip_low", "clip_high", "tokens", "entropy", "mm_abs", "mm_out",
                          "mm_max", "sampled_tokens"), 0.0)
    # --fsdp: each backward reduce-scatters the gradients (a collective), so every rank runs as many as the busiest
    # (None: a zero loss, fsdp.zero_loss) and a failure is exchanged before each backward. Without FSDP a backward is
    # local, the ranks may run different numbers of them, and one exchange ends the pass.
    sharded = fsdp.is_sharded(model)
    pad = int(all_max([float(len(mbs))], run.world)[0]) - len(mbs) if sharded else 0
    exchange = partial(fail_together, cfg, run.world, step)  # a rank that fails tells the others before they reduce
    pass_guard, micro_guard = (nullcontext, exchange) if sharded else (exchange, nullcontext)
    for pass_ in range(cfg.mu):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with fsdp.gathered(model), pass_guard():  # --fsdp: whole weights for the pass (fsdp.py)
            with micro_guard(), run.amp():
                prefix = shared_prefix(run, model, ro)  # forwarded once for every micro-batch of the pass
            for sl in mbs + [None] * pad:
                with micro_guard():
                    loss = fsdp.zero_loss(model) if sl is None else micro_batch_loss(
                        run, step, sl, ro=ro, adv=adv, mask=mask, norm=norm, ref_lp=ref_lp, old_lp=old_lp,
                        first_pass=pass_ == 0, sums=sums, prefix=prefix)
                loss.backward()
            with micro_guard():
                if prefix is not None:
                    prefix.backward()  # the micro-batches' gradients, summed, through the one prefix forward
        reduce_grads(run)  # DDP: summed over ranks, not averaged (each rank's loss has the global normaliser)
        with fail_together(cfg, run.world, step):  # Adam's first step allocates its state: a likely place for OOM
            gn = fsdp.whole(torch.nn.utils.clip_grad_norm_(trainable(model), cfg.grad_clip or float("inf")))
            if not torch.isfinite(gn):  # the same on every rank: a norm of the reduced gradients
                raise FloatingPointError(f"non-finite grad norm at step {step}; {last_checkpoint(cfg)}")
            if not empty:  # Adam would move the weights on zero gradients by its momentum: a step that learnt nothing
                opt.step()
            opt.zero_grad(set_to_none=True)
    return Updated(sums=sums, grad_norm=gn, lr=lr)


def log_step(run, step, *, batch, adv, upd, times):
    """7. Reduce the step's sums over ranks, append one line to metrics.jsonl; returns the metrics."""
    # Every metric is a global sum divided by a global count, so N ranks log what 1 process would; names say
    # exactly what they measure (reward/FN is each function's unweighted mean, kl is k3 per completion token).
    cfg, d = run.cfg, batch.drawn
    sums = dict(upd.sums)
    mm_max = sums.pop("mm_max")
    row_metrics = dict(d.task_metrics) | ({} if d.judge_mass is None else {"judge_mass": d.judge_mass})
    js = judge.length_sums(d.per_fn["judge"], d.ro.lengths.tolist()) if "judge" in d.per_fn else {}
    groups = len(d.texts) // cfg.group_size
    g = all_sum({
        "rows": len(d.texts), "reward": d.total.sum().item(), "reward_sq": (d.total ** 2).sum().item(),
        **{f"reward/{k}": sum(v) for k, v in d.per_fn.items()}, **{k: sum(v) for k, v in row_metrics.items()},
        **{f"{k}#num": sum(a for a, _ in v) for k, v in d.ratios.items()},
        **{f"{k}#den": sum(b for _, b in v) for k, v in d.ratios.items()},
        "zero_std": round(adv.zero_std_frac * groups), "groups": groups, "len": float(d.ro.lengths.sum()),
        "truncated": float((~d.ro.stopped).sum()), "completion_tokens": float(d.ro.completion_mask.sum()), **times,
        **sums, **js}, run.world)
    len_max, mm_max = all_max([float(d.ro.lengths.max()), mm_max], run.world)  # reduced by max, not sum
    n, w = g["rows"], run.world
    mean = g["reward"] / n

    def per_token(k):  # a mean over the tokens the loss saw; None in a step that had none (nothing was learnt)
        return g[k] / g["tokens"] if g["tokens"] else None

    def per_sampled(k, exists=True):  # a mean over every sampled token of the rows trained on
        return g[k] / g["sampled_tokens"] if g["sampled_tokens"] and exists else None
    # The mismatch compares the sampler's log-probs with the trainer's pi_old: with top-k/top-p the sampler's are of
    # the full softmax, not of what it drew from, and with LoRA dropout pi_old is a dropout sample; neither is the
    # sampler/trainer gap, so neither is logged.
    gap = cfg.top_p == 1 and not cfg.top_k and not (cfg.lora_rank and cfg.lora_dropout)
    metrics = {
        "step": step, "reward_mean": mean, "reward_std": math.sqrt(max(g["reward_sq"] / n - mean ** 2, 0.0)),
        **{k: g[k] / n for k in g if k.startswith("reward/")}, **{k: g[k] / n for k in row_metrics},
        # a ratio of sums (tool/error_rate: errors over calls), null in a step without any (no call made)
        **{k: g[f"{k}#num"] / g[f"{k}#den"] if g[f"{k}#den"] else None for k in d.ratios},
        "zero_std_frac": g["zero_std"] / g["groups"], "len_mean": g["len"] / n, "len_max": len_max,
        "truncated_frac": g["truncated"] / n, "kl": per_token("kl") if cfg.beta else None,  # beta 0: no KL at all
        "ratio": per_token("ratio"), "clip_low": per_token("clip_low"), "clip_high": per_token("clip_high"),
        "loss": g["loss"] / cfg.mu if g["tokens"] else None,
        # over every sampled token: the policy's entropy, and the sampler's log-prob distance from the trainer's
        "entropy": per_sampled("entropy"), "mismatch_mean": per_sampled("mm_abs", gap),
        "mismatch_max": mm_max if per_sampled("mm_abs", gap) is not None else None,
        "mismatch_out_frac": per_sampled("mm_out", gap),
        "grad_norm": upd.grad_norm.item(), "lr": upd.lr, "sample_s": g["sample_s"] / w, "train_s": g["train_s"] / w,
        "step_s": g["step_s"] / w, "completion_tokens": g["completion_tokens"],
        "tokens_per_s": g["completion_tokens"] / max(g["step_s"] / w, 1e-9),  # whole step, all ranks
    }
    metrics.update(batch.ds or {})  # --dynamic-sampling: global counts of the step's rounds and groups
    if js:  # judge_s: the judge's share of step_s; judge_len_corr: does the judge pay for length? (judge.py)
        metrics.update(judge_s=g["judge_s"] / w, judge_len_corr=judge.length_correlation(g, n))
    if run.rank == 0:
        append_jsonl(os.path.join(cfg.out, "metrics.jsonl"), metrics)
        run.report.log(metrics, "train")
    return metrics


def log_rollouts(run, step, *, batch, adv):
    """7b. The step's groups, each with its prompt, completions, rewards and advantages, to rollouts.jsonl."""
    # What the means of log_step are made of, for reading what the model was rewarded for (rollouts.py shows a
    # step). Every group drawn is logged, those that --dynamic-sampling dropped with no advantage; a group never
    # spans ranks, so each rank builds its own and rank 0 writes them all in draw order: N ranks log what 1
    # process would. --log-rollouts N keeps the first N groups of the step, 0 none.
    cfg, d, cap = run.cfg, batch.drawn, run.cfg.log_rollouts
    if cap == 0:
        return
    with fail_together(cfg, run.world, step):
        trained = range(len(d.texts)) if batch.rows is None else batch.rows.tolist()
        advs = dict(zip(trained, adv.values.tolist()))  # {row: its advantage}, for the rows trained on
        rounds = [step_prompts(run, step, k)[0] for k in range(len(d.texts) // (run.P * cfg.group_size))]
        groups = step_groups(step=step, drawn=d, advantages=[advs.get(i) for i in range(len(d.texts))],
                             rounds=rounds, rank=run.rank, P=run.P, cap=cap,
                             view=lambda i: example_view(run.task, run.train[i]))
    groups = gather_records(groups, run.world, order=lambda g: (g["round"], g["group"]))
    with fail_together(cfg, run.world, step):  # rank 0 writes; if that fails, every rank ends with its message
        if run.rank == 0:
            append_groups(os.path.join(cfg.out, "rollouts.jsonl"), groups)


def print_step(run, step, metrics, *, batch, t_run):
    """One console line per step (and every --print-every steps one sampled completion with its rewards)."""
    cfg, d = run.cfg, batch.drawn
    eta = (time.time() - t_run) / (step - run.start) * (cfg.steps - step)
    accs = " / ".join(f"{metrics[k]:.2f}" for k in metrics if k.startswith("acc_"))
    kl = "-" if metrics["kl"] is None else f"{metrics['kl']:.4f}"  # no KL: beta 0, or nothing learnt this step
    run.log(f"step {step}/{cfg.steps} | reward {metrics['reward_mean']:.3f} | acc {accs} | kl {kl} | "
            f"len {metrics['len_mean']:.0f} | {metrics['tokens_per_s']:.0f} tok/s | ETA {eta / 60:.1f} min", flush=True)
    if cfg.print_every and step % cfg.print_every == 0:
        rewards = {k: round(v[0], 3) for k, v in d.per_fn.items()}
        run.log(f"--- sample (step {step}, rewards {rewards}):\n{d.texts[0]}\n---")


def run_eval(run, step):
    """Greedy held-out evaluation (evaluate.py): the before and after of every learning claim."""
    with fsdp.gathered(run.model):  # --fsdp: all-gathered once for the whole evaluation
        scores = evaluate_and_record(run.model, run.tok, run.task, run.test, step, cfg=run.cfg, amp=run.amp(),
                                     games=run.eval_games, rank=run.rank, world=run.world, log=run.log)
    if scores is not None:  # None: --eval-n 0
        run.report.log({"step": step, **scores}, "eval")
    return scores


def save_checkpoint(run, step):
    """step-N/ in the run dir, atomically, keeping the last --keep-last (checkpoint.py)."""
    sharded = fsdp.is_sharded(run.model)
    if sharded:  # every rank takes part in gathering the whole weights and Adam state to rank 0 (one tensor at a time)
        state, opt_state = fsdp.whole_state(run.model), fsdp.full_optimizer_state(run.opt)
    with fail_together(run.cfg, run.world, step):  # rank 0 writes; if that fails, every rank ends with its message
        model = fsdp.plain_model(run.model, state) if sharded and run.rank == 0 else run.model
        save(step, cfg=run.cfg, model=model, opt_state=opt_state if sharded else run.opt.state_dict(),
             tok_files=run.tok_files, base_model=run.base_model, rank=run.rank, world=run.world, log=run.log)


# ----------------------------------------------------------------------------- set-up

def trainable(model):
    """The parameters the optimizer updates: all of them, or with LoRA the adapters only."""
    return [p for p in model.parameters() if p.requires_grad]


def setup(cfg, given):
    """Every check of the settings, resume, distributed init, then data, tokenizer, models and optimizer."""
    world, rank = world_and_rank()
    log = print if rank == 0 else (lambda *a, **k: None)
    resumed = read_resume(cfg, given) if cfg.resume and not cfg.eval_only else None
    cfg = resumed.cfg if resumed else cfg  # the run's saved config, overridden by the flags given now
    # ---- every check before anything loads: a bad flag costs one line, not a model load
    opts = check_settings(cfg, world)
    device = pick_device(cfg, world)
    cfg.out = prepare_out(cfg, resumed, rank)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    # The policy starts from the resumed checkpoint, the reference from --model (the initial weights, also on
    # resume); with LoRA the policy is --model plus adapters, and the reference is it with its adapters off. A
    # local model is found now, before any data loads; a hub id after, as it is a download.
    need_ref = cfg.beta != 0 and not cfg.eval_only and not cfg.lora_rank
    need_model = need_ref or not resumed or bool(cfg.lora_rank)
    check_model = need_model or "model" in given  # a resume given --model checks it is the run's base model
    model_dir = resolve_model(cfg, resumed) if check_model and not is_hub_id(cfg.model) else None
    need_judge = bool(cfg.judge) and not cfg.eval_only  # evaluation scores by the task's metrics, never a judge
    judge_dir = resolve_judge(cfg) if need_judge and not is_hub_id(cfg.judge) else None
    if resumed:
        check_resume(cfg, resumed, model_dir)
        log(f"resuming {cfg.out} from {resumed.dir} (step {resumed.step})")
    # ---- distributed: every rank has passed the same checks above, so none is left waiting here
    cfg.out = start_ranks(device, world, cfg.out, group=cfg.fsdp)
    torch.manual_seed(cfg.seed + rank)
    # ---- data, judge, tokenizer, policy, and (only when beta > 0) the frozen reference
    try:
        train, test = TASKS[cfg.task].load(cfg.data_dir, cfg.cache_dir, **opts)
    except TaskError as e:
        raise BadInput(str(e)) from None
    if need_model and is_hub_id(cfg.model):  # a download
        model_dir = resolve_model(cfg, resumed)
        if resumed:
            check_resume(cfg, resumed, model_dir)
    base_model = base_model_of(resumed, model_dir)
    judge_dir = resolve_judge(cfg) if need_judge and is_hub_id(cfg.judge) else judge_dir
    # the judge first: one whose tokenizer cannot say yes/no fails before anything big loads; with bf16 it is bf16
    jm = load_judge(cfg, judge_dir, device, torch.bfloat16 if bf16 else None) if need_judge else None
    tok, tok_files, model = load_policy(cfg, resumed, model_dir, device)
    # --fsdp: each model sharded once loaded (so at most one is whole at a time), and before the optimizer is made
    # (Adam's moments are then born sharded)
    model = fsdp.shard(model, device) if cfg.fsdp else model
    # the reference holds the policy's fp32 weights, under the same autocast: KL exactly 0 at step 1 (dtype policy)
    ref = load_reference(cfg, model_dir, device) if need_ref else None
    ref = fsdp.shard(ref, device) if cfg.fsdp and ref is not None else ref
    model.gradient_checkpointing = cfg.grad_ckpt
    amp = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else nullcontext
    opt = None
    if not cfg.eval_only:  # with LoRA: the adapters only
        opt = torch.optim.AdamW(trainable(model), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if resumed:  # Adam's moments and the torch RNG, so the resumed steps equal the uninterrupted ones
        fsdp.load_optimizer_state(opt, resumed.state["optimizer"])  # whole moments, cut to shards with --fsdp
        torch.set_rng_state(resumed.state["rng"]["torch"])
    if rank == 0:
        start_records(cfg, resumed.step if resumed else 0)
    try:  # --report-to: TensorBoard, W&B; rank 0 only
        reporter = report.start(cfg, start=resumed.step if resumed else 0, rank=rank)
    except ValueError as e:
        raise BadInput(str(e)) from None
    log(describe(cfg))
    log(f"{len(train)} train / {len(test)} test examples; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params on {device} x {world}{' (FSDP)' if cfg.fsdp else ''}, {'bf16 autocast' if bf16 else 'fp32'}; "
        + (f"LoRA r={cfg.lora_rank} on {cfg.lora_targets}: {sum(p.numel() for p in trainable(model)) / 1e6:.2f}M "
           "trainable; " if cfg.lora_rank else "")
        + "reference model: " + ('loaded (fp32 weights)' if ref else 'none (--eval-only)' if cfg.eval_only else
                                 'none (beta=0)' if cfg.beta == 0 else 'none (LoRA: the policy with its adapters off)')
        + (f"; judge {cfg.judge} (rubric {cfg.judge_rubric}, weight {cfg.judge_weight})" if jm else ""))
    return Run(cfg=cfg, task=TASKS[cfg.task], train=train, test=test, tok=tok, tok_files=tok_files, model=model,
               ref=ref, judge=jm, opt=opt, amp=amp, device=device, rank=rank, world=world,
               games=TASKS[cfg.task].train_plays(opts), eval_games=TASKS[cfg.task].eval_plays(opts),
               P=cfg.prompts_per_step // world,
               start=resumed.step if resumed else 0, log=log, base_model=base_model, report=reporter)


# ----------------------------------------------------------------------------- main: the loop

def train_loop(run):
    """Evaluate, run every step's stages in order (eval and checkpoint on schedule), evaluate again, plot."""
    cfg, t_run, step = run.cfg, time.time(), run.start
    try:
        if cfg.eval_only:  # measure a model before training it: scores to eval.jsonl, weights untouched
            return run_eval(run, 0)
        if run.start == 0:  # the baseline: every learning claim is this number against the final one
            run_eval(run, 0)
        for step in range(run.start + 1, cfg.steps + 1):
            t_step = time.time()
            with fail_together(cfg, run.world, step):  # one rank's error ends every rank with its message, not a hang
                examples, keys = next_prompts(run, step)            # 1. this rank's P prompts
                sampled = rollout(run, examples, keys)              # 2. G completions (or games) each
                scored = score(run, examples, sampled)              # 3. rewards and metrics
            batch = Batch(drawn=scored, ro=scored.ro, rows=None, ds=None)
            if cfg.dynamic_sampling:
                batch = refill(run, step, scored)                   # 3b. more rounds until P groups have a spread
            with fail_together(cfg, run.world, step):
                adv = advantages(run, batch)                        # 4. group-relative advantages
            t0 = time.time()
            with fail_together(cfg, run.world, step):  # one exchange per phase: --fsdp gathers at each one's start
                ref_lp = reference_logprobs(run, batch.ro)          # 5. the reference's log-probs (beta > 0)
            with fail_together(cfg, run.world, step):
                old_lp = old_logprobs(run, batch.ro)                #    and pi_old's (mu > 1)
            upd = update(run, step, ro=batch.ro, adv=adv.values,    # 6. loss, backward, optimizer step(s)
                         ref_lp=ref_lp, old_lp=old_lp)
            times = {"sample_s": batch.drawn.sample_s, "judge_s": batch.drawn.judge_s, "train_s": time.time() - t0,
                     "step_s": time.time() - t_step}
            metrics = log_step(run, step, batch=batch, adv=adv, upd=upd, times=times)  # 7. one metrics.jsonl line
            log_rollouts(run, step, batch=batch, adv=adv)          # 7b. every group to rollouts.jsonl
            print_step(run, step, metrics, batch=batch, t_run=t_run)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:  # then eval, checkpoint
                run_eval(run, step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(run, step)
        if not any(e["step"] == cfg.steps for e in read_jsonl(os.path.join(cfg.out, "eval.jsonl"))):
            run_eval(run, cfg.steps)  # the final evaluation, also after a resume that finds it missing
        if run.rank == 0:
            plot(cfg.out)
    except torch.OutOfMemoryError:
        raise BadInput(oom_advice(cfg, step)) from None
    except KeyboardInterrupt:
        interrupted(cfg, step, run.rank)


def main(argv=None):
    """The command line: set up, train (or evaluate, or plot); bad input and known failures end in one line."""
    try:
        cfg, given = parse_args(argv)
        if cfg.plot:
            return plot(cfg.plot, cfg.out)
        try:
            run = setup(cfg, given)
        except KeyboardInterrupt:
            interrupted(cfg, 0, started=False)
        try:
            with report.heartbeat(run, loop=train_loop):  # a line when the console is silent longer than expected
                train_loop(run)
        finally:
            run.report.close()
        finish(run.world)
    except (BadInput, FloatingPointError) as e:  # the one-line exit; the lower files raise, only this prints
        raise SystemExit(f"train.py: error: {e}") from None


if __name__ == "__main__":
    main()
