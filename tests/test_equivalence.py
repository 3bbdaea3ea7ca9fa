"""The flags that claim to change nothing but cost or layout, as hypothesis properties over drawn configurations.

README: N ranks compute the update of 1 process; micro-batching changes memory, not the gradient; a resumed run
equals the uninterrupted one; gradient checkpointing changes nothing but memory. For each drawn configuration (adv
scale, loss type, ratio level, mu, beta, LoRA, dynamic sampling, overlong filtering, TIS, the shared prompt prefix,
...) on the tiny random model, one 2-step, full-batch, 1-process run (in-process, cached per configuration and shared
by the four tests) is compared with: the same step with --micro-batch < rows; with --grad-ckpt; the run deleted back
to step 1 and resumed; and (last, the slow one: torchrun) the same step on 2 ranks, data-parallel or sharded (--fsdp).
The 1-process run forwards every prompt whole; the variants forward the prompts' shared prefix once where the
configuration draws it (--share-prefix, the default). What is compared is
the gradient of every trainable parameter as the optimizer receives it (a global optimizer pre-step hook records each
opt.step(), all mu of them, and also records that a step with nothing to learn from made none) and the step's log
line (loss, grad norm and every other value but timing); for resume, bit for bit, the log, step 2's gradients and
the final weights.

Draws are derandomized for CI (the four tests share one seed, so they draw the same configurations and share the
cached 1-process runs); GRPO_EQUIV_EXAMPLES=N asks for N random draws per test instead (GRPO_EQUIV_SEED=S repeats
one such search).
"""
import dataclasses
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

import calc as C
import train
from test_distributed import run_ranks
from test_train import ANSWERS, QUESTIONS, chars_near_20, flat_for_some, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"eq_varied": chars_near_20, "eq_flat": flat_for_some}  # flat: two of the six questions have no spread
TOOL_TAGS = ("9", "\ufffd")  # calc's call tags in these runs: a digit opens a call, a replacement character closes it

# ----------------------------------------------------------------------------- how many draws, and which
DEEP = int(os.environ.get("GRPO_EQUIV_EXAMPLES") or 0)
DRAW_SEED = int(os.environ.get("GRPO_EQUIV_SEED") or random.SystemRandom().randrange(2 ** 32)) if DEEP else 0
if DEEP:
    print(f"test_equivalence: {DEEP} random draws per test, GRPO_EQUIV_SEED={DRAW_SEED}", file=sys.stderr)
# CI does not shrink: a failure is reported as drawn, at once, not after minutes of torchrun runs on smaller ones
SETTINGS = settings(derandomize=not DEEP, max_examples=DEEP or 10, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow],
                    phases=list(Phase) if DEEP else [Phase.explicit, Phase.generate])
SAME_DRAWS = hypothesis_seed(DRAW_SEED)  # one seed for the four tests: the same draws, so they share the 1-process runs

# ----------------------------------------------------------------------------- tolerances
# fp32 rounding, measured over 127 drawn configurations (22 of them on 2 ranks), lr 1e-2, on the tiny model; 157 more
# (27 on 2 ranks) then passed these bounds.
# First (or only) pass: micro-batching and 2 ranks sum the rows in another order and group them into other forwards
# (each forward shares each distinct prompt once, grpo.py note 12), so a gradient element moves by a few ulps of the
# sums it came from: at most 3.3e-6 of its tensor's largest element. An element far below that largest one carries
# the same absolute noise (2.6e-5 relative was seen on one 70x below its tensor's max), so the bound is
# |diff| <= RTOL * (|g| + max |g| of the tensor). --grad-ckpt recomputes the same ops on the same inputs: bitwise
# equal in every draw without the shared prefix. The shared prefix (a variant's, against the 1-process run's whole
# prompts) is one more summation order of the same kind.
RTOL = 1e-5
# Later passes (mu = 2) are taken at the weights after Adam's first step, which moves each weight by about
# lr * g / (|g| + 1e-8): where |g| is near Adam's eps, g's fp32 noise becomes a weight difference of a fraction of lr,
# and the next pass's gradients, loss and grad norm carry it (most in LoRA's A, whose gradient is proportional to B,
# which Adam's first step sets). Measured: up to 2.5e-4 of the step's largest gradient element (2.4e-3 of a small
# tensor's own max), 4e-5 relative in loss and grad norm. So later passes are compared against the step's largest
# element, at LATER_RTOL; a wrong normaliser, advantage, ratio or reference changes them by percents.
LATER_RTOL = 1e-3
# The logged loss of a first pass is a sum of O(1) advantage terms that cancel to ~1e-8 (ratio 1, zero-mean
# groups): its rounding is absolute, up to 1.4e-7 seen (2.3e-6 with mu 2: 10x LOSS_ATOL). The grad norm: 1.4e-6
# relative at most with mu 1. Every other logged value: rewards and counts are exact; kl, ratio, entropy are token
# means of log-probs; mismatch_* measure the sampler's distance from the trainer's log-probs, rounding itself (~1e-6),
# so they move by as much as they are; with mu 2 a token's ratio may cross the clip edge in the second pass (none
# seen), so clip_* may move by a token's share.
LOSS_ATOL, NORM_ATOL, LOG_ATOL, MISMATCH_ATOL, CLIP_ATOL = 1e-6, 1e-6, 1e-6, 1e-5, 0.02


def config(adv_scale="group", loss_type="grpo", ratio_level="token", mu=1, beta=0.0, lora=False, dynamic=False,
           mask_truncated=False, tis=False, max_new_tokens=8, grad_clip=0.0, reward="eq_varied", micro=1, seed=1,
           fsdp=False, prefix=True, tool=False):
    """A drawn configuration as a dict (hashable through key()); every field a flag or the task."""
    return dict(adv_scale=adv_scale, loss_type=loss_type, ratio_level=ratio_level, mu=mu, beta=beta, lora=lora,
                dynamic=dynamic, mask_truncated=mask_truncated, tis=tis, max_new_tokens=max_new_tokens,
                grad_clip=grad_clip, reward="eq_flat" if dynamic else reward, micro=micro, seed=seed, fsdp=fsdp,
                prefix=prefix, tool=tool)


CONFIGS = st.builds(
    config, adv_scale=st.sampled_from(["group", "batch", "none"]),
    loss_type=st.sampled_from(["grpo", "token", "dr_grpo"]), ratio_level=st.sampled_from(["token", "sequence"]),
    mu=st.sampled_from([1, 2]), beta=st.sampled_from([0.0, 0.04]), lora=st.booleans(), dynamic=st.booleans(),
    mask_truncated=st.booleans(), tis=st.booleans(), max_new_tokens=st.sampled_from([8, 3]),
    grad_clip=st.sampled_from([0.0, 1.0]), reward=st.sampled_from(["eq_varied", "eq_flat"]),
    micro=st.sampled_from([1, 3]), seed=st.integers(0, 3), fsdp=st.booleans(), prefix=st.booleans(),
    tool=st.booleans())

# Pinned: every CI run checks these, whatever the draws. EMPTY cuts every completion: a step with no token to learn
# from, where no run may take an optimizer step.
BATCH = config(adv_scale="batch")
BATCH_DS = config(adv_scale="batch", dynamic=True)
EMPTY = config(mask_truncated=True, max_new_tokens=3, beta=0.04)
MU2_KL = config(mu=2, beta=0.04)
LORA_KL = config(lora=True, beta=0.04)
GSPO_MU2 = config(ratio_level="sequence", mu=2)
TIS = config(tis=True)
# the calculator: every completion an episode that pauses at each call, with dynamic sampling and the KL
TOOL_DS_KL = config(tool=True, dynamic=True, beta=0.04, max_new_tokens=12)
# --fsdp (2 ranks, sharded): the reference sharded too, with mu 2 and dynamic sampling, where the ranks keep different
# numbers of rows (so run different numbers of micro-batches and forwards); LoRA's frozen base sharded; every row cut
FSDP_DS_MU2_KL = config(dynamic=True, mu=2, beta=0.04, fsdp=True)
FSDP_LORA_DS_KL = config(lora=True, adv_scale="batch", dynamic=True, beta=0.04, fsdp=True)
FSDP_EMPTY = dict(EMPTY, fsdp=True)


PINNED = (BATCH, BATCH_DS, EMPTY, MU2_KL, LORA_KL, GSPO_MU2, TIS, TOOL_DS_KL, FSDP_DS_MU2_KL, FSDP_LORA_DS_KL,
          FSDP_EMPTY)


def pinned(test):
    for c in reversed(PINNED):  # run in this order
        test = example(c=c)(test)
    return test


def flags(c, data, ckpt, out, *extra):
    """The command line of configuration c: a 2-step run of 4 prompts x 4 completions, a checkpoint every step."""
    f = ["--task", c["reward"], "--model", ckpt, "--data-dir", data, "--out", str(out), "--prompts-per-step", "4",
         "--group-size", "4", "--max-new-tokens", str(c["max_new_tokens"]), "--eval-n", "0", "--steps", "2",
         "--save-every", "1", "--keep-last", "5", "--lr", "1e-2", "--warmup-steps", "1", "--seed", str(c["seed"]),
         "--adv-scale", c["adv_scale"], "--loss-type", c["loss_type"], "--ratio-level", c["ratio_level"],
         "--mu", str(c["mu"]), "--beta", str(c["beta"]), "--grad-clip", str(c["grad_clip"]), "--micro-batch", "16",
         "--no-share-prefix"]
    if c["lora"]:
        f += ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0"]
    if c["dynamic"]:
        f += ["--dynamic-sampling", "--dynamic-max-rounds", "2"]
    if c["mask_truncated"]:
        f += ["--mask-truncated"]
    if c["tis"]:  # with the default top-p 1 and top-k 0 (the sampler's log-probs are then the full softmax's)
        f += ["--tis-cap", "2"]
    if c["tool"]:
        f += ["--task-opts", "tools=calc"]
    return f + list(extra)  # later flags win: --steps 1, --micro-batch N, --grad-ckpt, --share-prefix


def key(c):
    """What a 1-process run depends on: --fsdp and the prefix change only the variants, so all share one."""
    return tuple(sorted((k, v) for k, v in c.items() if k not in ("fsdp", "prefix")))


def variant(c):
    """The flags every variant of c adds to the 1-process run's: the shared prompt prefix, if c draws it."""
    # The 1-process run forwards every prompt whole (--no-share-prefix, the plain computation); a variant with the
    # prefix forwards it once per rollout and per log-prob pass (grpo.SharedPrefix), above its micro-batches, on
    # its ranks, sharded or not. The resumed run continues the 1-process run's own settings, bit for bit.
    return ["--share-prefix"] if c["prefix"] else []


# ----------------------------------------------------------------------------- recording gradients

def whole(t):
    """A sharded (--fsdp) gradient's full value, gathered from every rank (each calls this in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def recording(train_module):
    """[(train step, [each trainable parameter's .grad, cloned, in the optimizer's order])] of every opt.step()."""
    records, step, real = [], [0], train_module.update

    def update(run, s, **kw):  # which train step the optimizer steps belong to
        step[0] = s
        return real(run, s, **kw)

    def before_step(opt, args, kwargs):
        records.append((step[0], [None if p.grad is None else whole(p.grad).detach().clone()
                                  for g in opt.param_groups for p in g["params"]]))
    handle = register_optimizer_step_pre_hook(before_step)
    train_module.update = update
    try:
        yield records
    finally:
        handle.remove()
        train_module.update = real


def install_tasks(train_module):
    """Register the tasks (in-process, and in the torchrun launcher); returns what to undo."""
    # With tools=calc (the configuration's `tool`) a completion is a calculator episode (calc.py, play.py) whose calls
    # are written with tags a tiny random model writes often, so its episodes pause and continue.
    g = train_module.TASKS["gsm8k"]
    old = {k: train_module.TASKS.get(k) for k in TASKS} | {"tags": (C.OPEN, C.CLOSE)}
    for name, fn in TASKS.items():
        train_module.TASKS[name] = dataclasses.replace(g, rewards=[(1.0, fn)], game_rewards=[(1.0, fn)])
    C.OPEN, C.CLOSE = TOOL_TAGS
    return old


# torchrun's ranks: train.py with the tasks above and the recorder; rank 0 saves what its optimizer received (the
# gradients are all-reduced before it, so they are the global ones)
LAUNCHER = f"""
import os
import sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
import torch
import train
import test_equivalence as eq
eq.install_tasks(train)
train.plot = lambda *a, **k: None
with eq.recording(train) as records:
    train.main(sys.argv[1:])
if os.environ.get("RANK", "0") == "0":
    torch.save(records, os.environ["EQUIV_GRADS"])
"""


# ----------------------------------------------------------------------------- runs

class Env:
    """The module's files and the cached 1-process runs; a short repr, as hypothesis prints it with each example."""
    def __init__(self, **kw):
        self.__dict__.update(kw, runs={}, ids={}, count=0)

    def name(self, c, what):
        """A new run dir for run `what` of configuration c: c<N>-what-<K>, N numbering the configurations in draw
        order, K every run (hypothesis runs a failing configuration again, and a run dir is never reused)."""
        self.count += 1
        return self.dir / f"c{self.ids.setdefault(key(c), len(self.ids))}-{what}-{self.count}"

    def __repr__(self):
        return f"Env({self.dir})"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("equiv")
    (d / "data").mkdir()
    for split in ("train", "test"):
        with open(d / "data" / f"{split}.jsonl", "w") as f:
            for q, a in zip(QUESTIONS, ANSWERS):
                f.write(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n")
    (d / "launch.py").write_text(LAUNCHER)
    old = install_tasks(train)
    real_plot, train.plot = train.plot, lambda *a, **k: None  # no curves.png: it is not what is compared
    yield Env(dir=d, data=str(d / "data"), ckpt=tiny_ckpt)
    train.plot = real_plot
    C.OPEN, C.CLOSE = old.pop("tags")
    for k, v in old.items():
        if v is None:
            train.TASKS.pop(k, None)
        else:
            train.TASKS[k] = v


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def in_process(env, c, name, *extra):
    """A 1-process run of c (train.main): (the optimizer's gradients, the metrics lines, the run dir)."""
    out = env.name(c, name)
    with recording(train) as records:
        train.main(flags(c, env.data, env.ckpt, out, *extra))
    return records, metrics(out), out


def full_batch(env, c):
    """The 2-step, full-batch (--micro-batch 16 >= every rank's rows), 1-process run of c, run once per config."""
    if key(c) not in env.runs:
        env.runs[key(c)] = in_process(env, c, "full")
    return env.runs[key(c)]


def two_ranks(env, c):
    """Step 1 of c on 2 ranks (torchrun, gloo): (rank 0's optimizer gradients, the metrics lines, the run dir)."""
    out = env.name(c, "two")
    grads = out.with_suffix(".pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(env.dir / "launch.py"), *flags(c, env.data, env.ckpt, out, "--steps", "1", *["--fsdp"] * c["fsdp"],
                                              *variant(c))]
    rc, log = run_ranks(cmd, {"EQUIV_GRADS": str(grads)}, out)  # ~10 s alone
    assert rc == 0, log
    assert ("cpu x 2 (FSDP)" if c["fsdp"] else "cpu x 2,") in log, log  # really two ranks, sharded or not
    return torch.load(grads, weights_only=False), metrics(out), out


# ----------------------------------------------------------------------------- comparisons

def steps_of(records, step):
    return [grads for s, grads in records if s == step]


def same_grads(a, b, what):
    """Every optimizer step's gradients of a equal b's (the tolerances above): as many steps (none on an empty step),
    as many parameters, a gradient on the same ones."""
    assert len(a) == len(b), f"{what}: {len(a)} optimizer steps against {len(b)}"
    for i, (ga, gb) in enumerate(zip(a, b)):
        assert len(ga) == len(gb), f"{what}: pass {i + 1}: {len(ga)} trainable parameters against {len(gb)}"
        top = max((y.abs().max().item() for y in gb if y is not None), default=0.0)  # the step's largest element
        for j, (x, y) in enumerate(zip(ga, gb)):
            assert (x is None) == (y is None), f"{what}: pass {i + 1}, parameter {j}: a gradient on one side only"
            if x is None:
                continue
            scale = y.abs().max().item() if i == 0 else top
            tol = RTOL if i == 0 else LATER_RTOL
            torch.testing.assert_close(x, y, rtol=tol, atol=tol * scale, msg=lambda m: (
                f"{what}: pass {i + 1}, parameter {j} {tuple(x.shape)}, max |grad| {y.abs().max().item():.3g} "
                f"(the step's {top:.3g}): {m}"))


def atol_of(k, mu):
    if k == "loss":
        return LOSS_ATOL * (1 if mu == 1 else 10)
    if k == "grad_norm":
        return NORM_ATOL
    if k.startswith("mismatch_"):
        return MISMATCH_ATOL
    return CLIP_ATOL if k.startswith("clip_") and mu > 1 else LOG_ATOL


def same_step(ma, mb, what, mu):
    """The step's logged values: loss and grad norm, and every other one but timing (the tolerances above)."""
    (a,), (b,) = without_timing([ma]), without_timing([mb])
    assert a.keys() == b.keys(), f"{what}: logged keys {sorted(a.keys() ^ b.keys())} on one side only"
    rtol = RTOL if mu == 1 else LATER_RTOL
    for k in ["loss", "grad_norm"] + sorted(b.keys() - {"loss", "grad_norm"}):
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float):
            atol = atol_of(k, mu)
            assert abs(x - y) <= atol + rtol * abs(y), f"{what}: {k} {x!r} against {y!r} (diff {abs(x - y):.3g})"
        else:  # None (a step with no token to learn from logs no loss, ratio, kl), ints, strings: exact
            assert x == y, f"{what}: {k} {x!r} against {y!r}"


def weights(step_dir):
    """Every tensor of every safetensors file in a checkpoint (with LoRA the adapter, and at the end merged/)."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for f in sorted(files):
            if f.endswith(".safetensors"):
                out.update({f"{os.path.relpath(os.path.join(root, f), step_dir)}:{k}": v
                            for k, v in load_file(os.path.join(root, f)).items()})
    return out


def sanity(c, records, rows):
    """What a pinned configuration is there to exercise really happened."""
    if key(c) == key(EMPTY):  # every completion cut, so every row is masked out: no optimizer step at all
        assert all(m["truncated_frac"] == 1.0 for m in rows) and records == [], "not an empty step"
    elif c in PINNED:  # a real update: mu optimizer steps a step, on a non-zero gradient
        assert len(records) == 2 * c["mu"] and all(m["grad_norm"] > 0 for m in rows), "no real update"
    if key(c) in (key(BATCH_DS), key(FSDP_DS_MU2_KL)):
        assert any(m["ds_rounds"] > 0 for m in rows), "no extra round was drawn"


# ----------------------------------------------------------------------------- the properties

@SAME_DRAWS
@SETTINGS
@given(c=CONFIGS)
@pinned
def test_micro_batch_changes_memory_not_the_gradient(env, c):
    records, rows, _ = full_batch(env, c)
    sanity(c, records, rows)
    small, small_rows, _ = in_process(env, c, f"mb{c['micro']}", "--steps", "1", "--micro-batch", str(c["micro"]),
                                      *variant(c))
    what = f"--micro-batch {c['micro']} against 16"
    same_grads(steps_of(small, 1), steps_of(records, 1), what)
    same_step(small_rows[0], rows[0], what, c["mu"])


@SAME_DRAWS
@SETTINGS
@given(c=CONFIGS)
@pinned
def test_grad_ckpt_changes_nothing_but_memory(env, c):
    records, rows, _ = full_batch(env, c)
    ck, ck_rows, _ = in_process(env, c, "ckpt", "--steps", "1", "--grad-ckpt", *variant(c))
    same_grads(steps_of(ck, 1), steps_of(records, 1), "--grad-ckpt")
    same_step(ck_rows[0], rows[0], "--grad-ckpt", c["mu"])


@SAME_DRAWS
@SETTINGS
@given(c=CONFIGS)
@pinned
def test_resume_equals_uninterrupted(env, c):
    records, rows, out = full_batch(env, c)
    res = env.name(c, "resumed")
    shutil.copytree(out, res)
    shutil.rmtree(res / "step-2")  # stopped after step 1's checkpoint
    with recording(train) as again:
        train.main(["--resume", str(res)])
    # the same process, the same ops on the same inputs: equal bit for bit, not merely close
    assert without_timing(metrics(res)) == without_timing(rows)
    a, b = steps_of(again, 2), steps_of(records, 2)
    assert len(a) == len(b) and all(x is y is None or torch.equal(x, y) for ga, gb in zip(a, b)
                                    for x, y in zip(ga, gb)), "step 2's gradients"
    wa, wb = weights(res / "step-2"), weights(out / "step-2")
    assert wa.keys() == wb.keys() and wa
    for k in wb:
        assert torch.equal(wa[k], wb[k]), k


@SAME_DRAWS
@SETTINGS
@given(c=CONFIGS)
@pinned
def test_two_ranks_compute_the_update_of_one_process(env, c):
    records, rows, _ = full_batch(env, c)
    two, two_rows, _ = two_ranks(env, c)
    same_grads(steps_of(two, 1), steps_of(records, 1), "2 ranks against 1 process")
    same_step(two_rows[0], rows[0], "2 ranks against 1 process", c["mu"])
