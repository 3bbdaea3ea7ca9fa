"""The calculator tool: a small arithmetic parser that is safe by construction, and the environment that runs it
inside the model's answer (play.py), with what a run logs about its use. Standard library only; imports rewards.

The protocol, inline in the assistant's one turn: the model writes <calc>EXPR</calc>; generation pauses once the
text holds </calc> (a stop string of several tokens, sample.generate's stop_texts), the environment appends
<result>VALUE</result> (or <result>error: WHY</result>), tokenized on its own after the model's exact sampled tokens,
and the model goes on in the same turn. Inline rather than ChatML tool turns: the answer stays one assistant
message, so the answer protocol and its rewards read one completion as in every other task; SmolLM2's and Qwen's
small chat templates have no tool role a 135M model has seen; and a turn boundary after each result would cost
the tokens of a new turn and invite the model to end its answer there. The result tokens are context, never a
target (play.py's mask).

The calculator (`calculate`): ASCII integers and decimals, + - * / (also x-less symbols × ÷), unary minus,
parentheses, and powers (** or ^) with an integer exponent of at most MAX_EXP in size. Never eval. Values are exact
Fractions. Bounds make any call cost microseconds: at most MAX_CHARS characters, MAX_DIGITS digits a number,
MAX_DEPTH nested parentheses, and every intermediate value's numerator and denominator below 10**MAX_MAGNITUDE
(a power is checked before it is computed). Every bad call returns an error the model can read, never raises.

Reward hacking (tests/test_calc.py has one test each). Correctness pays and tool use earns nothing, so calls are
worth only the right answers they lead to. Closed: spamming calls (unpaid; a call past max_calls ends the
completion without an answer); a call on the question's literal text (an error result, never an exception); an
answer that is a call ("<answer><calc>12*3</calc>": the block then holds several numbers, so it is no answer); a
result tag the model writes itself, or a call on a guessed answer (<calc>4213</calc>, <calc>4213*1</calc>), counted
as a tool result by tool/correct_from_result (only the environment's results count, and only those that equal
no number of their own expression). Cannot: a right answer without a call is paid as one with (a right answer is a
right answer); a call on a guess disguised as a computation (<calc>4212+1</calc>) counts as computed.

Results are written as rewards._fmt-style decimals: an integer as is ("5535"), a finite decimal exactly ("2.5"),
any other fraction rounded half-even to 4 decimal places with trailing zeros dropped ("10/3" -> "3.3333"). Answers
are compared with the gold answer by exact value (rewards.correct: 143 == 143.0), so a rounded result is right only
where the gold answer is that decimal; the generated tasks' answers are integers.
"""
from fractions import Fraction

import rewards as R

OPEN, CLOSE = "<calc>", "</calc>"
MAX_CHARS = 200  # an expression longer than this is refused before it is read
MAX_DIGITS = 15  # digits in one number (integer and decimal parts together)
MAX_DEPTH = 20  # nested parentheses (and unary minuses): the parser recurses once per level
MAX_EXP = 20  # |exponent| of a power
MAX_MAGNITUDE = 30  # every value's numerator and denominator stay below 10**30
MAX_CALLS = 4  # calls a completion may make; one more call ends it, without an answer
DECIMALS = 4
DIGITS = "0123456789"  # not str.isdigit: it accepts '٣' and '²'


class CalcError(ValueError):
    """A call the calculator refuses; the message is what the model reads after 'error: '."""


def _check(v):
    """v, if its numerator and denominator are in bounds."""
    if abs(v.numerator) >= 10 ** MAX_MAGNITUDE or v.denominator >= 10 ** MAX_MAGNITUDE:
        raise CalcError("result too large")
    return v


def tokens(expr):
    """The expression's tokens: Fractions and the strings + - * / ** ( )."""
    out, i, n = [], 0, len(expr)
    while i < n:
        c = expr[i]
        if c in " \t\n":
            i += 1
        elif c in DIGITS or (c == "." and i + 1 < n and expr[i + 1] in DIGITS):
            j = i
            while j < n and expr[j] in DIGITS:
                j += 1
            k = j
            if j < n and expr[j] == ".":
                k = j + 1
                while k < n and expr[k] in DIGITS:
                    k += 1
            text = expr[i:k]
            if len(text) - text.count(".") > MAX_DIGITS:
                raise CalcError(f"a number has more than {MAX_DIGITS} digits")
            whole, _, frac = text.partition(".")
            out.append(Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac)))
            i = k
        elif expr.startswith("**", i):
            out.append("**")
            i += 2
        elif c in "+-*/()^×÷":
            out.append({"^": "**", "×": "*", "÷": "/"}.get(c, c))
            i += 1
        else:
            raise CalcError(f"unexpected {c!r}: only numbers, + - * / ** ( ) are allowed")
    return out


class _Parser:
    """Recursive descent: sum := product (('+'|'-') product)*; product := unary (('*'|'/') unary)*;
    unary := '-' unary | '+' unary | power; power := atom ('**' unary)?; atom := number | '(' sum ')'."""

    def __init__(self, toks):
        self.toks, self.i, self.depth = toks, 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        t = self.peek()
        if t is None:
            raise CalcError("the expression ends too early")
        self.i += 1
        return t

    def sum(self):
        v = self.product()
        while self.peek() in ("+", "-"):
            op = self.take()
            v = _check(v + self.product() if op == "+" else v - self.product())
        return v

    def product(self):
        v = self.unary()
        while self.peek() in ("*", "/"):
            op, w = self.take(), self.unary()
            if op == "/" and w == 0:
                raise CalcError("division by zero")
            v = _check(v * w if op == "*" else v / w)
        return v

    def unary(self):
        if self.peek() in ("-", "+"):
            self.nest()
            sign = self.take()
            v = self.unary()
            self.depth -= 1
            return -v if sign == "-" else v
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        self.nest()
        e = self.unary()  # right-associative: 2**3**2 = 2**9, and 2**-1 = 0.5
        self.depth -= 1
        if e.denominator != 1 or abs(e) > MAX_EXP:
            raise CalcError(f"an exponent must be a whole number from -{MAX_EXP} to {MAX_EXP}")
        if base == 0 and e < 0:
            raise CalcError("division by zero")
        # bound the result before computing it: |num|**|e| and den**|e| must stay in bounds
        if max(abs(base.numerator), base.denominator) ** abs(int(e)) >= 10 ** MAX_MAGNITUDE:
            raise CalcError("result too large")
        return _check(base ** int(e))

    def atom(self):
        t = self.take()
        if isinstance(t, Fraction):
            return t
        if t == "(":
            self.nest()
            v = self.sum()
            if self.peek() != ")":
                raise CalcError("a '(' is not closed")
            self.take()
            self.depth -= 1
            return v
        raise CalcError(f"unexpected {t!r}")

    def nest(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError(f"more than {MAX_DEPTH} nested levels")


def calculate(expr):
    """(value, None) of an arithmetic expression, or (None, why) if the calculator refuses it; never raises."""
    # The one place a bound could be missed is the power: its operands are bounded in size (MAX_DIGITS, MAX_EXP) and
    # the result's size is checked from theirs before it is computed, so no call does big-integer work.
    if not isinstance(expr, str):
        return None, "not text"
    if len(expr) > MAX_CHARS:
        return None, f"longer than {MAX_CHARS} characters"
    try:
        p = _Parser(tokens(expr))
        if p.peek() is None:
            raise CalcError("empty expression")
        v = p.sum()
        if p.peek() is not None:
            raise CalcError(f"unexpected {p.peek()!r}" if not isinstance(p.peek(), Fraction) else
                            "two numbers with no operator between them")
        return v, None
    except CalcError as e:
        return None, str(e)


def format_value(v):
    """A result as the model reads it: '5535', '2.5', '-0.125', or a non-finite decimal rounded to 4 places."""
    s = R._fmt(v)
    if "/" not in s:
        return s
    q = round(v, DECIMALS)  # Fraction rounding: exact, half-even
    return R._fmt(q) if q != 0 or v == 0 else "0"


def result_text(expr):
    """What the environment appends after a call: '<result>5535</result>' or '<result>error: ...</result>'."""
    v, err = calculate(expr)
    return f"<result>{'error: ' + err if err else format_value(v)}</result>"


# ----------------------------------------------------------------------------- the environment

class Calculator:
    """One completion's calculator: play.py's environment for a tool task (one assistant turn, paused per call)."""
    # play.py's interface: messages() the chat before the turn; pause(text) when the turn's text reached a stop
    # string: the text to append inside the turn, or None to end the episode; play(text) when the turn ended: None
    # (one turn only); done. The texts are the model's since the last pause.
    def __init__(self, messages, max_calls=MAX_CALLS, tags=(OPEN, CLOSE)):
        # tags: the call's opening and closing text (tests use short ones that a tiny random model writes)
        self.opening, self.max_calls, (self.open, self.close) = list(messages), max_calls, tags
        self.stop_texts = (self.close,)
        self.parts = []  # [["model" | "tool", text]]: the transcript, the tool's parts marked
        self.calls = []  # [{"expr", "result", "error"}]
        self.ended = None  # "turn": the turn ended (or was cut); "over_cap": one call more than max_calls

    @property
    def done(self):
        return self.ended is not None

    def messages(self):
        return self.opening

    def pause(self, text):
        """The call the text ends with, answered: '<result>...</result>'; None past max_calls (the episode ends)."""
        self.parts.append(["model", text])
        if len(self.calls) >= self.max_calls:
            self.ended = "over_cap"
            return None
        head = text[:text.find(self.close)]  # the text before this call's </calc> (play.py pauses at the first)
        start = head.rfind(self.open)
        expr = head[start + len(self.open):] if start >= 0 else None
        res = f"<result>error: no {self.open} before {self.close}</result>" if expr is None else result_text(expr)
        self.calls.append({"expr": expr, "result": res[len("<result>"):-len("</result>")],
                           "error": res.startswith("<result>error:")})
        # The token that completed </calc> may have run on into the start of the result tag ("><" is one token in
        # SmolLM2's vocabulary): the tool then writes the rest of the tag, so the text reads <result> once.
        tail = text[text.find(self.close) + len(self.close):]
        res = res[len(tail):] if tail and res.startswith(tail) else res
        self.parts.append(["tool", res])
        return res

    def play(self, text):
        """The turn ended (on a stop token, or cut at the token budget: the Rollout's stopped flag says which)."""
        self.parts.append(["model", text])
        self.ended = "turn"

    def record(self):
        """The episode for rewards, logs and evaluation: its transcript (the tool's parts marked) and calls."""
        return {"transcript": self.parts, "calls": self.calls, "ended": self.ended}


def transcript_text(record):
    """The whole text of an episode: the model's and the tool's parts in order (what the rewards read)."""
    return "".join(t for _, t in record["transcript"])


def model_text(record):
    """The text the model wrote, without the tool's results."""
    return "".join(t for who, t in record["transcript"] if who == "model")


def computed_results(record):
    """The values of the record's calls that computed something: an error-free result that equals no number in its
    expression (so a call on a guessed answer, <calc>4213</calc> or <calc>4213*1</calc>, computes nothing)."""
    out = []
    for c in record["calls"]:
        if c["error"] or c["expr"] is None:
            continue
        v = R.parse_number(c["result"])
        literals = {t for t in tokens(c["expr"]) if isinstance(t, Fraction)}
        if v is not None and v not in literals:
            out.append(v)
    return out


# ----------------------------------------------------------------------------- what a run logs: tool/* ratios
# Each is (numerator, denominator) per completion; a step's (and an evaluation's) value is the sum of numerators over
# the sum of denominators, null when that is 0 (no call made, no answer right): a quantity that does not exist is
# not 0. Tool use earns no reward: these are only measured.

def calls_made(completion, game=None, **_):
    """tool/calls: calls per completion."""
    return len(game["calls"]), 1


def used_tool(completion, game=None, **_):
    """tool/used_frac: the share of completions with at least one call."""
    return float(bool(game["calls"])), 1


def call_errors(completion, game=None, **_):
    """tool/error_rate: the share of calls that got an error result."""
    return sum(c["error"] for c in game["calls"]), len(game["calls"])


def correct_from_tool(completion, gold, game=None, **_):
    """tool/correct_from_result: the share of right answers that equal a value the calculator computed."""
    if not R.correct(completion, gold):
        return 0, 0
    a = R.parse_number(R.answer_block(completion))
    return float(a in computed_results(game)), 1


TOOL_RATIOS = {"tool/calls": calls_made, "tool/used_frac": used_tool, "tool/error_rate": call_errors,
               "tool/correct_from_result": correct_from_tool}


def ratios(rows, fns=TOOL_RATIOS):
    """{name: sum of numerators / sum of denominators, or None} over rows of (completion, fields)."""
    out = {}
    for k, f in fns.items():
        num = den = 0.0
        for text, fields in rows:
            a, b = f(text, **fields)
            num, den = num + a, den + b
        out[k] = num / den if den else None
    return out
