"""GRPO fine-tuning, end to end: python train.py --task gsm8k [--model Qwen/Qwen2.5-0.5B-Instruct] [--out runs/NAME]

Read it top to bottom: the config (every flag), small helpers, evaluation, set-up, then one function per stage of
a step, then main(), whose loop shows the stages in order and nothing else:
  1. next_prompts  this rank's share of the step's prompts (a seeded permutation per epoch)
  2. rollout       G completions per prompt from the current policy (sample.py, KV-cached, no grad)
  3. score         each reward function (tasks.py -> rewards.py), the judge's with --judge (judge.py), and the
                   task's 0/1 metrics
     3b. refill    with --dynamic-sampling (DAPO): more rounds of prompts until P groups have a reward spread
  4. advantages    group-relative: (r - mean(group)) / (std(group) + eps)            (grpo.py)
  5. reference     the frozen reference's token log-probs, for the k3 KL term (beta > 0 only)
  6. update        clipped surrogate - beta * k3, backward over micro-batches, optimizer step(s)  (grpo.py)
  7. log_step      one metrics.jsonl line, reduced over ranks; then eval and checkpoint on schedule
What to train on lives in tasks.py (data, prompt, rewards, metrics): adding a task never touches this file.
Multi-GPU: torchrun --nproc_per_node N train.py ... (data parallel; see README "Multi-GPU").

Dtype policy, the one place it is set (--dtype): weights, optimizer state and checkpoints are fp32 everywhere.
With bf16 (the default on CUDA; on CPU only when asked, so CI runs the same code) every forward pass runs under
bf16 autocast: the sampler, the token log-probs, the reference's and the evaluation's. Two rules keep it exact:
  - the reference model holds the policy's fp32 weights and runs under the same autocast, so at step 1 its
    log-probs are the policy's bit for bit and the KL is exactly 0. A bf16 reference would halve its memory
    (2 bytes per parameter instead of 4: 1 GB for a 0.5B model) but differ from the policy by bf16 rounding of
    the residual stream, norms and RoPE tables: with SmolLM2-135M, a step-1 k3 of 7.8e-4 per token (log-probs
    up to 0.23 nats apart), a KL that is not there;
  - lm_head and log_softmax run in fp32 (model.logits, grpo._chunk_logprobs): bf16 logits round by up to 0.125
    above 16; with SmolLM2 that moved token log-probs by 0.018 nats on average and up to 0.13 (a ratio of 1.14
    from rounding alone, against a clip at 1.2). This costs the (chunk, V) logits' matmul in fp32 and nothing in
    memory: the fp32 logits existed already, for log_softmax.
The judge (--judge) is the one model held in bf16: frozen, and never compared with the policy, it needs no fp32
master weights, so with bf16 it is loaded in bf16 (half the memory) and runs under the same autocast.
Legend: P prompts per rank per step, G group, N = P*G rows, T completion time.
"""
import argparse
import copy
import glob
import itertools
import json
import math
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import judge
import lora
from grpo import (LOSS_TYPES, RATIO_LEVELS, group_advantages, grpo_loss, loss_normalizer, mismatch, tis_weights,
                  token_logprobs)
from model import Transformer, is_hub_id, resolve_checkpoint
from play import play
from rewards import combine
from sample import cat_rollouts, generate, take_rows
from tasks import TASKS, Task, TaskError, judge_view, parse_options, prompt_text  # noqa: F401 (Task: forkers, tests)
from tokenizer import Tokenizer


def arg(default, help, **kw):
    """A config field whose help text (and argparse extras) travel with it: the CLI is generated from these."""
    return field(default=default, metadata=dict(help=help, **kw))


# ----------------------------------------------------------------------------- the config: every flag, once
# One source of truth per setting: parse_args() builds the CLI from these fields, checkpoints save them, and a
# resumed run reloads them. Defaults are DeepSeekMath's / TRL's GRPO settings for one GPU; small CPU runs (README
# "CPU quick start") override the batch and lengths, not the algorithm.

@dataclass
class TrainConfig:
    # ---- what to train, from where, to where
    task: str = arg("gsm8k", "task to train on (tasks.py: gsm8k, arith, wordle)")
    task_opts: str = arg("", "task options as k=v,k=v (arith: digits=2,ops=+,terms=2,...; wordle: mode=states|games,"
                         "per_secret=4,seed=0; see tasks.py)")
    model: str = arg("Qwen/Qwen2.5-0.5B-Instruct", "Hugging Face repo id or local checkpoint dir")
    data_dir: str = arg("", "dir with the task's train.jsonl/test.jsonl; empty: download (checksummed) to --cache-dir")
    cache_dir: str = arg("~/.cache/grpo", "where downloaded datasets are kept")
    out: str = arg("", "run dir for metrics, evals, checkpoints (default runs/TASK-TIMESTAMP)")
    resume: str = arg("", "run dir to continue from its last complete checkpoint (flags given now override)")
    plot: str = arg("", "only plot the curves of this run dir (or dirs,joined,by,commas) to a PNG (--out, default RUN/curves.png), then exit")
    eval_only: bool = arg(False, "only evaluate --model on the task's test split (eval.jsonl in --out), then exit")
    # ---- the batch: P prompts x G completions; GRPO's baseline is the group mean, so G is the variance knob
    steps: int = arg(200, "optimizer steps (x mu)")
    prompts_per_step: int = arg(16, "prompts per step, global across ranks")
    group_size: int = arg(8, "G: completions per prompt")
    max_new_tokens: int = arg(512, "completion length cap (training and eval; in a game, per turn)")
    temperature: float = arg(0.7, "sampling temperature for training rollouts")
    top_p: float = arg(1.0, "nucleus sampling mass for rollouts (1 = off)")
    top_k: int = arg(0, "top-k for rollouts (0 = off)")
    # ---- the optimizer: RL fine-tuning moves weights far less than pre-training, hence lr ~1e-6 on GPU models
    lr: float = arg(2e-6, "peak learning rate (AdamW)")
    warmup_steps: int = arg(10, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(0.1, "final lr as a fraction of --lr")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta2: float = arg(0.99, "AdamW beta2 (beta1 0.9)")
    grad_clip: float = arg(1.0, "clip the global grad norm to this (0 = off)")
    # ---- the loss (grpo.py states the objective and numbers each departure that these flags select)
    beta: float = arg(0.04, "k3 KL coefficient; 0 = no reference model at all")
    eps_low: float = arg(0.2, "clip ratio below at 1 - eps_low")
    eps_high: float = arg(None, "clip ratio above at 1 + eps_high (default eps_low; DAPO clip-higher: 0.28)", type=float)
    loss_type: str = arg("grpo", "loss aggregation", choices=LOSS_TYPES)
    adv_scale: str = arg("group", "divide advantages by the group std, the batch std, or nothing (Dr. GRPO)",
                         choices=("group", "batch", "none"))
    adv_unbiased_std: bool = arg(True, "Bessel-corrected std for advantages (np.std if off)")
    adv_eps: float = arg(1e-4, "added to the std of advantages")
    mu: int = arg(1, "update passes (optimizer steps) per batch of rollouts")
    # ---- research knobs (README "Research knobs"); the defaults are the paper's GRPO
    ratio_level: str = arg("token", "importance ratio per token (GRPO) or per sequence (GSPO, arXiv 2507.18071; "
                           "with --loss-type grpo and its tighter clip: --eps-low 3e-4 --eps-high 4e-4)",
                           choices=RATIO_LEVELS)
    mask_truncated: bool = arg(False, "overlong filtering (DAPO): completions cut at --max-new-tokens get no loss and "
                               "leave the normaliser")
    dynamic_sampling: bool = arg(False, "dynamic sampling (DAPO): groups whose rewards are all equal are dropped and "
                                 "more prompts drawn until the step has --prompts-per-step groups with a spread")
    dynamic_max_rounds: int = arg(4, "with --dynamic-sampling, at most this many extra rounds of --prompts-per-step "
                                  "prompts a step; then the step trains on the groups it found")
    tis_cap: float = arg(0.0, "truncated importance sampling: weight each token's loss by min(pi_trainer / "
                         "pi_sampler, C), detached (0 = off; >= 1, e.g. 2)")
    # ---- LLM-as-a-judge (judge.py): a frozen local model's yes/no verdict as one more reward, for any task
    judge: str = arg("", "judge model (local dir or hub id): its P(yes) that a completion meets --judge-rubric is "
                     "one more reward, reward/judge (judge.py); empty: no judge")
    judge_rubric: str = arg("correct", "the judge's criterion: a built-in rubric (correct, reasoning, concise) or a "
                            "text file holding one")
    judge_weight: float = arg(1.0, "weight of the judge's score (in [0, 1]) in the total reward")
    judge_max_tokens: int = arg(512, "completion tokens the judge reads: a longer completion keeps its first 3/4 and "
                                "last 1/4, and the judge is told how much was cut")
    # ---- LoRA (lora.py): train low-rank adapters only; the KL reference is the policy with its adapters off
    lora_rank: int = arg(0, "LoRA rank r (0 = full fine-tuning)")
    lora_alpha: float = arg(32.0, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input while training")
    lora_targets: str = arg(",".join(lora.TARGETS), "comma-separated module names to adapt (never lm_head or embeddings)")
    # ---- memory and speed: none of these changes what is computed, only how
    micro_batch: int = arg(8, "rows per forward/backward; changes memory, not the gradient")
    logprob_chunk: int = arg(1024, "tokens per lm_head/log_softmax chunk")
    grad_ckpt: bool = arg(False, "gradient checkpointing: recompute activations in backward")
    compile: bool = arg(False, "torch.compile the sampler's decode step (on CPU it measured slower than eager, which packs weights for oneDNN)")
    dtype: str = arg("auto", "forward passes in bf16 autocast over fp32 weights, or all fp32 (auto: bf16 on CUDA, "
                     "fp32 on CPU; see the dtype policy at the top of train.py)", choices=("auto", "bf16", "fp32"))
    # ---- evaluation, checkpoints, logging
    eval_every: int = arg(50, "evaluate every this many steps (0 = only at start and end)")
    eval_n: int = arg(1319, "test problems per evaluation (greedy pass@1; 0 = no evaluation)")
    eval_batch: int = arg(64, "prompts per evaluation generate call")
    save_every: int = arg(50, "checkpoint every this many steps (and at the end)")
    keep_last: int = arg(2, "checkpoints to keep (older ones are deleted once a newer one is complete)")
    print_every: int = arg(10, "print one sampled completion with its rewards every this many steps")
    seed: int = arg(0, "base seed: data order, and each prompt's sampling stream")
    device: str = arg("", "cuda, cuda:N, cpu or mps; empty: cuda if available, else cpu")


def die(msg):
    """The one-line exit for bad input: lower files raise exceptions, only this file turns them into exits."""
    raise SystemExit(f"train.py: error: {msg}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default once, and none where the help text already says what empty means."""
    def _get_help_string(self, action):
        return action.help if action.default in ("", None) else super()._get_help_string(action)


def build_parser(defaults=True):
    """The CLI, generated from TrainConfig's fields. defaults=False: flags not given are absent from the result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    for f in fields(TrainConfig):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default if defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=m["help"])
        else:
            p.add_argument(flag, type=m.get("type", type(f.default)), default=default, help=m["help"],
                           choices=m.get("choices"))
    return p


def parse_args(argv=None):
    """Flags generated from TrainConfig; returns (cfg, the set of flags given explicitly)."""
    args = vars(build_parser().parse_args(argv))
    # "given" = the flags on this command line, as argparse itself read them (abbreviations like --max-new
    # included); on --resume they override the saved config, the rest do not
    given = set(vars(build_parser(defaults=False).parse_args(argv)))
    return TrainConfig(**args), given


# ----------------------------------------------------------------------------- small helpers

def lr_at(step, cfg):
    """Linear warmup to cfg.lr over warmup_steps, then cosine down to min_lr_ratio * lr at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def data_indices(step, cfg, n):
    """Global dataset indices of a step's prompts: a fresh seeded permutation each epoch."""
    # A pure function of (seed, step): no data-loader state to checkpoint, and resume or a change of rank count
    # draws exactly the prompts the uninterrupted run would have.
    pos = np.arange((step - 1) * cfg.prompts_per_step, step * cfg.prompts_per_step)
    return [int(np.random.default_rng([cfg.seed, int(q) // n]).permutation(n)[q % n]) for q in pos], pos


def completion_texts(tok, ro):
    """Decoded completions, without the final stop token (rewards see only the text)."""
    # lengths include the stop token when a row stopped; a truncated row keeps all its tokens
    out = []
    for ids, n, stopped in zip(ro.completion_ids.tolist(), ro.lengths.tolist(), ro.stopped.tolist()):
        out.append(tok.decode(ids[:n - int(stopped)]))
    return out


def all_sum(values, world):
    """Sum a dict of floats over ranks (metrics are global means, not rank 0's)."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=dist_device())
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def dist_device():
    """Where collectives' tensors must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def last_checkpoint(cfg):
    """What a failed run leaves to resume from, for its last line."""
    ck = checkpoints(cfg.out)
    return f"resume from {ck[-1]} with --resume {cfg.out}" if ck else "no checkpoint was written yet"


def oom_advice(cfg, step):
    return (f"out of memory at step {step}: lower --micro-batch (now {cfg.micro_batch}), --max-new-tokens, "
            f"--group-size or --prompts-per-step, or pass --grad-ckpt; {last_checkpoint(cfg)}")


@contextmanager
def fail_together(run, step):
    """Run a block that every rank runs; if it fails on any rank, every rank exits with that rank's message.

    Without this, one rank's error (a non-finite loss, a reward function raising, an OOM) ends that rank while
    the others wait for it in their next all_reduce: a hang, or under torchrun a SIGTERM with no message. Here
    every rank leaves the block, then all exchange one flag (a tiny all_reduce, before any other collective),
    so all learn of the failure at the same point and exit with the same line. One process: the same line, or
    the traceback of an unexpected exception.
    """
    err = None
    try:
        yield
    except (Exception, SystemExit) as e:
        err = e
    # known failures get their one line; anything else is a bug, whose traceback is printed where it happened
    known, msg = isinstance(err, (FloatingPointError, torch.OutOfMemoryError, SystemExit)), None
    if isinstance(err, torch.OutOfMemoryError):
        msg = oom_advice(run.cfg, step)
    elif isinstance(err, SystemExit):  # a die() inside the block
        msg = str(err.code).removeprefix("train.py: error: ")
    elif err is not None:
        msg = str(err) if known else f"{type(err).__name__}: {err} (traceback above)"
    if run.world > 1:
        if err is not None:
            if not known:
                traceback.print_exception(err)  # on the rank that failed, before every rank exits
            # free the failed stage's tensors (its frames' locals) back to the allocator: after an OOM, the
            # exchange below must not run out of memory itself
            traceback.clear_frames(err.__traceback__)
        flag = torch.tensor([msg is not None], dtype=torch.int32, device=dist_device())
        dist.all_reduce(flag)  # how many ranks failed
        if flag.item():
            msgs = [None] * run.world
            dist.all_gather_object(msgs, msg)
            r = next(i for i, m in enumerate(msgs) if m is not None)
            # every rank prints, then waits for the others, so that none exits (and has torchrun stop the rest)
            # before all have said why
            print(f"train.py: error: rank {r} of {run.world} failed at step {step}: {msgs[r]}", file=sys.stderr,
                  flush=True)
            dist.barrier()
            raise SystemExit(1)
    elif err is not None:
        if not known:
            raise err
        die(msg)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
CHECKPOINT_FILES = ("tokenizer.json", "trainer_state.pt")  # a complete step-N/ holds these, and either
WEIGHT_FILES = (("config.json", "model.safetensors"), (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS))  # pair


def read_tokenizer_files(src):
    """{name: bytes} of the tokenizer and chat-template files in src; raises if it has no tokenizer.json."""
    # Read once at start-up and written into every checkpoint: copying them from the checkpoint a run resumed
    # from broke once keep-last rotation deleted that checkpoint (later ones had no tokenizer, and no resume).
    files = {}
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)):
            with open(os.path.join(src, f), "rb") as fh:
                files[f] = fh.read()
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"{src}: no tokenizer.json to put beside the checkpoints' weights")
    return files


def checkpoints(run_dir):
    """Complete checkpoint dirs of a run, oldest first: renamed into place, holding every CHECKPOINT_FILES and the
    weights (a Hugging Face model, or with LoRA a PEFT adapter)."""
    has = lambda d, names: all(os.path.isfile(os.path.join(d, f)) for f in names)  # noqa: E731
    ck = [d for d in glob.glob(os.path.join(run_dir, "step-*")) if d.rsplit("-", 1)[1].isdigit()
          and has(d, CHECKPOINT_FILES) and any(has(d, pair) for pair in WEIGHT_FILES)]
    return sorted(ck, key=lambda d: int(d.rsplit("-", 1)[1]))


def truncate_jsonl(path, last_step):
    """Drop records past last_step (a resumed run rewrites them)."""
    if os.path.isfile(path):
        keep = [l for l in open(path) if l.strip() and json.loads(l)["step"] <= last_step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def read_jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.isfile(path) else []


def plot(run_dirs, out=""):
    """Curves of one run (every reward function) or several overlaid (e.g. seeds), as a PNG; needs matplotlib.

    run_dirs: a run dir, or several joined by commas. out: the PNG's path (default RUN_DIR/curves.png).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); metrics are in metrics.jsonl")
        return None
    dirs = [d for d in run_dirs.split(",") if d]
    if not dirs:
        die(f"--plot {run_dirs!r}: name a run dir, or several joined by commas")
    out = os.path.join(out, "curves.png") if out and os.path.isdir(out) else out
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    for n, d in enumerate(dirs):
        rows, evals = read_jsonl(os.path.join(d, "metrics.jsonl")), read_jsonl(os.path.join(d, "eval.jsonl"))
        if not rows:
            die(f"--plot {d}: no metrics.jsonl there (a run dir holds one once its first step is done)")
        s, name = [r["step"] for r in rows], os.path.basename(os.path.normpath(d))
        one = len(dirs) == 1  # one run: every reward function and accuracy; several: one colour per run
        c = None if one else f"C{n}"
        ax[0, 0].plot(s, [r["reward_mean"] for r in rows], label="total" if one else name, lw=2 if one else 1, color=c)
        for k in [k for k in rows[0] if k.startswith("reward/") and one]:
            ax[0, 0].plot(s, [r[k] for r in rows], label=k[7:], lw=1)
        for k in [k for k in rows[0] if k.startswith("acc_") and (one or k == "acc_strict")]:
            ax[0, 1].plot(s, [r[k] for r in rows], label=f"train {k}" if one else None, lw=1, alpha=0.5, color=c)
        for k in [k for k in (evals[0] if evals else {}) if k.startswith("acc_")]:
            ax[0, 1].plot([e["step"] for e in evals], [e[k] for e in evals], "o-" if k == "acc_strict" else "s--",
                          label=f"eval {k}" + ("" if one else f" {name}"), color=c)
        ax[1, 0].plot(s, [r["kl"] for r in rows], color=c, label=None if one else name)
        ax[1, 1].plot(s, [r["len_mean"] for r in rows], label="mean" if one else name, color=c)
        if one:
            ax[1, 1].plot(s, [r["len_max"] for r in rows], label="max")
    ax[0, 0].set_title("training reward (mean)")
    ax[0, 1].set_title("accuracy (eval: greedy, held-out; train: sampled)")
    ax[1, 0].set_title("KL to reference (k3, per token)")
    ax[1, 1].set_title("completion length (tokens, mean)")
    for a in ax.flat:
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    out = out or os.path.join(dirs[0], "curves.png")
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        die(f"--plot: cannot write {out} ({e.strerror or e})")
    finally:
        plt.close(fig)
    print(f"plot: wrote {out}")
    return out


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, tok, task, test, cfg, amp, rank, world, log=print):
    """Greedy pass@1 on the first eval_n test problems, sharded across ranks; returns (metrics, per-problem rows).

    Prints progress after every batch (problems done, running accuracy, ETA): 1,319 GSM8K problems of up to 512
    tokens take a long while on a CPU, and a silent evaluation looks hung.
    """
    total = min(cfg.eval_n, len(test))
    mine = list(range(rank, total, world))
    rows, t0 = [], time.time()
    for s in range(0, len(mine), cfg.eval_batch):
        idx = mine[s:s + cfg.eval_batch]
        prompts = [tok.encode_chat(task.prompt(test[i])) for i in idx]
        with amp:
            ro = generate(model, prompts, 1, cfg.max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids,
                          vocab_size=tok.vocab_size, pad_id=tok.pad_id)
        for i, text in zip(idx, completion_texts(tok, ro)):
            rows.append({"index": i, "completion": text, **{k: f(text, **test[i]) for k, f in task.metrics.items()}})
        done, dt = len(rows), time.time() - t0  # rank 0's share stands for every rank's: shards differ by <= 1
        accs = " ".join(f"{k} {sum(r[k] for r in rows) / done:.3f}" for k in task.metrics)
        log(f"  eval {min(done * world, total)}/{total} | {accs} | {dt:.0f} s, ETA {dt / done * (len(mine) - done):.0f} s",
            flush=True)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for g in gathered for r in g), key=lambda r: r["index"])
    n = max(len(rows), 1)
    return {"n": len(rows), **{k: sum(r[k] for r in rows) / n for k in task.metrics}}, rows


@torch.no_grad()
def evaluate_games(model, tok, task, test, cfg, amp, rank, world, log=print):
    """Play the first eval_n test games to their end, greedy, eval_batch at a time, sharded across ranks; returns
    (task.game_summary of the games, one record per game: its secret, turns with the model's text, result)."""
    total = min(cfg.eval_n, len(test))
    mine = list(range(rank, total, world))
    rows, t0 = [], time.time()
    for s in range(0, len(mine), cfg.eval_batch):
        idx = mine[s:s + cfg.eval_batch]
        games = [task.game(test[i]) for i in idx]
        play(model, tok, games, cfg.max_new_tokens, temperature=0.0, amp=amp)  # one generate call per turn
        rows += [{"index": i, **g.record()} for i, g in zip(idx, games)]
        done, dt = len(rows), time.time() - t0
        summary = " ".join(f"{k} {v:.3f}" for k, v in task.game_summary(rows).items() if v is not None)
        log(f"  eval {min(done * world, total)}/{total} games | {summary} | {dt:.0f} s, ETA "
            f"{dt / done * (len(mine) - done):.0f} s", flush=True)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for g in gathered for r in g), key=lambda r: r["index"])
    return {"n": len(rows), **task.game_summary(rows)}, rows


# ----------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """Everything a step needs, built once by setup(): the stages below read it, the loop in main() owns it."""
    cfg: TrainConfig
    task: Task
    train: list
    test: list
    tok: Tokenizer
    tok_files: dict  # {name: bytes} of the tokenizer files, written into every checkpoint
    model: Transformer
    ref: Transformer  # frozen initial weights; None when beta == 0 (or --eval-only)
    judge: judge.Judge  # the frozen judge of --judge (judge.py); None without one (or with --eval-only)
    opt: torch.optim.Optimizer  # None with --eval-only
    amp: object  # a context-manager factory: bf16 autocast, or nothing with fp32 (the dtype policy, top of file)
    device: torch.device
    rank: int
    world: int
    games: bool  # train on whole games (a game task with mode=games): play.py's multi-turn rollouts
    P: int  # prompts per rank per step
    start: int  # last completed step (0 for a new run)
    log: object  # print on rank 0, a no-op elsewhere


def lora_targets(cfg):
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def check_settings(cfg, world):
    """Every setting that can be checked without loading anything; dies with one line naming the first bad one."""
    # A bad flag costs one line now, not a traceback after minutes of loading, sampling or the step-0 eval.
    if cfg.task not in TASKS:
        die(f"unknown task {cfg.task!r}; known: {', '.join(TASKS)}")
    if cfg.prompts_per_step % world:
        die(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by the {world} ranks")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "micro_batch", "eval_batch", "logprob_chunk",
                 "save_every", "keep_last", "judge_max_tokens"):
        if getattr(cfg, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("seed", "eval_n", "warmup_steps", "eval_every", "print_every", "top_k", "weight_decay", "grad_clip",
                 "beta", "adv_eps", "dynamic_max_rounds"):
        if not getattr(cfg, name) >= 0:  # `not >=` also refuses NaN
            die(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        die(f"--group-size must be >= 2, got {cfg.group_size}: GRPO's advantage is a reward minus its group's "
            "mean, so a group of one has zero advantage and nothing is ever learned")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        die(f"--lr must be > 0, got {cfg.lr}")
    if not cfg.temperature > 0:
        die("--temperature must be > 0 for training rollouts (greedy groups have no variance to learn from)")
    if not 0 < cfg.top_p <= 1:
        die(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        die(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 <= cfg.adam_beta2 < 1:
        die(f"--adam-beta2 must be in [0, 1), got {cfg.adam_beta2}")
    if not (cfg.tis_cap == 0 or cfg.tis_cap >= 1):  # also refuses NaN
        die(f"--tis-cap must be 0 (off) or >= 1, got {cfg.tis_cap}: a cap below 1 would shrink every on-policy token")
    if not 0 <= cfg.eps_low < 1 or not (cfg.eps_high is None or cfg.eps_high >= 0):
        die(f"--eps-low must be in [0, 1) and --eps-high >= 0, got {cfg.eps_low} and {cfg.eps_high}")
    if cfg.resume and cfg.eval_only:
        die("--eval-only evaluates --model; to evaluate a run's checkpoint pass --model RUN/step-N")
    if cfg.eval_only and cfg.eval_n == 0:
        die("--eval-only with --eval-n 0 would evaluate nothing")
    if cfg.judge:
        if not (cfg.judge_weight > 0 and math.isfinite(cfg.judge_weight)):
            die(f"--judge-weight must be > 0, got {cfg.judge_weight}")
        try:
            judge.load_rubric(cfg.judge_rubric)
        except ValueError as e:
            die(f"--judge-rubric: {e}")
    if cfg.lora_rank:
        try:
            lora.check_settings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, lora_targets(cfg))
        except ValueError as e:
            die(f"--lora-*: {e}")
    try:
        return parse_options(cfg.task, cfg.task_opts)
    except TaskError as e:
        die(str(e))


def pick_device(cfg, world):
    """The torch.device to run on, or one line saying why the asked-for one cannot be used."""
    if not cfg.device:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
            torch.device("cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        die(f"--device {cfg.device!r} is not a device: use cuda, cuda:N, cpu or mps")
    if device.type not in ("cpu", "cuda", "mps"):
        die(f"--device {cfg.device!r}: only cuda, cpu and mps are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}, but finds no GPU" if torch.version.cuda else \
                "a CPU-only build"
            die(f"--device {cfg.device}: CUDA is not available here (this torch {torch.__version__} is {build}); "
                "use --device cpu")
        if world > 1 and device.index is not None:
            die(f"--device {cfg.device}: under torchrun pass --device cuda, and each rank takes its own GPU "
                "(LOCAL_RANK)")
        if device.index is None:  # torchrun: one GPU per rank
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            die(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        die(f"--device {cfg.device}: MPS is not available here; use --device cpu")
    if world > 1 and device.type == "mps":
        die("torchrun with --device mps is not supported (no collective backend for it)")
    return device


def check_out_dir(out):
    """Create the run dir now and prove it writable, so a bad --out fails before anything loads."""
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        die(f"--out {out}: cannot write there ({e.strerror})")


def trainable(model):
    """The parameters the optimizer updates: all of them, or with LoRA the adapters only."""
    return [p for p in model.parameters() if p.requires_grad]


def load_model(path, device):
    """A Hugging Face model dir, or a PEFT LoRA adapter dir (ours: step-N/ of a LoRA run) merged into its base."""
    if os.path.isfile(os.path.join(path, lora.ADAPTER_CONFIG)):
        return lora.merge(lora.load_adapted(path, device=device)).requires_grad_(True)
    return Transformer.from_pretrained(path, device=device)


def resolve_model(cfg, resumed):
    """--model as a local dir (downloaded if a hub id), or one line saying which model could not be found."""
    try:
        return resolve_checkpoint(cfg.model)
    except OSError as e:
        if resumed:  # the policy comes from the checkpoint; --model is the reference, and it may have moved
            die(f"the reference model (the run's initial weights, --model): {e}; if it moved, pass --model NEW_PATH "
                "with --resume")
        die(f"--model: {e}")


def resolve_judge(cfg):
    """--judge as a local dir (downloaded if a hub id), or one line saying which judge could not be found."""
    try:
        return resolve_checkpoint(cfg.judge)
    except OSError as e:
        die(f"--judge: {e}")


def setup(cfg, given):
    """Every check of the settings, resume, distributed init, then data, tokenizer, models and optimizer."""
    # torchrun sets RANK/WORLD_SIZE; each rank takes P/world prompts of every step
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    log = print if rank == 0 else (lambda *a, **k: None)

    # ---- resume: the run's saved config, overridden by flags given now
    start, state, ck = 0, None, []
    if cfg.resume and not cfg.eval_only:
        if not os.path.isdir(cfg.resume):
            die(f"--resume {cfg.resume}: no such run dir")
        ck = checkpoints(cfg.resume)
        if not ck:
            die(f"--resume {cfg.resume}: no complete checkpoint there (a step-N/ dir holding "
                f"{', '.join(CHECKPOINT_FILES)} and a model or a LoRA adapter)")
        try:
            state = torch.load(os.path.join(ck[-1], "trainer_state.pt"), map_location="cpu", weights_only=False,
                               mmap=True)  # the config is read now, Adam's moments only when loaded
        except Exception as e:  # a truncated or foreign file: name it
            die(f"--resume {cfg.resume}: cannot read {ck[-1]}/trainer_state.pt ({type(e).__name__}: {e})")
        saved = TrainConfig(**{k: v for k, v in state["config"].items() if k in {f.name for f in fields(TrainConfig)}})
        cfg = TrainConfig(**{f.name: getattr(cfg if f.name in given else saved, f.name) for f in fields(TrainConfig)})
        cfg.out, start = cfg.resume, state["step"]

    # ---- check the settings before loading anything: a bad flag costs one line, not a model load
    opts = check_settings(cfg, world)
    device = pick_device(cfg, world)
    cfg.out = cfg.out or os.path.join("runs", f"{cfg.task}-{'eval-' if cfg.eval_only else ''}{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.eval_only and any(os.path.exists(os.path.join(cfg.out, f)) for f in ("metrics.jsonl", "eval.jsonl")):
        die(f"--out {cfg.out} already holds a run's metrics or evals; --eval-only writes to a new dir")
    if rank == 0:
        check_out_dir(cfg.out)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    # the policy starts from the resumed checkpoint, the reference from --model (the initial weights, also on
    # resume). A local --model is found now, before any data loads; a hub id after, as it is a download.
    # With LoRA the policy is always --model plus the adapters (fresh, or the checkpoint's), and the reference is
    # the same model with its adapters off: no second model.
    need_ref = cfg.beta != 0 and not cfg.eval_only and not cfg.lora_rank
    need_model = need_ref or not state or bool(cfg.lora_rank)
    model_dir = resolve_model(cfg, state) if need_model and not is_hub_id(cfg.model) else None
    need_judge = bool(cfg.judge) and not cfg.eval_only  # evaluation scores by the task's metrics, never a judge
    judge_dir = resolve_judge(cfg) if need_judge and not is_hub_id(cfg.judge) else None
    if state:
        if bool(cfg.lora_rank) != os.path.isfile(os.path.join(ck[-1], lora.ADAPTER_CONFIG)):
            die(f"--resume {cfg.resume}: {ck[-1]} is {'a LoRA adapter' if not cfg.lora_rank else 'a full model'}; "
                f"resume it {'with' if not cfg.lora_rank else 'without'} --lora-rank")
        if cfg.lora_rank:  # the adapter on disk defines the layers and the optimizer's state: no changes now
            a = lora.read_adapter_config(ck[-1])
            if (a["r"], float(a["alpha"]), float(a["dropout"]), set(a["targets"])) != \
                    (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, set(lora_targets(cfg))):
                die(f"--resume {cfg.resume}: its adapter has r={a['r']}, alpha={a['alpha']}, dropout={a['dropout']}, "
                    f"targets {','.join(a['targets'])}; LoRA settings cannot change on resume")
        log(f"resuming {cfg.out} from {ck[-1]} (step {start})")

    # ---- distributed: every rank has passed the same checks above, so none is left waiting here
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        out = [cfg.out]
        dist.broadcast_object_list(out, src=0)  # rank 0's run dir: a default name holds a timestamp per rank
        cfg.out = out[0]
    torch.manual_seed(cfg.seed + rank)

    # ---- data, tokenizer, policy, and (only when beta > 0) the frozen reference
    try:
        train, test = TASKS[cfg.task].load(cfg.data_dir, cfg.cache_dir, **opts)
    except TaskError as e:
        die(str(e))
    model_dir = resolve_model(cfg, state) if need_model and is_hub_id(cfg.model) else model_dir  # a download
    judge_dir = resolve_judge(cfg) if need_judge and is_hub_id(cfg.judge) else judge_dir
    jm = None
    if need_judge:  # before the policy: a judge whose tokenizer cannot say yes/no fails before anything big loads
        try:
            jm = judge.Judge(judge_dir, cfg.judge_rubric, cfg.judge_max_tokens, device, torch.bfloat16 if bf16 else None)
        except (OSError, ValueError) as e:
            die(f"could not load the judge {cfg.judge!r}: {e}")
    src = ck[-1] if state else model_dir
    try:
        tok = Tokenizer(src)
        tok_files = read_tokenizer_files(tok.path)
        if cfg.lora_rank:  # the base model's weights, frozen, and trainable adapters on them
            model = load_model(model_dir, device)
            if state:
                lora.load_adapter(model, src)
            else:  # seeded apart from the global RNG: every rank starts from the same adapters
                lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, lora_targets(cfg), cfg.seed)
        else:
            model = load_model(src, device)
    except (OSError, ValueError) as e:
        die(f"could not load model {src!r}: {e}")
    ref = None
    if need_ref:  # the policy's fp32 weights, under the same autocast: KL exactly 0 at step 1 (dtype policy)
        try:
            ref = load_model(model_dir, device).requires_grad_(False).eval()
        except (OSError, ValueError) as e:
            die(f"could not load the reference model {cfg.model!r} (the run's initial weights, --model): {e}")
    model.gradient_checkpointing = cfg.grad_ckpt
    amp = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else nullcontext
    opt = None
    if not cfg.eval_only:
        opt = torch.optim.AdamW(trainable(model), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay)  # with LoRA: the adapters only
    if state:  # Adam's moments and the torch RNG, so the resumed steps equal the uninterrupted ones
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
    if rank == 0:  # records past the checkpoint came from steps that are about to be redone
        truncate_jsonl(os.path.join(cfg.out, "metrics.jsonl"), start)
        truncate_jsonl(os.path.join(cfg.out, "eval.jsonl"), start)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    log(json.dumps(asdict(cfg)))
    log(f"{len(train)} train / {len(test)} test examples; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params on {device} x {world}, {'bf16 autocast' if bf16 else 'fp32'}; "
        + (f"LoRA r={cfg.lora_rank} on {cfg.lora_targets}: {sum(p.numel() for p in trainable(model)) / 1e6:.2f}M "
           "trainable; " if cfg.lora_rank else "")
        + "reference model: " + ('loaded (fp32 weights)' if ref else 'none (--eval-only)' if cfg.eval_only else
                                 'none (beta=0)' if cfg.beta == 0 else 'none (LoRA: the policy with its adapters off)')
        + (f"; judge {cfg.judge} (rubric {cfg.judge_rubric}, weight {cfg.judge_weight})" if jm else ""))
    games = TASKS[cfg.task].game is not None and opts.get("mode") == "games"
    return Run(cfg, TASKS[cfg.task], train, test, tok, tok_files, model, ref, jm, opt, amp, device, rank, world,
               games, cfg.prompts_per_step // world, start, log)


# ----------------------------------------------------------------------------- the stages of a step
# Each stage is a function of the Run and what the earlier stages returned, so a forker can replace one (a
# different reward mixing, another advantage estimator, a rollout engine) without touching the rest.

EXTRA_POS = 2 ** 62  # dynamic sampling's extra rounds number their prompts from here: never a data position


def next_prompts(run, step, round_=0):
    """This rank's share of the step's global batch: (examples, their global data positions); round_ > 0: the
    step's extra round of --dynamic-sampling."""
    # The order is a fixed permutation per epoch from (seed, epoch) alone, so it is the same for any number of
    # ranks and across a resume; rank r takes positions r*P .. r*P+P-1 of the step's global batch.
    cfg, n = run.cfg, len(run.train)
    if round_ == 0:
        idx, pos = data_indices(step, cfg, n)
    else:  # drawn from (seed, step, round) alone, so the data order, resume and rank count stay as without them
        idx = np.random.default_rng([cfg.seed, step, round_]).integers(n, size=cfg.prompts_per_step).tolist()
        pos = EXTRA_POS + ((step * (cfg.dynamic_max_rounds + 1) + round_) * cfg.prompts_per_step
                           + np.arange(cfg.prompts_per_step))  # distinct sampling streams for every extra prompt
    sl = slice(run.rank * run.P, (run.rank + 1) * run.P)
    return [run.train[i] for i in idx[sl]], pos[sl]


def rollout(run, examples, pos):
    """G completions per prompt from the current policy (sample.py), or G whole games per example (play.py):
    (rollout, decoded texts, seconds sampling, per-row fields for the rewards: {} or {"game": its record})."""
    cfg, G = run.cfg, run.cfg.group_size
    run.model.eval()
    t0 = time.time()
    if run.games:  # G games per example, played to the end; the trajectory's replies are outside the loss mask
        games = [run.task.game(ex) for ex in examples for _ in range(G)]
        # a generator per game, from (seed, data position, game): independent of rank and batch, as below
        gens = [torch.Generator(run.device).manual_seed(int(np.random.SeedSequence([cfg.seed, int(q), j])
                                                            .generate_state(1)[0])) for q in pos for j in range(G)]
        ro, texts = play(run.model, run.tok, games, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, gens,
                         G, run.amp(), cfg.compile)
        return ro, texts, time.time() - t0, [{"game": g.record()} for g in games]
    # One generator per prompt, seeded by the prompt's global data position: a prompt's completions do not
    # depend on which rank drew it or on what else is in the batch, so N ranks sample what 1 process would.
    gens = [torch.Generator(run.device).manual_seed(cfg.seed * 2 ** 32 + int(q)) for q in pos]
    prompts = [run.tok.encode_chat(run.task.prompt(ex)) for ex in examples]
    with run.amp():
        ro = generate(run.model, prompts, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                      run.tok.stop_ids, gens, run.tok.vocab_size, run.tok.pad_id, cfg.compile)
    return ro, completion_texts(run.tok, ro), time.time() - t0, [{}] * len(ro.lengths)


def score(run, examples, texts, extra):
    """Rewards per function and their weighted total (N,), per-row metrics (the task's 0/1 ones, and judge_mass with
    a judge), and the seconds the judge took."""
    # Every reward sees the example's fields, the row's extra fields (a game's record) and `prompt`, the prompt's
    # text, so a format reward can refuse reasoning copied from the instruction (rewards.well_formed). Row i
    # belongs to prompt i // G. Whole games are scored by the task's game rewards and metrics.
    G, task = run.cfg.group_size, run.task
    reward_list, metric_fns = (task.game_rewards, task.game_metrics) if run.games else (task.rewards, task.metrics)
    rows = [{**examples[i // G], **extra[i]} for i in range(len(texts))]
    t0, mass = time.time(), None
    if run.judge is not None:  # one batched forward per group (judge.py); the reward reads the row's score
        with run.amp():
            views = [judge_view(task, ex) for ex in examples]  # (question, reference or None) per prompt
            judged = [run.judge.score(q, texts[p * G:(p + 1) * G], ref) for p, (q, ref) in enumerate(views)]
        scores, mass = [torch.cat(t).tolist() for t in zip(*judged)] if judged else ([], [])
        for r, s in zip(rows, scores):
            r["judge"] = s
        reward_list = reward_list + [(run.cfg.judge_weight, judge.judge)]
    t_judge = time.time() - t0
    ptexts = [prompt_text(task.prompt(ex)) for ex in examples]  # once per prompt, not per completion
    scored = [combine(reward_list, t, prompt=ptexts[i // G], **ex) for i, (t, ex) in enumerate(zip(texts, rows))]
    total = torch.tensor([tot for tot, _ in scored])  # (N,)
    per_fn = {k: [per[k] for _, per in scored] for k in (scored[0][1] if scored else {})}
    accs = {k: [f(t, **ex) for t, ex in zip(texts, rows)] for k, f in metric_fns.items()}
    if mass is not None:
        accs["judge_mass"] = mass  # P(yes) + P(no): near 0, the judge is not answering yes or no (judge.py)
    return total, per_fn, accs, t_judge


def informative(run, total):
    """Whether each of this rank's groups has a reward spread, gathered into one (rounds' global prompts,) bool."""
    G, P, PG = run.cfg.group_size, run.P, run.cfg.prompts_per_step
    r = total.view(-1, G)  # (P, G)
    flags = torch.zeros(PG, dtype=torch.float64)
    flags[run.rank * P:(run.rank + 1) * P] = (r.amax(1) != r.amin(1)).double()
    if run.world > 1:
        flags = flags.to(dist_device())
        dist.all_reduce(flags)  # each rank filled its own slice
    return flags.cpu().bool()


def refill(run, step, ro, texts, total, per_fn, accs):
    """--dynamic-sampling (DAPO, arXiv 2503.14476, sec. 3.3): while fewer than --prompts-per-step groups of the
    step have a reward spread, draw another round of prompts (at most --dynamic-max-rounds). Returns everything
    drawn, merged, the rows to train on (pick_rows) and their Rollout, the drawn/kept counts, and the extra seconds
    of sampling and judging."""
    # Every rank takes part in every round and in each round's exchange of flags, so they stop together, and the
    # groups kept are those one process would keep: N ranks train on what 1 process would. A rank may keep fewer
    # groups than another, or none (update() handles both without skewing the normaliser).
    cfg, G, P, PG = run.cfg, run.cfg.group_size, run.P, run.cfg.prompts_per_step
    parts, flags, dt = [(ro, texts, total, per_fn, accs)], [informative(run, total)], [0.0, 0.0]
    while sum(int(f.sum()) for f in flags) < PG and len(flags) <= cfg.dynamic_max_rounds:
        with fail_together(run, step):
            examples, pos = next_prompts(run, step, len(flags))
            ro_r, texts_r, t_s, extra = rollout(run, examples, pos)
            total_r, per_fn_r, accs_r, t_j = score(run, examples, texts_r, extra)
        parts.append((ro_r, texts_r, total_r, per_fn_r, accs_r))
        dt = [dt[0] + t_s, dt[1] + t_j]
        flags.append(informative(run, total_r))
    rows, kept = pick_rows(flags, run.rank, P, G)
    with fail_together(run, step):  # no collective inside; a rank running out of memory here tells the others
        ro = cat_rollouts([p[0] for p in parts], run.tok.pad_id)
        per_fn = {k: sum((p[3][k] for p in parts), []) for k in per_fn}
        accs = {k: sum((p[4][k] for p in parts), []) for k in accs}
        batch = take_rows(ro, rows)
    ds = {"ds_rounds": len(flags) - 1, "ds_groups_drawn": len(flags) * PG, "ds_groups_kept": kept}
    return ro, sum((p[1] for p in parts), []), torch.cat([p[2] for p in parts]), per_fn, accs, rows, batch, ds, dt


def pick_rows(flags, rank, P, G):
    """(this rank's rows to train on (n,), groups kept globally) from each round's global informative flags (PG,):
    the first PG informative groups in global order, round by round, prompt by prompt; rank r holds prompts
    r*P .. r*P+P-1 of every round, and its rows of round k start at k*P*G (cat_rollouts' order)."""
    PG, rows, kept = len(flags[0]), [], 0
    for k, f in enumerate(flags):
        for j in range(PG):
            if f[j] and kept < PG:
                kept += 1
                if rank * P <= j < (rank + 1) * P:
                    start = k * P * G + (j - rank * P) * G
                    rows += range(start, start + G)
    return torch.tensor(rows, dtype=torch.long), kept


def advantages(run, total, rows=None):
    """Group-relative advantages (N,) on the training device (of the rows to train on, when given), and the fraction
    of all the groups with zero spread."""
    # A group never spans ranks, so its mean and std are exact locally; with --adv-scale batch the std is this
    # rank's batch's (grpo.py, departure 2). A zero-std group gets 0: it teaches nothing, and says so in the log.
    cfg = run.cfg
    adv, zero_std = group_advantages(total, cfg.group_size, cfg.adv_scale, cfg.adv_unbiased_std, cfg.adv_eps)
    if rows is not None:  # --dynamic-sampling: the kept groups alone (the batch std, with --adv-scale batch)
        adv = group_advantages(total[rows], cfg.group_size, cfg.adv_scale, cfg.adv_unbiased_std, cfg.adv_eps)[0]
    return adv.to(run.device), zero_std


def micro_batches(run, ro):
    """Row slices of at most --micro-batch rows: memory changes with it, the gradient does not."""
    return [slice(s, s + run.cfg.micro_batch) for s in range(0, ro.completion_mask.shape[0], run.cfg.micro_batch)]


def logprobs(run, m, ro, sl, entropy=False):
    """Token log-probs (rows, T) of the sampled completions under model m, at the sampling temperature (and with
    entropy, the entropies (rows, T) of the next-token distributions there)."""
    return token_logprobs(m, ro.prompt_ids[sl], ro.prompt_mask[sl], ro.completion_ids[sl], ro.completion_mask[sl],
                          run.cfg.temperature, run.cfg.logprob_chunk, entropy=entropy)


@torch.no_grad()
def reference(run, ro):
    """(ref_lp, old_lp), each (N, T) or None: the reference's log-probs when beta > 0, and, when mu > 1, the
    policy's own before the first update pass (the pi_old of the ratio)."""
    # With mu == 1 pi_old is the policy itself, so the ratio is exp(lp - lp.detach()) == 1 with the right gradient,
    # and no extra forward is needed. The sampler's log-probs are not used as pi_old: under autocast or a
    # different batch make-up they can differ from the trainer's by rounding.
    mbs, ref_lp = micro_batches(run, ro), None
    if not mbs:  # --dynamic-sampling left this rank no rows: nothing to compute
        return None, None
    with run.amp():
        if run.ref is not None:
            ref_lp = torch.cat([logprobs(run, run.ref, ro, sl) for sl in mbs])
        elif run.cfg.lora_rank and run.cfg.beta != 0:  # LoRA: the reference is the base model, adapters off
            with lora.adapters_off(run.model):
                ref_lp = torch.cat([logprobs(run, run.model, ro, sl) for sl in mbs])
        old_lp = torch.cat([logprobs(run, run.model, ro, sl) for sl in mbs]) if run.cfg.mu > 1 else None
    return ref_lp, old_lp


def observe(sums, ent, old, ro, sl):
    """Add a micro-batch's policy entropy and sampler mismatch (grpo.mismatch: sampler vs the trainer's pi_old) to
    the step's sums, over every sampled token."""
    # The mismatch is what --tis-cap corrects: with the sampler and trainer in one precision it is ~0 (rounding
    # from a different batch make-up); bf16 rollouts or a compiled decode step make it larger.
    mm = mismatch(old, ro.logprobs[sl], ro.completion_mask[sl])
    sums["entropy"] += (ent * ro.completion_mask[sl]).sum().item()
    sums["mm_abs"], sums["mm_out"], sums["sampled_tokens"] = (sums["mm_abs"] + mm["abs"], sums["mm_out"] + mm["out"],
                                                               sums["sampled_tokens"] + mm["tokens"])
    sums["mm_max"] = max(sums["mm_max"], mm["max"])


def update(run, step, ro, adv, ref_lp, old_lp):
    """mu optimizer steps on this batch of rollouts; returns (summed loss stats, last grad norm, lr)."""
    cfg, model, opt = run.cfg, run.model, run.opt
    mbs = micro_batches(run, ro)
    # --mask-truncated: the loss sees only completions that stopped (grpo.py, note 11); log-probs, entropy and the
    # mismatch still cover every sampled token
    keep = ro.stopped if cfg.mask_truncated else None
    mask = ro.completion_mask & ro.stopped[:, None] if cfg.mask_truncated else ro.completion_mask  # (N, T)
    # One normaliser for the whole optimizer batch, summed over ranks (grpo.py, departure 5): each micro-batch's
    # loss is already divided by it, so accumulating gradients over micro-batches and summing them over ranks
    # gives exactly the gradient of one big single-process batch.
    # a rank with nothing to train on (dynamic sampling, overlong filtering) adds 0, and only the sum is kept >= 1
    norm = loss_normalizer(cfg.loss_type, mask, cfg.max_new_tokens, keep) if mask.any() else 0.0
    if run.world > 1:
        norm = all_sum({"n": norm}, run.world)["n"]
    empty, norm = norm == 0, max(norm, 1.0)  # empty: no rank has a token to learn from; no optimizer step either
    model.train()
    sums = {"loss": 0.0, "kl": 0.0, "ratio": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tokens": 0.0, "entropy": 0.0,
            "mm_abs": 0.0, "mm_out": 0.0, "mm_max": 0.0, "sampled_tokens": 0.0}
    for pass_ in range(cfg.mu):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with fail_together(run, step):  # a rank that fails here tells the others before they wait in all_reduce
            for sl in mbs:
                with run.amp():  # on the first pass also the entropy (a softmax per chunk, for a metric)
                    lp, ent = logprobs(run, model, ro, sl, entropy=True) if pass_ == 0 else \
                        (logprobs(run, model, ro, sl), None)
                old = lp.detach() if old_lp is None else old_lp[sl]  # the trainer's pi_old
                if pass_ == 0:
                    observe(sums, ent, old, ro, sl)
                w = tis_weights(old, ro.logprobs[sl], mask[sl], cfg.tis_cap) if cfg.tis_cap else None
                loss, st = grpo_loss(lp, old, adv[sl], mask[sl], norm, cfg.loss_type,
                                     None if ref_lp is None else ref_lp[sl], cfg.beta, cfg.eps_low, cfg.eps_high,
                                     cfg.ratio_level, w)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at step {step}: {st}; advantages [{adv.min().item():.3g}, "
                        f"{adv.max().item():.3g}]; {last_checkpoint(cfg)}")
                loss.backward()
                sums["loss"] += loss.item()
                for k in ("kl", "ratio", "clip_low", "clip_high"):
                    sums[k] += st[k] * st["tokens"]  # token-weighted, so the logged means are per token
                sums["tokens"] += st["tokens"]
        if run.world > 1:  # summed, not averaged: each rank's loss already carries the global normaliser
            for p in trainable(model):
                if p.grad is None:  # this rank had no rows: it adds zeros, and takes part in every all_reduce
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        with fail_together(run, step):  # Adam's first step allocates its state: a likely place to run out of memory
            gn = torch.nn.utils.clip_grad_norm_(trainable(model), cfg.grad_clip or float("inf"))
            if not torch.isfinite(gn):  # the same on every rank: the gradients were all-reduced
                die(f"non-finite grad norm at step {step}; {last_checkpoint(cfg)}")
            if not empty:  # Adam would move the weights on zero gradients by its momentum: a step that learnt nothing
                opt.step()
            opt.zero_grad(set_to_none=True)
    return sums, gn, lr


def log_step(run, step, ro, texts, total, per_fn, accs, zero_std, sums, gn, lr, times, ds=None):
    """Reduce the step's sums over ranks, append one line to metrics.jsonl, print a summary; returns the metrics."""
    # Every metric is a global sum divided by a global count, so N ranks log what 1 process would; names say
    # exactly what they measure (reward/FN is each function's unweighted mean, kl is k3 per completion token).
    cfg = run.cfg
    sums = dict(sums)
    mm_max = sums.pop("mm_max")
    js = {}
    if "judge" in per_fn:  # the score against length, as sums that add over ranks (a Pearson correlation below)
        x, y = np.array(per_fn["judge"], dtype=np.float64), ro.lengths.double().cpu().numpy()
        js = {"jx": x.sum(), "jy": y.sum(), "jxy": (x * y).sum(), "jxx": (x * x).sum(), "jyy": (y * y).sum()}
    g = all_sum({
        "rows": len(texts), "reward": total.sum().item(), "reward_sq": (total ** 2).sum().item(),
        **{f"reward/{k}": sum(v) for k, v in per_fn.items()}, **{k: sum(v) for k, v in accs.items()},
        "zero_std": round(zero_std * (len(texts) // cfg.group_size)), "groups": len(texts) // cfg.group_size,
        "len": float(ro.lengths.sum()),
        "truncated": float((~ro.stopped).sum()), "completion_tokens": float(ro.completion_mask.sum()), **times,
        **sums, **js}, run.world)
    maxes = torch.tensor([float(ro.lengths.max()), mm_max], dtype=torch.float64)  # reduced by max, not sum
    if run.world > 1:
        maxes = maxes.to(dist_device())
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    len_max, mm_max = maxes.tolist()
    n, ntok, nsam, w = g["rows"], max(g["tokens"], 1), max(g["sampled_tokens"], 1), run.world
    mean = g["reward"] / n
    metrics = {
        "step": step, "reward_mean": mean, "reward_std": math.sqrt(max(g["reward_sq"] / n - mean ** 2, 0.0)),
        **{k: g[k] / n for k in g if k.startswith("reward/")}, **{k: g[k] / n for k in accs},
        "zero_std_frac": g["zero_std"] / g["groups"], "len_mean": g["len"] / n, "len_max": len_max,
        "truncated_frac": g["truncated"] / n, "kl": g["kl"] / ntok, "ratio": g["ratio"] / ntok,
        "clip_low": g["clip_low"] / ntok, "clip_high": g["clip_high"] / ntok, "loss": g["loss"] / cfg.mu,
        # over every sampled token: the policy's entropy, and the sampler's log-prob distance from the trainer's
        "entropy": g["entropy"] / nsam, "mismatch_mean": g["mm_abs"] / nsam, "mismatch_max": mm_max,
        "mismatch_out_frac": g["mm_out"] / nsam,
        "grad_norm": gn.item(), "lr": lr, "sample_s": g["sample_s"] / w, "train_s": g["train_s"] / w,
        "step_s": g["step_s"] / w, "completion_tokens": g["completion_tokens"],
        "tokens_per_s": g["completion_tokens"] / max(g["step_s"] / w, 1e-9),  # whole step, all ranks
    }
    metrics.update(ds or {})  # --dynamic-sampling: global counts of the step's rounds and groups
    if js:  # judge_s: the judge's share of step_s; judge_len_corr: does the judge pay for length? (judge.py)
        cov = n * g["jxy"] - g["jx"] * g["jy"]
        var = (n * g["jxx"] - g["jx"] ** 2) * (n * g["jyy"] - g["jy"] ** 2)
        corr = max(-1.0, min(1.0, cov / math.sqrt(var))) if var > 0 else None  # None: no spread, no correlation
        metrics.update(judge_s=g["judge_s"] / w, judge_len_corr=corr)
    if run.rank == 0:
        with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
    return metrics


def print_step(run, step, metrics, t_run, texts, per_fn):
    """One line per step (and every --print-every steps one sampled completion with its rewards)."""
    cfg = run.cfg
    eta = (time.time() - t_run) / (step - run.start) * (cfg.steps - step)
    run.log(f"step {step}/{cfg.steps} | reward {metrics['reward_mean']:.3f} | acc "
            f"{' / '.join(f'{metrics[k]:.2f}' for k in metrics if k.startswith('acc_'))} | kl {metrics['kl']:.4f} | "
            f"len {metrics['len_mean']:.0f} | {metrics['tokens_per_s']:.0f} tok/s | ETA {eta / 60:.1f} min", flush=True)
    if cfg.print_every and step % cfg.print_every == 0:
        run.log(f"--- sample (step {step}, rewards {({k: round(v[0], 3) for k, v in per_fn.items()})}):\n{texts[0]}\n---")


def run_eval(run, step):
    """Evaluate greedily on the test split; eval.jsonl gets the scores, eval/step-N.jsonl every completion."""
    if run.cfg.eval_n == 0:  # --eval-n 0: no evaluation at all (benchmarks, quick checks)
        return None
    run.log(f"eval step {step}: {min(run.cfg.eval_n, len(run.test))} test {'games' if run.task.game else 'problems'}, "
            f"greedy, up to {run.cfg.max_new_tokens} new tokens{' a turn' if run.task.game else ''}")
    # greedy, so the score is a property of the weights alone, not of a sampling seed
    metrics, rows = (evaluate_games if run.task.game else evaluate)(run.model.eval(), run.tok, run.task, run.test,
                                                                    run.cfg, run.amp(), run.rank, run.world, run.log)
    if run.rank == 0:
        with open(os.path.join(run.cfg.out, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        os.makedirs(os.path.join(run.cfg.out, "eval"), exist_ok=True)
        with open(os.path.join(run.cfg.out, "eval", f"step-{step}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    run.log(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()))
    return metrics


def save(run, step):
    """step-N/ = a Hugging Face model dir (with LoRA: a PEFT adapter dir, and at the end also merged/, the merged
    Hugging Face model) + the tokenizer + trainer_state.pt, written to a temp dir and renamed into place."""
    # A crash mid-write leaves only .step-N.tmp, which resume ignores; older checkpoints are deleted only once
    # the new one is complete, so there is always one to resume from.
    cfg = run.cfg
    if run.rank == 0:
        final, tmp = os.path.join(cfg.out, f"step-{step}"), os.path.join(cfg.out, f".step-{step}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dirs = [tmp]
        if cfg.lora_rank:
            base = os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # loadable from anywhere
            lora.save_adapter(run.model, tmp, base)
            if step == cfg.steps:  # the deliverable: a plain model that transformers and vLLM load without peft
                lora.merge(copy.deepcopy(run.model)).save_pretrained(os.path.join(tmp, "merged"))
                dirs.append(os.path.join(tmp, "merged"))
        else:
            run.model.save_pretrained(tmp)
        for d, (name, data) in itertools.product(dirs, run.tok_files.items()):  # read once at start-up
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        torch.save({"step": step, "optimizer": run.opt.state_dict(), "config": asdict(cfg), "world_size": run.world,
                    "data_position": step * cfg.prompts_per_step, "rng": {"torch": torch.get_rng_state()}},
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(cfg.out)[:-cfg.keep_last]:
            shutil.rmtree(old)
        run.log(f"saved {final}")
    if run.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- main: the loop

def main(argv=None):
    cfg, given = parse_args(argv)
    if cfg.plot:
        return plot(cfg.plot, cfg.out)
    try:
        run = setup(cfg, given)
    except KeyboardInterrupt:
        interrupted(None, 0)
    cfg, t_run, step = run.cfg, time.time(), run.start
    try:
        if cfg.eval_only:  # measure a model before training it: scores to eval.jsonl, weights untouched
            run_eval(run, 0)
            return finish(run)
        if run.start == 0:  # the baseline: every learning claim is this number against the final one
            run_eval(run, 0)
        for step in range(run.start + 1, cfg.steps + 1):
            t_step = time.time()
            with fail_together(run, step):  # one rank's error ends every rank with its message, not a hang
                examples, pos = next_prompts(run, step)                  # 1. this rank's P prompts
                ro, texts, t_sample, extra = rollout(run, examples, pos)  # 2. G completions (or games) each
                total, per_fn, accs, t_judge = score(run, examples, texts, extra)  # 3. rewards and metrics
            rows, batch, ds = None, ro, None
            if cfg.dynamic_sampling:  # 3b. more rounds until P groups have a reward spread; train on those only
                ro, texts, total, per_fn, accs, rows, batch, ds, dt = refill(run, step, ro, texts, total, per_fn, accs)
                t_sample, t_judge = t_sample + dt[0], t_judge + dt[1]
            with fail_together(run, step):
                adv, zero_std = advantages(run, total, rows)             # 4. group-relative advantages
                t0 = time.time()
                ref_lp, old_lp = reference(run, batch)                   # 5. reference (and pi_old) log-probs
            sums, gn, lr = update(run, step, batch, adv, ref_lp, old_lp)  # 6. loss, backward, optimizer step(s)
            times = {"sample_s": t_sample, "judge_s": t_judge, "train_s": time.time() - t0,
                     "step_s": time.time() - t_step}
            metrics = log_step(run, step, ro, texts, total, per_fn, accs, zero_std, sums, gn, lr, times, ds)  # 7. log
            print_step(run, step, metrics, t_run, texts, per_fn)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:  # then eval, checkpoint
                run_eval(run, step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(run, step)
        if step > run.start or run.start == 0:  # the final evaluation, unless a resume found nothing left to do
            run_eval(run, cfg.steps)
    except torch.OutOfMemoryError:
        die(oom_advice(cfg, step))
    except KeyboardInterrupt:
        interrupted(run, step)
    if run.rank == 0:
        plot(cfg.out)
    return finish(run)


def interrupted(run, step):
    """Ctrl-C: one line saying what is safe and how to go on (exit code 130, as a shell reports SIGINT)."""
    # Nothing is lost: checkpoints are renamed into place only once complete, so the last one is intact.
    ck = checkpoints(run.cfg.out) if run else []
    if run is None:
        msg = "interrupted while starting"
    elif run.cfg.eval_only:
        msg = "interrupted during the evaluation; no scores were written"
    elif ck:
        msg = f"interrupted at step {step}; {ck[-1]} is complete. Resume with: python train.py --resume {run.cfg.out}"
    else:
        msg = (f"interrupted at step {step}, before the first checkpoint (step "
               f"{min(run.cfg.save_every, run.cfg.steps)}); nothing to resume, start again")
    if run is None or run.rank == 0:
        print(f"train.py: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def finish(run):
    """Leave the process group cleanly, so torchrun sees every rank exit 0."""
    if run.world > 1:
        # together: a rank tearing down gloo while rank 0 still writes its plot was seen to abort at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
