"""The run's settings: TrainConfig (every flag, once), the CLI generated from it, every check of a setting that
needs nothing loaded, and the choice of device. BadInput is the one exception for bad input on the training side.
"""
import argparse
import math
import os
from dataclasses import dataclass, field, fields

import torch

import fsdp
import judge
import lora
import report
from grpo import LOSS_TYPES, RATIO_LEVELS
from tasks import TASKS, TaskError, parse_options


class BadInput(Exception):
    """A setting, file or state the run cannot use; the message is one line naming it (train.main prints it)."""


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
    task: str = arg("gsm8k", "task to train on (tasks.py: gsm8k, arith, wordprob, wordle)")
    task_opts: str = arg("", "task options as k=v,k=v (arith: digits=2,ops=+,terms=2,...; wordle: mode=states|games,"
                         "per_secret=4,seed=0; wordprob and gsm8k: tools=calc|none,calls=4; see tasks.py)")
    model: str = arg("Qwen/Qwen2.5-0.5B-Instruct", "Hugging Face repo id or local checkpoint dir")
    data_dir: str = arg("", "dir with the task's train.jsonl/test.jsonl; empty: download (checksummed) to --cache-dir")
    cache_dir: str = arg("~/.cache/grpo", "where downloaded datasets are kept")
    out: str = arg("", "run dir for metrics, evals, checkpoints (default runs/TASK-TIMESTAMP)")
    resume: str = arg("", "run dir to continue from its last complete checkpoint (flags given now override)")
    plot: str = arg("", "only print the evaluations of this run dir (or dirs,joined,by,commas) side by side and plot "
                    "their curves to a PNG (--out, default RUN/curves.png), then exit")
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
    eps_high: float = arg(None, "clip ratio above at 1 + eps_high (default eps_low; DAPO clip-higher: 0.28)",
                          type=float)
    loss_type: str = arg("grpo", "loss aggregation", choices=LOSS_TYPES)
    adv_scale: str = arg("group", "divide advantages by the group std, the batch std, or nothing (Dr. GRPO)",
                         choices=("group", "batch", "none"))
    adv_unbiased_std: bool = arg(True, "Bessel-corrected std for advantages (np.std if off)")
    adv_eps: float = arg(1e-4, "added to the std of advantages")
    mu: int = arg(1, "update passes (optimizer steps) per batch of rollouts")
    # ---- research knobs (docs/knobs.md); the defaults are the paper's GRPO
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
    lora_targets: str = arg(",".join(lora.TARGETS),
                            "comma-separated module names to adapt (never lm_head or embeddings)")
    # ---- memory and speed: none of these changes what is computed, only how
    micro_batch: int = arg(8, "rows per forward/backward; changes memory, not the gradient")
    logprob_chunk: int = arg(1024, "tokens per lm_head/log_softmax chunk")
    share_prefix: bool = arg(True, "forward the prompts' common prefix (system turn, worked examples) once a rollout, "
                             "evaluation batch and log-prob pass; off: every prompt whole (same results, slower)")
    grad_ckpt: bool = arg(False, "gradient checkpointing: recompute activations in backward")
    compile: bool = arg(False, "torch.compile the sampler's decode step (on CPU it measured slower than eager, which "
                        "packs weights for oneDNN)")
    fsdp: bool = arg(False, "under torchrun, shard the weights, gradients, Adam state and reference over the ranks "
                     "(FSDP2; torch >= 2.9.1); the update equals one process's (docs/multi-gpu.md)")
    dtype: str = arg("auto", "forward passes in bf16 autocast over fp32 weights, or all fp32 (auto: bf16 on CUDA, "
                     "fp32 on CPU; see the dtype policy at the top of train.py)", choices=("auto", "bf16", "fp32"))
    # ---- evaluation, checkpoints, logging
    eval_every: int = arg(50, "evaluate every this many steps (0 = only at start and end)")
    eval_n: int = arg(1319, "test problems per evaluation (greedy pass@1; 0 = no evaluation)")
    eval_batch: int = arg(64, "prompts per evaluation generate call")
    save_every: int = arg(50, "checkpoint every this many steps (and at the end)")
    keep_last: int = arg(2, "checkpoints to keep (older ones are deleted once a newer one is complete)")
    report_to: str = arg("", "also send each metrics.jsonl and eval.jsonl line to tensorboard (RUN/tb), wandb, or "
                         "both joined by a comma (report.py; each needs its package installed); empty: neither")
    print_every: int = arg(10, "print one sampled completion with its rewards every this many steps")
    log_rollouts: int = arg(-1, "groups a step written to RUN/rollouts.jsonl, each with its prompt, completions, "
                            "rewards and advantages (the first N drawn; -1 = all, 0 = no file; view: rollouts.py)")
    seed: int = arg(0, "base seed: data order, and each prompt's sampling stream")
    device: str = arg("", "cuda, cuda:N, cpu or mps; empty: cuda if available, else cpu")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default once, and none where the help text already says what empty means."""
    def _get_help_string(self, action):
        return action.help if action.default in ("", None) else super()._get_help_string(action)


DESCRIPTION = ("GRPO fine-tuning, end to end: python train.py --task gsm8k [--model Qwen/Qwen2.5-0.5B-Instruct] "
               "[--out runs/NAME]")


def build_parser(defaults=True):
    """The CLI, generated from TrainConfig's fields. defaults=False: flags not given are absent from the result."""
    # allow_abbrev=False: a typo that is a prefix of a flag (--max-new-token) is an error, not silently that flag
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, formatter_class=HelpFormatter,
                                allow_abbrev=False)
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
    # "given" = the flags on this command line; on --resume they override the saved config, the rest do not
    given = set(vars(build_parser(defaults=False).parse_args(argv)))
    return TrainConfig(**args), given


# What a run is: a resumed run refuses a change of these (the base model is judged by its fingerprint instead, as
# --model may name a new path for the same weights). The rest may change on resume (README "Training").
IDENTITY = ("task", "task_opts", "seed", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def lora_targets(cfg):
    """--lora-targets as a tuple of module names."""
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def check_settings(cfg, world):
    """Every setting that can be checked without loading anything; raises BadInput naming the first bad one."""
    # A bad flag costs one line now, not a traceback after minutes of loading, sampling or the step-0 eval.
    if cfg.task not in TASKS:
        raise BadInput(f"unknown task {cfg.task!r}; known: {', '.join(TASKS)}")
    if cfg.prompts_per_step % world:
        raise BadInput(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by the {world} ranks")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "micro_batch", "eval_batch", "logprob_chunk",
                 "save_every", "keep_last", "judge_max_tokens"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("seed", "eval_n", "warmup_steps", "eval_every", "print_every", "top_k", "weight_decay", "grad_clip",
                 "beta", "adv_eps", "dynamic_max_rounds"):
        if not getattr(cfg, name) >= 0:  # `not >=` also refuses NaN
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.log_rollouts < -1:
        raise BadInput(f"--log-rollouts must be -1 (all), 0 (none) or a number of groups, got {cfg.log_rollouts}")
    if cfg.seed >= 2 ** 64:
        raise BadInput(f"--seed must be < 2**64, got {cfg.seed}: it seeds 64-bit sampling streams")
    if cfg.group_size < 2:
        raise BadInput(f"--group-size must be >= 2, got {cfg.group_size}: GRPO's advantage is a reward minus its "
                       "group's mean, so a group of one has zero advantage and nothing is ever learned")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise BadInput(f"--lr must be > 0, got {cfg.lr}")
    if not cfg.temperature > 0:
        raise BadInput("--temperature must be > 0 for training rollouts (greedy groups have no variance to learn from)")
    if not 0 < cfg.top_p <= 1:
        raise BadInput(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise BadInput(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 <= cfg.adam_beta2 < 1:
        raise BadInput(f"--adam-beta2 must be in [0, 1), got {cfg.adam_beta2}")
    if not (cfg.tis_cap == 0 or cfg.tis_cap >= 1):  # also refuses NaN
        raise BadInput(f"--tis-cap must be 0 (off) or >= 1, got {cfg.tis_cap}: a cap below 1 would shrink every "
                       "on-policy token")
    if cfg.tis_cap and (cfg.top_p < 1 or cfg.top_k):
        raise BadInput(f"--tis-cap with --top-p {cfg.top_p} / --top-k {cfg.top_k}: the sampler's log-probs are of the "
                       "full softmax, not of the truncated distribution it drew from, so TIS would not see the gap "
                       "(grpo.py, note 10); use --top-p 1 --top-k 0 with TIS")
    if cfg.lora_rank and cfg.lora_dropout and (cfg.mu > 1 or cfg.tis_cap):
        raise BadInput(f"--lora-dropout {cfg.lora_dropout} with --mu {cfg.mu} / --tis-cap {cfg.tis_cap}: pi_old is "
                       "computed without dropout and the update's log-probs with it, so the ratio would clip on "
                       "dropout noise; use --lora-dropout 0 with --mu > 1 or --tis-cap")
    if not 0 <= cfg.eps_low < 1 or not (cfg.eps_high is None or cfg.eps_high >= 0):
        raise BadInput(f"--eps-low must be in [0, 1) and --eps-high >= 0, got {cfg.eps_low} and {cfg.eps_high}")
    if cfg.fsdp:
        if "WORLD_SIZE" not in os.environ:  # torchrun sets it; 1 rank is allowed there (a check of the code path)
            raise BadInput("--fsdp shards over torchrun's ranks: launch with torchrun --nproc_per_node N, or "
                           "pass --no-fsdp (a run started with --fsdp keeps it on --resume unless told)")
        if cfg.device.startswith("mps"):
            raise BadInput("--fsdp with --device mps: FSDP needs a collective backend (NCCL on CUDA, gloo on CPU)")
        if cfg.compile:
            raise BadInput("--fsdp with --compile: the compiled decode step is not traced through FSDP's hooks; "
                           "drop one")
        try:
            fsdp.check_torch()
        except ValueError as e:
            raise BadInput(str(e)) from None
    if cfg.resume and cfg.eval_only:
        raise BadInput("--eval-only evaluates --model; to evaluate a run's checkpoint pass --model RUN/step-N")
    if cfg.eval_only and cfg.eval_n == 0:
        raise BadInput("--eval-only with --eval-n 0 would evaluate nothing")
    if cfg.judge:
        if not (cfg.judge_weight > 0 and math.isfinite(cfg.judge_weight)):
            raise BadInput(f"--judge-weight must be > 0, got {cfg.judge_weight}")
        try:
            judge.load_rubric(cfg.judge_rubric)
        except ValueError as e:
            raise BadInput(f"--judge-rubric: {e}")
    if cfg.lora_rank:
        try:
            lora.check_settings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, lora_targets(cfg))
        except ValueError as e:
            raise BadInput(f"--lora-*: {e}")
    try:
        report.tools(cfg.report_to)
    except ValueError as e:
        raise BadInput(str(e)) from None
    try:
        return parse_options(cfg.task, cfg.task_opts)
    except TaskError as e:
        raise BadInput(str(e)) from None


def describe(cfg):
    """The run in one console line; every setting is in RUN/config.json (checkpoint.start_records writes it)."""
    what = f"{cfg.task}" + (f" ({cfg.task_opts})" if cfg.task_opts else "") + f" on {cfg.model}"
    if cfg.eval_only:
        return f"evaluating {what}: {cfg.eval_n} test problems at most; every setting in {cfg.out}/config.json"
    return (f"training {what}: {cfg.steps} steps of {cfg.prompts_per_step} prompts x {cfg.group_size} completions, "
            f"lr {cfg.lr:g}, beta {cfg.beta:g}; run dir {cfg.out}, every setting in {cfg.out}/config.json")


def pick_device(cfg, world):
    """The torch.device to run on, or one line saying why the asked-for one cannot be used."""
    if not cfg.device:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
            torch.device("cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise BadInput(f"--device {cfg.device!r} is not a device: use cuda, cuda:N, cpu or mps")
    if device.type not in ("cpu", "cuda", "mps"):
        raise BadInput(f"--device {cfg.device!r}: only cuda, cpu and mps are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}, but finds no GPU" if torch.version.cuda else \
                "a CPU-only build"
            raise BadInput(f"--device {cfg.device}: CUDA is not available here (this torch {torch.__version__} is "
                           f"{build}); use --device cpu")
        if world > 1 and device.index is not None:
            raise BadInput(f"--device {cfg.device}: under torchrun pass --device cuda, and each rank takes its own GPU "
                           "(LOCAL_RANK)")
        if device.index is None:  # torchrun: one GPU per rank
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise BadInput(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"--device {cfg.device}: MPS is not available here; use --device cpu")
    if world > 1 and device.type == "mps":
        raise BadInput("torchrun with --device mps is not supported (no collective backend for it)")
    return device
