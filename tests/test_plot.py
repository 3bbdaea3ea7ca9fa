"""plot.py: the evaluations side by side (text, no matplotlib), and curves whose steps are whole and whose points
show even for a one-step run (the Figure's lines and ticks, no pixels)."""
import json

import pytest

import plot
import train


def write_run(d, steps, evals):
    """A run dir holding metrics.jsonl for steps 1..steps and eval.jsonl with {step: acc_strict} (None: no file)."""
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "reward_mean": 0.1 * s, "reward/correct": 0.1 * s, "acc_strict": 0.1,
                                "kl": None if s == 1 else 0.01, "len_mean": 30, "len_max": 40}) + "\n")
    if evals is not None:
        with open(d / "eval.jsonl", "w") as f:
            for s, acc in evals.items():
                f.write(json.dumps({"step": s, "n": 9, "acc_strict": acc, "acc_lenient": acc + 0.1}) + "\n")
    return str(d)


def test_eval_table_puts_first_and_final_evaluations_side_by_side(tmp_path, capsys):
    a = write_run(tmp_path / "a", 3, {3: 0.5, 0: 0.125})  # out of order on disk: still first -> final
    b = write_run(tmp_path / "b", 1, {0: 0.25})  # one evaluation: one number
    c = write_run(tmp_path / "c", 2, None)  # no evaluation yet
    train.main(["--plot", f"{a},{b},{c}", "--out", str(tmp_path / "x.png")])  # with or without matplotlib
    out = capsys.readouterr().out.splitlines()
    i = out.index("held-out evaluations (greedy pass@1), first -> final:")
    head, ra, rb, rc = (line.split() for line in out[i + 1:i + 5])
    assert head == ["run", "steps", "eval", "at", "n", "acc_strict", "acc_lenient"]
    assert ra == [a, "3", "0", "->", "3", "9", "0.125", "->", "0.500", "0.225", "->", "0.600"]
    assert rb == [b, "1", "0", "9", "0.250", "0.350"]
    assert rc == [c, "2", "-", "-", "-", "-"]
    assert len({len(line) for line in out[i + 1:i + 5]}) == 1  # aligned columns
    plot.main([a, b])  # the script takes several run dirs (a shell glob) as well as commas
    assert f"{b}  " in capsys.readouterr().out


def test_curves_have_whole_steps_and_a_one_step_run_shows(tmp_path):
    pytest.importorskip("matplotlib")
    runs = plot.read_runs(",".join([write_run(tmp_path / "one", 1, {0: 0.1, 1: 0.2}),
                                    write_run(tmp_path / "three", 3, {0: 0.1, 3: 0.3})]))
    fig = plot.figure(runs)
    for ax in fig.axes:
        assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_title()  # no 1.25 steps
        lines = ax.get_lines()
        assert lines and all(line.get_marker() not in (None, "", "None") for line in lines), ax.get_title()
    reward = fig.axes[0].get_lines()
    assert [list(line.get_xdata()) for line in reward] == [[1], [1, 2, 3]]  # the one-step run is a drawn point
    long = plot.figure(plot.read_runs(write_run(tmp_path / "long", 60, None)))
    assert long.axes[0].get_lines()[0].get_marker() in (None, "", "None")  # many points: a plain line
