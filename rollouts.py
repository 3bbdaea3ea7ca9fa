"""The rollout log: every group a run drew, with its prompt, completions, rewards and advantages, in
RUN/rollouts.jsonl; and a viewer that prints one step's groups as a table, best advantage first.

    python rollouts.py runs/arith --step 24   # one step's groups (default: the last step logged)
train.py appends one line per group at every step (train.log_rollouts; --log-rollouts N keeps the first N groups
of a step, 0 writes no file), in draw order:
  {"step", "round" (the --dynamic-sampling round; 0 without it), "group" (its place among the round's prompts, over
   all ranks), "index" (its example's index in the train split), "question", "gold" (the example's answer, or a
   game's secret; null if it has none), "kept" (false: --dynamic-sampling dropped it), "rows": one per completion}
a row: {"completion" (a whole episode: "game", its record: a game's every turn, a tool episode's transcript with
the tool's parts marked), "reward" (the weighted total), "rewards"
({reward function: its unweighted value}), "advantage" (null in a dropped group), "length" (the model's tokens),
"stopped" (false: cut at --max-new-tokens), and the task's 0/1 metrics}. Numbers are rounded to 6 decimals.
"""
import argparse
import json
import os
import re
import sys

from config import BadInput

FILE = "rollouts.jsonl"
STEP = re.compile(r'\{"step": (\d+),')  # every line starts so (group_line's first key): found without parsing


def num(x):
    """A number as the log writes it: 6 decimals, and an int where it is one (1 rather than 1.0)."""
    x = round(float(x), 6)
    return int(x) if x.is_integer() else x


def rollout_rows(*, texts, extra, total, rewards, metrics, lengths, stopped, advantages):
    """One dict per row (completion or game) from the step's per-row lists; advantages: None where not trained on."""
    rows = []
    for i, text in enumerate(texts):
        body = {"game": extra[i]["game"]} if "game" in extra[i] else {"completion": text}  # a game: all its turns
        rows.append({**body, "reward": num(total[i]), "rewards": {k: num(v[i]) for k, v in rewards.items()},
                     "advantage": None if advantages[i] is None else num(advantages[i]), "length": int(lengths[i]),
                     "stopped": bool(stopped[i]), **{k: num(v[i]) for k, v in metrics.items()}})
    return rows


def group_line(*, step, round_, group, index, question, gold, rows):
    """One group's line of rollouts.jsonl (the layout in this file's docstring)."""
    return {"step": step, "round": round_, "group": group, "index": index, "question": question, "gold": gold,
            "kept": any(r["advantage"] is not None for r in rows), "rows": rows}


def step_groups(*, step, drawn, advantages, rounds, rank, P, cap, view):
    """This rank's lines of a step: its P groups of each round, those among the step's first `cap` (-1: all)."""
    # drawn: train.Scored, every row of every round in round order (rank-local); advantages (rows,): None where not
    # trained on; rounds: each round's global dataset indices, rank r holding r*P .. r*P+P-1; view(index):
    # (question, gold) of a train example.
    G, per_round = drawn.ro.group_size, len(rounds[0]) if rounds else 0
    rows = rollout_rows(texts=drawn.texts, extra=drawn.extra, total=drawn.total.tolist(), rewards=drawn.per_fn,
                        metrics=drawn.task_metrics, lengths=drawn.ro.lengths.tolist(),
                        stopped=drawn.ro.stopped.tolist(), advantages=advantages)  # (rows,) a dict each
    lines = []
    for k, idx in enumerate(rounds):
        for p, i in enumerate(idx[rank * P:(rank + 1) * P]):
            place = rank * P + p  # the group's place among the round's prompts, over all ranks
            if cap > 0 and k * per_round + place >= cap:  # past the step's first N groups
                continue
            question, gold = view(i)
            lines.append(group_line(step=step, round_=k, group=place, index=i, question=question, gold=gold,
                                    rows=rows[(k * P + p) * G:(k * P + p + 1) * G]))
    return lines


def append_groups(path, groups):
    """Append a step's lines in one write: a crash can cut only the last line, never an earlier one."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(g) + "\n" for g in groups))


def read_step(run_dir, step=None):
    """(step, its groups) from RUN/rollouts.jsonl (step None: the last one logged); BadInput says what is missing."""
    path = os.path.join(run_dir, FILE)
    if not os.path.isdir(run_dir):
        raise BadInput(f"{run_dir}: no such run dir")
    if not os.path.isfile(path):
        raise BadInput(f"{run_dir}: no {FILE} there (a run writes it from its first step on, unless --log-rollouts 0)")
    steps, want, kept = set(), step, []
    with open(path) as f:  # only the wanted step's lines are parsed: a long run's log is large
        for line in f:
            m = STEP.match(line)
            if not m or not line.endswith("\n"):  # a line that a crash cut short
                continue
            s = int(m.group(1))
            steps.add(s)
            if step is None and (want is None or s > want):  # the last step so far
                want, kept = s, []
            if s == want:
                kept.append(line)
    if not steps:
        raise BadInput(f"{path}: holds no step yet")
    if want not in steps:
        raise BadInput(f"{path}: no step {want}; it holds steps {min(steps)} to {max(steps)}")
    return want, [json.loads(line) for line in kept]


def one_line(text, chars):
    """Text on one line, newlines and other control characters escaped (\\n), cut to chars (0: whole)."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if not chars or len(text) <= chars else text[:chars - 3] + "..."


def game_text(game):
    """An episode on one line: a tool episode's transcript with each result marked ⟦...⟧ (the tool's text, not the
    model's); a game's turns as GUESS=feedback for each word guessed, ?(what it wrote) for a turn that was not."""
    if "transcript" in game:  # calc.Calculator's record: which text is the tool's comes from the record, not tags
        text = "".join(one_line(t, 0) if who == "model" else f"⟦{one_line(t, 0)}⟧" for who, t in game["transcript"])
        return text + (" (ended: one call too many)" if game.get("ended") == "over_cap" else "")
    return " ".join(f"{t['guess']}={t['feedback']}" if t["valid"] else f"?({one_line(t['text'] or '', 12)})"
                    for t in game["turns"]) + (" (won)" if game.get("won") else "")


def cell(v):
    """A table cell: a number to at most 3 decimals (0.1, 1, -1.617), - for null, yes/no for a flag."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    t = f"{v:.3f}".rstrip("0").rstrip(".")
    return "0" if t == "-0" else t


def table(step, groups, chars=100):
    """A step's groups as text: per group its question and gold answer once, then its rows by advantage."""
    if not groups:
        return f"step {step}: no groups logged"
    first = groups[0]["rows"][0]
    rewards = list(first["rewards"])
    metrics = [k for k in first if k not in ("completion", "game", "reward", "rewards", "advantage", "length",
                                             "stopped")]
    cols = ["adv", "reward", *rewards, *metrics, "len", "stop"]
    dropped = sum(not g["kept"] for g in groups)
    out = [f"step {step}: {len(groups)} groups of {len(groups[0]['rows'])}"
           + (f", {dropped} dropped by dynamic sampling (advantage -)" if dropped else "")]
    for g in groups:
        out += ["", f"group {g['group']}" + (f" (round {g['round']})" if g["round"] else "")
                + f" | example {g['index']}" + ("" if g["kept"] else " | dropped"),
                "question: " + g["question"].replace("\n", "\n          "), f"gold: {g['gold']}"]
        body = [[cell(r["advantage"]), cell(r["reward"]), *(cell(r["rewards"][k]) for k in rewards),
                 *(cell(r[k]) for k in metrics), str(r["length"]), cell(r["stopped"]),
                 one_line(game_text(r["game"]) if "game" in r else r["completion"], chars)]
                for r in sorted(g["rows"], key=lambda r: (r["advantage"] is None, -(r["advantage"] or 0),
                                                          -r["reward"]))]
        widths = [max(len(c), *(len(b[j]) for b in body)) for j, c in enumerate(cols)]
        out.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)) + "  completion")
        out += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) + "  " + b[-1] for b in body]
    return "\n".join(out)


def show(run_dir, step=None, chars=100):
    """The viewer: one step's table from a run dir."""
    return table(*read_step(run_dir, step), chars=chars)


def build_parser():
    """The viewer's command line: python rollouts.py RUN [--step N] [--chars C]."""
    p = argparse.ArgumentParser(prog="rollouts.py", description="print one step's groups of a run's rollouts.jsonl "
                                "as a table, best advantage first")
    p.add_argument("run", help="a run dir")
    p.add_argument("--step", type=int, default=None, help="the step to show (default: the last one logged)")
    p.add_argument("--chars", type=int, default=100, help="characters of each completion shown (0: all of it)")
    return p


def main(argv=None):
    """The viewer, from the command line; bad input ends in one line."""
    a = build_parser().parse_args(argv)
    try:
        print(show(a.run, a.step, a.chars), flush=True)
    except BadInput as e:
        raise SystemExit(f"rollouts.py: error: {e}") from None
    except BrokenPipeError:  # piped into head, which has read what it wanted: no traceback at exit (Python's docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
