"""rollouts.py and train.log_rollouts: the log holds what the step's metrics are made of (also the groups dynamic
sampling dropped), a resume truncates it, --log-rollouts caps it or switches it off, and the viewer prints a step;
eval/step-N.jsonl rows read on their own. 2 ranks: test_distributed.py; whole games: test_train.py."""
import json
import os
import shutil

import pytest

import rollouts
import test_train
import train
from test_train import ANSWERS, QUESTIONS, args, metrics

data_dir, flat_task = test_train.data_dir, test_train.flat_task  # its fixtures, used here too


def lines(out):
    return [json.loads(line) for line in open(os.path.join(out, "rollouts.jsonl"))]


def matches_metrics(groups, rows):
    """Each step's logged means are the means over its logged rows: rewards, metrics, lengths, flat groups."""
    for m in rows:
        gs = [g for g in groups if g["step"] == m["step"]]
        rs = [r for g in gs for r in g["rows"]]

        def mean(f):
            return sum(map(f, rs)) / len(rs)
        assert m["reward_mean"] == pytest.approx(mean(lambda r: r["reward"]), abs=1e-5)
        for k in (k for k in m if k.startswith("reward/")):
            assert m[k] == pytest.approx(mean(lambda r: r["rewards"][k[7:]]), abs=1e-5), k
        for k in (k for k in m if k.startswith("acc_")):
            assert m[k] == pytest.approx(mean(lambda r: r[k])), k
        assert m["len_mean"] == pytest.approx(mean(lambda r: r["length"]))
        assert m["truncated_frac"] == pytest.approx(mean(lambda r: not r["stopped"]))
        flat = [len({r["reward"] for r in g["rows"]}) == 1 for g in gs]
        assert m["zero_std_frac"] == pytest.approx(sum(flat) / len(gs))
        assert len(gs) == m.get("ds_groups_drawn", len(gs)) and sum(g["kept"] for g in gs) == m.get(
            "ds_groups_kept", len(gs))
        for g in gs:  # a kept group's advantages sum to 0 (flat: all 0); a dropped group has none
            advs = [r["advantage"] for r in g["rows"]]
            assert (sum(advs) == pytest.approx(0, abs=1e-4)) if g["kept"] else advs == [None] * len(advs)


def test_log_reproduces_the_metrics_with_dropped_groups_marked_and_resume_truncates_it(tiny_ckpt, data_dir,
                                                                                      tmp_path, flat_task, capsys):
    out = tmp_path / "ds"
    train.main(["--task", "flat", "--steps", "2", "--save-every", "1", "--keep-last", "5", "--dynamic-sampling",
                *args(tiny_ckpt, data_dir, out), "--eval-n", "2"])
    groups, rows = lines(out), metrics(out)
    assert [(g["step"], g["round"], g["group"]) for g in groups] == [
        (m["step"], k, j) for m in rows for k in range(m["ds_rounds"] + 1) for j in range(2)]  # draw order
    assert any(not g["kept"] for g in groups)  # flat groups were drawn and dropped, and are in the log
    matches_metrics(groups, rows)
    for g in groups:  # the prompt's example, once per group, and G rows
        assert QUESTIONS[g["index"]] == g["question"] and g["gold"] == str(ANSWERS[g["index"]])
        assert len(g["rows"]) == 4 and all(isinstance(r["completion"], str) for r in g["rows"])

    # eval/step-N.jsonl: each row with its question and gold answer (the test split is the same questions here)
    ev = [json.loads(line) for line in open(out / "eval" / "step-0.jsonl")]
    assert [(r["index"], r["question"], r["gold"]) for r in ev] == [(i, QUESTIONS[i], str(ANSWERS[i]))
                                                                    for i in (0, 1)]

    # the viewer: a step's groups, the question once per group, rows by advantage
    s = next(g["step"] for g in groups if not g["kept"])
    capsys.readouterr()
    rollouts.main([str(out), "--step", str(s)])
    text = capsys.readouterr().out
    shown = [g for g in groups if g["step"] == s]
    assert text.startswith(f"step {s}: {len(shown)} groups of 4, {sum(not g['kept'] for g in shown)} dropped")
    assert text.count("question: ") == len(shown) and text.count("| dropped") == sum(not g["kept"] for g in shown)
    kept = next(g for g in shown if g["kept"])
    block = text.split(f"question: {kept['question']}\n")[1].split("\n")[2:6]  # after its gold and column names
    assert [float(row.split()[0]) for row in block] == sorted((round(r["advantage"], 3) for r in kept["rows"]),
                                                             reverse=True)
    rollouts.main([str(out)])  # the last step by default
    assert capsys.readouterr().out.startswith("step 2: ")
    for argv, message in (([str(tmp_path / "none")], "no such run dir"), ([str(tmp_path)], "no rollouts.jsonl there"),
                          ([str(out), "--step", "7"], "no step 7; it holds steps 1 to 2")):
        with pytest.raises(SystemExit, match=f"^rollouts.py: error: .*{message}"):
            rollouts.main(argv)

    # resume: the steps past the checkpoint, and a line a crash cut short, are dropped and written again
    shutil.rmtree(out / "step-2")
    with open(out / "rollouts.jsonl", "a") as f:
        f.write('{"step": 3, "round": 0, "gro')
    train.main(["--resume", str(out)])
    assert lines(out) == groups


def test_log_rollouts_caps_or_switches_off_the_log(tiny_ckpt, data_dir, tmp_path):
    for n, want in (("0", None), ("1", [0])):
        out = tmp_path / f"cap{n}"
        train.main(["--task", "gsm8k", "--steps", "1", *args(tiny_ckpt, data_dir, out), "--eval-n", "0",
                    "--log-rollouts", n])
        assert (not os.path.exists(out / "rollouts.jsonl")) if want is None else \
            [g["group"] for g in lines(out)] == want
    with pytest.raises(SystemExit, match="--log-rollouts must be -1 .all., 0 .none. or a number of groups, got -2"):
        train.main(["--out", str(tmp_path / "bad"), "--log-rollouts", "-2"])


def test_a_row_reads_as_the_log_writes_it():
    row, = rollouts.rollout_rows(texts=["a\nb"], extra=[{}], total=[0.30000001192092896], rewards={"f": [1.0]},
                                 metrics={"acc": [0.0]}, lengths=[3], stopped=[True], advantages=[None])
    assert row == {"completion": "a\nb", "reward": 0.3, "rewards": {"f": 1}, "advantage": None, "length": 3,
                   "stopped": True, "acc": 0}
    game = {"turns": [{"guess": "CRANE", "valid": True, "feedback": "XYGXX", "text": "<guess>crane</guess>"},
                      {"guess": None, "valid": False, "feedback": None, "text": "no\tguess"}], "won": False}
    assert rollouts.game_text(game) == "CRANE=XYGXX ?(no\\tguess)"
    assert rollouts.one_line("x" * 20, 10) == "xxxxxxx..." and rollouts.one_line("x" * 20, 0) == "x" * 20
