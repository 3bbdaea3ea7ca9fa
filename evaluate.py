"""Held-out evaluation, greedy so that a score is a property of the weights alone: pass@1 on test problems, or
whole test episodes played to their end (Wordle's games, calculator episodes); sharded across ranks, recorded in
the run dir.

eval.jsonl gets one line of scores per evaluation, eval/step-N.jsonl every completion (with its question and
gold answer), game (with its secret and turns) or calculator episode (with its question, gold answer, calls and
whole transcript, the tool's results marked) it scored.
Legend: N rows (one per problem in an evaluation batch).
"""
import json
import os
import time

import torch

from checkpoint import append_jsonl
from play import play
from ranks import fail_together, gather_records
from sample import generate
from tasks import example_view


def completion_texts(tok, ro):
    """Decoded completions, without the final stop token (rewards see only the text)."""
    # lengths include the stop token when a row stopped; a truncated row keeps all its tokens
    out = []
    for ids, n, stopped in zip(ro.completion_ids.tolist(), ro.lengths.tolist(), ro.stopped.tolist()):
        out.append(tok.decode(ids[:n - int(stopped)]))
    return out


def progress(log, *, done, world, total, mine, t0, scores, unit=""):
    """One line after every batch (problems done, running scores, ETA): a silent long evaluation looks hung."""
    dt = time.time() - t0  # rank 0's share stands for every rank's: shards differ by <= 1
    eta = dt / done * (mine - done)
    log(f"  eval {min(done * world, total)}/{total}{unit} | {scores} | {dt:.0f} s, ETA {eta:.0f} s", flush=True)


@torch.no_grad()
def evaluate(model, tok, task, test, *, n, batch, max_new_tokens, amp, rank, world, log=print, share_prefix=True):
    """Greedy pass@1 on this rank's share of the first n test problems: one row per problem, with its metrics."""
    total = min(n, len(test))
    mine = list(range(rank, total, world))
    rows, t0 = [], time.time()
    for s in range(0, len(mine), batch):
        idx = mine[s:s + batch]
        prompts = [tok.encode_chat(task.prompt(test[i])) for i in idx]
        with amp:
            ro = generate(model, prompts, G=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids,
                          vocab_size=tok.vocab_size, pad_id=tok.pad_id, share_prefix=share_prefix)
        for i, text in zip(idx, completion_texts(tok, ro)):  # the question and gold answer: a row reads on its own
            question, gold = example_view(task, test[i])
            rows.append({"index": i, "question": question, "gold": gold, "completion": text,
                         **{k: f(text, **test[i]) for k, f in task.metrics.items()}})
        accs = " ".join(f"{k} {sum(r[k] for r in rows) / len(rows):.3f}" for k in task.metrics)
        progress(log, done=len(rows), world=world, total=total, mine=len(mine), t0=t0, scores=accs)
    return rows


@torch.no_grad()
def evaluate_games(model, tok, task, test, *, n, batch, max_new_tokens, amp, rank, world, log=print, share_prefix=True):
    """Greedy whole episodes (games, calculator episodes) on this rank's share of the first n test examples: one row
    per episode, with its record."""
    total = min(n, len(test))
    mine = list(range(rank, total, world))
    rows, t0 = [], time.time()
    for s in range(0, len(mine), batch):
        idx = mine[s:s + batch]
        games = [task.game(test[i]) for i in idx]
        play(model, tok, games, max_new_tokens=max_new_tokens, temperature=0.0, amp=amp,
             share_prefix=share_prefix)  # a generate call a turn
        rows += [{"index": i, **g.record()} for i, g in zip(idx, games)]
        if task.ratios:  # a tool episode's row reads on its own: its question and gold answer (a game's: its record)
            for r in rows[-len(idx):]:
                r["question"], r["gold"] = example_view(task, test[r["index"]])
        summary = " ".join(f"{k} {v:.3f}" for k, v in task.game_summary(rows).items() if v is not None)
        progress(log, done=len(rows), world=world, total=total, mine=len(mine), t0=t0, scores=summary,
                 unit=" episodes" if task.ratios else " games")
    return rows


def summarize(task, rows, games=False):
    """The scores of an evaluation's rows (all ranks'): n, then the mean of each metric (episodes: their summary)."""
    if games:
        return {"n": len(rows), **task.game_summary(rows)}
    return {"n": len(rows), **{k: sum(r[k] for r in rows) / max(len(rows), 1) for k in task.metrics}}


def evaluate_and_record(model, tok, task, test, step, *, cfg, amp, rank, world, log=print, games=False):
    """Evaluate, write eval/step-N.jsonl and eval.jsonl; returns the scores (None with --eval-n 0: no evaluation)."""
    # games: play whole episodes (wordle's games, calculator episodes: the task's eval_plays), greedy
    if cfg.eval_n == 0:
        return None
    log(f"eval step {step}: {min(cfg.eval_n, len(test))} test {'episodes' if games else 'problems'}, "
        f"greedy, up to {cfg.max_new_tokens} new tokens{' a turn' if games else ''}")
    # A rank failing while it evaluates, or rank 0 while it writes, ends every rank with its message: the gather
    # between them is a collective, which no rank reaches unless all got there (ranks.fail_together).
    with fail_together(cfg, world, step):
        rows = (evaluate_games if games else evaluate)(
            model.eval(), tok, task, test, n=cfg.eval_n, batch=cfg.eval_batch, max_new_tokens=cfg.max_new_tokens,
            amp=amp, rank=rank, world=world, log=log, share_prefix=cfg.share_prefix)
    rows = gather_records(rows, world)
    with fail_together(cfg, world, step):
        metrics = summarize(task, rows, games)
        if rank == 0:
            os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
            with open(os.path.join(cfg.out, "eval", f"step-{step}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            append_jsonl(os.path.join(cfg.out, "eval.jsonl"), {"step": step, **metrics})
    log(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in metrics.items()))
    return metrics
