"""torchrun data parallelism on CPU (gloo): one 2-rank step equals the 1-process step over the same prompts,
metrics included, and a 2-rank checkpoint resumes in 1 rank."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

from model import Transformer
from test_rollouts import matches_metrics
from test_train import ANSWERS, QUESTIONS, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py with a task whose reward varies between random completions (so the tiny model gets a real gradient)
LAUNCHER = f"""
import os
import sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
import train
from test_train import chars_near_20
g = train.TASKS["gsm8k"]
train.TASKS["toy"] = train.Task(g.load, g.prompt, [(1.0, chars_near_20)], g.metrics)
if os.environ.get("FLAT"):  # two of the six questions get no reward spread (dynamic sampling drops them)
    from test_train import flat_for_some
    train.TASKS["toy"] = train.Task(g.load, g.prompt, [(1.0, flat_for_some)], g.metrics)
if os.environ.get("NAN_RANK") == os.environ.get("RANK", "0"):  # a non-finite loss on this rank only
    real = train.grpo_loss
    train.grpo_loss = lambda *a, **k: (lambda loss, st: (loss * float("nan"), st))(*real(*a, **k))
if os.environ.get("RAISE_RANK") == os.environ.get("RANK", "0"):  # a reward function that raises on this rank only
    def broken(completion, **_):
        raise KeyError("gold")
    train.TASKS["toy"] = train.Task(g.load, g.prompt, [(1.0, broken)], g.metrics)
if os.environ.get("EVAL_RAISE_RANK") == os.environ.get("RANK", "0"):  # evaluation fails on this rank only
    import evaluate
    def broken_generate(*a, **k):
        raise RuntimeError("eval broke")
    evaluate.generate = broken_generate
if os.environ.get("SAVE_RAISE") and os.environ.get("RANK", "0") == "0":  # rank 0 cannot write its checkpoint
    def broken_save(*a, **k):
        raise OSError("disk full")
    train.save = broken_save
if os.environ.get("SAMPLER_SHIFT"):  # the sampler's log-probs off by 0 .. 0.4 a token: a sampler/trainer gap of size
    real_rollout = train.rollout
    def shifted(run, examples, keys):
        s = real_rollout(run, examples, keys)
        s.ro.logprobs = s.ro.logprobs + 0.1 * (s.ro.completion_ids % 5).float()  # (N, T)
        return s
    train.rollout = shifted
if os.environ.get("COUNT_GATHERS"):  # FSDP's all-gathers (one per unit) in each phase of a run, and outside them
    import atexit
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group
    gathers, real_gather = {{"all": 0, "phases": 0}}, fsdp_group.foreach_all_gather
    def counted(*a, **k):
        gathers["all"] += 1
        return real_gather(*a, **k)
    fsdp_group.foreach_all_gather = counted
    def counting(name, stage):
        def wrapped(*a, **k):
            before = gathers["all"]
            out = stage(*a, **k)
            gathers["phases"] += gathers["all"] - before
            print(f"all-gathers in {{name}}: {{gathers['all'] - before}}", flush=True)
            return out
        return wrapped
    for name in ("rollout", "run_eval", "reference_logprobs", "old_logprobs", "update"):
        setattr(train, name, counting(name, getattr(train, name)))
    atexit.register(lambda: print(f"all-gathers outside phases: {{gathers['all'] - gathers['phases']}}", flush=True))
train.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    return make_setup(tmp_path_factory, tiny_ckpt)


def make_setup(tmp_path_factory, tiny_ckpt):
    """(a dir with the toy data and the launcher, the tiny checkpoint): what run() takes as setup."""
    d = tmp_path_factory.mktemp("dist")
    for split in ("train", "test"):
        with open(d / f"{split}.jsonl", "w") as f:
            for q, a in zip(QUESTIONS, ANSWERS):
                f.write(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n")
    (d / "launch.py").write_text(LAUNCHER)
    return d, tiny_ckpt


def run(setup, out, nproc, *extra, env_extra=None, ok=True):
    d, ckpt = setup
    flags = ["--task", "toy", "--model", ckpt, "--data-dir", str(d), "--out", str(out), "--prompts-per-step", "4",
             "--group-size", "4", "--max-new-tokens", "10", "--eval-n", "5", "--eval-batch", "2", "--lr", "1e-2",
             "--warmup-steps", "1", "--micro-batch", "3", "--seed", "1", *extra]
    launch = [sys.executable, str(d / "launch.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(d / "launch.py")]
    rc, log = run_ranks(launch + flags, dict(env_extra or {}), out, retry=ok)
    if not ok:
        return rc, log
    assert rc == 0, log
    return log


# What a rank prints when it aborts in torch's native teardown at exit, after the run has finished (checkpoint and
# metrics written): outside the project's code and not what these tests measure (docs/multi-gpu.md), so such a run
# is run again; an abort that comes twice, in a run that had not finished, or any other failure still fails the test
TEARDOWN_ABORT = "terminate called without an active exception"


def finished_then_aborted(rc, log):
    """Whether a run ended in the teardown abort after finishing: its last checkpoint saved, no rank's error."""
    return rc != 0 and TEARDOWN_ABORT in log and re.search(r"(?m)^saved ", log) and "train.py: error" not in log


def run_ranks(cmd, env_extra, out, retry=True):
    """(return code, output) of a command (torchrun or one process), leaving no process behind; see TEARDOWN_ABORT."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    before = tempfile.mkdtemp() if retry and os.path.isdir(out) else None  # a resume: the dir to start again from
    try:
        if before:
            shutil.copytree(out, before, dirs_exist_ok=True)
        for attempt in (1, 2):
            p = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1", **env_extra),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                log, _ = p.communicate(timeout=300)  # fitted to a loaded 2-core machine
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # leave no rank behind
                    p.wait()
            if not (retry and attempt == 1 and finished_then_aborted(p.returncode, log)):
                return p.returncode, log
            warnings.warn(f"a finished run aborted in torch's teardown; run again: {' '.join(map(str, cmd))}")
            shutil.rmtree(out, ignore_errors=True)
            if before:
                shutil.copytree(before, out)
    finally:
        if before:
            shutil.rmtree(before, ignore_errors=True)


def metrics(out):
    return [json.loads(l) for l in open(out / "metrics.jsonl")]


def rollout_lines(out, step=None):
    """The groups of rollouts.jsonl (of one step)."""
    return [g for g in map(json.loads, open(out / "rollouts.jsonl")) if step in (None, g["step"])]


def same_rollouts(got, want, where):
    """The same groups in the same order with the same rows, advantages to fp32 summation order."""
    assert len(got) == len(want), where
    for g, w in zip(got, want):
        assert {**g, "rows": None} == {**w, "rows": None}, where
        for a, b in zip(g["rows"], w["rows"]):
            assert {**a, "advantage": 0} == {**b, "advantage": 0}, where
            assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-5), where  # None == None too


def assert_metric(k, got, want, where):
    """A logged value of another rank count (or a resume) equals the 1-process one, to fp32 summation order."""
    # mismatch_* measure the sampler's log-probs against the trainer's, a gap of fp32 rounding (~1e-6) when both
    # run in fp32, which the trainer's other batch make-up on 2 ranks rounds differently: it moves by as much as
    # it is (test_equivalence.MISMATCH_ATOL)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5 if k.startswith("mismatch_") else 1e-6), where


def test_two_ranks_equal_one_process_and_resume_in_one_rank(setup, tmp_path):
    run(setup, tmp_path / "one", 1, "--steps", "2", "--save-every", "1", "--keep-last", "5")
    log = run(setup, tmp_path / "two", 2, "--steps", "2", "--save-every", "1", "--keep-last", "5")
    assert "cpu x 2, fp32; reference model" in log  # really two ranks

    # the parameters after each step: Adam's first step amplifies fp32 summation-order noise on tiny gradients,
    # so the tolerance is 2% of the step size lr = 1e-2 (every weight moves by about lr)
    init = Transformer.from_pretrained(setup[1]).state_dict()
    for step in (1, 2):
        a = Transformer.from_pretrained(str(tmp_path / "one" / f"step-{step}")).state_dict()
        b = Transformer.from_pretrained(str(tmp_path / "two" / f"step-{step}")).state_dict()
        assert max((a[k] - init[k]).abs().max() for k in a) > 0.009
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=0, msg=f"step {step} {k}")

    # the logged metrics are global (reduced over ranks), so they equal the single process's
    one, two = without_timing(metrics(tmp_path / "one")), without_timing(metrics(tmp_path / "two"))
    assert [m["step"] for m in two] == [1, 2] and one[1]["kl"] > 0
    for m1, m2 in zip(one, two):
        assert m1.keys() == m2.keys()
        for k in m1:
            assert_metric(k, m2[k], m1[k], k)
    # the rollout log holds every rank's groups once, in the order and with the rows of 1 process (step 1, from
    # the same weights), and the means logged are its rows' means
    r2 = rollout_lines(tmp_path / "two")
    assert [(g["step"], g["group"]) for g in r2] == [(s, j) for s in (1, 2) for j in range(4)]
    same_rollouts(r2[:4], rollout_lines(tmp_path / "one", 1), "step 1")
    matches_metrics(r2, metrics(tmp_path / "two"))
    ev1 = [json.loads(l) for l in open(tmp_path / "one" / "eval.jsonl")]
    ev2 = [json.loads(l) for l in open(tmp_path / "two" / "eval.jsonl")]
    assert ev1 == ev2 and ev2[0]["n"] == 5  # eval sharded across ranks and gathered

    # a checkpoint written by 2 ranks resumes in 1 rank and reproduces step 2
    shutil.rmtree(tmp_path / "two" / "step-2")
    run(setup, tmp_path / "two", 1, "--resume", str(tmp_path / "two"))
    resumed = without_timing(metrics(tmp_path / "two"))
    assert [m["step"] for m in resumed] == [1, 2]
    for k in resumed[1]:
        assert_metric(k, resumed[1][k], two[1][k], k)
    assert rollout_lines(tmp_path / "two", 1) == r2[:4]  # step 2's lines were dropped and written again
    same_rollouts(rollout_lines(tmp_path / "two", 2), r2[4:], "resumed step 2")


def test_mismatch_of_real_size_is_reduced_over_ranks_as_one_process_computes_it(setup, tmp_path):
    """mismatch_mean, _max and _out_frac: a sum over ranks over a global count, a max over ranks, as 1 process."""
    # In fp32 the gap is rounding (~1e-6), below any tolerance; here a shifted sampler makes it 0 .. 0.4 a token,
    # so summing the max over ranks, or dividing by one rank's tokens, would show
    env = {"SAMPLER_SHIFT": "1"}
    run(setup, tmp_path / "one", 1, "--steps", "1", "--eval-n", "0", env_extra=env)
    run(setup, tmp_path / "two", 2, "--steps", "1", "--eval-n", "0", env_extra=env)
    (m1,), (m2,) = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m1["mismatch_mean"] > 0.05 and m1["mismatch_max"] == pytest.approx(0.4, abs=1e-4)
    assert 0 < m1["mismatch_out_frac"] < 1  # shifts of 0.3 and 0.4 fall outside [0.8, 1.25], the rest inside
    for k in ("mismatch_mean", "mismatch_max", "mismatch_out_frac"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k


def test_indivisible_prompts_per_step_is_a_clear_error(setup, tmp_path):
    with pytest.raises(AssertionError, match="--prompts-per-step 3 is not divisible by the 2 ranks"):
        run(setup, tmp_path / "x", 2, "--steps", "1", "--prompts-per-step", "3")


@pytest.mark.parametrize("env, message", [
    ({"NAN_RANK": "1"}, "rank 1 of 2 failed at step 1: non-finite loss nan"),
    ({"RAISE_RANK": "0"}, "rank 0 of 2 failed at step 1: KeyError: 'gold' (traceback above)"),
    ({"EVAL_RAISE_RANK": "1"}, "rank 1 of 2 failed at step 0: RuntimeError: eval broke (traceback above)"),
    ({"SAVE_RAISE": "1"}, "rank 0 of 2 failed at step 1: OSError: disk full (traceback above)"),
])
def test_one_rank_failing_ends_every_rank_with_its_message(setup, tmp_path, env, message):
    # without fail_together the failing rank exits and the other waits in all_reduce (or torchrun kills it
    # silently); here both reach the same check, and each exits non-zero with the same line
    rc, log = run(setup, tmp_path / "x", 2, "--steps", "2", "--eval-n", "2", "--save-every", "1", env_extra=env,
                  ok=False)
    assert rc != 0
    assert log.count("train.py: error: " + message) == 2, log  # printed by both ranks


def test_lora_two_ranks_equal_one_process(setup, tmp_path):
    # the adapters start equal on every rank (seeded apart from the per-rank global RNG), and only they are reduced
    flags = ("--steps", "1", "--lora-rank", "4", "--lora-alpha", "8", "--eval-n", "1", "--log-rollouts", "3")
    run(setup, tmp_path / "one", 1, *flags)
    run(setup, tmp_path / "two", 2, *flags)
    # --log-rollouts 3: the step's first 3 groups, 2 from rank 0 and 1 from rank 1, as 1 process logs them
    assert [g["group"] for g in rollout_lines(tmp_path / "two")] == [0, 1, 2]
    same_rollouts(rollout_lines(tmp_path / "two"), rollout_lines(tmp_path / "one"), "capped")
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "one" / "step-1" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "step-1" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(".lora_B." in k and a[k].abs().max() > 0 for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=0, msg=k)  # lr 1e-2: 2% of Adam's first step
    for m1, m2 in zip(without_timing(metrics(tmp_path / "one")), without_timing(metrics(tmp_path / "two"))):
        for k in m1:
            assert_metric(k, m2[k], m1[k], k)


def two_ranks_step_by_step(setup, tmp_path, steps, flags, env_extra=None):
    """(1-process metrics, 2-rank metrics) of `steps` steps, where 2 ranks run each step from the 1-process run's
    previous checkpoint. Compared step after step from the same weights: otherwise Adam's fp32 noise (up to 2e-4
    after one step at lr 1e-2) can flip a sampled token in a later step, and every later number with it, which
    made a 3-step comparison fail now and then. The lr is constant, so a run stopped at step s equals the longer
    run's first s steps."""
    flags = (*flags, "--min-lr-ratio", "1", "--save-every", "1", "--keep-last", str(steps))
    run(setup, tmp_path / "one", 1, *flags, "--steps", str(steps), env_extra=env_extra)
    one, two = without_timing(metrics(tmp_path / "one")), []
    for s in range(1, steps + 1):
        d = tmp_path / f"two-{s}"
        if s == 1:
            run(setup, d, 2, *flags, "--steps", "1", env_extra=env_extra)
        else:  # the 1-process run's checkpoint of step s-1, resumed by 2 ranks for one step
            shutil.copytree(tmp_path / "one", d)
            for k in range(s, steps + 1):
                shutil.rmtree(d / f"step-{k}")
            run(setup, d, 2, *flags, "--resume", str(d), "--steps", str(s), env_extra=env_extra)
        two.append(without_timing(metrics(d))[s - 1])
    return one, two


def test_dynamic_sampling_two_ranks_equal_one_process(setup, tmp_path):
    """Extra rounds are drawn and kept by global decisions (every rank in every exchange), so 2 ranks keep the groups
    1 process keeps, even when one rank keeps more of them than the other, and the normaliser is the global one."""
    flags = ("--dynamic-sampling", "--dynamic-max-rounds", "2", "--eval-n", "1")
    one, two = two_ranks_step_by_step(setup, tmp_path, 3, flags, env_extra={"FLAT": "1"})
    assert any(m["ds_rounds"] > 0 for m in one) and [m["step"] for m in two] == [1, 2, 3]
    for m1, m2 in zip(one, two):
        assert m1.keys() == m2.keys()
        for k in m1:
            assert_metric(k, m2[k], m1[k], (m1["step"], k))
    # the rollout log: the groups 1 process logs, dropped ones included; a 2-rank resume of the 1-process run
    # kept the steps before its checkpoint and dropped the rest
    ones = rollout_lines(tmp_path / "one")
    assert any(not g["kept"] for g in ones)
    for s in (1, 2, 3):
        twos = rollout_lines(tmp_path / f"two-{s}")
        assert [g for g in twos if g["step"] < s] == [g for g in ones if g["step"] < s]
        same_rollouts([g for g in twos if g["step"] >= s], rollout_lines(tmp_path / "one", s), s)
