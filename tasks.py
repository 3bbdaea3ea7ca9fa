"""Tasks: what GRPO trains on and how it is scored. A task is data, a prompt, rewards and metrics; nothing else.

A Task bundles
- load(data_dir, cache_dir, **options) -> (train, test): lists of example dicts (fields such as question, gold);
- prompt(example) -> chat messages [{"role", "content"}];
- rewards: [(weight, fn)], summed into the training reward; fn(completion, prompt=..., **example) -> float;
- metrics: {name: fn}, 0/1 per completion, reported as accuracy in training and evaluation;
- options: {knob: default}, set with train.py --task-opts "k=v,k=v" and passed to load.
A task played as episodes (wordle's games, a calculator inside the answer) also has
- game(example) -> a fresh environment (play.py's interface: a game, or calc.Calculator);
- train_plays(options), eval_plays(options): whether training plays G whole episodes per example (play.py) and
  whether evaluation plays them, greedy;
- game_rewards and game_metrics: like rewards and metrics, scored on a whole episode (they get its record as
  `game`), used when training plays;
- game_summary(records) -> the evaluation's metrics, from the episodes' records;
- ratios: {name: fn -> (numerator, denominator)}, logged per step as a ratio of sums (calc.TOOL_RATIOS).
Adding a task = one Task(...) in TASKS (its code here, or in a file of its own that this file imports); train.py
never changes.
Every reward also receives `prompt`, the text of all prompt messages, so a reward can refuse a copy of the prompt.
With train.py --judge, a judge model grades each completion too, shown what judge_view(task, example) returns.
Bad data or options raise TaskError (a ValueError) with one line naming the problem; train.py turns it into an exit.

Tasks here:
- gsm8k: grade-school word problems (Cobbe et al. 2021), downloaded once and checked against sha256.
- wordle: the word game, on word lists shipped in data/wordle (wordle.py); trains on game states (mode=states,
  the DeepLearning.AI course's way) or on whole games (mode=games); evaluates by playing whole games.
- arith: generated integer arithmetic ("What is 37 + 48?"), no download. Train and test are disjoint by
  construction: each problem's text is hashed, and the hash alone says on which side it lives. The default,
  2-digit addition, keeps a laptop model in GRPO's useful range: some answers right, not all.
- wordprob: generated word problems for the calculator (wordprob.py), held out by template; tools=calc lets the
  model call it (calc.py), tools=none is the same task without it. gsm8k takes tools=calc too.
All but wordle use one answer protocol: reasoning inside <reasoning></reasoning>, then the number inside
<answer></answer>; with tools=calc the reasoning may hold calls, <calc>EXPR</calc>, each followed by the
calculator's <result>VALUE</result> (calc.py), and the answer is still the number the model writes.
"""
import functools
import hashlib
import json
import os
import random
import shutil
import urllib.request
from dataclasses import dataclass, field

import calc as C
import rewards as R
import wordle as W
import wordprob as WP


class TaskError(ValueError):
    """Bad task data or options; the message is one line that names the problem."""


@dataclass
class Task:
    load: object
    prompt: object
    rewards: list
    metrics: dict
    options: dict = field(default_factory=dict)
    game: object = None
    game_rewards: list = None
    game_metrics: dict = None
    game_summary: object = None
    train_plays: object = lambda opts: False  # (options) -> training plays whole episodes (play.py)
    eval_plays: object = lambda opts: False  # (options) -> evaluation plays them
    ratios: dict = None  # {name: fn(completion, **fields) -> (numerator, denominator)}: logged as sum / sum


def prompt_text(messages):
    """The text every reward sees as `prompt`: all message contents, one per line."""
    return "\n".join(m["content"] for m in messages)


def judge_view(task, ex):
    """(question, reference answer or None): what a judge (judge.py) is shown of an example besides the completion."""
    # The example's own question and gold answer where it has them (gsm8k, arith); otherwise its prompt's last user
    # message (wordle: the game so far), with no reference, so a judge never sees a secret that the policy cannot.
    if "question" in ex:
        return ex["question"], None if ex.get("gold") is None else str(ex["gold"])
    return next(m["content"] for m in reversed(task.prompt(ex)) if m["role"] == "user"), None


def example_view(task, ex):
    """(question, gold answer or None): what a record (rollouts.jsonl, eval/step-N.jsonl) shows of an example."""
    # judge_view's question (the example's, or its prompt's last user message); the gold answer is the example's
    # `gold`, or a game's `secret`, which a record may show (a judge may not: the policy never sees it)
    question = ex["question"] if "question" in ex else next(
        (m["content"] for m in reversed(task.prompt(ex)) if m["role"] == "user"), "")
    return question, ex.get("gold", ex.get("secret"))


def parse_options(task_name, text):
    """'digits=2,ops=+-' -> {'digits': 2, 'ops': '+-'} over the task's defaults, typed like them."""
    defaults = TASKS[task_name].options
    opts = dict(defaults)
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or k not in defaults:
            known = ", ".join(f"{a}={b}" for a, b in defaults.items()) or "none"
            raise TaskError(f"bad task option {item!r} for {task_name}; options (with defaults): {known}")
        try:
            opts[k] = type(defaults[k])(v.strip())
        except ValueError:
            raise TaskError(f"task option {k}={v.strip()!r} is not a valid {type(defaults[k]).__name__}") from None
    return opts


# ----------------------------------------------------------------------------- the shared answer protocol

# No literal template with placeholders: a model can copy one verbatim for the format rewards (docs/results.md, GSM8K).
# The tags are named in prose instead, and the format rewards pay only for real reasoning and a number
# (rewards.well_formed).
PROTOCOL = ("First think step by step inside <reasoning> </reasoning> tags, then give only the final number "
            "inside <answer> </answer> tags.")


def answer(reasoning, value):
    """A completion in the protocol's exact layout (worked examples use it)."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{value}\n</answer>"


# ----------------------------------------------------------------------------- tools: the calculator (calc.py)

TOOLS = ("none", "calc")
CALC_PROTOCOL = ("You have a calculator: write an arithmetic expression inside <calc> </calc> and its value appears "
                 "right after it inside <result> </result>.")


def call(expr):
    """A worked example's calculator call with the result the calculator gives it: '<calc>..</calc><result>..'."""
    return f"<calc>{expr}</calc>{C.result_text(expr)}"


def tool_options(task, tools, calls):
    """The fields every example of a tool-capable task carries: {tools, calls}; TaskError for bad values."""
    if tools not in TOOLS:
        raise TaskError(f"{task}: tools must be one of {', '.join(TOOLS)}, got {tools!r}")
    if not 1 <= calls <= 16:
        raise TaskError(f"{task}: calls (calculator calls per completion) must be 1..16, got {calls}")
    return {"tools": tools, "calls": calls}


def tool_game(prompt, ex):
    """The calculator environment of an example (calc.Calculator) under the task's prompt function."""
    return C.Calculator(prompt(ex), max_calls=ex["calls"], tags=(C.OPEN, C.CLOSE))  # read now: tests swap them


def tool_summary(rows):
    """An evaluation's metrics from its episodes' rows (each with gold and record): accuracy and the tool ratios."""
    fields = [(C.transcript_text(r), {"gold": r["gold"], "game": r}) for r in rows]
    n = max(len(rows), 1)
    return {**{k: sum(f(t, **x) for t, x in fields) / n for k, f in METRICS.items()}, **C.ratios(fields)}


def plays_tool(opts):
    return opts["tools"] == "calc"


# ----------------------------------------------------------------------------- GSM8K

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
GSM8K_SHA256 = {"train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
                "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"}
GSM8K_SYSTEM = "You are a careful math tutor. Solve the problem. " + PROTOCOL
# repeated after the question: small models ignore a system-only format instruction
GSM8K_USER = "{question}\n\n" + PROTOCOL


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def gsm8k_file(data_dir, cache_dir, split):
    """data_dir/SPLIT.jsonl, or the original openai/grade-school-math file, downloaded once and checksummed."""
    if data_dir:
        path = os.path.join(os.path.expanduser(data_dir), f"{split}.jsonl")
        if not os.path.isfile(path):
            raise TaskError(f"{path} not found: --data-dir must hold train.jsonl and test.jsonl "
                            "in the GSM8K jsonl format")
        return path
    path = os.path.join(os.path.expanduser(cache_dir), "gsm8k", f"{split}.jsonl")
    if os.path.isfile(path) and sha256(path) == GSM8K_SHA256[split]:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(GSM8K_URL.format(split), timeout=30) as r, open(path + ".tmp", "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise TaskError(f"could not download GSM8K {split} ({e}); offline, pass --data-dir DIR with train.jsonl and "
                        "test.jsonl (from github.com/openai/grade-school-math, grade_school_math/data)") from None
    if sha256(path + ".tmp") != GSM8K_SHA256[split]:
        raise TaskError(f"downloaded GSM8K {split} has the wrong sha256; not using it (left at {path}.tmp)")
    os.replace(path + ".tmp", path)
    return path


def read_gsm8k(path):
    """[{question, gold}] from GSM8K jsonl: one {"question": ..., "answer": "... #### 42"} per line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                out.append({"question": ex["question"], "gold": R.extract_gold(ex["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise TaskError(f"{path}:{i}: bad GSM8K line ({type(e).__name__}: {e})") from None
    if not out:
        raise TaskError(f"{path}: no examples")
    return out


def gsm8k_load(data_dir, cache_dir, tools="none", calls=C.MAX_CALLS):
    opts = tool_options("gsm8k", tools, calls)
    return tuple([{**ex, **opts} for ex in read_gsm8k(gsm8k_file(data_dir, cache_dir, split))]
                 for split in ("train", "test"))


# One worked example as an earlier chat turn, written here (not from the data set). It shows the layout with real
# content; copying it earns nothing, as its answer is wrong for any other question and rewards.well_formed
# refuses reasoning copied from the prompt.
GSM8K_SHOT = ("A baker makes 24 muffins in the morning and 18 in the afternoon. He sells 30. How many are left?",
              answer("He makes 24 + 18 = 42 muffins.\nAfter selling 30, 42 - 30 = 12 are left.", 12))


GSM8K_TOOL_SHOT = (GSM8K_SHOT[0], answer(
    "He makes " + call("24 + 18") + " muffins.\nAfter selling 30, " + call("42 - 30") + " are left.", 12))


def gsm8k_prompt(ex):
    calc = ex.get("tools") == "calc"
    return [{"role": "system", "content": GSM8K_SYSTEM + (" " + CALC_PROTOCOL if calc else "")},
            {"role": "user", "content": GSM8K_USER.format(question=GSM8K_SHOT[0])},
            {"role": "assistant", "content": (GSM8K_TOOL_SHOT if calc else GSM8K_SHOT)[1]},
            {"role": "user", "content": GSM8K_USER.format(question=ex["question"])}]


# ----------------------------------------------------------------------------- wordprob: word problems for the tool

WORDPROB_SYSTEM = "You are a careful math tutor. Solve the problem. " + PROTOCOL


def wordprob_load(data_dir, cache_dir, tools, calls, train_size, test_size, seed):
    """Train and test problems from disjoint templates (wordprob.py); data_dir and cache_dir are unused."""
    opts = tool_options("wordprob", tools, calls)
    if train_size < 1 or test_size < 1:
        raise TaskError(f"wordprob: train_size and test_size must be >= 1, got {train_size} and {test_size}")
    return tuple([{**ex, **opts} for ex in WP.problems(side, n, seed)]
                 for side, n in (("train", train_size), ("test", test_size)))


@functools.lru_cache(maxsize=None)
def wordprob_shots(tools):
    """The worked examples as earlier chat turns: one problem of each SHOT template, each step a call (tools=calc)
    or worked by hand (tools=none)."""
    msgs = []
    for ex in WP.problems("shots", len(WP.SHOTS), seed="prompt"):
        steps = [call(e) if tools == "calc" else f"{e} = {C.format_value(C.calculate(e)[0])}" for e in ex["steps"]]
        msgs += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": answer(
            "\n".join(f"Step {k}: {s}" for k, s in enumerate(steps, 1)), ex["gold"])}]
    return tuple(msgs)


def wordprob_prompt(ex):
    system = WORDPROB_SYSTEM + (" " + CALC_PROTOCOL if ex["tools"] == "calc" else "")
    return [{"role": "system", "content": system}, *wordprob_shots(ex["tools"]),
            {"role": "user", "content": ex["question"]}]


# ----------------------------------------------------------------------------- arith: generated arithmetic

ARITH_OPS = "+-*"
ARITH_SYSTEM = "You are a careful calculator. " + PROTOCOL


def arith_eval(nums, ops):
    """Value of nums[0] ops[0] nums[1] ... with * before + and -, as Python evaluates it."""
    terms, signs = [nums[0]], [1]
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(n)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def arith_text(nums, ops):
    return " ".join([str(nums[0])] + [f"{o} {n}" for o, n in zip(ops, nums[1:])])


def explain(a, op, b):
    """One worked line for a op b by place value: '37 + 48 = 30 + 40 + 7 + 8 = 70 + 15 = 85'."""
    if op == "*":
        parts = [int(d) * 10 ** i for i, d in enumerate(reversed(str(b))) if d != "0"][::-1] or [0]
        if len(parts) == 1:
            return f"{a} * {b} = {a * b}"
        return (f"{a} * {b} = " + " + ".join(f"{a} * {p}" for p in parts) + " = "
                + " + ".join(str(a * p) for p in parts) + f" = {a * b}")
    r = a + b if op == "+" else a - b
    hi, lo = b - b % 10, b % 10
    if abs(a) < 10 or hi == 0 or lo == 0:
        return f"{a} {op} {b} = {r}"
    mid = a + hi if op == "+" else a - hi
    return f"{a} {op} {b} = {a} {op} {hi} {op} {lo} = {mid} {op} {lo} = {r}"


def arith_reasoning(nums, ops):
    """Worked steps: products first, then sums and differences left to right, one line each."""
    nums, ops, lines = list(nums), list(ops), []
    while "*" in ops:
        i = ops.index("*")
        lines.append(explain(nums[i], "*", nums[i + 1]))
        nums[i:i + 2], ops[i:i + 1] = [nums[i] * nums[i + 1]], []
    acc = nums[0]
    for op, n in zip(ops, nums[1:]):
        lines.append(explain(acc, op, n))
        acc = acc + n if op == "+" else acc - n
    return "\n".join(lines)


def arith_split(text, test_percent):
    """'test' or 'train' from the problem's text alone (sha256), so the two sides never share a problem."""
    return "test" if int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100 < test_percent else "train"


def arith_problems(side, n, digits, ops, terms, seed, test_percent=20):
    """Up to n distinct problems of one side, drawn by a seeded generator: [{question, gold, expr}]."""
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    rng, seen, out = random.Random(f"arith-{side}-{seed}"), set(), []
    space = (hi - lo + 1) ** terms * len(ops) ** (terms - 1)
    tries = 0
    while len(out) < n and tries < 50 * n + 1000 and len(seen) < space:
        tries += 1
        nums = [rng.randint(lo, hi) for _ in range(terms)]
        o = [rng.choice(ops) for _ in range(terms - 1)]
        text = arith_text(nums, o)
        if text in seen:
            continue
        seen.add(text)
        if arith_split(text, test_percent) == side:
            out.append({"question": f"What is {text}?", "gold": str(arith_eval(nums, o)), "expr": text,
                        "digits": digits, "ops": ops, "terms": terms})
    return out


def arith_load(data_dir, cache_dir, digits, ops, terms, train_size, test_size, seed):
    """Disjoint train/test lists of generated problems (data_dir and cache_dir are unused: nothing to read)."""
    # train_size and test_size are caps: a small setting has fewer problems (2-digit addition: 8,100 in all,
    # about 6,500 on the train side), and train.py's start-up line says how many were drawn.
    if not 1 <= digits <= 9:
        raise TaskError(f"arith: digits must be 1..9, got {digits}")
    if not ops or set(ops) - set(ARITH_OPS):
        raise TaskError(f"arith: ops must be a non-empty subset of {ARITH_OPS!r}, got {ops!r}")
    if not 2 <= terms <= 6:
        raise TaskError(f"arith: terms must be 2..6, got {terms}")
    if train_size < 1 or test_size < 1:
        raise TaskError(f"arith: train_size and test_size must be >= 1, got {train_size} and {test_size}")
    ops = "".join(dict.fromkeys(ops))
    train = arith_problems("train", train_size, digits, ops, terms, seed)
    test = arith_problems("test", test_size, digits, ops, terms, seed)
    if not train or not test:
        raise TaskError(f"arith: digits={digits}, ops={ops}, terms={terms} has too few distinct problems")
    return train, test


@functools.lru_cache(maxsize=None)
def arith_shots(digits, ops, terms):
    """Two worked examples as earlier chat turns, fixed per setting, drawn from the train side."""
    # How the protocol is shown decides the cold start: with no answer block in a group every reward is 0 and GRPO
    # has no gradient, and examples as chat turns get answer blocks where an instruction or a system-message example
    # does not.
    msgs = []
    for p in arith_problems("train", 2, max(digits, 2), ops, terms, seed="shots"):  # >= 2 digits: show a carry
        nums, o = [int(t) for t in p["expr"].split()[::2]], p["expr"].split()[1::2]
        msgs += [{"role": "user", "content": p["question"]},
                 {"role": "assistant", "content": answer(arith_reasoning(nums, o), p["gold"])}]
    return tuple(msgs)


def arith_prompt(ex):
    shots = arith_shots(ex["digits"], ex["ops"], ex["terms"])
    return [{"role": "system", "content": ARITH_SYSTEM}, *shots, {"role": "user", "content": ex["question"]}]


# Correctness is the reward; format_strict is a 0.1 nudge towards the exact layout, paid only for real reasoning
# and a parseable number (rewards.well_formed), so a format-only completion earns 0.1 of a correct one's 1.1.
ARITH_REWARDS = [(1.0, R.correct), (0.1, R.format_strict)]

METRICS = {"acc_strict": R.correct, "acc_lenient": R.correct_lenient}

# ----------------------------------------------------------------------------- wordle (the game: wordle.py)

def wordle_load(data_dir, cache_dir, mode, per_secret, seed):
    """(train, test): game states (mode states) or one empty game per secret (mode games); one game per test secret."""
    # Mode games ignores per_secret.
    # The test secrets are in a fixed shuffled order (not the run's seed), so --eval-n 100 takes the same 100 in
    # every run and they are not the alphabet's first. data_dir and cache_dir are unused: the lists ship here.
    if data_dir:
        raise TaskError("wordle reads the word lists shipped in data/wordle; --data-dir is not used by it")
    if mode not in ("states", "games"):
        raise TaskError(f"wordle: mode must be states or games, got {mode!r}")
    if per_secret < 1:
        raise TaskError(f"wordle: per_secret must be >= 1, got {per_secret}")
    try:
        train_secrets, test_secrets, _ = W.word_lists()
    except ValueError as e:
        raise TaskError(str(e)) from None
    test = [{"secret": s, "history": []} for s in random.Random("wordle-test").sample(test_secrets, len(test_secrets))]
    if mode == "games":
        return [{"secret": s, "history": []} for s in train_secrets], test
    return W.states(train_secrets, per_secret, seed), test


def wordle_prompt(ex):
    return W.Game(ex["secret"], ex["history"]).messages()


def wordle_game(ex):
    return W.Game(ex["secret"], ex["history"])


def guess_is_word(completion, **_):
    """1 if the completion's one <guess> is a listed word."""
    return float(W.valid_guess(completion) is not None)


def game_clean(completion, game=None, **_):
    """1 if every guess of the game was a listed word."""
    return float(all(t["valid"] for t in game["turns"]))


def wordle_summary(records):
    """Win rate, mean guesses in won games, and per turn: the share of guesses that are not words and in format."""
    # The format is <guess>WORD</guess>: one block, 5 letters; a word or not.
    turns = [t for r in records for t in r["turns"]]
    won = [r["guesses"] for r in records if r["won"]]
    return {"acc_win": len(won) / max(len(records), 1), "guesses_won": sum(won) / len(won) if won else None,
            "invalid_rate": sum(not t["valid"] for t in turns) / max(len(turns), 1),
            "format_rate": sum(R.wordle_format(t["text"]) for t in turns) / max(len(turns), 1)}


TASKS = {
    # tools=calc: each completion is one calculator episode (calc.py), in training and evaluation
    "gsm8k": Task(gsm8k_load, gsm8k_prompt, R.GSM8K_REWARDS, METRICS, options=dict(tools="none", calls=C.MAX_CALLS),
                  game=functools.partial(tool_game, gsm8k_prompt), game_rewards=R.GSM8K_REWARDS,
                  game_metrics=METRICS, game_summary=tool_summary, train_plays=plays_tool, eval_plays=plays_tool,
                  ratios=C.TOOL_RATIOS),
    # correctness pays; tool use earns nothing (calc.py), so spamming calls cannot pay
    "wordprob": Task(wordprob_load, wordprob_prompt, ARITH_REWARDS, METRICS,
                     options=dict(tools="calc", calls=C.MAX_CALLS, train_size=5000, test_size=400, seed=0),
                     game=functools.partial(tool_game, wordprob_prompt), game_rewards=ARITH_REWARDS,
                     game_metrics=METRICS, game_summary=tool_summary, train_plays=plays_tool, eval_plays=plays_tool,
                     ratios=C.TOOL_RATIOS),
    "arith": Task(arith_load, arith_prompt, ARITH_REWARDS, METRICS,
                  options=dict(digits=2, ops="+", terms=2, train_size=20000, test_size=1000, seed=0)),
    # training metrics: states: acc_secret (this guess is the secret), acc_word (it is a listed word); games:
    # acc_win (the game was won, as evaluation's acc_win), acc_clean (every guess of the game was a word)
    "wordle": Task(wordle_load, wordle_prompt, W.STATE_REWARDS, {"acc_secret": W.STATE_REWARDS[0][1],
                                                                "acc_word": guess_is_word},
                   options=dict(mode="states", per_secret=4, seed=0), game=wordle_game,
                   game_rewards=W.GAME_REWARDS, game_metrics={"acc_win": W.game_win, "acc_clean": game_clean},
                   game_summary=wordle_summary, train_plays=lambda opts: opts["mode"] == "games",
                   eval_plays=lambda opts: True),
}
