"""Curves of a run, or of several overlaid (seeds, variants), as one PNG (needs matplotlib, optional), and their
evaluations side by side as a table (no matplotlib needed).

    python plot.py runs/arith                      # runs/arith/curves.png
    python plot.py runs/a-s0,runs/a-s1 --out x.png  # several runs, one colour each
    python plot.py runs/a-s*                       # the same: several run dirs
train.py writes a run's curves.png at its end, and `python train.py --plot RUN` does what this script does.
"""
import argparse
import os
import sys

from checkpoint import read_jsonl
from config import BadInput


def read_runs(run_dirs):
    """[(run dir, its metrics.jsonl records, its eval.jsonl records)] of run dirs joined by commas."""
    dirs = [d for d in run_dirs.split(",") if d]
    if not dirs:
        raise BadInput(f"--plot {run_dirs!r}: name a run dir, or several joined by commas")
    runs = []
    for d in dirs:
        rows, evals = read_jsonl(os.path.join(d, "metrics.jsonl")), read_jsonl(os.path.join(d, "eval.jsonl"))
        if not rows:
            raise BadInput(f"--plot {d}: no metrics.jsonl there (a run dir holds one once its first step is done)")
        runs.append((d, rows, sorted(evals, key=lambda e: e["step"])))
    return runs


def eval_table(runs):
    """The runs side by side: steps done, and each held-out accuracy at the first and at the final evaluation."""
    keys = list(dict.fromkeys(k for _, _, evals in runs for e in evals for k in e if k.startswith("acc_")))

    def span(first, final, k):  # "first -> final", one number for one evaluation, "-" for none
        v = [f"{e[k]:.3f}" if isinstance(e.get(k), (int, float)) else "-" for e in (first, final)]
        return v[0] if first is final else f"{v[0]} -> {v[1]}"
    table = [["run", "steps", "eval at", "n", *keys]]
    for d, rows, evals in runs:
        if not evals:
            table.append([os.path.normpath(d), str(rows[-1]["step"]), "-", "-", *["-"] * len(keys)])
            continue
        first, final = evals[0], evals[-1]
        at = str(first["step"]) if first is final else f"{first['step']} -> {final['step']}"
        table.append([os.path.normpath(d), str(rows[-1]["step"]), at, str(final.get("n", "-")),
                      *(span(first, final, k) for k in keys)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    return "held-out evaluations (greedy pass@1), first -> final:\n" + "\n".join(lines)


def pyplot():
    """matplotlib.pyplot without a display, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(run_dirs, out=""):
    """One run's curves (every reward function), or several runs' joined by commas; returns the PNG's path."""
    # out: the PNG's path, or a dir for its curves.png (default RUN_DIR/curves.png); None returned without matplotlib.
    # The runs' evaluations are printed as a table first, with or without matplotlib.
    runs = read_runs(run_dirs)
    print(eval_table(runs))
    plt = pyplot()
    if plt is None:
        print("plot: matplotlib is not installed (pip install matplotlib); metrics are in metrics.jsonl")
        return None
    out = os.path.join(out, "curves.png") if out and os.path.isdir(out) else out
    fig = figure(runs)
    out = out or os.path.join(runs[0][0], "curves.png")
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise BadInput(f"--plot: cannot write {out} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    print(f"plot: wrote {out}")
    return out


def figure(runs):
    """The curves of read_runs' runs as a matplotlib Figure: reward, accuracy, KL and length per step."""
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    for n, (d, rows, evals) in enumerate(runs):
        s, name = [r["step"] for r in rows], os.path.basename(os.path.normpath(d))
        one = len(runs) == 1  # one run: every reward function and accuracy; several: one colour per run
        c = None if one else f"C{n}"
        # a point per step while they are few: a line through one point draws nothing, and a one-step run would vanish
        mk = dict(marker="o", ms=3) if len(s) <= 50 else {}
        ax[0, 0].plot(s, [r["reward_mean"] for r in rows], label="total" if one else name, lw=2 if one else 1,
                      color=c, **mk)
        for k in [k for k in rows[0] if k.startswith("reward/") and one]:
            ax[0, 0].plot(s, [r[k] for r in rows], label=k[7:], lw=1, **mk)
        for k in [k for k in rows[0] if k.startswith("acc_") and (one or k == "acc_strict")]:
            ax[0, 1].plot(s, [r[k] for r in rows], label=f"train {k}" if one else None, lw=1, alpha=0.5, color=c,
                          **mk)
        for k in [k for k in (evals[0] if evals else {}) if k.startswith("acc_")]:
            ax[0, 1].plot([e["step"] for e in evals], [e[k] for e in evals], "o-" if k == "acc_strict" else "s--",
                          label=f"eval {k}" + ("" if one else f" {name}"), color=c)
        kl = [float("nan") if r["kl"] is None else r["kl"] for r in rows]  # None: no KL that step (beta 0, empty)
        ax[1, 0].plot(s, kl, color=c, label=None if one else name, **mk)
        ax[1, 1].plot(s, [r["len_mean"] for r in rows], label="mean" if one else name, color=c, **mk)
        if one:
            ax[1, 1].plot(s, [r["len_max"] for r in rows], label="max", **mk)
    ax[0, 0].set_title("training reward (mean)")
    ax[0, 1].set_title("accuracy (eval: greedy, held-out; train: sampled)")
    ax[1, 0].set_title("KL to reference (k3, per token)")
    ax[1, 1].set_title("completion length (tokens, mean)")
    for a in ax.flat:
        a.set_xlabel("step")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.25, 1.5 ticks
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None):
    """python plot.py RUN [RUN ...] [--out PNG]: the table, then the curves."""
    p = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run dirs (each may be several joined by commas)")
    p.add_argument("--out", default="", help="the PNG's path, or a dir for its curves.png (default RUN/curves.png)")
    a = p.parse_args(argv)
    try:
        return plot(",".join(a.runs), a.out)
    except BadInput as e:
        p.error(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
