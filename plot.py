"""Curves of a run, or of several overlaid (seeds, variants), as one PNG; needs matplotlib (optional).

    python plot.py runs/arith                      # runs/arith/curves.png
    python plot.py runs/a-s0,runs/a-s1 --out x.png  # several runs, one colour each
train.py writes a run's curves.png at its end, and `python train.py --plot RUN` does what this script does.
"""
import argparse
import os

from checkpoint import read_jsonl
from config import BadInput


def plot(run_dirs, out=""):
    """One run's curves (every reward function), or several runs' joined by commas; returns the PNG's path."""
    # out: the PNG's path, or a dir for its curves.png (default RUN_DIR/curves.png); None returned without matplotlib
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); metrics are in metrics.jsonl")
        return None
    dirs = [d for d in run_dirs.split(",") if d]
    if not dirs:
        raise BadInput(f"--plot {run_dirs!r}: name a run dir, or several joined by commas")
    out = os.path.join(out, "curves.png") if out and os.path.isdir(out) else out
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    for n, d in enumerate(dirs):
        rows, evals = read_jsonl(os.path.join(d, "metrics.jsonl")), read_jsonl(os.path.join(d, "eval.jsonl"))
        if not rows:
            raise BadInput(f"--plot {d}: no metrics.jsonl there (a run dir holds one once its first step is done)")
        s, name = [r["step"] for r in rows], os.path.basename(os.path.normpath(d))
        one = len(dirs) == 1  # one run: every reward function and accuracy; several: one colour per run
        c = None if one else f"C{n}"
        ax[0, 0].plot(s, [r["reward_mean"] for r in rows], label="total" if one else name, lw=2 if one else 1,
                      color=c)
        for k in [k for k in rows[0] if k.startswith("reward/") and one]:
            ax[0, 0].plot(s, [r[k] for r in rows], label=k[7:], lw=1)
        for k in [k for k in rows[0] if k.startswith("acc_") and (one or k == "acc_strict")]:
            ax[0, 1].plot(s, [r[k] for r in rows], label=f"train {k}" if one else None, lw=1, alpha=0.5, color=c)
        for k in [k for k in (evals[0] if evals else {}) if k.startswith("acc_")]:
            ax[0, 1].plot([e["step"] for e in evals], [e[k] for e in evals], "o-" if k == "acc_strict" else "s--",
                          label=f"eval {k}" + ("" if one else f" {name}"), color=c)
        kl = [float("nan") if r["kl"] is None else r["kl"] for r in rows]  # None: no KL that step (beta 0, empty)
        ax[1, 0].plot(s, kl, color=c, label=None if one else name)
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
        raise BadInput(f"--plot: cannot write {out} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    print(f"plot: wrote {out}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    p.add_argument("runs", help="a run dir, or several joined by commas")
    p.add_argument("--out", default="", help="the PNG's path, or a dir for its curves.png (default RUN/curves.png)")
    a = p.parse_args()
    try:
        plot(a.runs, a.out)
    except BadInput as e:
        p.error(str(e))
