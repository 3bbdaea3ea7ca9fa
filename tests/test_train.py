"""train.py on CPU with a tiny random checkpoint and tiny jsonl files made here: CLI, checkpoints, resume,
micro-batch invariance, no reference model at beta=0, and the documented errors."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import evaluate
import sample
import tokenizer
import train
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples?", "A box holds 12 pens. How many in 2 boxes?",
             "Sara reads 5 pages a day for 6 days. How many pages?", "What is 10 minus 7?",
             "A car has 4 wheels. How many wheels on 3 cars?", "Half of 18 is what?"]
ANSWERS = [7, 24, 30, 3, 12, 9]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    for split in ("train", "test"):
        with open(d / f"{split}.jsonl", "w") as f:
            for q, a in zip(QUESTIONS, ANSWERS):
                f.write(json.dumps({"question": q, "answer": f"Some work.\n#### {a}"}) + "\n")
    return str(d)


def chars_near_20(completion, **_):
    """A reward that varies between random completions, so the tiny model gets a real gradient."""
    return -abs(len(completion) - 20) / 20


@pytest.fixture
def toy_task(monkeypatch):
    g = train.TASKS["gsm8k"]
    monkeypatch.setitem(train.TASKS, "toy", train.Task(g.load, g.prompt, [(1.0, chars_near_20)], g.metrics))


def args(ckpt, data, out, *extra):
    return ["--model", ckpt, "--data-dir", data, "--out", str(out), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "12", "--eval-n", "3", "--eval-batch", "2", "--lr", "1e-2", "--warmup-steps", "1",
            "--seed", "3", *extra]


def metrics(run, name="metrics.jsonl"):
    return [json.loads(l) for l in open(os.path.join(run, name))]


TIMING = ("sample_s", "judge_s", "train_s", "step_s", "tokens_per_s")


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_cli_three_steps_writes_metrics_eval_and_loadable_checkpoint(tiny_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--task", "gsm8k", "--steps", "3", "--save-every", "2",
                        *args(tiny_ckpt, data_dir, out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "reward/correct", "reward/xml_count", "acc_strict", "acc_lenient",
                "zero_std_frac", "len_mean", "len_max", "truncated_frac", "clip_low", "clip_high", "kl",
                "grad_norm", "lr", "sample_s", "train_s", "step_s", "tokens_per_s"):
        assert key in rows[0], key
    evals = [json.loads(l) for l in open(out / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 3] and evals[0]["n"] == 3
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"} <= set(os.listdir(out / "step-3"))
    assert os.path.isdir(out / "step-2")
    ours = Transformer.from_pretrained(str(out / "step-3"))
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        logits = ours(ids)
    tr = pytest.importorskip("transformers")
    theirs = tr.AutoModelForCausalLM.from_pretrained(out / "step-3", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_resume_equals_uninterrupted(tiny_ckpt, data_dir, tmp_path, toy_task):
    out = tmp_path / "run"
    train.main(["--task", "toy", "--steps", "4", "--save-every", "2", "--keep-last", "5",
                *args(tiny_ckpt, data_dir, out)])
    full = metrics(out)
    assert full[0]["kl"] == 0 and full[2]["kl"] > 0 and full[0]["reward_std"] > 0  # a real update happened
    # a crash after step 2's checkpoint: step 4 never completed, step 3's write was cut half way
    shutil.rmtree(out / "step-4")
    os.rename(out / "step-2", out / "keep")
    shutil.copytree(out / "keep", out / ".step-3.tmp")
    os.rename(out / "keep", out / "step-2")
    train.main(["--resume", str(out)])
    resumed = metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert without_timing(resumed[2:]) == without_timing(full[2:])


def grads_before_each_step(monkeypatch):
    """Record the gradient of every parameter the optimizer holds, just before each AdamW step."""
    seen, real = [], torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_micro_batch_changes_memory_not_the_gradient(tiny_ckpt, data_dir, tmp_path, toy_task, monkeypatch):
    """The gradient before the optimizer step, not the weights after it: Adam's first step is about lr * sign(g),
    blind to a gradient's scale, so it cannot see a normaliser computed per micro-batch (which makes micro-batch
    1's gradient N times micro-batch N's). Rows here: 2 prompts x G 4 = 8."""
    for loss_type in ("grpo", "token", "dr_grpo"):
        grads, losses = {}, {}
        for mb in ("1", "3", "8"):
            seen = grads_before_each_step(monkeypatch)
            out = tmp_path / f"mb{mb}-{loss_type}"
            train.main(["--task", "toy", "--steps", "1", "--micro-batch", mb, "--loss-type", loss_type,
                        *args(tiny_ckpt, data_dir, out), "--eval-n", "0"])
            (grads[mb],), losses[mb] = seen, metrics(out)[0]["loss"]
        assert max(g.abs().max() for g in grads["8"]) > 1e-3, loss_type  # a real gradient
        for mb in ("1", "3"):
            assert losses[mb] == pytest.approx(losses["8"], rel=1e-5, abs=1e-7), (loss_type, mb)
            for a, b in zip(grads[mb], grads["8"]):  # fp32 sums in another order (and micro-batch 1 forwards each
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{loss_type} mb {mb}")  # row's prompt)


def test_beta_zero_loads_no_reference_model(tiny_ckpt, data_dir, tmp_path, monkeypatch):
    loads = []
    real = Transformer.from_pretrained.__func__
    monkeypatch.setattr(Transformer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    train.main(["--steps", "1", "--beta", "0", *args(tiny_ckpt, data_dir, tmp_path / "b0")])
    assert len(loads) == 1
    train.main(["--steps", "1", "--beta", "0.04", *args(tiny_ckpt, data_dir, tmp_path / "b1")])
    assert len(loads) == 3


def test_missing_data_dir(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="train.jsonl not found: --data-dir must hold"):
        train.main(["--steps", "1", *args(tiny_ckpt, str(tmp_path / "nope"), tmp_path / "r")])


def test_corrupt_data_line_named(tiny_ckpt, data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    with open(bad / "train.jsonl", "a") as f:
        f.write('{"question": "no answer here"}\n')
    with pytest.raises(SystemExit, match=r"train.jsonl:7: bad GSM8K line \(KeyError"):
        train.main(["--steps", "1", *args(tiny_ckpt, str(bad), tmp_path / "r")])


def test_bad_flags_and_unknown_task(tiny_ckpt, data_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown task 'chess'; known: gsm8k"):
        train.main(["--task", "chess", *args(tiny_ckpt, data_dir, tmp_path / "r")])
    with pytest.raises(SystemExit, match="--group-size must be >= 2, got 0"):
        train.main([*args(tiny_ckpt, data_dir, tmp_path / "r"), "--group-size", "0"])
    with pytest.raises(SystemExit, match="--model: .*no-model: model directory not found"):
        train.main(["--steps", "1", *args(str(tmp_path / "no-model"), data_dir, tmp_path / "r")])
    r = subprocess.run([sys.executable, "train.py", "--steps", "many"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value: 'many'" in r.stderr


def test_help_documents_every_flag_with_default():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for f in dataclasses.fields(config.TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout
    assert "(default: Qwen/Qwen2.5-0.5B-Instruct)" in " ".join(r.stdout.split())


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = config.TrainConfig(lr=1.0, warmup_steps=4, steps=20, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(1, 21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and abs(lrs[-1] - 0.1) < 1e-12


def test_eval_only_writes_eval_and_changes_no_weights(tiny_ckpt, data_dir, tmp_path):
    before = {k: v.clone() for k, v in Transformer.from_pretrained(tiny_ckpt).state_dict().items()}
    files = sorted(os.listdir(tiny_ckpt))
    out = tmp_path / "ev"
    r = subprocess.run([sys.executable, "train.py", "--eval-only", *args(tiny_ckpt, data_dir, out), "--eval-n", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    evals = [json.loads(l) for l in open(out / "eval.jsonl")]
    assert len(evals) == 1 and evals[0]["step"] == 0 and evals[0]["n"] == 5
    assert {"acc_strict", "acc_lenient"} <= set(evals[0])
    rows = [json.loads(l) for l in open(out / "eval" / "step-0.jsonl")]
    assert [row["index"] for row in rows] == list(range(5)) and all("completion" in row for row in rows)
    assert "eval 4/5" in r.stdout and "eval 5/5" in r.stdout and "ETA" in r.stdout  # progress, batch by batch
    assert not os.path.exists(out / "metrics.jsonl") and not any(p.startswith("step-") for p in os.listdir(out))
    assert sorted(os.listdir(tiny_ckpt)) == files
    after = Transformer.from_pretrained(tiny_ckpt).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_only_with_resume_or_into_a_run_dir_is_a_clear_error(tiny_ckpt, data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--eval-only evaluates --model"):
        train.main(["--eval-only", "--resume", str(tmp_path), *args(tiny_ckpt, data_dir, tmp_path / "r")])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match="already holds a run's metrics or evals; --eval-only writes to a new dir"):
        train.main(["--eval-only", *args(tiny_ckpt, data_dir, tmp_path / "run")])
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_partial_rewards_are_named_and_duplicates_refused(tiny_ckpt, data_dir, tmp_path, monkeypatch):
    from functools import partial
    import rewards as R
    g = train.TASKS["gsm8k"]
    near = partial(R.length_penalty, ideal=10)
    monkeypatch.setitem(train.TASKS, "p", train.Task(g.load, g.prompt, [(0.1, near)], g.metrics))
    train.main(["--task", "p", "--steps", "1", *args(tiny_ckpt, data_dir, tmp_path / "p")])
    row = metrics(tmp_path / "p")[0]
    assert row["reward/length_penalty"] < 0 and abs(row["reward_mean"] - 0.1 * row["reward/length_penalty"]) < 1e-6
    monkeypatch.setitem(train.TASKS, "d",
                        train.Task(g.load, g.prompt, [(1.0, near), (1.0, R.length_penalty)], g.metrics))
    with pytest.raises(ValueError, match="duplicate reward name 'length_penalty'"):
        train.main(["--task", "d", "--steps", "1", *args(tiny_ckpt, data_dir, tmp_path / "d")])


def test_arith_task_trains_end_to_end_with_options(tiny_ckpt, tmp_path):
    out = tmp_path / "arith"
    train.main(["--task", "arith", "--task-opts", "digits=1,ops=+-,terms=3", "--steps", "2",
                *args(tiny_ckpt, "", out)])
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2] and {"reward/correct", "reward/format_strict",
                                                    "acc_strict"} <= set(rows[0])
    cfg = json.load(open(out / "config.json"))
    assert cfg["task"] == "arith" and cfg["task_opts"] == "digits=1,ops=+-,terms=3"
    first = json.loads(open(out / "eval" / "step-0.jsonl").readline())
    assert first["index"] == 0


def test_bad_task_options_fail_before_loading(tiny_ckpt, tmp_path, monkeypatch):
    forbid_loading(monkeypatch, data=False)
    with pytest.raises(SystemExit, match="bad task option 'depth=3' for arith"):
        train.main(["--task", "arith", "--task-opts", "depth=3", *args(tiny_ckpt, "", tmp_path / "r")])
    with pytest.raises(SystemExit, match="arith: digits must be 1..9, got 0"):
        train.main(["--task", "arith", "--task-opts", "digits=0", *args(tiny_ckpt, "", tmp_path / "r")])


def test_offline_gsm8k_without_data_says_how_to_pass_data_dir(tiny_ckpt, tmp_path, monkeypatch):
    import tasks

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(tasks.urllib.request, "urlopen", offline)
    a = args(tiny_ckpt, "", tmp_path / "r", "--cache-dir", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="could not download GSM8K train.*pass --data-dir DIR"):
        train.main(["--steps", "1", *a])


def test_plot_one_run_and_several_overlaid(tmp_path):
    pytest.importorskip("matplotlib")
    for name, up in (("s0", 0.1), ("s1", 0.2)):
        d = tmp_path / name
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            for s in (1, 2, 3):
                f.write(json.dumps({"step": s, "reward_mean": up * s, "reward/correct": up * s, "acc_strict": up * s,
                                    "kl": 0.01 * s, "len_mean": 30, "len_max": 40}) + "\n")
        with open(d / "eval.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, "n": 9, "acc_strict": 0.1}) + "\n")
            f.write(json.dumps({"step": 3, "n": 9, "acc_strict": 0.1 + up}) + "\n")
    assert train.main(["--plot", str(tmp_path / "s0")]) == str(tmp_path / "s0" / "curves.png")
    both = str(tmp_path / "both.png")
    assert train.main(["--plot", f"{tmp_path / 's0'},{tmp_path / 's1'}", "--out", both]) == both
    assert os.path.getsize(both) > 10_000 and open(both, "rb").read(4) == b"\x89PNG"
    with pytest.raises(SystemExit, match="no metrics.jsonl there"):
        train.main(["--plot", str(tmp_path / "nope")])
    assert train.main(["--plot", str(tmp_path / "s1"), "--out", str(tmp_path)]) == str(tmp_path / "curves.png")
    with pytest.raises(SystemExit, match="name a run dir"):
        train.main(["--plot", ","])
    (tmp_path / "empty").mkdir()  # a run dir before its first step: no metrics.jsonl yet
    with pytest.raises(SystemExit, match="empty: no metrics.jsonl there"):
        train.main(["--plot", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="--plot: cannot write .*nodir/x.png"):
        train.main(["--plot", str(tmp_path / "s0"), "--out", str(tmp_path / "nodir" / "x.png")])


# ----------------------------------------------------------------------------- reliability (issue 12)

def interrupt_when(monkeypatch, cond):
    """Make train.score raise KeyboardInterrupt (a Ctrl-C mid-step) whenever cond() holds."""
    real = getattr(train.score, "real", train.score)

    def score(run, examples, sampled):
        if cond():
            raise KeyboardInterrupt
        return real(run, examples, sampled)
    score.real = real
    monkeypatch.setattr(train, "score", score)


def test_resume_twice_across_checkpoint_rotation(tiny_ckpt, data_dir, tmp_path, toy_task, monkeypatch):
    # keep-last 1 deletes the checkpoint a run resumed from; later checkpoints must still be complete model dirs
    flags = ["--task", "toy", "--steps", "6", "--save-every", "1", "--keep-last", "1", "--eval-every", "0"]
    full, out = tmp_path / "full", tmp_path / "run"
    train.main([*flags, *args(tiny_ckpt, data_dir, full)])
    interrupt_when(monkeypatch, lambda: os.path.exists(out / "step-2"))  # Ctrl-C in step 3
    with pytest.raises(SystemExit):
        train.main([*flags, *args(tiny_ckpt, data_dir, out)])
    assert sorted(os.listdir(out / "step-2")) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                          "tokenizer.json", "trainer_state.pt"])
    interrupt_when(monkeypatch, lambda: os.path.exists(out / "step-4"))  # Ctrl-C in step 5, after a resume
    with pytest.raises(SystemExit):
        train.main(["--resume", str(out)])
    assert sorted(os.listdir(out / "step-4")) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                          "tokenizer.json", "trainer_state.pt"])
    assert not os.path.exists(out / "step-2")  # the checkpoint resumed from was rotated away
    interrupt_when(monkeypatch, lambda: False)
    train.main(["--resume", str(out)])
    tok = open(os.path.join(tiny_ckpt, "tokenizer.json"), "rb").read()
    assert open(out / "step-6" / "tokenizer.json", "rb").read() == tok
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert without_timing(metrics(out)[4:]) == without_timing(metrics(full)[4:])  # the third segment


def test_sampling_streams_never_collide_and_big_seeds_train(tiny_ckpt, data_dir, tmp_path, toy_task):
    """Every (seed, prompt key) gets its own stream: the old seed * 2**32 + position overflowed manual_seed from seed
    2**32 on (3 * 2**30 with dynamic sampling), and seed s's extra rounds reused seed s + 2**30's streams."""
    seeds = (0, 1, 2 ** 30, 2 ** 32, 3 * 2 ** 30, 2 ** 64 - 1)
    keys = [(0, q, 0, 0) for q in (0, 1, 2 ** 32, 2 ** 62)]
    keys += [(1, t, r, j) for t in (1, 2) for r in (1, 2) for j in (0, 1)]
    streams = [sample.stream_seed(s, *k) for s in seeds for k in keys]
    assert len(set(streams)) == len(streams) and all(0 <= x < 2 ** 64 for x in streams)
    assert len({sample.stream_seed(s, *k, g) for s in seeds for k in keys for g in range(3)}) == len(streams) * 3
    train.main(["--task", "toy", "--steps", "1", *args(tiny_ckpt, data_dir, tmp_path / "big"), "--eval-n", "0",
                "--seed", str(2 ** 32 + 5), "--dynamic-sampling"])
    assert metrics(tmp_path / "big")[0]["step"] == 1
    with pytest.raises(SystemExit, match=r"--seed must be < 2\*\*64"):
        train.main(["--out", str(tmp_path / "r"), "--seed", str(2 ** 64)])


def test_a_crash_in_the_final_evaluation_is_redone_on_resume(tiny_ckpt, data_dir, tmp_path, toy_task, monkeypatch):
    """step-N/ is saved before the final evaluation: a crash there leaves a run with nothing left to train, and
    --resume must still write the final record, the number every learning claim rests on."""
    out, real = tmp_path / "run", train.evaluate_and_record

    def crash_at_the_end(*a, **k):
        if a[4] == 2:  # the step
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "evaluate_and_record", crash_at_the_end)
    with pytest.raises(SystemExit):
        train.main(["--task", "toy", "--steps", "2", *args(tiny_ckpt, data_dir, out), "--eval-n", "3"])
    assert os.path.isdir(out / "step-2") and [e["step"] for e in metrics(out, "eval.jsonl")] == [0]
    monkeypatch.setattr(train, "evaluate_and_record", real)
    train.main(["--resume", str(out)])
    assert [e["step"] for e in metrics(out, "eval.jsonl")] == [0, 2] and os.path.isfile(out / "eval" / "step-2.jsonl")
    train.main(["--resume", str(out)])  # now complete: nothing is redone
    assert [e["step"] for e in metrics(out, "eval.jsonl")] == [0, 2] and len(metrics(out)) == 2


def test_checkpoint_without_tokenizer_is_never_resumed(tiny_ckpt, data_dir, tmp_path, toy_task):
    out = tmp_path / "run"
    train.main(["--task", "toy", "--steps", "2", "--save-every", "1", "--keep-last", "5",
                *args(tiny_ckpt, data_dir, out)])
    os.remove(out / "step-2" / "tokenizer.json")  # e.g. written by the old code after a rotation
    assert checkpoint.checkpoints(str(out)) == [str(out / "step-1")]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        checkpoint.read_tokenizer_files(str(out / "step-2"))
    os.remove(out / "step-1" / "tokenizer.json")
    with pytest.raises(SystemExit, match="no complete checkpoint there"):
        train.main(["--resume", str(out)])


def test_a_flag_given_on_resume_overrides_the_saved_config_and_abbreviations_are_refused(tiny_ckpt, data_dir,
                                                                                          tmp_path, toy_task, capsys):
    out = tmp_path / "run"
    train.main(["--task", "toy", "--steps", "1", *args(tiny_ckpt, data_dir, out)])
    assert train.parse_args(["--max-new-tokens", "5", "--group-size=3"])[1] == {"max_new_tokens", "group_size"}
    for typo in (["--max-new-token", "16"], ["--max-new", "5"], ["--gro=3"]):  # a prefix is not silently that flag
        with pytest.raises(SystemExit) as e:
            train.parse_args(typo)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    train.main(["--resume", str(out), "--steps", "2", "--max-new-tokens", "5"])
    state = torch.load(out / "step-2" / "trainer_state.pt", weights_only=False)
    assert state["config"]["max_new_tokens"] == 5 and metrics(out)[1]["len_max"] <= 5


def test_a_new_run_never_writes_over_another(tiny_ckpt, data_dir, tmp_path, toy_task):
    """--out naming a finished run once cut its metrics.jsonl and overwrote config.json, and a later --resume mixed
    the stale step-N with the new config; now it is one line, and nothing in the dir changes."""
    out = tmp_path / "run"
    train.main(["--task", "toy", "--steps", "2", *args(tiny_ckpt, data_dir, out), "--save-every", "1"])
    before = {f: open(out / f).read() for f in ("metrics.jsonl", "config.json", "eval.jsonl")}
    with pytest.raises(SystemExit, match=f"--out {out} already holds a run; continue it with --resume {out}"):
        train.main(["--task", "toy", "--steps", "1", *args(tiny_ckpt, data_dir, out)])
    assert {f: open(out / f).read() for f in before} == before and sorted(os.listdir(out))[-2:] == ["step-1", "step-2"]
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text('{"step": 1}\n')  # a run stopped before its first checkpoint
    with pytest.raises(SystemExit, match="holds a run with no checkpoint to resume; delete it or pass a new --out"):
        train.main(["--task", "toy", "--steps", "1", *args(tiny_ckpt, data_dir, tmp_path / "early")])


@pytest.mark.parametrize("flags, message", [
    (["--task", "gsm8k"], "--task 'gsm8k' differs from the run's 'toy'"),
    (["--seed", "4"], "--seed 4 differs from the run's 3"),
    (["--task-opts", "digits=3"], "--task-opts 'digits=3' differs from the run's ''"),
])
def test_resume_refuses_what_would_change_the_run(tiny_ckpt, data_dir, tmp_path, toy_task, monkeypatch, flags,
                                                  message):
    out = tmp_path / "run"
    train.main(["--task", "toy", "--steps", "1", *args(tiny_ckpt, data_dir, out)])
    before = open(out / "metrics.jsonl").read()
    with monkeypatch.context() as mp, pytest.raises(SystemExit, match=message + ".*start a new run with --out"):
        forbid_loading(mp)  # refused before anything loads, and before any file of the run is touched
        train.main(["--resume", str(out), "--steps", "2", *flags])
    assert open(out / "metrics.jsonl").read() == before


def test_resume_judges_the_base_model_by_identity_not_path(tiny_ckpt, data_dir, tmp_path, toy_task):
    from conftest import write_checkpoint
    out, other = tmp_path / "run", write_checkpoint(str(tmp_path / "other"), seed=7)  # same shapes, other weights
    train.main(["--task", "toy", "--steps", "1", *args(tiny_ckpt, data_dir, out)])
    with pytest.raises(SystemExit, match="--model .*other is not the run's base model"):
        train.main(["--resume", str(out), "--steps", "2", "--model", other])
    shutil.copytree(tiny_ckpt, tmp_path / "copy")  # the same model elsewhere is the same model
    train.main(["--resume", str(out), "--steps", "2", "--model", str(tmp_path / "copy")])
    assert [m["step"] for m in metrics(out)] == [1, 2]
    with pytest.raises(SystemExit, match=f"--model {out} is a run dir, not a model: pass one of its checkpoints, "
                                         f"e.g. --model {out}/step-2"):
        train.main(["--eval-only", "--model", str(out), "--data-dir", data_dir, "--out", str(tmp_path / "ev")])


def test_bf16_autocast_on_cpu_is_exact_at_step_one_and_trains(tiny_ckpt, data_dir, tmp_path, toy_task, monkeypatch):
    # --dtype bf16 runs on CPU the mixed-precision code CUDA runs: sampler, log-probs, loss, optimizer, checkpoint
    seen = []  # (kind, autocast on?, the result, where) of every token_logprobs and generate call
    real_lp, real_gen = train.token_logprobs, train.generate
    monkeypatch.setattr(train, "token_logprobs", lambda *a, **k: seen.append(
        ("logprobs", torch.is_autocast_enabled("cpu"), real_lp(*a, **k), "update")) or seen[-1][2])
    for module, where in ((train, "rollout"), (evaluate, "eval")):  # patched where each calls generate
        monkeypatch.setattr(module, "generate", lambda *a, where=where, **k: seen.append(
            ("generate", torch.is_autocast_enabled("cpu"), real_gen(*a, **k), where)) or seen[-1][2])
    out = tmp_path / "bf16"
    log = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: log.append(" ".join(map(str, a))))
    train.main(["--task", "toy", "--steps", "2", "--dtype", "bf16", *args(tiny_ckpt, data_dir, out)])
    assert any("bf16 autocast; reference model: loaded (fp32 weights)" in l for l in log)
    rows = metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # same weights, same dtype, same autocast: k3 exactly 0
    # sampling, the policy's and the reference's log-probs, and evaluation all ran under bf16 autocast
    assert {where for *_, where in seen} == {"update", "rollout", "eval"} and all(on for _, on, _, _ in seen)
    assert all(t.dtype == torch.float32 for k, _, x, _ in seen if k == "logprobs"
               for t in (x if isinstance(x, tuple) else (x,)))  # (log-probs, entropies) in the update
    assert all(x.logprobs.dtype == torch.float32 for k, _, x, _ in seen if k == "generate")
    ours = Transformer.from_pretrained(str(out / "step-2"))
    assert all(p.dtype == torch.float32 for p in ours.parameters())  # fp32 master weights in the checkpoint
    init = Transformer.from_pretrained(tiny_ckpt)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), init.parameters()))


def test_reference_in_bf16_would_not_be_exact(tiny_ckpt):
    # why the reference keeps the policy's fp32 weights: a bf16 copy under the same autocast gives k3 != 0
    from grpo import k3, token_logprobs
    pol = Transformer.from_pretrained(tiny_ckpt)
    ref16 = Transformer.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    pid, cid = torch.randint(3, 300, (4, 7), generator=g), torch.randint(3, 300, (4, 6), generator=g)
    pm, cm = torch.ones_like(pid, dtype=torch.bool), torch.ones_like(cid, dtype=torch.bool)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = token_logprobs(pol, pid, pm, cid, cm)
        b = token_logprobs(Transformer.from_pretrained(tiny_ckpt), pid, pm, cid, cm)
        c = token_logprobs(ref16, pid, pm, cid, cm)
    assert torch.equal(a, b) and k3(a, b).max() == 0
    assert k3(a, c).max() > 0


def forbid_loading(mp, data=True):
    """Make any model or tokenizer load (and, with data, any dataset load) fail the test."""
    def boom(*a, **k):
        raise AssertionError("loaded something before refusing the settings")
    mp.setattr(Transformer, "from_pretrained", classmethod(boom))  # the class, wherever a file imported it
    mp.setattr(tokenizer.Tokenizer, "__init__", boom)
    for name in list(train.TASKS) if data else []:
        mp.setattr(train.TASKS[name], "load", boom)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Bad settings must be refused before data, tokenizer or model load: any load here fails the test."""
    forbid_loading(monkeypatch)


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    (["--group-size", "1"], "--group-size must be >= 2, got 1: GRPO's advantage"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    (["--lr=-1e-3"], "--lr must be > 0, got -0.001"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--beta=-1"], "--beta must be >= 0"),
    (["--eps-low", "1.5"], r"--eps-low must be in \[0, 1\)"),
    (["--device", "tpu0"], "--device 'tpu0' is not a device: use cuda, cuda:N, cpu or mps"),
    (["--eval-only", "--resume", "x"], "--eval-only evaluates --model"),
    (["--eval-only", "--eval-n", "0"], "--eval-only with --eval-n 0 would evaluate nothing"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--model", "/nonexistent/model"], "--model: /nonexistent/model: model directory not found"),
    (["--judge", "/nonexistent/judge"], "--judge: /nonexistent/judge: model directory not found"),
    (["--judge", "j", "--judge-rubric", "tone"], "--judge-rubric: rubric 'tone' is neither a built-in one"),
    (["--judge", "j", "--judge-weight", "0"], "--judge-weight must be > 0, got 0.0"),
    (["--judge-max-tokens", "0"], "--judge-max-tokens must be >= 1, got 0"),
    (["--tis-cap", "2", "--top-p", "0.9"], r"--tis-cap with --top-p 0.9 / --top-k 0: the sampler's log-probs"),
    (["--tis-cap", "2", "--top-k", "5"], r"--tis-cap with --top-p 1.0 / --top-k 5"),
    (["--lora-rank", "4", "--lora-dropout", "0.1", "--mu", "2"], "--lora-dropout 0.1 with --mu 2 / --tis-cap 0.0: "),
    (["--lora-rank", "4", "--lora-dropout", "0.1", "--tis-cap", "2"], "--lora-dropout 0.1 with --mu 1 / --tis-cap 2"),
])
def test_bad_settings_are_one_line_before_anything_loads(tmp_path, nothing_loads, flags, message):
    with pytest.raises(SystemExit, match=message):
        train.main(["--out", str(tmp_path / "r"), *flags])


def test_unusable_out_dir_and_missing_cuda_before_anything_loads(tmp_path, nothing_loads):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out .*file: exists and is not a directory"):
        train.main(["--out", str(tmp_path / "file")])
    with pytest.raises(SystemExit, match="--out .*file/run: cannot write there"):
        train.main(["--out", str(tmp_path / "file" / "run")])
    if os.getuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(SystemExit, match="cannot write there"):
            train.main(["--out", str(ro / "run")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: CUDA is not available here"):
            train.main(["--out", str(tmp_path / "r"), "--device", "cuda"])


def test_config_missing_a_key_names_file_and_key(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.load(open(bad / "config.json"))
    del cfg["hidden_size"]
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match=r"bad/config.json: missing required key 'hidden_size'"):
        Transformer.from_pretrained(str(bad))


def test_resume_after_the_base_model_moved_names_the_reference(tiny_ckpt, data_dir, tmp_path, toy_task, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt, base)
    out = tmp_path / "run"
    train.main(["--task", "toy", "--steps", "1", *args(str(base), data_dir, out)])
    shutil.move(base, tmp_path / "moved")
    with monkeypatch.context() as mp, pytest.raises(
            SystemExit, match=r"the reference model \(the run's initial weights, --model\): .*base: model "
                              r"directory not found.*pass --model NEW_PATH with --resume"):
        forbid_loading(mp, data=False)  # found out before the policy (from the checkpoint) loads
        train.main(["--resume", str(out), "--steps", "2"])
    train.main(["--resume", str(out), "--steps", "2", "--model", str(tmp_path / "moved")])
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_ctrl_c_is_one_line_and_exit_130(tiny_ckpt, data_dir, tmp_path, toy_task, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupt_when(monkeypatch, lambda: os.path.exists(out / "step-2"))  # Ctrl-C in step 3
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "toy", "--steps", "4", "--save-every", "2", *args(tiny_ckpt, data_dir, out)])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err == (f"train.py: interrupted at step 3; {out}/step-2 is complete. "
                   f"Resume with: python train.py --resume {out}\n")
    interrupt_when(monkeypatch, lambda: True)  # before the first checkpoint: nothing to resume
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "toy", "--steps", "4", "--save-every", "2", *args(tiny_ckpt, data_dir, tmp_path / "new")])
    assert e.value.code == 130 and "before the first checkpoint (step 2); nothing to resume" in capsys.readouterr().err
    interrupt_when(monkeypatch, lambda: False)
    train.main(["--resume", str(out)])
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_checkpoint_files_honour_the_umask(tiny_ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        Transformer.from_pretrained(tiny_ckpt).save_pretrained(str(tmp_path / "m"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m" / "model.safetensors").st_mode & 0o777 == 0o644  # safetensors alone gives 0600


def test_help_shows_each_default_once():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    assert "(default: )" not in text and "(default: None)" not in text
    assert "empty: cuda if available, else cpu" in text


# ----------------------------------------------------------------------------- wordle: states, whole games (issue 14)

def wordle_args(ckpt, out, mode, *extra):
    return ["--task", "wordle", "--task-opts", f"mode={mode},per_secret=1", "--model", ckpt, "--out", str(out),
            "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "6", "--eval-n", "3",
            "--eval-batch", "2", "--lr", "1e-2", "--warmup-steps", "1", "--seed", "3", *extra]


def test_wordle_trains_on_states_and_evaluates_by_playing_games(tiny_ckpt, tmp_path):
    out = tmp_path / "states"
    train.main([*wordle_args(tiny_ckpt, out, "states"), "--steps", "1"])
    row = metrics(out)[0]
    assert {"reward/wordle_correct", "reward/wordle_partial", "reward/wordle_consistent", "reward/wordle_format",
            "acc_secret", "acc_word"} <= set(row)
    ev = [json.loads(l) for l in open(out / "eval.jsonl")]
    assert [e["step"] for e in ev] == [0, 1] and {"acc_win", "guesses_won", "invalid_rate", "format_rate"} <= set(ev[0])
    games = [json.loads(l) for l in open(out / "eval" / "step-1.jsonl")]  # transcripts: one line per game
    assert len(games) == 3 and all(len(g["turns"]) == 6 and "text" in g["turns"][0] for g in games)


@pytest.fixture
def varied_wordle(monkeypatch):
    """wordle whose whole-game reward varies for a random model (its games are all invalid: reward -1 each)."""
    w = train.TASKS["wordle"]
    monkeypatch.setitem(train.TASKS, "wordle", dataclasses.replace(w, game_rewards=[*w.game_rewards,
                                                                                     (1.0, chars_near_20)]))


def test_wordle_whole_games_train_and_resume_equals_uninterrupted(tiny_ckpt, tmp_path, varied_wordle):
    out = tmp_path / "games"
    train.main([*wordle_args(tiny_ckpt, out, "games"), "--steps", "3", "--save-every", "1", "--keep-last", "5",
                "--eval-n", "0"])
    full = metrics(out)
    assert {"reward/game_win", "reward/game_speed", "reward/game_invalid", "acc_win", "acc_clean"} <= set(full[0])
    assert full[0]["reward/game_invalid"] == -1.0 and full[0]["reward_std"] > 0 and full[1]["kl"] > 0
    assert full[0]["len_mean"] > 6  # the model's tokens over six turns, not one completion's
    from test_rollouts import lines, matches_metrics
    logged = lines(out)  # the rollout log keeps each game's turns, and the secret as the gold answer
    assert [g["step"] for g in logged] == [1, 1, 2, 2, 3, 3]
    assert all(len(r["game"]["turns"]) == 6 and r["game"]["secret"] == g["gold"] for g in logged for r in g["rows"])
    assert all("text" in t for g in logged for r in g["rows"] for t in r["game"]["turns"])
    matches_metrics(logged, full)
    shutil.rmtree(out / "step-3")
    shutil.rmtree(out / "step-2")
    train.main(["--resume", str(out)])
    assert without_timing(metrics(out)[1:]) == without_timing(full[1:])
    assert lines(out) == logged  # steps 2 and 3 dropped on resume, and written again


def test_wordle_eval_only(tiny_ckpt, tmp_path):
    out = tmp_path / "ev"
    train.main([*wordle_args(tiny_ckpt, out, "games"), "--eval-only"])
    ev = json.loads(open(out / "eval.jsonl").read())
    assert ev["n"] == 3 and ev["acc_win"] == 0 and ev["invalid_rate"] == 1.0 and ev["guesses_won"] is None


def test_judge_adds_a_named_reward_and_its_cost_and_resumes_exactly(tiny_ckpt, tiny_judge, data_dir, tmp_path):
    """--judge on gsm8k: reward/judge is one more term of the total at its weight, judge_s / judge_mass /
    judge_len_corr are logged, and a resumed run equals the uninterrupted one (the judge is deterministic)."""
    out = tmp_path / "run"
    flags = ["--task", "gsm8k", "--steps", "3", "--save-every", "1", "--keep-last", "5", "--judge", tiny_judge,
             "--judge-weight", "0.5", "--judge-rubric", "reasoning", "--judge-max-tokens", "8",
             *args(tiny_ckpt, data_dir, out)]
    train.main(flags)
    rows = metrics(out)
    weights = {f.__name__: w for w, f in train.TASKS["gsm8k"].rewards} | {"judge": 0.5}
    for m in rows:
        assert 0 < m["reward/judge"] < 1 and 0 < m["judge_mass"] <= 1
        assert m["judge_len_corr"] is None or -1 <= m["judge_len_corr"] <= 1
        assert 0 < m["judge_s"] < m["step_s"]
        assert m["reward_mean"] == pytest.approx(sum(w * m[f"reward/{k}"] for k, w in weights.items()), abs=1e-6)
    assert len({m["reward/judge"] for m in rows}) == 3  # it scores what was sampled, not a constant
    shutil.rmtree(out / "step-3")
    train.main(["--resume", str(out)])
    assert without_timing(metrics(out)) == without_timing(rows)


def one_step_weights(ckpt, data, out, *flags):
    train.main(["--task", "toy", "--steps", "1", *args(ckpt, data, out), "--eval-n", "0", *flags])
    return Transformer.from_pretrained(str(out / "step-1")).state_dict(), metrics(out)[0]


def loss_calls(monkeypatch):
    """Record the ratio level and TIS weights of every grpo_loss call of train.update."""
    calls, real = [], train.grpo_loss

    def grpo_loss(*a, **k):
        calls.append({"ratio_level": k["ratio_level"], "is_weight": k["is_weight"]})
        return real(*a, **k)
    monkeypatch.setattr(train, "grpo_loss", grpo_loss)
    return calls


def test_entropy_and_sampler_mismatch_are_logged_and_tis_changes_nothing_in_fp32(tiny_ckpt, data_dir, tmp_path,
                                                                                  toy_task, monkeypatch):
    """fp32 sampler and trainer: the mismatch is rounding (< 1e-4 nats), so --tis-cap 2 weights every token ~1 and
    the gradient is the same to fp32 tolerance; entropy is logged every step."""
    calls = loss_calls(monkeypatch)
    _, m0 = one_step_weights(tiny_ckpt, data_dir, tmp_path / "a")
    assert calls and all(c["is_weight"] is None for c in calls)
    calls.clear()
    _, m1 = one_step_weights(tiny_ckpt, data_dir, tmp_path / "b", "--tis-cap", "2")
    w = torch.cat([c["is_weight"][c["is_weight"] > 0] for c in calls])  # the weights of the masked tokens
    assert calls and ((w - 1).abs() < 1e-3).all() and (w <= 2).all()
    assert m0["mismatch_mean"] < 1e-4 and m0["mismatch_max"] < 1e-3 and m0["mismatch_out_frac"] == 0.0
    assert 0 < m0["entropy"] <= math.log(400)  # nats, at most log(vocab)
    # the grad norm sees any reweighting (the weights after Adam's first step, about lr * sign(grad), would not)
    assert m1["loss"] == pytest.approx(m0["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)


def test_tis_weights_the_policy_gradient_only_and_by_the_right_ratio(tiny_ckpt, data_dir, tmp_path, toy_task,
                                                                    monkeypatch):
    """A sampler that claims every token twice as likely as the trainer finds it: w = pi_trainer / pi_sampler = 1/2.
    With --mu 2 the second pass has ratios != 1 and a KL gradient != 0 (the policy moved, the reference did not),
    and the first pass is the same in every run below (its KL gradient is 0 and Adam's first step is lr * sign(g),
    blind to the factor 1/2). So pass 2's gradients decompose: C (beta 0) is the policy-gradient term, A - C (beta
    0.04) the KL term, and TIS must give B = C / 2 + (A - C). An inverted ratio gives 2 C, weights on the KL term
    (A - C) / 2."""
    real = train.generate

    def overconfident(*a, **k):
        ro = real(*a, **k)
        ro.logprobs = ro.logprobs + math.log(2.0) * ro.completion_mask
        return ro
    monkeypatch.setattr(train, "generate", overconfident)
    second = {}
    for name, flags in (("A", ["--beta", "0.04"]), ("B", ["--beta", "0.04", "--tis-cap", "2"]), ("C", ["--beta", "0"])):
        seen = grads_before_each_step(monkeypatch)
        one_step_weights(tiny_ckpt, data_dir, tmp_path / name, "--mu", "2", "--grad-clip", "0", *flags)
        assert len(seen) == 2
        second[name] = torch.cat([g.flatten() for g in seen[1]])
    A, B, C = second["A"], second["B"], second["C"]
    assert (A - C).abs().max() > 1e-2 * C.abs().max()  # a real KL gradient on pass 2
    # Loose enough for the few weights whose pass-1 gradient sits near Adam's eps (there the sign rule fails), two
    # orders below what a wrong weighting moves: an inverted ratio is off by 1.5 |C|, weighted KL by |A - C| / 2
    torch.testing.assert_close(B, C / 2 + (A - C), rtol=1e-2, atol=1e-2 * C.abs().max().item())


def test_gspo_first_step_equals_grpo_and_mask_truncated_drops_cut_rows(tiny_ckpt, data_dir, tmp_path, toy_task,
                                                                       monkeypatch):
    """mu = 1: at the first pass every ratio is 1, where GSPO's gradient is the token-level one (grpo.py, note 9).
    --mask-truncated with 3 new tokens cuts every completion of the random model: no loss, no gradient, and the
    weights stay where they were."""
    calls = loss_calls(monkeypatch)
    _, m0 = one_step_weights(tiny_ckpt, data_dir, tmp_path / "a")
    _, m1 = one_step_weights(tiny_ckpt, data_dir, tmp_path / "b", "--ratio-level", "sequence")
    assert {c["ratio_level"] for c in calls} == {"token", "sequence"}  # the flag reaches the loss
    assert m1["loss"] == pytest.approx(m0["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    # mu 2: the second pass has ratios != 1, where one ratio per sequence is not one per token
    passes = {}
    for level in ("token", "sequence"):
        seen = grads_before_each_step(monkeypatch)
        one_step_weights(tiny_ckpt, data_dir, tmp_path / f"mu2-{level}", "--mu", "2", "--grad-clip", "0",
                         "--ratio-level", level, "--eps-low", "0.5")
        passes[level] = [torch.cat([g.flatten() for g in p]) for p in seen]
    (t1, t2), (s1, s2) = passes["token"], passes["sequence"]
    torch.testing.assert_close(s1, t1, rtol=1e-4, atol=1e-7)
    assert (s2 - t2).abs().max() > 1e-3 * t2.abs().max()
    cut, m = one_step_weights(tiny_ckpt, data_dir, tmp_path / "c", "--mask-truncated", "--max-new-tokens", "3",
                              "--beta", "0")
    assert m["truncated_frac"] == 1.0 and m["grad_norm"] == 0.0
    init = Transformer.from_pretrained(tiny_ckpt).state_dict()
    assert all(torch.equal(cut[k], init[k]) for k in init)


def test_a_step_with_nothing_to_learn_logs_null_and_runs_no_reference(tiny_ckpt, data_dir, tmp_path, toy_task,
                                                                       monkeypatch):
    """Every completion cut with --mask-truncated: no token to learn from, so no loss, ratio, KL or clip fraction
    exists (null, not 0), and the reference's forward, which could not matter, never runs. beta 0: no KL, ever."""
    models = []  # the model of every token_logprobs call
    real = train.token_logprobs
    monkeypatch.setattr(train, "token_logprobs", lambda m, *a, **k: models.append(m) or real(m, *a, **k))
    _, m = one_step_weights(tiny_ckpt, data_dir, tmp_path / "c", "--mask-truncated", "--max-new-tokens", "3")
    assert m["truncated_frac"] == 1.0 and m["grad_norm"] == 0.0
    assert all(m[k] is None for k in ("loss", "ratio", "kl", "clip_low", "clip_high")), m
    assert m["entropy"] is not None and m["mismatch_mean"] is not None  # these cover every sampled token
    assert models and len({id(x) for x in models}) == 1  # only the policy's forward (pass 0, for the metrics)
    models.clear()
    _, m = one_step_weights(tiny_ckpt, data_dir, tmp_path / "d", "--beta", "0")
    assert m["kl"] is None and m["ratio"] == pytest.approx(1.0) and m["loss"] is not None
    models.clear()
    _, m = one_step_weights(tiny_ckpt, data_dir, tmp_path / "e")  # with beta > 0 the reference runs, as before
    assert m["kl"] == 0.0 and len({id(x) for x in models}) == 2


def test_mismatch_is_null_where_the_sampler_logprobs_are_not_what_it_drew_from(tiny_ckpt, data_dir, tmp_path,
                                                                                toy_task):
    """Top-p/top-k: the sampler's log-probs are of the full softmax (grpo.py note 8); LoRA dropout: pi_old is a
    dropout sample. Either way mismatch_* would not measure the sampler/trainer gap, so it is null."""
    for i, flags in enumerate((["--top-p", "0.9"], ["--top-k", "20"], ["--lora-rank", "4", "--lora-dropout", "0.1"])):
        train.main(["--task", "toy", "--steps", "1", *args(tiny_ckpt, data_dir, tmp_path / str(i)), "--eval-n", "0",
                    *flags])
        m = metrics(tmp_path / str(i))[0]
        assert m["mismatch_mean"] is None and m["mismatch_max"] is None and m["mismatch_out_frac"] is None, flags
        assert m["entropy"] is not None and m["loss"] is not None


def flat_for_some(completion, question="", **_):
    """A reward with no spread for two of the six questions (every completion scores 0), varied for the rest."""
    return 0.0 if ("apples" in question or "pens" in question) else chars_near_20(completion)


@pytest.fixture
def flat_task(monkeypatch):
    g = train.TASKS["gsm8k"]
    monkeypatch.setitem(train.TASKS, "flat", train.Task(g.load, g.prompt, [(1.0, flat_for_some)], g.metrics))


def trained_batches(monkeypatch):
    """Record (rows, rewards of those rows) of every update: what a step actually trained on."""
    seen, real_adv = [], train.advantages

    def advantages(run, batch):
        total = batch.drawn.total
        seen.append(total if batch.rows is None else total[batch.rows])
        return real_adv(run, batch)
    monkeypatch.setattr(train, "advantages", advantages)
    return seen


def test_dynamic_sampling_trains_only_on_groups_with_a_spread_and_resumes_exactly(tiny_ckpt, data_dir, tmp_path,
                                                                                   flat_task, monkeypatch):
    seen = trained_batches(monkeypatch)
    out = tmp_path / "ds"
    flags = ["--task", "flat", "--steps", "4", "--save-every", "2", "--keep-last", "5", "--dynamic-sampling",
             *args(tiny_ckpt, data_dir, out)]
    train.main(flags)
    rows = metrics(out)
    assert any(m["ds_rounds"] > 0 for m in rows)  # flat groups were drawn, and more prompts were drawn for them
    for m, r in zip(rows, seen):
        assert m["ds_groups_kept"] == 2 and m["ds_groups_drawn"] == 2 * (m["ds_rounds"] + 1)
        g = r.view(-1, 4)
        assert g.shape[0] == 2 and (g.amax(1) > g.amin(1)).all()  # P groups, each with a spread
    plain = tmp_path / "plain"  # without the flag, flat groups are trained on (with zero advantage)
    train.main([a if a != str(out) else str(plain) for a in flags if a != "--dynamic-sampling"])
    assert any(m["zero_std_frac"] > 0 for m in metrics(plain)) and "ds_rounds" not in metrics(plain)[0]
    shutil.rmtree(out / "step-4")
    train.main(["--resume", str(out)])
    assert without_timing(metrics(out)) == without_timing(rows)


def test_dynamic_sampling_cap_trains_on_what_it_found(tiny_ckpt, data_dir, tmp_path, flat_task, monkeypatch):
    """--dynamic-max-rounds 0: no extra draws; a step trains on its informative groups only, possibly none."""
    seen = trained_batches(monkeypatch)
    out = tmp_path / "cap"
    train.main(["--task", "flat", "--steps", "3", "--dynamic-sampling", "--dynamic-max-rounds", "0",
                *args(tiny_ckpt, data_dir, out), "--eval-n", "0"])
    rows = metrics(out)
    for m, r in zip(rows, seen):
        assert m["ds_rounds"] == 0 and m["ds_groups_drawn"] == 2 and r.numel() == 4 * m["ds_groups_kept"]
        assert m["zero_std_frac"] == pytest.approx(1 - m["ds_groups_kept"] / 2)
    assert any(m["ds_groups_kept"] < 2 for m in rows)


def test_pick_rows_keeps_the_first_informative_groups_in_global_order():
    """Two ranks (P=2 each, G=3): the kept groups are those one process (P=4) keeps, split by who holds them,
    and a rank may keep none."""
    flags = [torch.tensor([True, False, False, True]), torch.tensor([True, True, True, True])]
    r0, kept = train.pick_rows(flags, 0, 2, 3)
    r1, _ = train.pick_rows(flags, 1, 2, 3)
    one, kept1 = train.pick_rows(flags, 0, 4, 3)
    assert kept == kept1 == 4  # round 0: prompts 0 and 3; round 1: prompts 0 and 1; the rest are over the cap
    assert r0.tolist() == [0, 1, 2, 6, 7, 8, 9, 10, 11] and r1.tolist() == [3, 4, 5]
    assert one.tolist() == [0, 1, 2, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # the same groups, in one process's rows
    r1, kept = train.pick_rows([torch.tensor([True, True, False, False])], 1, 2, 3)
    assert r1.tolist() == [] and kept == 2


@pytest.fixture
def tool_task(monkeypatch):
    """gsm8k with tools=calc and a reward that varies, its calls written with tags a tiny random model writes."""
    import calc as C
    import dataclasses
    monkeypatch.setattr(C, "OPEN", "9")
    monkeypatch.setattr(C, "CLOSE", "\ufffd")
    g = train.TASKS["gsm8k"]
    monkeypatch.setitem(train.TASKS, "tool", dataclasses.replace(g, game_rewards=[(1.0, chars_near_20)]))


def test_a_tool_task_trains_on_episodes_logs_its_calls_and_resumes_exactly(tiny_ckpt, data_dir, tmp_path, tool_task):
    import rollouts
    out = tmp_path / "run"
    train.main(["--task", "tool", "--task-opts", "tools=calc,calls=2", "--steps", "4", "--save-every", "2",
                "--keep-last", "5", *args(tiny_ckpt, data_dir, out, "--max-new-tokens", "24", "--beta", "0.04")])
    full = metrics(out)
    assert full[2]["kl"] > 0 and full[0]["reward_std"] > 0
    groups = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    recs = [r["game"] for g in groups for r in g["rows"]]
    calls = [c for rec in recs for c in rec["calls"]]
    assert len(calls) >= 4 and all(c["error"] for c in calls)  # a random model's calls: never arithmetic
    # each step's tool/* ratios are those of its rows' records (a ratio of sums; null where there is none)
    for m in full:
        rows = [r["game"] for g in groups if g["step"] == m["step"] for r in g["rows"]]
        n_calls = sum(len(r["calls"]) for r in rows)
        assert m["tool/calls"] == pytest.approx(n_calls / len(rows))
        assert m["tool/used_frac"] == pytest.approx(sum(bool(r["calls"]) for r in rows) / len(rows))
        assert m["tool/error_rate"] == (1.0 if n_calls else None)
        assert m["tool/correct_from_result"] is None  # no answer is right
    # the viewer marks the tool's results, from the record (not from tags the model could forge)
    step = next(g["step"] for g in groups if any(r["game"]["calls"] for r in g["rows"]))
    shown = rollouts.show(str(out), step, chars=0)
    rec = next(r["game"] for g in groups if g["step"] == step for r in g["rows"] if r["game"]["calls"])
    assert f"⟦{rollouts.one_line(rec['transcript'][1][1], 0)}⟧" in shown
    # evaluation played the episodes greedily and saved whole transcripts, the tool's parts marked
    ev = [json.loads(line) for line in open(out / "eval" / "step-4.jsonl")]
    assert all({"transcript", "calls", "question", "gold"} <= set(r) for r in ev)
    assert all(w in ("model", "tool") for r in ev for w, _ in r["transcript"])
    e = json.loads(open(out / "eval.jsonl").readlines()[-1])
    assert {"acc_strict", "tool/calls", "tool/error_rate"} <= set(e)  # the summary has the ratios
    # a crash after step 2's checkpoint: the resumed steps equal the uninterrupted ones, rollout log included
    log = (out / "rollouts.jsonl").read_text()
    shutil.rmtree(out / "step-4")
    train.main(["--resume", str(out)])
    assert without_timing(metrics(out)[2:]) == without_timing(full[2:])
    assert (out / "rollouts.jsonl").read_text() == log


def test_wordprob_with_and_without_the_tool_trains_end_to_end(tiny_ckpt, tmp_path):
    common = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-n", "2",
              "--model", tiny_ckpt]
    for tools, episodes in (("none", False), ("calc", True)):
        out = tmp_path / tools
        train.main(["--task", "wordprob", "--task-opts", f"tools={tools},train_size=20,test_size=4", "--out", str(out),
                    *common])
        m, e = metrics(out)[0], json.loads(open(out / "eval.jsonl").readlines()[-1])
        assert ("tool/calls" in m) == ("tool/calls" in e) == episodes  # no tool: no tool metric at all
        ev = json.loads(open(out / "eval" / "step-1.jsonl").readline())
        assert ("transcript" in ev) == episodes and ev["question"].startswith("First, ")
