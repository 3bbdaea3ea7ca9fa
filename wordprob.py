"""Generated two-step word problems for the calculator (tasks.py's wordprob), held out by template.

A problem is two operations said in words: "First, multiply 347 by 28. Then decrease the result by 1290. What
number do you get?". Each step is one of + - * / on large numbers (3-digit times 2-digit, 4-digit sums and
differences, exact divisions), worded one of three ways per operation ("subtract Y from X", "take X minus Y",
"decrease X by Y"), some with the operands in the other order. A 135M model gets almost none right by mental
arithmetic; with the calculator it must still build each call from the words: which operation, which operand
first, and that the second step works on the first one's result.

A template is the problem's frame: its two operations and the wording of each (16 operation pairs x 9 wording
pairs). The split is by template, not only by numbers: a test template words both steps in the third wording of
their operations, which no training template uses, so every test problem is worded in a way training never shows
(the 64 templates with one such step are used by neither side; with them in the test the untrained model started
at 44%, above the 40% a proof needs room under).
The worked examples in the prompt come from two fixed training templates (a worked example of the test's own
template makes the tool trivial: the model copies the call pattern). Problems are drawn by a generator seeded by
(side, seed, index), so a split is the same on every machine. Every answer is a positive integer.
Standard library only.
"""
import itertools
import random

OPS = "*+-/"
# the wordings of each operation on {x} and {y}; the last of each is held out (test templates only)
PHRASES = {
    "*": ("multiply {x} by {y}", "take the product of {x} and {y}", "find {x} times {y}"),
    "+": ("add {y} to {x}", "take the sum of {x} and {y}", "increase {x} by {y}"),
    "-": ("subtract {y} from {x}", "take {x} minus {y}", "decrease {x} by {y}"),
    "/": ("divide {x} by {y}", "take the quotient of {x} and {y}", "split {x} into {y} equal parts"),
}
ASK = ("What is the final number?", "What number do you get?", "What is the result?")
HELD_OUT = 2  # the wording index only test templates use


def first_step(op, r):
    """(x, y, x op y) of a first step: 3-digit x 2-digit products, 4-digit sums and differences, exact quotients."""
    if op == "*":
        x, y = r.randint(101, 989), r.randint(12, 98)
        return x, y, x * y
    if op == "/":
        y, q = r.randint(12, 98), r.randint(12, 99)
        return y * q, y, q
    if op == "+":
        x, y = r.randint(1001, 9989), r.randint(1001, 9989)
        return x, y, x + y
    y = r.randint(1001, 8989)
    x = y + r.randint(1001, 5000)
    return x, y, x - y


def second_step(op, v, r):
    """(z, v op z): the second step, on the first one's result v (z divides v in a quotient, z < v in a difference)."""
    if op == "*":
        z = r.randint(12, 98)
        return z, v * z
    if op == "/":
        z = r.choice([d for d in range(3, 100) if v % d == 0] or [1])
        return z, v // z
    if op == "+":
        z = r.randint(101, 9989)
        return z, v + z
    z = r.randint(max(1, v // 10), v - 1)
    return z, v - z


def problem(template, r):
    """One problem of a template (op1, op2, wording1, wording2): {question, gold, template, steps}."""
    op1, op2, w1, w2 = template
    x, y, v = first_step(op1, r)
    z, ans = second_step(op2, v, r)
    if op2 == "/" and z == 1:  # v has no divisor in 3..99: draw again
        return problem(template, r)
    q = (f"First, {PHRASES[op1][w1].format(x=x, y=y)}. Then {PHRASES[op2][w2].format(x='the result', y=z)}. "
         f"{r.choice(ASK)}")
    return {"question": q, "gold": str(ans), "template": f"{op1}{op2}/{w1}{w2}",
            "steps": [f"{x} {op1} {y}", f"{v} {op2} {z}"]}


TEMPLATES = [(a, b, i, j) for a, b in itertools.product(OPS, OPS) for i, j in itertools.product(range(3), range(3))]
TEST = tuple(t for t in TEMPLATES if t[2] == t[3] == HELD_OUT)  # both steps in held-out wordings
SHOTS = (("*", "-", 0, 0), ("+", "/", 1, 1))  # training templates: shown, never tested
TRAIN = tuple(t for t in TEMPLATES if HELD_OUT not in t[2:])  # (those with one held-out step are not used)


def problems(side, n, seed):
    """n problems of one side ('train', 'test' or 'shots'), each of a template drawn by its own generator."""
    keys = {"train": TRAIN, "test": TEST, "shots": SHOTS}[side]
    out = []
    for i in range(n):
        r = random.Random(f"wordprob-{side}-{seed}-{i}")
        out.append(problem(keys[i % len(keys)] if side == "shots" else r.choice(keys), r))
    return out
