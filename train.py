"""GRPO fine-tuning, end to end: python train.py --task gsm8k [--model Qwen/Qwen2.5-0.5B-Instruct] [--out runs/NAME]

Each step: sample prompts -> G completions each (sample.py) -> rewards (rewards.py) -> group advantages ->
reference log-probs -> update passes (grpo.py) -> optimizer step -> log -> eval / checkpoint.
Multi-GPU: torchrun --nproc_per_node N train.py ... (data parallel; see README "Multi-GPU").

Dtype policy, the one place it is set: weights, optimizer state and checkpoints are fp32 everywhere. On CUDA,
forward passes run under bf16 autocast (and the frozen reference model is kept in bf16, as it only runs
forward there). On CPU everything is fp32.
Legend: P prompts per rank per step, G group, N = P*G rows, T completion time.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import rewards as R
from grpo import LOSS_TYPES, group_advantages, grpo_loss, loss_normalizer, token_logprobs
from model import Transformer, resolve_checkpoint
from sample import generate
from tokenizer import Tokenizer


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    task: str = arg("gsm8k", "task to train on (see TASKS)")
    model: str = arg("Qwen/Qwen2.5-0.5B-Instruct", "Hugging Face repo id or local checkpoint dir")
    data_dir: str = arg("", "dir with the task's train.jsonl/test.jsonl; empty: download (checksummed) to --cache-dir")
    cache_dir: str = arg("~/.cache/grpo", "where downloaded datasets are kept")
    out: str = arg("", "run dir for metrics, evals, checkpoints (default runs/TASK-TIMESTAMP)")
    resume: str = arg("", "run dir to continue from its last complete checkpoint (flags given now override)")
    plot: str = arg("", "only write the curves of this run dir to a PNG, then exit")
    steps: int = arg(200, "optimizer steps (x mu)")
    prompts_per_step: int = arg(16, "prompts per step, global across ranks")
    group_size: int = arg(8, "G: completions per prompt")
    max_new_tokens: int = arg(512, "completion length cap (training and eval)")
    temperature: float = arg(0.7, "sampling temperature for training rollouts")
    top_p: float = arg(1.0, "nucleus sampling mass for rollouts (1 = off)")
    top_k: int = arg(0, "top-k for rollouts (0 = off)")
    lr: float = arg(2e-6, "peak learning rate (AdamW)")
    warmup_steps: int = arg(10, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(0.1, "final lr as a fraction of --lr")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta2: float = arg(0.99, "AdamW beta2 (beta1 0.9)")
    grad_clip: float = arg(1.0, "clip the global grad norm to this (0 = off)")
    beta: float = arg(0.04, "k3 KL coefficient; 0 = no reference model at all")
    eps_low: float = arg(0.2, "clip ratio below at 1 - eps_low")
    eps_high: float = arg(None, "clip ratio above at 1 + eps_high (default eps_low; DAPO clip-higher: 0.28)", type=float)
    loss_type: str = arg("grpo", "loss aggregation", choices=LOSS_TYPES)
    adv_scale: str = arg("group", "divide advantages by the group std, the batch std, or nothing (Dr. GRPO)",
                         choices=("group", "batch", "none"))
    adv_unbiased_std: bool = arg(True, "Bessel-corrected std for advantages (np.std if off)")
    adv_eps: float = arg(1e-4, "added to the std of advantages")
    mu: int = arg(1, "update passes (optimizer steps) per batch of rollouts")
    micro_batch: int = arg(8, "rows per forward/backward; changes memory, not the gradient")
    logprob_chunk: int = arg(1024, "tokens per lm_head/log_softmax chunk")
    grad_ckpt: bool = arg(False, "gradient checkpointing: recompute activations in backward")
    compile: bool = arg(False, "torch.compile the sampler's decode step (on CPU it measured slower than eager, which packs weights for oneDNN)")
    eval_every: int = arg(50, "evaluate every this many steps (0 = only at start and end)")
    eval_n: int = arg(1319, "test problems per evaluation (greedy pass@1)")
    eval_batch: int = arg(64, "prompts per evaluation generate call")
    save_every: int = arg(50, "checkpoint every this many steps (and at the end)")
    keep_last: int = arg(2, "checkpoints to keep (older ones are deleted once a newer one is complete)")
    print_every: int = arg(10, "print one sampled completion with its rewards every this many steps")
    seed: int = arg(0, "base seed: data order, and each prompt's sampling stream")
    device: str = arg("", "cuda, cpu, ... (default: cuda if available)")


def die(msg):
    raise SystemExit(f"train.py: error: {msg}")


def parse_args(argv=None):
    """Flags generated from TrainConfig; returns (cfg, the set of flags given explicitly)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=m["help"])
        else:
            p.add_argument(flag, type=m.get("type", type(f.default)), default=f.default, help=m["help"],
                           choices=m.get("choices"))
    args = vars(p.parse_args(argv))
    words = argv if argv is not None else sys.argv[1:]
    given = {a.dest for a in p._actions for o in a.option_strings for w in words if w == o or w.startswith(o + "=")}
    return TrainConfig(**args), given


# ----------------------------------------------------------------------------- tasks
# A task bundles: load(cfg) -> (train, test) lists of example dicts; prompt(example) -> chat messages; rewards,
# a list of (weight, fn) summed into the training reward; metrics, named 0/1 functions reported as accuracy
# in training and evaluation. Reward fns take (completion, **example). Adding a task = one Task(...) in TASKS.

@dataclass
class Task:
    load: object
    prompt: object
    rewards: list
    metrics: dict


GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
GSM8K_SHA256 = {"train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
                "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"}
GSM8K_SYSTEM = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
# repeated after the question: small models (SmolLM2-135M) ignore a system-only format instruction
GSM8K_USER = ("{question}\n\nFirst think inside <reasoning> </reasoning> tags, then give the final number inside "
              "<answer> </answer> tags.")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def gsm8k_file(cfg, split):
    """--data-dir/SPLIT.jsonl, or the original openai/grade-school-math file, downloaded once and checksummed."""
    if cfg.data_dir:
        path = os.path.join(os.path.expanduser(cfg.data_dir), f"{split}.jsonl")
        if not os.path.isfile(path):
            die(f"{path} not found: --data-dir must hold train.jsonl and test.jsonl in the GSM8K jsonl format")
        return path
    path = os.path.join(os.path.expanduser(cfg.cache_dir), "gsm8k", f"{split}.jsonl")
    if os.path.isfile(path) and sha256(path) == GSM8K_SHA256[split]:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(GSM8K_URL.format(split), timeout=30) as r, open(path + ".tmp", "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        die(f"could not download GSM8K {split} ({e}); offline, pass --data-dir DIR with train.jsonl and test.jsonl "
            "(from github.com/openai/grade-school-math, grade_school_math/data)")
    if sha256(path + ".tmp") != GSM8K_SHA256[split]:
        die(f"downloaded GSM8K {split} has the wrong sha256; not using it (left at {path}.tmp)")
    os.replace(path + ".tmp", path)
    return path


def read_gsm8k(path):
    """[{question, gold}] from GSM8K jsonl: one {"question": ..., "answer": "... #### 42"} per line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                out.append({"question": ex["question"], "gold": R.extract_gold(ex["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                die(f"{path}:{i}: bad GSM8K line ({type(e).__name__}: {e})")
    if not out:
        die(f"{path}: no examples")
    return out


TASKS = {
    "gsm8k": Task(
        load=lambda cfg: (read_gsm8k(gsm8k_file(cfg, "train")), read_gsm8k(gsm8k_file(cfg, "test"))),
        prompt=lambda ex: [{"role": "system", "content": GSM8K_SYSTEM},
                           {"role": "user", "content": GSM8K_USER.format(question=ex["question"])}],
        rewards=R.GSM8K_REWARDS,
        metrics={"acc_strict": R.correct, "acc_lenient": R.correct_lenient},
    ),
}


# ----------------------------------------------------------------------------- small helpers

def lr_at(step, cfg):
    """Linear warmup to cfg.lr over warmup_steps, then cosine down to min_lr_ratio * lr at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def data_indices(step, cfg, n):
    """Global dataset indices of a step's prompts: a fresh seeded permutation each epoch."""
    pos = np.arange((step - 1) * cfg.prompts_per_step, step * cfg.prompts_per_step)
    return [int(np.random.default_rng([cfg.seed, int(q) // n]).permutation(n)[q % n]) for q in pos], pos


def completion_texts(tok, ro):
    """Decoded completions, without the final stop token (rewards see only the text)."""
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
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def copy_tokenizer_files(src, dst):
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
              "special_tokens_map.json", "vocab.json", "merges.txt"):
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)


def checkpoints(run_dir):
    """Complete checkpoint dirs of a run, oldest first (a checkpoint is complete once renamed into place)."""
    ck = [d for d in glob.glob(os.path.join(run_dir, "step-*")) if os.path.isfile(os.path.join(d, "trainer_state.pt"))]
    return sorted(ck, key=lambda d: int(d.rsplit("-", 1)[1]))


def truncate_jsonl(path, last_step):
    """Drop records past last_step (a resumed run rewrites them)."""
    if os.path.isfile(path):
        keep = [l for l in open(path) if l.strip() and json.loads(l)["step"] <= last_step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def plot(run_dir):
    """reward / accuracy / KL / length curves of a run as run_dir/curves.png (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); metrics are in metrics.jsonl")
        return None
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    ev_path = os.path.join(run_dir, "eval.jsonl")
    evals = [json.loads(l) for l in open(ev_path) if l.strip()] if os.path.isfile(ev_path) else []
    s = [r["step"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(s, [r["reward_mean"] for r in rows], label="total", lw=2)
    for k in [k for k in rows[0] if k.startswith("reward/")]:
        ax[0, 0].plot(s, [r[k] for r in rows], label=k[7:], lw=1)
    ax[0, 0].set_title("training reward (mean)")
    for k in [k for k in rows[0] if k.startswith("acc_")]:
        ax[0, 1].plot(s, [r[k] for r in rows], label=f"train {k}", lw=1)
    for k in [k for k in (evals[0] if evals else {}) if k.startswith("acc_")]:
        ax[0, 1].plot([e["step"] for e in evals], [e[k] for e in evals], "o-", label=f"eval {k}")
    ax[0, 1].set_title("accuracy")
    ax[1, 0].plot(s, [r["kl"] for r in rows])
    ax[1, 0].set_title("KL to reference (k3, per token)")
    ax[1, 1].plot(s, [r["len_mean"] for r in rows], label="mean")
    ax[1, 1].plot(s, [r["len_max"] for r in rows], label="max")
    ax[1, 1].set_title("completion length (tokens)")
    for a in ax.flat:
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=110)
    print(f"plot: wrote {out}")
    return out


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, tok, task, test, cfg, amp, rank, world):
    """Greedy pass@1 on the first eval_n test problems, sharded across ranks; returns (metrics, per-problem rows)."""
    mine = list(range(rank, min(cfg.eval_n, len(test)), world))
    rows = []
    for s in range(0, len(mine), cfg.eval_batch):
        idx = mine[s:s + cfg.eval_batch]
        prompts = [tok.encode_chat(task.prompt(test[i])) for i in idx]
        with amp:
            ro = generate(model, prompts, 1, cfg.max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids,
                          vocab_size=tok.vocab_size, pad_id=tok.pad_id)
        for i, text in zip(idx, completion_texts(tok, ro)):
            rows.append({"index": i, "completion": text, **{k: f(text, **test[i]) for k, f in task.metrics.items()}})
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for g in gathered for r in g), key=lambda r: r["index"])
    n = max(len(rows), 1)
    return {"n": len(rows), **{k: sum(r[k] for r in rows) / n for k in task.metrics}}, rows


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = parse_args(argv)
    if cfg.plot:
        return plot(cfg.plot)

    # ---- distributed: torchrun sets RANK/WORLD_SIZE; each rank takes P/world prompts of every step
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    if torch.cuda.is_available() and cfg.device in ("", "cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device(cfg.device or "cpu")
    log = print if rank == 0 else (lambda *a, **k: None)

    # ---- resume: the run's saved config, overridden by flags given now
    start, state = 0, None
    if cfg.resume:
        ck = checkpoints(cfg.resume)
        if not ck:
            die(f"--resume {cfg.resume}: no complete checkpoint (step-N/trainer_state.pt) there")
        state = torch.load(os.path.join(ck[-1], "trainer_state.pt"), map_location="cpu", weights_only=False)
        saved = TrainConfig(**state["config"])
        cfg = TrainConfig(**{f.name: getattr(cfg if f.name in given else saved, f.name) for f in fields(TrainConfig)})
        cfg.out, start = cfg.resume, state["step"]
        log(f"resuming {cfg.out} from {ck[-1]} (step {start})")

    # ---- check the settings before loading anything
    if cfg.task not in TASKS:
        die(f"unknown task {cfg.task!r}; known: {', '.join(TASKS)}")
    if cfg.prompts_per_step % world:
        die(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by the {world} ranks")
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "mu", "micro_batch", "eval_batch",
                 "logprob_chunk"):
        if getattr(cfg, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.temperature <= 0:
        die("--temperature must be > 0 for training rollouts (greedy groups have no variance to learn from)")
    task, P = TASKS[cfg.task], cfg.prompts_per_step // world
    cfg.out = cfg.out or os.path.join("runs", f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    torch.manual_seed(cfg.seed + rank)

    # ---- load data, tokenizer, policy, and (only when beta > 0) the frozen reference
    train, test = task.load(cfg)
    src = ck[-1] if state else cfg.model
    try:
        tok = Tokenizer(src)
        model = Transformer.from_pretrained(src, device=device)
        ref = None
        if cfg.beta != 0:  # the reference is always the initial weights, also on resume
            ref = Transformer.from_pretrained(cfg.model, device=device,
                                              dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            ref.requires_grad_(False).eval()
    except (OSError, ValueError) as e:
        die(f"could not load model {src!r}: {e}")
    model.gradient_checkpointing = cfg.grad_ckpt
    amp = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if state:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        truncate_jsonl(os.path.join(cfg.out, "metrics.jsonl"), start)
        truncate_jsonl(os.path.join(cfg.out, "eval.jsonl"), start)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    log(json.dumps(asdict(cfg)))
    log(f"{len(train)} train / {len(test)} test examples; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params on {device} x {world}; reference model: {'loaded' if ref else 'none (beta=0)'}")

    def run_eval(step):
        metrics, rows = evaluate(model.eval(), tok, task, test, cfg, amp(), rank, world)
        if rank == 0:
            with open(os.path.join(cfg.out, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
            with open(os.path.join(cfg.out, "eval", f"step-{step}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        log(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()))

    def save(step):
        """step-N/ = a Hugging Face model dir + trainer_state.pt, written to a temp dir and renamed into place."""
        if rank == 0:
            final, tmp = os.path.join(cfg.out, f"step-{step}"), os.path.join(cfg.out, f".step-{step}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            copy_tokenizer_files(tok.path, tmp)
            torch.save({"step": step, "optimizer": opt.state_dict(), "config": asdict(cfg), "world_size": world,
                        "data_position": step * cfg.prompts_per_step, "rng": {"torch": torch.get_rng_state()}},
                       os.path.join(tmp, "trainer_state.pt"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoints(cfg.out)[:-cfg.keep_last]:  # only now that the new one is complete
                shutil.rmtree(old)
            log(f"saved {final}")
        if world > 1:
            dist.barrier()

    if start == 0:
        run_eval(0)
    t_run, step = time.time(), start
    try:
        for step in range(start + 1, cfg.steps + 1):
            # ---- 1. prompts: this rank's share of the step's global batch
            t_step = time.time()
            idx, pos = data_indices(step, cfg, len(train))
            idx, pos = idx[rank * P:(rank + 1) * P], pos[rank * P:(rank + 1) * P]
            examples = [train[i] for i in idx]
            prompts = [tok.encode_chat(task.prompt(ex)) for ex in examples]

            # ---- 2. rollouts: G completions per prompt; each prompt's stream is seeded by its global data
            # position, so sampling is the same for any number of ranks and across a resume
            t0 = time.time()
            gens = [torch.Generator(device).manual_seed(cfg.seed * 2 ** 32 + int(q)) for q in pos]
            model.eval()
            with amp():
                ro = generate(model, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                              cfg.top_k, tok.stop_ids, gens, tok.vocab_size, tok.pad_id, cfg.compile)
            t_sample = time.time() - t0

            # ---- 3. rewards, per function and weighted total
            texts = completion_texts(tok, ro)
            rows = [examples[i // cfg.group_size] for i in range(len(texts))]
            per_fn = {f.__name__: [f(t, **ex) for t, ex in zip(texts, rows)] for _, f in task.rewards}
            total = torch.tensor([sum(w * per_fn[f.__name__][i] for w, f in task.rewards) for i in range(len(texts))])
            accs = {k: [f(t, **ex) for t, ex in zip(texts, rows)] for k, f in task.metrics.items()}

            # ---- 4. group advantages (a group never spans ranks; scale=batch uses this rank's batch)
            adv, zero_std = group_advantages(total, cfg.group_size, cfg.adv_scale, cfg.adv_unbiased_std, cfg.adv_eps)
            adv = adv.to(device)

            # ---- 5. reference log-probs (beta > 0 only), and old log-probs when mu > 1
            t0 = time.time()
            B, mask = cfg.micro_batch, ro.completion_mask
            mbs = [slice(s, s + B) for s in range(0, mask.shape[0], B)]

            def logprobs(m, sl):
                return token_logprobs(m, ro.prompt_ids[sl], ro.prompt_mask[sl], ro.completion_ids[sl], mask[sl],
                                      cfg.temperature, cfg.logprob_chunk)

            with torch.no_grad(), amp():
                ref_lp = torch.cat([logprobs(ref, sl) for sl in mbs]) if ref is not None else None
                old_lp = torch.cat([logprobs(model, sl) for sl in mbs]) if cfg.mu > 1 else None

            # ---- 6. update: mu passes, each accumulating over micro-batches with the step's global normaliser
            norm = loss_normalizer(cfg.loss_type, mask, cfg.max_new_tokens)
            if world > 1:
                norm = all_sum({"n": norm}, world)["n"]
            model.train()
            sums = {"loss": 0.0, "kl": 0.0, "ratio": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tokens": 0.0}
            for _ in range(cfg.mu):
                lr = lr_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                for sl in mbs:
                    with amp():
                        lp = logprobs(model, sl)
                    old = lp.detach() if old_lp is None else old_lp[sl]
                    loss, st = grpo_loss(lp, old, adv[sl], mask[sl], norm, cfg.loss_type,
                                         None if ref_lp is None else ref_lp[sl], cfg.beta, cfg.eps_low, cfg.eps_high)
                    if not torch.isfinite(loss):
                        die(f"non-finite loss {loss.item()} at step {step}: {st}; advantages "
                            f"[{adv.min().item():.3g}, {adv.max().item():.3g}]. Last checkpoint kept in {cfg.out}")
                    loss.backward()
                    sums["loss"] += loss.item()
                    for k in ("kl", "ratio", "clip_low", "clip_high"):
                        sums[k] += st[k] * st["tokens"]
                    sums["tokens"] += st["tokens"]
                # ---- 7. optimizer step: gradients summed over ranks (each rank's loss is already divided by the
                # global normaliser, so the sum is exactly the single-process gradient)
                if world > 1:
                    for p in model.parameters():
                        dist.all_reduce(p.grad)
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                if not torch.isfinite(gn):
                    die(f"non-finite grad norm at step {step}. Last checkpoint kept in {cfg.out}")
                opt.step()
                opt.zero_grad(set_to_none=True)
            t_train = time.time() - t0

            # ---- 8. log: global sums over ranks, then means
            n_tok = float(mask.sum())
            g = all_sum({
                "rows": len(texts), "reward": total.sum().item(), "reward_sq": (total ** 2).sum().item(),
                **{f"reward/{k}": sum(v) for k, v in per_fn.items()}, **{k: sum(v) for k, v in accs.items()},
                "zero_std": zero_std * P, "groups": P, "len": float(ro.lengths.sum()),
                "truncated": float((~ro.stopped).sum()), "completion_tokens": n_tok, "sample_s": t_sample,
                "train_s": t_train, "step_s": time.time() - t_step, **sums}, world)
            len_max = torch.tensor(float(ro.lengths.max()))
            if world > 1:
                len_max = len_max.to(dist_device())
                dist.all_reduce(len_max, op=dist.ReduceOp.MAX)
            n, ntok = g["rows"], max(g["tokens"], 1)
            mean = g["reward"] / n
            metrics = {
                "step": step, "reward_mean": mean, "reward_std": math.sqrt(max(g["reward_sq"] / n - mean ** 2, 0.0)),
                **{k: g[k] / n for k in g if k.startswith("reward/")}, **{k: g[k] / n for k in accs},
                "zero_std_frac": g["zero_std"] / g["groups"], "len_mean": g["len"] / n, "len_max": len_max.item(),
                "truncated_frac": g["truncated"] / n, "kl": g["kl"] / ntok, "ratio": g["ratio"] / ntok,
                "clip_low": g["clip_low"] / ntok, "clip_high": g["clip_high"] / ntok, "loss": g["loss"] / cfg.mu,
                "grad_norm": gn.item(), "lr": lr, "sample_s": g["sample_s"] / world, "train_s": g["train_s"] / world,
                "step_s": g["step_s"] / world, "completion_tokens": g["completion_tokens"],
                "tokens_per_s": g["completion_tokens"] / max(g["step_s"] / world, 1e-9),  # whole step, all ranks
            }
            if rank == 0:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            eta = (time.time() - t_run) / (step - start) * (cfg.steps - step)
            log(f"step {step}/{cfg.steps} | reward {mean:.3f} | acc {' / '.join(f'{metrics[k]:.2f}' for k in accs)} | "
                f"kl {metrics['kl']:.4f} | len {metrics['len_mean']:.0f} | {metrics['tokens_per_s']:.0f} tok/s | "
                f"ETA {eta / 60:.1f} min", flush=True)
            if cfg.print_every and step % cfg.print_every == 0:
                log(f"--- sample (step {step}, rewards {({k: round(v[0], 3) for k, v in per_fn.items()})}):\n"
                    f"{texts[0]}\n---")

            # ---- 9. eval / checkpoint
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                run_eval(step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
    except torch.OutOfMemoryError:
        die(f"out of memory at step {step}: lower --micro-batch (now {cfg.micro_batch}), --max-new-tokens, "
            "--group-size or --prompts-per-step, or pass --grad-ckpt. Last checkpoint kept in " + cfg.out)

    if step > start or start == 0:
        run_eval(cfg.steps)
    if rank == 0:
        plot(cfg.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
