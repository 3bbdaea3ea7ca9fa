"""report.py: --report-to sends every metrics.jsonl and eval.jsonl value to TensorBoard and W&B (offline here), read
back from their files, and a resume continues the same log; a tool not installed is one line before anything loads;
the heartbeat names the step and stage of a silence too long, and stays quiet in a steady run."""
import glob
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from types import SimpleNamespace

import pytest

import report
import train


def run_args(ckpt, out, *extra):
    return ["--task", "arith", "--model", ckpt, "--out", str(out), "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "6", "--eval-n", "2", "--eval-batch", "2", "--lr", "1e-2", "--warmup-steps", "1",
            "--seed", "3", *extra]


def records(path):
    return [json.loads(line) for line in open(path)]


def tensorboard_scalars(log_dir):
    """{tag: [(step, value)]} of a TensorBoard log dir, as TensorBoard reads it (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_history(path):
    """{step: {key: value}} of an offline W&B run's .wandb file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, part, out = open(path, "rb").read(), 7, b"", {}  # 7: the ':W&B' header, magic and version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])  # crc32, length, FULL/FIRST/MIDDLE/LAST
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole Record
            r = pb.Record()
            r.ParseFromString(part)
            part = b""
            if r.WhichOneof("record_type") == "history":
                out.setdefault(r.history.step.num, {}).update(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return out


def test_tensorboard_and_wandb_get_every_logged_value_and_a_resume_continues(tiny_ckpt, tmp_path, monkeypatch,
                                                                             capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # its files go in the run dir
    out = tmp_path / "run"
    train.main(run_args(tiny_ckpt, out, "--steps", "3", "--save-every", "2", "--keep-last", "5", "--report-to",
                        "tensorboard,wandb"))
    console = capsys.readouterr().out
    assert f"every setting in {out}/config.json" in console and '{"task"' not in console  # a summary, not a dump
    first_try = records(out / "metrics.jsonl")
    # a crash that lost step 3's checkpoint: the resume redoes step 3 and the final evaluation
    shutil.rmtree(out / "step-3")
    train.main(["--resume", str(out)])
    rows, evals = records(out / "metrics.jsonl"), records(out / "eval.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [e["step"] for e in evals] == [0, 3]
    assert rows[2]["step_s"] != first_try[2]["step_s"]  # the redone step 3 is told apart by its timing
    want = {}  # {(tag, step): value} of every number in metrics.jsonl and eval.jsonl
    for prefix, recs in (("train", rows), ("eval", evals)):
        for r in recs:
            want.update({(f"{prefix}/{k}", r["step"]): v for k, v in r.items() if k != "step" and v is not None})
    assert ("train/kl", 1) in want and ("eval/acc_strict", 3) in want and ("train/reward/correct", 2) in want

    tb = tensorboard_scalars(str(out / "tb"))  # float32 in the file; each step once, the redone step's values
    assert {(tag, s): v for tag, pts in tb.items() for s, v in pts} == pytest.approx(want, rel=1e-6, abs=1e-30)
    assert all(len({s for s, _ in pts}) == len(pts) for pts in tb.values())

    run_id = open(out / "wandb-id").read().strip()
    tries = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(tries) == 2 and all(t.endswith(f"run-{run_id}.wandb") for t in tries)  # one W&B run, resumed
    got = {}
    for t in tries:  # W&B merges the tries; the later one's steps replace the earlier's
        for step, items in wandb_history(t).items():
            got.update({(k, step): v for k, v in items.items() if not k.startswith("_")})
    assert got == want


def test_a_tool_not_installed_or_unknown_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    a = run_args(str(tmp_path / "no-model"), tmp_path / "r", "--steps", "1")  # a model load would fail differently
    with pytest.raises(SystemExit, match="--report-to mlflow: unknown tool 'mlflow'; known: tensorboard, wandb"):
        train.main([*a, "--report-to", "mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *p: None if name == "wandb" else real(name, *p))
    with pytest.raises(SystemExit, match="--report-to wandb: wandb is not installed; pip install wandb"):
        train.main([*a, "--report-to", "wandb"])
    assert report.tools("") == report.tools("none") == ()
    cfg = SimpleNamespace(report_to="wandb", out=str(tmp_path / "r"))
    assert report.start(cfg, start=0, rank=1).wb is None  # only rank 0 reports (and checks)
    assert not os.path.exists(tmp_path / "r" / "wandb-id")


# ----------------------------------------------------------------------------- the heartbeat

def loop(run, stages, say):
    """Stands for train.train_loop: a `step` local, each stage a function of this file, a line at each step's end."""
    step = 0
    for step, seconds in stages:
        t_step = time.time()  # noqa: F841 (read by the heartbeat, as train_loop's)
        rollout(run, seconds, say)
        run.log(f"step {step} done")


def rollout(run, seconds, say):
    """A stage that takes `seconds`, printing a line every `say` seconds if say > 0."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        time.sleep(say or seconds)
        if say:
            run.log("working")


def beats(stages, first, say=0.0):
    """The heartbeat's lines while loop runs the stages [(step, seconds)]."""
    lines = []
    run = SimpleNamespace(rank=0, log=lambda *a, **k: lines.append(" ".join(map(str, a))), cfg=SimpleNamespace(steps=9))
    with report.heartbeat(run, loop=loop, first=first, poll=0.01):
        loop(run, stages, say)
    return [line for line in lines if "still in" in line]


def test_heartbeat_names_step_and_stage_of_a_long_silence_and_backs_off():
    got = beats([(1, 1.2)], first=0.15)  # silent 1.2 s: lines at 0.15, 0.45, 1.05 s (each wait doubles), not 8
    assert 2 <= len(got) <= 4 and got[0].startswith("  step 1/9: still in rollout (")


def test_heartbeat_is_quiet_while_lines_come_and_adapts_to_the_step_time():
    assert beats([(1, 0.6)], first=0.3, say=0.03) == []  # a line every 0.03 s: never silent 0.3 s
    # step 1 is silent past first=0.15; once it has taken 0.5 s, a silence must pass twice that to be news
    got = beats([(1, 0.5), (2, 0.5), (3, 0.35)], first=0.15)
    assert got and all(line.startswith("  step 1/9: still in rollout") for line in got)


def test_where_finds_the_loop_step_and_the_stage_past_a_wrapper():
    torch = pytest.importorskip("torch")

    @torch.no_grad()  # a wrapper frame of another file between the loop and the stage, as train.py's stages have
    def stage():
        return report.where(sys._getframe(), fake_loop)

    def fake_loop():
        step, t_step = 7, 123.0  # noqa: F841 (read by where)
        return stage()
    assert fake_loop() == (7, 123.0, "stage")
    assert report.where(sys._getframe(), fake_loop) == (None, None, None)  # outside the loop


def test_heartbeat_reads_the_loop_variables_train_loop_has():
    """report.where reads train_loop's `step` and `t_step` by name: a rename there must fail here, not go quiet."""
    import train
    assert {"step", "t_step"} <= set(train.train_loop.__code__.co_varnames)
