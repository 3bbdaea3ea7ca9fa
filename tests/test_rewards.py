"""Tests for rewards.py: robustness, numeric parsing, anti-hacking, Wordle rules, combine."""
import json
import math
import os
import sys
import time
from collections import Counter
from fractions import Fraction
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewards as R  # noqa: E402

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"
INSTRUCTION = ("First think inside <reasoning> </reasoning> tags, then give the final number inside "
               "<answer> </answer> tags.")
QUESTION = "A box holds 6 rows of 7 eggs. How many eggs are in the box?"
# what train.py passes as `prompt`: every prompt message's text joined with "\n" (system, then user)
PROMPT = ("Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
          f"{QUESTION}\n\n{INSTRUCTION}")
FIELDS = dict(gold="42", secret="CRANE", history=[("SLATE", "XXGXG"), ("TRACE", list("XGGYG"))], num_tokens=None,
              prompt=PROMPT)
ALL_REWARDS = [R.correct, R.correct_lenient, R.format_strict, partial(R.format_strict, layout="think"), R.format_soft,
               R.integer_answer, R.xml_count, R.wordle_correct, R.wordle_partial, R.wordle_format,
               R.wordle_consistent, R.length_penalty]
GOOD = "<reasoning>\n6 * 7 = 42\n</reasoning>\n<answer>\n42\n</answer>\n"


def wrap(x, reasoning="6 times 7 is 42"):
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{x}\n</answer>\n"


# ----------------------------------------------------------------------------- robustness

# text biased towards the structure rewards look at, mixed with arbitrary unicode
PIECES = ["<answer>", "</answer>", "<reasoning>", "</reasoning>", "<think>", "</think>", "<guess>", "</guess>",
          "\n", " ", "1", "42", ",", ".", "/", "-", "$", "%", "e", "0", "CRANE", "slate", "ß", "\u2212", "٣"]
texts = st.one_of(st.text(), st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3))).map("".join))


@settings(max_examples=200, deadline=None)
@given(texts)
def test_never_raises_or_nan(s):
    for fn in ALL_REWARDS:
        r = fn(s, **FIELDS)
        assert isinstance(r, float) and math.isfinite(r), (fn, s)
    total, per = R.combine(R.GSM8K_REWARDS + R.WORDLE_REWARDS, s, **FIELDS)
    assert math.isfinite(total) and all(math.isfinite(v) for v in per.values())
    assert -0.5 <= R.xml_count(s) <= 0.5
    assert 0.0 <= R.wordle_partial(s, secret="CRANE") <= 1.0
    for f in (R.parse_number, R.last_number, R.answer_block, R.parse_guess, R.reasoning_block, R.well_formed):
        f(s)


ADVERSARIAL = [
    "<answer>" * 100_000, "1," * 500_000, "<reasoning>\n" * 100_000, "9" * 1_000_000, "1e" + "9" * 999_998,
    "<answer>\n" + "1," * 500_000 + "\n</answer>", "<answer>\n" + "9" * 1_000_000 + "\n</answer>",
    "<answer>\n" + "1" + ",000" * 250_000 + "1\n</answer>", "\n</reasoning>\n<answer>\n" * 45_000,
    "<guess>" * 140_000, "<guess>" + "A" * 1_000_000 + "</guess>", "-" * 1_000_000, "1." * 500_000,
    "1/" * 500_000, "$" * 1_000_000,
    wrap("x" * 1_000_000), "<reasoning>\n" + "x" * 1_000_000 + "\n</reasoning>\n<answer>\n42\n</answer>\n" + "y" * 10,
    "<think>" + " " * 1_000_000 + "</think>" * 2, "é" * 1_000_000, "</answer>" + "z" * 1_000_000,
    wrap(42, "Ab " * 333_333), wrap(42, "-" * 1_000_000), "--" * 500_000 + "5", "-\u2212." * 333_333 + "5",
]


@pytest.mark.parametrize("s", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_huge_adversarial_inputs_fast(s):
    for fn in ALL_REWARDS:
        t = time.perf_counter()
        r = fn(s, **FIELDS)
        dt = time.perf_counter() - t
        assert math.isfinite(r)
        assert dt < 1.0, (fn, dt)  # catastrophic-backtracking guard; linear scans take ~0.01-0.25 s per MB


def test_non_str_is_type_error():
    for bad in (None, b"<answer>42</answer>", 42, ["42"]):
        with pytest.raises(TypeError):
            R.correct(bad, gold="42")
        with pytest.raises(TypeError):
            R.parse_number(bad)


def test_bad_fields_are_value_errors():
    with pytest.raises(ValueError):
        R.format_strict(GOOD, layout="xml")
    with pytest.raises(ValueError):
        R.well_formed(GOOD, layout="xml")
    with pytest.raises(ValueError):
        R.wordle_partial("<guess>CRANE</guess>", secret="CRANES")


# ----------------------------------------------------------------------------- numbers

def int_formats(n):
    """Every accepted spelling of integer n."""
    a, sign = abs(n), "-" if n < 0 else ""
    fs = [f"{a}", f"{a:,}", f"${a}", f"${a:,}", f"{a}.00", f"{a}.0", f"{a}.", f"{a}%", f"{a:,} dollars",
          f"{a}/1"]
    return [sign + f for f in fs] + [f"the answer is {sign}{a:,}."] + \
        ([f"-${a:,}", f"$-{a}", f"\u2212{a}"] if n < 0 else [])


def dec_formats(ip, fd):
    """Every accepted spelling of ip.fd (ip >= 0, fd a non-empty digit string)."""
    return [f"{ip}.{fd}", f"{ip:,}.{fd}", f"{ip}.{fd}000", f"${ip:,}.{fd}", f"{ip:,}.{fd} kg"] + \
        ([f".{fd}"] if ip == 0 else [])


@given(st.integers(-10**30, 10**30))
def test_integer_formats_parse_equal(n):
    for f in int_formats(n):
        assert R.parse_number(f) == n, f
        assert R.last_number(f) == n, f
    assert R.parse_number(str(n)) == R.parse_number(str(n))  # reflexive


@given(st.integers(0, 10**12), st.integers(0, 10**6), st.integers(0, 3), st.booleans())
def test_decimal_formats_parse_equal(ip, frac, zeros, neg):
    fd = "0" * zeros + str(frac)
    v = ip + Fraction(int(fd), 10 ** len(fd))
    for f in dec_formats(ip, fd):
        if neg:
            f = "-" + f
        assert R.parse_number(f) == (-v if neg else v), f


def test_parse_number_examples():
    F = Fraction
    cases = {"1,234": 1234, "1234": 1234, "$1234": 1234, "1234.00": 1234, "1234.": 1234, "-5": -5, "3/4": F(3, 4),
             "0.5": F(1, 2), "50%": 50, "$1,234 dollars": 1234, "18 ... 18.0": 18, "-$5": -5,
             "": None, "no digits": None, "3 or 4 or 5": None, "3-5": None, "1/0": None, "1e5": None,
             "x2": None, "9" * 101: None, "9" * 100: int("9" * 100)}
    for t, v in cases.items():
        assert R.parse_number(t) == v, t
    assert R.last_number("3 apples, 4 pears, total 7.") == 7
    assert [R._to_fraction(t) for t in R._NUM.findall("3-4")] == [3, 4]
    assert R.last_number("3-4") == 4 and R.parse_number("- 5") == 5  # a spaced minus is no sign: unchanged
    assert R.last_number("7 then 1e999999") == 7  # exponent token rejected, earlier number kept


def test_extract_gold():
    assert R.extract_gold("Natalia...\n#### 72") == "72"
    assert R.extract_gold("x #### 3\n#### 1,234") == "1234"  # the final marker wins
    assert R.extract_gold("#### -7") == "-7"
    assert R.extract_gold("#### 0.50") == "0.5"
    assert R.extract_gold("#### $1,200.00") == "1200"
    for bad in ("72", "#### ", "#### seventy", "#### 3 or 4", "#### 1e5"):
        with pytest.raises(ValueError):
            R.extract_gold(bad)


def test_a_number_without_a_value_is_a_second_candidate():
    # "7/0" used to be skipped, so "42 7/0" scored as 42: a hedge the answer block must refuse
    for t in ("42 7/0", "7/0 42", "<answer>42 or 7/0</answer>", "42 --42", "42 " + "9" * (R.MAX_DIGITS + 1)):
        assert R.parse_number(t) is None, t
    for t in ("7/0", "--5"):
        assert R.parse_number(t) is None, t
    assert R.parse_number("42 and 42.0") == 42  # the same value twice is still one candidate
    hedge = "<reasoning>\n6 * 7 = 42, or maybe 7/0\n</reasoning>\n<answer>\n42 7/0\n</answer>"
    assert R.correct(hedge, gold="42") == 0.0
    assert R.correct_lenient(hedge, gold="42") == 1.0  # lenient reads the last number with a value, by design


def test_double_minus_is_no_number():
    for t in ("--5", "\u2212\u22125", "-\u22125", "\u2212-5", "--$5", "$--5", "--.5", "x --5 y",
              "<answer>--5</answer>"):
        assert R.parse_number(t) is None, t
        assert R.last_number(t) is None, t
    for t in ("-5", "$-5", "-$5", "\u22125", "x -5 y"):
        assert R.parse_number(t) == -5, t
    assert R.parse_number("3--4") is None  # "--4" has no value, so it is a second candidate beside the 3
    a = R.answer_block("<answer>--5</answer>")
    assert a == "--5" and R.parse_number(a) is None
    hedge = "<reasoning>\nsome real work here\n</reasoning>\n<answer>\n--5\n</answer>"
    for gold in ("5", "-5"):
        assert R.correct(hedge, gold=gold) == 0.0 and R.correct_lenient(hedge, gold=gold) == 0.0
    assert R.integer_answer(hedge) == 0.0 and not R.well_formed(hedge)
    with pytest.raises(ValueError):
        R.extract_gold("#### --5")


# ----------------------------------------------------------------------------- correctness

@given(st.integers(-10**15, 10**15), st.integers(1, 10**6))
def test_correct_any_format_and_wrong_number(n, delta):
    gold = R.extract_gold(f"#### {n}")
    for f in int_formats(n):
        assert R.correct(wrap(f), gold=gold) == 1.0, f
        assert R.correct(f"<answer>{f}</answer>", gold=gold) == 1.0, f
        assert R.correct_lenient(f"blah 3 blah {f}", gold=gold) == 1.0, f
    assert R.correct(wrap(n + delta), gold=gold) == 0.0
    assert R.correct(wrap(f"{n}.5"), gold=gold) == 0.0


# CI lays ../shared beside the clone, so there the data must be found: a skip would hide the test (CI=true)
@pytest.mark.skipif(not GSM8K_TRAIN.exists() and not os.environ.get("CI"),
                    reason=f"GSM8K train file not found at {GSM8K_TRAIN}")
def test_correct_on_every_gsm8k_gold():
    n = 0
    with open(GSM8K_TRAIN) as f:
        for line in f:
            ans = json.loads(line)["answer"]
            gold = R.extract_gold(ans)
            raw = ans.rsplit("####", 1)[1].strip()
            v = R.parse_number(gold)
            assert v is not None and v == R.parse_number(raw) and R._fmt(v) == gold
            for s in (raw, gold, f"${raw}", f"{gold}.00", f"{raw} dollars"):
                assert R.correct(wrap(s), gold=gold) == 1.0, (raw, s)
            assert R.correct(wrap(v + 1), gold=gold) == 0.0
            assert R.correct_lenient(ans, gold=gold) == 1.0  # the reference solution ends with its answer
            n += 1
    assert n > 7000


def test_hacks_rejected():
    g = "42"
    assert R.correct(GOOD, gold=g) == 1.0
    assert R.correct("<answer>42</answer><answer>42</answer>", gold=g) == 0.0  # several blocks
    assert R.correct("<answer>41</answer>\n<answer>42</answer>", gold=g) == 0.0
    assert R.correct(wrap("3 or 4 or 42"), gold=g) == 0.0  # several candidates in one block
    assert R.correct(wrap("41, 42"), gold=g) == 0.0
    assert R.correct(wrap("41-43"), gold=g) == 0.0
    assert R.correct(wrap(""), gold=g) == 0.0 and R.correct(wrap("  \n\t "), gold=g) == 0.0  # empty
    assert R.correct(wrap(""), gold="0") == 0.0
    assert R.correct("<answer>\n42\n", gold=g) == 0.0  # unclosed
    assert R.correct("</answer>42<answer>", gold=g) == 0.0  # misordered
    assert R.correct("the answer is 42", gold=g) == 0.0  # outside tags: strict no, lenient yes
    assert R.correct_lenient("the answer is 42", gold=g) == 1.0
    assert R.correct(wrap("42 ... so 42.0"), gold=g) == 1.0  # repeats of one value are fine
    # trailing text after </answer> is penalised by xml_count, proportionally and bounded
    assert R.xml_count(GOOD) == 0.5
    assert R.xml_count(GOOD + "x" * 100) == pytest.approx(0.4)
    assert R.xml_count(GOOD + "x" * 10**6) == 0.0
    assert R.xml_count("</answer>" + "x" * 10**6) == -0.5
    assert R.format_strict(GOOD + "bonus") == 0.0
    assert R.integer_answer(wrap("3 or 4")) == 0.0


def test_format_strict_and_soft():
    assert R.format_strict(GOOD) == 1.0
    assert R.format_strict(GOOD.rstrip()) == 1.0 and R.format_strict(GOOD + "\n  ") == 1.0  # trailing ws ok
    assert R.format_strict("<reasoning>\n6 rows\nof 7 eggs: 6 * 7\n</reasoning>\n<answer>\n42\n</answer>") == 1.0
    assert R.format_strict("<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>\n") == 0.0  # empty: closed by the gate
    assert R.format_strict("<reasoning>\n</reasoning>\n<answer>\n</answer>\n") == 0.0  # regex needs \n..\n
    assert R.format_strict("<reasoning>6 times 7</reasoning>\n<answer>\n42\n</answer>") == 0.0  # well-formed, no \n
    assert R.format_strict(" " + GOOD) == 0.0  # leading junk
    assert R.format_strict("<reasoning>x</reasoning>\n<answer>\n42\n</answer>") == 0.0
    assert R.format_strict(wrap(42, "x")) == 0.0 and R.format_strict(wrap(42, "...")) == 0.0  # right layout, gated
    assert R.format_strict(wrap("...", "6 times 7 is 42")) == 0.0  # no number
    assert R.format_strict(GOOD.replace("42\n</answer>", "<answer>42\n</answer>")) == 0.0  # duplicate tag
    think = "<think>\nsix sevens: 6 * 7 = 42\n</think>\n<answer>42</answer>"
    assert R.format_strict(think, layout="think") == 1.0
    assert R.format_strict("<think>a b c 6x7</think><answer>42</answer>", layout="think") == 1.0
    assert R.format_strict("<think>a b c</think><answer>42</answer>", layout="think") == 0.0  # no calculation
    assert R.format_strict("<think>hmm</think><answer>42</answer>", layout="think") == 0.0  # gated on <think>
    assert R.format_strict("<think>a b c 6x7</think> x <answer>42</answer>", layout="think") == 0.0
    assert R.format_strict(think + " extra", layout="think") == 0.0
    assert R.format_strict(think) == 0.0 and R.format_strict(GOOD, layout="think") == 0.0
    assert R.format_soft("pre <reasoning>a\nb c 2+2</reasoning> mid <answer>4</answer> post") == 1.0
    assert R.format_soft("pre <reasoning>a\nb</reasoning> mid <answer>4</answer> post") == 0.0  # 2 words: gated
    assert R.format_soft("<reasoning>a b c 2+2</reasoning><answer>x</answer>") == 0.0  # no number: gated
    assert R.format_soft("<answer>4</answer><reasoning>a b c 2+2</reasoning>") == 0.0
    assert R.format_soft("<reasoning>a</reasoning>") == 0.0


def test_integer_answer_and_xml_count():
    for a, want in [("42", 1), ("-7", 1), ("1,234", 1), ("42.0", 0), ("$42", 0), ("4 2", 0), ("", 0), ("x", 0)]:
        assert R.integer_answer(wrap(a)) == want, a
    assert R.integer_answer(wrap("9" * 101)) == 0.0
    assert R.integer_answer(wrap("42", "work")) == 0.0  # gated: one-word reasoning
    assert R.integer_answer("<answer>\n42\n</answer>") == 0.0  # gated: no reasoning
    assert R.xml_count(GOOD.replace("<reasoning>\n", "<reasoning>")) == 0.375  # 0.125 per tag-with-newline
    assert R.xml_count("<reasoning>\n") == 0.0  # gated: the tag credit needs a well-formed completion
    assert R.xml_count("<reasoning>\n<reasoning>\n") == 0.0  # a tag twice earns nothing
    assert R.xml_count(wrap("...", "...") + "x" * 100) == pytest.approx(-0.1)  # not well-formed: penalty only
    assert R.xml_count(GOOD.rstrip("\n")) == 0.5


# ----------------------------------------------------------------------------- Wordle

@pytest.mark.parametrize("secret,guess,want", [
    ("ABBEY", "BABES", "YYGGX"),
    ("SPEED", "EERIE", "YYXXX"),  # secret has two E's -> first two E's yellow, third gray
    ("CRANE", "EERIE", "XXYXG"),  # the only E is green, so the other E's are gray
    ("ABBEY", "KEBAB", "XYGYY"),
    ("ABBEY", "BOBBY", "YXGXG"),  # one spare B -> first B yellow, last B gray
    ("LLAMA", "HELLO", "XXYYX"),
    ("APPLE", "PAPAL", "YYGXY"),
    ("crane", "CRANE", "GGGGG"),  # case-insensitive
])
def test_wordle_feedback_hand_cases(secret, guess, want):
    assert "".join(R.wordle_feedback(guess, secret)) == want


def test_wordle_feedback_rejects_bad_words():
    for g, s in [("CRAN", "CRANE"), ("CRANES", "CRANE"), ("CRAN3", "CRANE"), ("CRANE", "ÉCRAN"), ("CRANE", "")]:
        with pytest.raises(ValueError):
            R.wordle_feedback(g, s)


words = st.text(alphabet="ABCDE", min_size=5, max_size=5)  # tiny alphabet forces duplicate letters


@given(words, words)
def test_wordle_feedback_properties(guess, secret):
    fb = R.wordle_feedback(guess, secret)
    for i in range(5):
        assert (fb[i] == "G") == (guess[i] == secret[i])
    cs, cg = Counter(secret), Counter(guess)
    for ch in cg:
        used = sum(1 for i in range(5) if guess[i] == ch and fb[i] in "GY")
        assert used <= cs[ch] and used == min(cs[ch], cg[ch])  # official rule
    p = R.wordle_partial(f"<guess>{guess}</guess>", secret=secret)
    assert 0.0 <= p <= 1.0 and (p == 1.0) == (guess == secret)
    assert R.wordle_correct(f"<guess>{guess.lower()}</guess>", secret=secret) == float(guess == secret)


def _naive_partial(guess, secret):
    """The course's naive partial credit: any non-green letter `in secret` is yellow (over-counts duplicates)."""
    return sum(0.2 if g == s else 0.1 if g in secret else 0.0 for g, s in zip(guess, secret))


def test_naive_partial_overcounts_duplicates():
    # CRANE has one E (green at the end): EERIE's first two E's are gray officially, yellow naively
    assert R.wordle_partial("<guess>EERIE</guess>", secret="CRANE") == pytest.approx(0.3)
    assert _naive_partial("EERIE", "CRANE") == pytest.approx(0.5)
    assert R.wordle_partial("<guess>EEEEE</guess>", secret="EERIE") == pytest.approx(0.6)
    assert _naive_partial("EEEEE", "EERIE") == pytest.approx(0.8)
    assert R.wordle_partial("<guess>MELON</guess>", secret="LEMON") == _naive_partial("MELON", "LEMON")  # no dups


def test_wordle_guess_parsing_and_format():
    assert R.parse_guess("think <guess> crane </guess>") == "crane"
    assert R.parse_guess("<guess>CRANE</guess><guess>SLATE</guess>") is None  # several guesses
    assert R.parse_guess("no tags") is None
    assert R.wordle_format("<guess>CRANE</guess>") == 1.0
    for bad in ("<guess>CRANES</guess>", "<guess>CRAN</guess>", "<guess>CR4NE</guess>", "<guess>ÉCRAN</guess>",
                "<guess>ßABC</guess>", "<guess>CR NE</guess>", "CRANE", "<guess>CRANE</guess><guess>CRANE</guess>"):
        assert R.wordle_format(bad) == 0.0, bad
        assert R.wordle_correct(bad, secret="CRANE") == 0.0
    assert R.wordle_correct("<guess>crane</guess>", secret="CRANE") == 1.0
    assert R.wordle_partial("<guess>CRANE</guess>", secret="CRANE") == 1.0
    assert R.wordle_partial("<guess>CRATE</guess>", secret="CRANE") == pytest.approx(0.8)


def test_wordle_consistent():
    secret = "CRANE"
    hist = [(g, R.wordle_feedback(g, secret)) for g in ("SLATE", "TRACE")]
    hist_str = [(g, "".join(f).lower()) for g, f in hist]  # feedback as str, any case
    assert R.wordle_consistent("<guess>CRANE</guess>", history=hist) == 1.0
    assert R.wordle_consistent("<guess>CRANE</guess>", history=hist_str) == 1.0
    assert R.wordle_consistent("<guess>SLATE</guess>", history=hist) == 0.0  # repeats a tried word
    assert R.wordle_consistent("<guess>BRAKE</guess>", history=hist) == 0.0  # ignores the C in TRACE
    assert R.wordle_consistent("<guess>CRANE</guess>") == 1.0  # no history: vacuously consistent
    assert R.wordle_consistent("CRANE", history=hist) == 0.0  # no guess


# ----------------------------------------------------------------------------- length, combine

def test_length_penalty():
    assert R.length_penalty("x" * 20) == 0.0
    assert R.length_penalty("") == -20.0
    assert R.length_penalty("x" * 25) == -5.0
    assert R.length_penalty("x" * 5, ideal=10) == -5.0
    assert R.length_penalty("anything", ideal=100, num_tokens=90) == -10.0
    assert R.length_penalty("x" * 10**6) == -(10**6 - 20)


def test_combine():
    total, per = R.combine([(2.0, R.correct), (0.5, R.format_strict), (0.25, R.length_penalty)],
                           GOOD, gold="42", question="ignored", num_tokens=24)
    assert per == {"correct": 1.0, "format_strict": 1.0, "length_penalty": -4.0}
    assert total == pytest.approx(2.0 + 0.5 - 1.0)
    total, per = R.combine(R.GSM8K_REWARDS, GOOD, gold="42")
    assert per == {"correct": 1.0, "format_strict": 1.0, "format_soft": 1.0, "integer_answer": 1.0, "xml_count": 0.5}
    assert total == pytest.approx(sum(w for w, _ in R.GSM8K_REWARDS) - 0.2 * 0.5)  # xml_count max is 0.5
    assert total == 2.5  # combine's fsum is exact; a plain += would give 2.5000000000000004
    assert R.combine(R.GSM8K_REWARDS, GOOD, gold="41")[0] == pytest.approx(total - 2.0)
    _, per = R.combine([(1.0, partial(R.format_strict, layout="think"))], GOOD)
    assert per == {"format_strict": 0.0}
    total, per = R.combine(R.WORDLE_REWARDS, "<guess>CRANE</guess>", secret="CRANE", history=[])
    assert total == pytest.approx(sum(w for w, _ in R.WORDLE_REWARDS)) and set(per) >= {"wordle_correct"}
    assert R.combine([], GOOD) == (0.0, {})
    with pytest.raises(ValueError):
        R.combine([(1.0, R.correct), (2.0, R.correct)], GOOD, gold="42")


# ----------------------------------------------------------------------------- format gate (template-copy hacks)

def test_well_formed():
    assert R.well_formed(GOOD) and R.well_formed(GOOD, prompt=PROMPT)
    assert R.well_formed(wrap(85, "37 + 48 = 85"), prompt=PROMPT)
    assert R.well_formed(wrap("$1,234.50 dollars", "add the two prices up: $1,000 + $234.50"), prompt=PROMPT)
    assert R.well_formed(wrap("42 ... so 42.0"), prompt=PROMPT)  # one value, repeated
    assert R.well_formed("<think>six sevens: 6 * 7 = 42</think><answer>42</answer>", layout="think")
    assert not R.well_formed("<think>six sevens: 6 * 7 = 42</think><answer>42</answer>")  # wrong layout
    for calc in ("16 * 4 = 64", "3 times 7", "$2 x 9 = $18", "10 - 3", "12 / 4", "7 \u00d7 6", "2 plus 2 is 4"):
        assert R.well_formed(wrap(42, "so we get " + calc)), calc
    assert not R.well_formed(GOOD, layout="think")
    bad = {
        "no number": wrap("forty-two"), "empty answer": wrap(""), "two numbers": wrap("41 or 42"),
        "placeholder": wrap(42, "..."), "one char": wrap(42, "x"), "one word": wrap(42, "work"),
        "empty reasoning": wrap(42, ""), "2 words": wrap(42, "6 times"), "punctuation only": wrap(42, "+ - * / = ..."),
        "copied instruction": wrap(42, INSTRUCTION), "copied question": wrap(42, QUESTION),
        "copied template line": wrap(42, "Respond in the following format:"),
        "copy, other case/whitespace": wrap(42, "  a BOX holds 6 rows\n\nof   7\teggs. "),
        "no reasoning block": "<answer>\n42\n</answer>", "no answer block": "<reasoning>\n6 times 7\n</reasoning>\n42",
        "two reasoning blocks": "<reasoning>\n6 times 7\n</reasoning>\n" + GOOD,
        "two answer blocks": GOOD + "<answer>\n42\n</answer>",
        "misordered reasoning": "</reasoning>\n6 times 7\n<reasoning>\n<answer>\n42\n</answer>",
        # seen on SmolLM2 (GSM8K, 20 steps) once the template copy was closed: nothing computed
        "restated question": wrap(16, "She lays 16 eggs per day.\nShe sells the remainder at the farmers\u2019 market "
                                      "daily for $2 per fresh duck egg."),
        "answer stated, not computed": wrap(12, "12 bolts of blue fiber."),
        "a range is no calculation": wrap(42, "it is 40 to 45"),
    }
    for why, text in bad.items():
        assert not R.well_formed(text, prompt=PROMPT), why
    assert R.well_formed(wrap(42, QUESTION + " 6 x 7"))  # without a prompt there is nothing to copy
    assert R.well_formed(wrap(42, "so " + QUESTION + " 6 x 7"), prompt=PROMPT)  # not a verbatim copy: cannot close
    assert R.reasoning_block(GOOD) == "6 * 7 = 42" and R.reasoning_block(GOOD, layout="think") is None
    assert R.reasoning_block("<think> a </think>", layout="think") == "a"


def test_template_copy_hacks_earn_a_small_fraction():
    good, per = R.combine(R.GSM8K_REWARDS, GOOD, gold="42", prompt=PROMPT)
    assert good == 2.5 and per["correct"] == 1.0
    hacks = {
        "template": "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>",  # SmolLM2's learned output
        "placeholder": "<reasoning>\nx\n</reasoning>\n<answer>\n0\n</answer>",
        "bare answer": "<answer>\n7\n</answer>",
        "copied instruction": wrap(7, INSTRUCTION),
        "copied question": wrap(7, QUESTION),
    }
    for why, text in hacks.items():
        total, per = R.combine(R.GSM8K_REWARDS, text, gold="42", prompt=PROMPT)
        assert total <= R.FORMAT_SHARE_MAX * good, why
        assert total == 0.0 and set(per.values()) == {0.0}, (why, per)
    # an honest, well-formed wrong answer takes exactly the format share, a right one without reasoning only `correct`
    assert R.combine(R.GSM8K_REWARDS, wrap(41), gold="42", prompt=PROMPT)[0] == R.FORMAT_SHARE_MAX * good == 0.5
    assert R.combine(R.GSM8K_REWARDS, "<answer>\n42\n</answer>", gold="42", prompt=PROMPT)[0] == 2.0


structured = st.builds(wrap, texts, texts)  # right layout, arbitrary reasoning and answer


@settings(deadline=None)
@given(st.one_of(texts, structured))
def test_format_only_earns_at_most_the_format_share(s):
    good = R.combine(R.GSM8K_REWARDS, GOOD, gold="42", prompt=PROMPT)[0]
    assert good == 2.5
    if R.correct(s, gold="42") == 0.0:
        assert R.combine(R.GSM8K_REWARDS, s, gold="42", prompt=PROMPT)[0] <= R.FORMAT_SHARE_MAX * good
