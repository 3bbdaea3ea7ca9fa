"""calc.py: the calculator against Python's arithmetic, hostile calls, the environment, and the tool's hacks."""
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

import calc as C
import rewards as R
import tasks as T


# ----------------------------------------------------------------------------- the calculator

def number():
    """(text, value) of an ASCII integer or decimal literal."""
    ints = st.integers(0, 10 ** 6).map(lambda n: (str(n), Fraction(n)))
    decs = st.tuples(st.integers(0, 9999), st.integers(0, 999)).map(
        lambda t: (f"{t[0]}.{t[1]:03d}", Fraction(t[0]) + Fraction(t[1], 1000)))
    return st.one_of(ints, decs)


def expression():
    """(text, value) of a valid expression, its value computed by Python's Fraction arithmetic alongside."""
    def extend(inner):
        def binary(t):
            (a, x), op, (b, y) = t
            if op == "/" and y == 0:
                return f"({a})+({b})", x + y
            v = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
            return f"({a}){op}({b})", v
        pw = st.tuples(inner, st.integers(0, 3)).map(lambda t: (f"({t[0][0]})**{t[1]}", t[0][1] ** t[1]))
        neg = inner.map(lambda t: (f"-({t[0]})", -t[1]))
        return st.one_of(st.tuples(inner, st.sampled_from("+-*/"), inner).map(binary), pw, neg)
    return st.recursive(number(), extend, max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(expression())
def test_calculator_equals_pythons_arithmetic(e):
    text, want = e
    got, err = C.calculate(text)
    if err is None:
        assert got == want
    else:  # refused only for size: a value past the bounds, or the text past MAX_CHARS
        assert err in ("result too large", f"longer than {C.MAX_CHARS} characters"), (text, err)
        assert len(text) > C.MAX_CHARS or max(abs(want.numerator), want.denominator) >= 10 ** 20 or any(
            ch in text for ch in "*/")


@pytest.mark.parametrize("expr,value", [
    ("123*45", 5535), ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("10 / 4", Fraction(5, 2)), ("-3 - -2", -1),
    ("2**10", 1024), ("2^10", 1024), ("2**3**2", 512), ("2**-2", Fraction(1, 4)), (".5 + 1.25", Fraction(7, 4)),
    ("7 × 6 ÷ 3", 14), ("  42  ", 42), ("1.50", Fraction(3, 2)), ("+5", 5)])
def test_calculator_values(expr, value):
    assert C.calculate(expr) == (value, None)


@pytest.mark.parametrize("expr,why", [
    ("", "empty expression"), ("2 +", "the expression ends too early"), ("(2 + 3", "a '(' is not closed"),
    ("2 3", "two numbers with no operator between them"), ("1 / 0", "division by zero"),
    ("1 / (2 - 2)", "division by zero"), ("0 ** -1", "division by zero"),
    ("9 ** 99999", "an exponent must be a whole number from -20 to 20"),
    ("99999 ** 20", "result too large"), ("2 ** 0.5", "an exponent must be a whole number from -20 to 20"),
    ("1" * 16, "a number has more than 15 digits"),
    ("__import__('os').system('ls')", "unexpected '_': only numbers, + - * / ** ( ) are allowed"),
    ("abs(3)", "unexpected 'a': only numbers, + - * / ** ( ) are allowed"),
    ("(1).real", "unexpected '.': only numbers, + - * / ** ( ) are allowed"),
    ("x * 2", "unexpected 'x': only numbers, + - * / ** ( ) are allowed"),
    ("٣ + 1", "unexpected '٣': only numbers, + - * / ** ( ) are allowed"),  # Arabic-Indic three: not ASCII
    ("2²", "unexpected '²': only numbers, + - * / ** ( ) are allowed"),
    ("1e5", "unexpected 'e': only numbers, + - * / ** ( ) are allowed"),
    ("1,000 + 1", "unexpected ',': only numbers, + - * / ** ( ) are allowed"),
    ("9" * 10000, f"longer than {C.MAX_CHARS} characters"),
    ("(" * 30 + "1" + ")" * 30, "more than 20 nested levels"), ("-" * 30 + "1", "more than 20 nested levels")])
def test_bad_calls_get_a_readable_error_never_an_exception(expr, why):
    assert C.calculate(expr) == (None, why)
    assert C.result_text(expr) == f"<result>error: {why}</result>"


def test_no_call_does_big_work():
    # the worst a call can ask within the bounds: chained maximal powers and products, and deep nesting
    worst = ["999999999999999**20", "(999999999999999*999999999999999)**20", "*".join(["999999999999999"] * 12),
             "/".join(["7"] * 99), "2**20**20**20", "1/" * 60 + "3", "((((" * 5 + "9**19" + "))))" * 5]
    for expr in worst:
        t0 = time.perf_counter()
        C.calculate(expr[:C.MAX_CHARS])
        assert time.perf_counter() - t0 < 0.05, expr  # a loose bound: microseconds by design (10**30 caps)
    assert C.calculate(123) == (None, "not text")


@pytest.mark.parametrize("v,text", [
    (Fraction(5535), "5535"), (Fraction(5, 2), "2.5"), (Fraction(-1, 8), "-0.125"), (Fraction(10, 3), "3.3333"),
    (Fraction(2, 3), "0.6667"), (Fraction(-2, 3), "-0.6667"), (Fraction(1, 30000), "0"), (Fraction(0), "0")])
def test_results_are_written_as_stated(v, text):
    assert C.format_value(v) == text


# ----------------------------------------------------------------------------- the environment

def episode(*segments, max_calls=C.MAX_CALLS):
    """A Calculator fed the model's segments: all but the last pause, the last ends the turn."""
    env = C.Calculator([{"role": "user", "content": "q"}], max_calls=max_calls)
    inline = [env.pause(s) for s in segments[:-1]]
    if not env.done:
        env.play(segments[-1])
    return env, inline


def test_a_call_is_answered_inline_and_the_transcript_marks_the_tools_part():
    env, inline = episode("Total: <calc>123*45</calc>", "\nSo <calc>5535 - 35</calc>", " left.\n<answer>5500</answer>")
    assert inline == ["<result>5535</result>", "<result>5500</result>"]
    rec = env.record()
    assert rec["calls"] == [{"expr": "123*45", "result": "5535", "error": False},
                            {"expr": "5535 - 35", "result": "5500", "error": False}]
    assert [w for w, _ in rec["transcript"]] == ["model", "tool", "model", "tool", "model"]
    assert C.transcript_text(rec) == ("Total: <calc>123*45</calc><result>5535</result>\nSo <calc>5535 - 35</calc>"
                                      "<result>5500</result> left.\n<answer>5500</answer>")
    assert C.model_text(rec) == "Total: <calc>123*45</calc>\nSo <calc>5535 - 35</calc> left.\n<answer>5500</answer>"
    assert env.done and rec["ended"] == "turn"


def test_a_token_run_past_the_closing_tag_is_completed_not_repeated():
    # "><" is one SmolLM2 token: the model's text ends "</calc><", and the tool writes the rest of "<result>"
    env, inline = episode("<calc>2*3</calc><", "done")
    assert inline == ["result>6</result>"]
    assert C.transcript_text(env.record()) == "<calc>2*3</calc><result>6</result>done"
    env, inline = episode("<calc>2*3</calc>.", "done")  # any other run-on is kept, and the tag written whole
    assert inline == ["<result>6</result>"]


def test_a_close_without_an_open_and_the_call_cap():
    env, inline = episode("oops</calc>", "x")
    assert inline == ["<result>error: no <calc> before </calc></result>"] and env.record()["calls"][0]["error"]
    segs = [f"<calc>{i}+1</calc>" for i in range(C.MAX_CALLS + 1)] + ["never reached"]
    env, inline = episode(*segs)
    assert inline[-1] is None and len(inline) == C.MAX_CALLS + 1  # one call more than the cap ends the episode
    assert env.done and env.record()["ended"] == "over_cap" and len(env.record()["calls"]) == C.MAX_CALLS


# ----------------------------------------------------------------------------- rewards, ratios and hacks

def wordprob_reward(rec, gold):
    fields = {"gold": gold, "game": rec, "prompt": "p"}
    return R.combine(T.TASKS["wordprob"].game_rewards, C.transcript_text(rec), **fields)[0], C.ratios(
        [(C.transcript_text(rec), fields)])


RIGHT = "<reasoning>\nTotal: {}\n</reasoning>\n<answer>\n5535\n</answer>"


def written(text, **kw):
    """The episode of a model that writes `text`: paused after each </calc>, as play.py pauses it."""
    parts = text.split("</calc>")
    return episode(*[p + "</calc>" for p in parts[:-1]], parts[-1], **kw)[0].record()


def test_correctness_pays_and_tool_use_itself_earns_nothing():
    with_call, r1 = wordprob_reward(written(RIGHT.format("<calc>123*45</calc>")), "5535")
    # the same right answer without a call (worked by hand) earns the same: calls are not paid
    by_hand, r2 = wordprob_reward(written(RIGHT.format("123 * 45 = 5535")), "5535")
    assert with_call == by_hand == pytest.approx(1.1)
    assert r1 == {"tool/calls": 1, "tool/used_frac": 1, "tool/error_rate": 0, "tool/correct_from_result": 1}
    assert r2 == {"tool/calls": 0, "tool/used_frac": 0, "tool/error_rate": None, "tool/correct_from_result": 0}
    # spamming calls cannot pay: the same answer after four extra calls earns the same, a fifth ends the episode
    spam = "".join(f"<calc>{i}*2</calc>" for i in range(3))
    assert wordprob_reward(written(RIGHT.format(spam + "<calc>123*45</calc>")), "5535")[0] == pytest.approx(1.1)
    rec = written(RIGHT.format(spam + "<calc>1+1</calc><calc>123*45</calc>"))
    assert rec["ended"] == "over_cap" and wordprob_reward(rec, "5535")[0] == 0


def test_hack_a_call_on_the_questions_literal_text():
    q = "A school orders 123 packs of 45 pencils. How many pencils?"
    rec = written(f"<calc>{q}</calc><reasoning>\nx y z\n</reasoning>\n<answer>\n1\n</answer>")
    assert rec["calls"][0]["error"] and rec["calls"][0]["result"].startswith("error: unexpected 'A'")
    reward, ratios = wordprob_reward(rec, "5535")
    assert reward == 0 and ratios["tool/error_rate"] == 1 and ratios["tool/correct_from_result"] is None


def test_hack_a_result_pasted_without_a_call_is_not_a_tool_result():
    # the model writes the tag itself: the answer is right (and paid), but it is no calculator result
    forged = RIGHT.format("123 * 45 <result>5535</result>")
    rec = written(forged)
    reward, ratios = wordprob_reward(rec, "5535")
    assert reward == pytest.approx(1.1) and ratios["tool/correct_from_result"] == 0
    assert rec["transcript"] == [["model", forged]]  # the transcript marks it as the model's text


@pytest.mark.parametrize("call", ["5535", "(5535)", "5535*1", "5535 + 0", "--5535"])
def test_hack_a_call_on_a_guessed_answer_is_not_a_computed_result(call):
    rec = written(RIGHT.format(f"<calc>{call}</calc>"))
    assert not rec["calls"][0]["error"] and C.computed_results(rec) == []
    reward, ratios = wordprob_reward(rec, "5535")
    assert reward >= 1 and ratios["tool/correct_from_result"] == 0


def test_an_answer_made_of_a_call_is_not_an_answer():
    rec = written("<reasoning>\n12 * 3\n</reasoning>\n<answer><calc>12*3</calc></answer>")
    assert C.transcript_text(rec).endswith("<answer><calc>12*3</calc><result>36</result></answer>")
    assert wordprob_reward(rec, "36")[0] == 0  # the answer block holds 12, 3 and 36: not one number
