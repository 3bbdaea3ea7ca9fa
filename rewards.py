"""
Verifiable rewards for GRPO: GSM8K answers, answer formats, Wordle guesses and length.

Every reward is a pure, deterministic `fn(completion: str, **fields) -> float` that ignores
unknown fields, so a task is a list of (weight, fn) and `combine` sums them. Standard library
only. For any str completion no reward raises or returns NaN/inf, and all run in linear time
(str.find/count scans and regexes without nested ambiguous quantifiers). Needs Python 3.11+ (atomic
regex groups). A non-str completion raises TypeError (a caller bug, not model output); malformed
*fields* (a bad Wordle secret/history, an unknown layout) raise ValueError for the same reason.

Numbers (parse_number, last_number): ASCII digits with optional thousands commas (strict 3-digit
groups), decimals ("0.5", ".5", "1234.00"; a trailing "1234." is just a full stop), fractions "3/4",
a leading minus and/or currency sign ("-$5", "$-5"); "%", units and words are ignored. Values are
exact Fractions, so 18 == 18.0 == 18.00. Not numbers: digits glued to a letter ("x2", "COVID19"),
anything after two minus signs, ASCII or U+2212 ("--5", "--$5": neither 5 nor -5, a doubled sign is no sign),
scientific notation ("1e5" is rejected whole: unsupported, and Fraction(10**999999) would be a DoS),
anything with more than MAX_DIGITS digits, and "n/0". parse_number counts such a number-shaped token without a
value as a second, different candidate ("42 7/0" is ambiguous); last_number skips it.

Reward hacking, per function (what it closes / what it cannot):
- well_formed, the gate of every GSM8K format reward (format_strict, format_soft, integer_answer and
  xml_count's tag credit score 0 without it): exactly one reasoning block with >= 3 alphanumeric words
  holding at least one calculation (number, operator, number: "16 * 4", "3 times 7") that is not a
  substring of the prompt (casefolded, whitespace collapsed), and exactly one answer block holding exactly
  one number. Closes: the system prompt's template copied with "...", placeholder or one/two-word
  reasoning ("x", "work"), the instruction, question or a worked example pasted verbatim as reasoning, a
  bare answer block, and reasoning that restates the question's sentences or states the answer without
  computing anything. Cannot: a wrong or irrelevant calculation ("1 + 1 = 2" before a guess), a
  paraphrased copy plus a calculation, reasoning in a non-Latin script (needs ASCII words); and `correct`
  is deliberately not gated, so a right guess without reasoning still earns it (a right answer is a right
  answer).
- correct: exactly one <answer> block holding exactly one number *value* (repeats like "18 ... 18.0"
  are fine). Closes: several <answer> blocks, several candidates in one block ("3 or 4 or 5",
  "3-5"), empty/whitespace answers, an answer outside the tags. Cannot: a right guess with wrong
  or no reasoning; an answer that also restates an intermediate number ("3*6 = 18") scores 0,
  which is deliberate strictness, not a hack.
- correct_lenient: last number in the whole text. Cannot close: ending with the right number by
  chance, or dumping many numbers and ending on a likely one; use only for eval/curricula.
- format_strict: whole completion is <reasoning>\\n..\\n</reasoning>\\n<answer>\\n..\\n</answer> with
  each tag exactly once (or the DeepSeek-R1 <think>..</think> <answer>..</answer> layout), gated.
  Closes: duplicated tags, junk before or after. Cannot: what the gate cannot.
- format_soft: <reasoning>..</reasoning> then <answer>..</answer> anywhere, gated. Cannot: extra text
  around the blocks passes, deliberately (the gate already demands one block of each).
- integer_answer: the strict answer block is a bare integer literal, gated. Cannot: a wrong integer passes.
- xml_count: 0.125 per tag-with-newline occurring exactly once (only if well_formed), minus 0.001/char of
  text after the last </answer> (always), surrounding whitespace free (capped at 0.5, total in [-0.5, 0.5]).
  Closes: rambling after the answer. Cannot: what the gate cannot.
- wordle_correct / wordle_partial / wordle_format: exactly one <guess> block, so listing several
  words gets nothing. Partial credit uses official duplicate-letter rules so "EEEEE"-style spam of
  a letter the secret contains once earns one yellow, not five. Cannot: partial is dense shaping
  towards the secret, a model can farm 0.8 with near-misses without ever using feedback.
- wordle_consistent: closes ignoring earlier feedback (and re-guessing an already-tried word).
  Cannot: a consistent but uninformative guess still scores 1.
- length_penalty: unbounded below (finite): -abs(ideal - n). Cannot: padding to exactly `ideal`.

Sources: HF LLM course, GRPO chapter (format regex, xml_count, TRL length reward); willccbb's
GRPO gist (GSM8K reward set and weights); DeepLearning.AI "Reinforcement Fine-Tuning LLMs with GRPO"
(Wordle rewards); DeepSeek-R1 paper (rule-based accuracy + format rewards, <think> layout).
"""
import math
import re
from collections import Counter
from fractions import Fraction
from itertools import islice

MAX_DIGITS = 100  # longer digit runs are "not a number": int("9"*10**6) is slow and no GSM8K answer is close

# One number token. No nested ambiguous quantifiers: comma groups are fixed-width with a distinct
# separator, so each match attempt is linear and finditer over 1 MB stays linear.
_NUM = re.compile(
    r"(?=[-\u2212$\u20ac\u00a3\u00a5.0-9])"  # cheap first-char filter: lets sre skip text fast
    # a run of 2+ minus signs is taken whole, glued or not, for _to_fraction to reject: "--5", "3--4", "--$1.5"
    # can't shed a '-' to read as -5 or 5 (whole run from its start only, so "-" * 10**6 stays linear);
    # a single minus only if not glued to a word/number: "3-4" is 3 and 4
    r"(?:(?<![-\u2212])[-\u2212]{2,}+|(?<![\w.\-\u2212])[-\u2212])?"
    r"[$\u20ac\u00a3\u00a5]?"  # $ EUR GBP YEN
    r"(?<!\w)"  # digits glued to a letter/digit are no number: "x2", the exponent in "1e5"
    # atomic/possessive (3.11+): commit to the longest token, so the lookahead below can't backtrack "12e5" into "1"
    r"(?>(?:[0-9]{1,3}(?:,[0-9]{3}(?![0-9]))++|[0-9]++)(?:\.[0-9]++)?|\.[0-9]++)(?:/[0-9]++)?+"
    r"(?![eE][-+\u2212]?[0-9])"  # scientific notation unsupported: "1e5" is rejected whole
)
_INT = re.compile(r"[-\u2212]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)")
_GOLD = re.compile(r"\s*" + _NUM.pattern + r"\s*%?\s*\.?\s*")


def _str(x):
    """Type-check a completion: non-str is a programming error."""
    if not isinstance(x, str):
        raise TypeError(f"completion must be str, got {type(x).__name__}")
    return x


def _to_fraction(tok):
    """Exact value of a _NUM token, None if too long, n/0 or after two minus signs."""
    s = tok.lstrip("-\u2212")
    neg = len(tok) - len(s)
    if neg > 1:
        return None  # "--5": a doubled sign hedges between 5 and -5, so it is neither
    s = s.lstrip("$\u20ac\u00a3\u00a5").replace(",", "")
    if len(s) - s.count(".") - s.count("/") > MAX_DIGITS:
        return None
    num, _, den = s.partition("/")
    ip, _, fp = num.partition(".")
    v = Fraction(int(ip or "0") * 10 ** len(fp) + int(fp or "0"), 10 ** len(fp))
    if den:
        d = int(den)
        if d == 0:
            return None
        v /= d
    return -v if neg else v


def _fmt(v):
    """Canonical string of a Fraction: '1234', '-0.25', or 'p/q' if not a finite decimal."""
    if v.denominator == 1:
        return str(v.numerator)
    d, twos, fives = v.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{v.numerator}/{v.denominator}"
    k = max(twos, fives)
    q = abs(v.numerator) * 10 ** k // v.denominator
    s = str(q).rjust(k + 1, "0")
    return ("-" if v < 0 else "") + s[:-k] + "." + s[-k:]


def parse_number(text):
    """Exact value of the one number in text ('$1,234 dollars' -> 1234); None if none or several different."""
    # A number-shaped token without a value ("7/0", "--5", too many digits) counts as a different candidate, so
    # "42 7/0" is ambiguous (None), not 42: skipping it would let a hedge through.
    val = None
    for tok in dict.fromkeys(_NUM.findall(_str(text))):  # dedupe in C: "1,"*500000 converts once
        v = _to_fraction(tok)
        if v is None:
            return None
        if val is None:
            val = v
        elif v != val:
            return None  # "3 or 4 or 5": ambiguous is not a number
    return val


def last_number(completion):
    """Lenient parse: value of the last number in the text, None if there is none."""
    for tok in reversed(_NUM.findall(_str(completion))):
        v = _to_fraction(tok)
        if v is not None:
            return v
    return None


def extract_gold(answer_text):
    """Normalised gold number after the final '#### ' of a GSM8K answer ('#### 1,234' -> '1234')."""
    i = _str(answer_text).rfind("####")
    if i < 0:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer_text[-80:]!r}")
    rest = answer_text[i + 4:]
    v = parse_number(rest) if _GOLD.fullmatch(rest) else None
    if v is None:
        raise ValueError(f"GSM8K answer after '####' is not a number: {rest[:80]!r}")
    return _fmt(v)


def _block(text, open_, close):
    """Stripped content of exactly one open_..close block, else None (zero, several, or misordered)."""
    if text.count(open_) != 1 or text.count(close) != 1:
        return None
    i, j = text.find(open_) + len(open_), text.find(close)
    return text[i:j].strip() if j >= i else None


def answer_block(completion):
    """Strict: stripped content of exactly one <answer>...</answer> block, else None."""
    return _block(_str(completion), "<answer>", "</answer>")


_TAGS = {"reasoning": ("<reasoning>", "</reasoning>"), "think": ("<think>", "</think>")}
_WORD = re.compile(r"[A-Za-z0-9]+")
# one calculation: a number, an operator (symbol or word), a number ("16 * 4", "3 times 7", "$2 x 9"); bounded
# gaps keep the scan linear
_CALC = re.compile(r"[0-9][ \t]{0,3}(?:[-+*/x\u00d7\u00f7\u2212]|times|plus|minus|divided by|multiplied by)"
                   r"[ \t]{0,3}\$?[0-9]")


def _layout_tags(layout):
    """(open, close) reasoning tags of a layout, ValueError for an unknown one."""
    if layout not in _TAGS:
        raise ValueError(f"layout must be 'reasoning' or 'think', got {layout!r}")
    return _TAGS[layout]


def reasoning_block(completion, layout="reasoning"):
    """Stripped content of exactly one <reasoning> (or <think> for layout 'think') block, else None."""
    return _block(_str(completion), *_layout_tags(layout))


def _norm(text):
    """Casefolded, whitespace runs collapsed to one space, stripped: copies compare equal across layout."""
    return " ".join(text.casefold().split())


def well_formed(completion, prompt="", layout="reasoning", **_):
    """True iff one answer block with one number, and one reasoning block of >= 3 words with a calculation."""
    # The reasoning block must also not be copied from the prompt.
    # The gate of every format reward, so that a copy of a template with placeholders
    # ("<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>") earns none of them. Cheapest checks first.
    a = answer_block(completion)
    if a is None or parse_number(a) is None:
        return False
    r = reasoning_block(completion, layout)
    # >= 3 ASCII alphanumeric words: "...", "x", "work" fail, "37 + 48 = 85" passes; islice stops the scan early
    if r is None or sum(1 for _ in islice(_WORD.finditer(r), 3)) < 3:
        return False
    # at least one calculation: reasoning that restates the question's sentences ("She sells the remainder at the
    # farmers' market daily for $2 per fresh duck egg.") or the answer alone ("12 bolts of blue fiber.") computes
    # nothing
    if _CALC.search(r) is None:
        return False
    # a verbatim copy of the instruction, question or a worked example (str `in` is linear in CPython)
    return not (prompt and _norm(r) in _norm(prompt))


# ----------------------------------------------------------------------------- GSM8K rewards

def correct(completion, gold, **_):
    """1.0 iff exactly one answer block holding exactly one number value equal to gold."""
    a = answer_block(completion)
    if a is None:
        return 0.0
    v, g = parse_number(a), parse_number(str(gold))
    return float(v is not None and v == g)


def correct_lenient(completion, gold, **_):
    """1.0 iff the last number anywhere in the text equals gold (gameable, see module doc)."""
    v, g = last_number(completion), parse_number(str(gold))
    return float(v is not None and v == g)


def format_strict(completion, layout="reasoning", prompt="", **_):
    """1.0 iff well_formed and the whole completion is the exact reasoning/answer (or R1 think/answer) layout."""
    s = _str(completion)
    o, c = _layout_tags(layout)
    if any(s.count(t) != 1 for t in (o, c, "<answer>", "</answer>")) or not well_formed(s, prompt, layout):
        return 0.0
    if layout == "reasoning":
        # HF course regex ^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$ but linear, with
        # multi-line content allowed (the course's re.match without DOTALL rejects multi-line reasoning,
        # a known gotcha), each tag exactly once, and any trailing whitespace (EOS may or may not follow "\n").
        s = s.rstrip()
        mid = "\n</reasoning>\n<answer>\n"
        i = s.find(mid)
        return float(s.startswith("<reasoning>\n") and s.endswith("\n</answer>") and i >= len("<reasoning>\n")
                     and i + len(mid) <= len(s) - len("\n</answer>"))
    # DeepSeek-R1: "<think> ... </think> <answer> ... </answer>", whitespace free around/between tags.
    s = s.strip()
    i, j = s.find(c) + len(c), s.find("<answer>")
    return float(s.startswith(o) and s.endswith("</answer>") and i <= j and not s[i:j].strip())


def format_soft(completion, prompt="", **_):
    """1.0 if well_formed and <reasoning>...</reasoning> is followed anywhere by <answer>...</answer>."""
    s, i = _str(completion), 0
    if not well_formed(s, prompt):
        return 0.0
    for t in ("<reasoning>", "</reasoning>", "<answer>", "</answer>"):
        i = s.find(t, i)
        if i < 0:
            return 0.0
        i += len(t)
    return 1.0


def integer_answer(completion, prompt="", **_):
    """1.0 if well_formed and the strict answer block is a bare integer literal ('-12', '1,234'; not '$5')."""
    # Bare literal, like the course's isdigit() check plus sign/commas: it shapes towards the clean
    # answer `correct` parses reliably, so "the answer is 18" gets nothing here.
    a = answer_block(completion)
    ok = a is not None and _INT.fullmatch(a) is not None and well_formed(completion, prompt)
    return float(ok and len(a.lstrip("-\u2212")) - a.count(",") <= MAX_DIGITS)


_XML = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")


def xml_count(completion, prompt="", **_):
    """Shaping: +0.125 per tag (with newline) seen once if well_formed, -0.001/char after </answer>; in [-0.5, 0.5]."""
    # willccbb's count_xml penalises len(text after "\n</answer>\n") but if that exact string is missing
    # it charges the *whole* text; here: text after the last "</answer>", stripped of whitespace, cap 0.5.
    # Only the tag credit is gated: the rambling penalty stays, so an ill-formed completion never outscores
    # the same completion made well-formed.
    s = _str(completion)
    r = 0.125 * sum(s.count(t) == 1 for t in _XML) if well_formed(s, prompt) else 0.0
    j = s.rfind("</answer>")
    if j >= 0:
        r -= min(0.001 * len(s[j + len("</answer>"):].strip()), 0.5)
    return r


# ----------------------------------------------------------------------------- Wordle rewards

def _word(w, what):
    """Upper-cased w if it is exactly 5 ASCII letters, else ValueError."""
    if not (isinstance(w, str) and len(w) == 5 and w.isascii() and w.isalpha()):
        raise ValueError(f"{what} must be 5 ASCII letters, got {w!r:.40}")
    return w.upper()


def wordle_feedback(guess, secret):
    """Official Wordle colours per letter: 'G' right place, 'Y' elsewhere (duplicates counted), 'X' absent."""
    g, s = _word(guess, "guess"), _word(secret, "secret")
    fb = ["G" if a == b else "X" for a, b in zip(g, s)]
    left = Counter(b for a, b in zip(g, s) if a != b)  # secret letters not consumed by greens
    for i, a in enumerate(g):
        if fb[i] == "X" and left[a] > 0:  # yellow only while unmatched copies remain, left to right
            fb[i], left[a] = "Y", left[a] - 1
    return fb


def parse_guess(completion):
    """Stripped content of exactly one <guess>...</guess> block (several guesses -> None)."""
    return _block(_str(completion), "<guess>", "</guess>")


def _valid_guess(completion):
    """Upper-cased guess if it is exactly 5 ASCII letters, else None."""
    g = parse_guess(completion)
    # isascii first: .upper() of non-ASCII can change length ("ß" -> "SS")
    return g.upper() if g is not None and len(g) == 5 and g.isascii() and g.isalpha() else None


def wordle_correct(completion, secret, **_):
    """1.0 iff the guess is the secret word (case-insensitive)."""
    return float(_valid_guess(completion) == _word(secret, "secret"))


def wordle_partial(completion, secret, **_):
    """0.2 per green + 0.1 per yellow under official duplicate rules, in [0, 1]; 1.0 only for the secret."""
    # The DeepLearning.AI course's naive version scores a yellow for every non-green letter that is
    # `in secret`, so a guess repeating a letter the secret has once gets several yellows (over-count).
    # 4 greens force the 5th letter gray, so only 5 greens reach 1.0.
    g, s = _valid_guess(completion), _word(secret, "secret")
    if g is None:
        return 0.0
    fb = wordle_feedback(g, s)
    return min(max((2 * fb.count("G") + fb.count("Y")) / 10, 0.0), 1.0)


def wordle_format(completion, **_):
    """1.0 iff exactly one <guess>WORD</guess> whose word is 5 ASCII letters (surrounding spaces ok)."""
    return float(_valid_guess(completion) is not None)


def wordle_consistent(completion, history=(), **_):
    """1.0 iff the guess, taken as the secret, reproduces every (prev_guess, feedback) in history."""
    g = _valid_guess(completion)
    if g is None:
        return 0.0
    return float(all(wordle_feedback(p, g) == [c.upper() for c in fb] for p, fb in history))


# ----------------------------------------------------------------------------- length, combining

def length_penalty(completion, ideal=20, num_tokens=None, **_):
    """-abs(ideal - n), n = num_tokens if given else len(completion) in characters."""
    # ideal=20 chars is the TRL quickstart / HF course reward_len example; set it per task (e.g. via
    # functools.partial) since 20 is far too short for GSM8K reasoning. Finite but unbounded below.
    n = len(_str(completion)) if num_tokens is None else int(num_tokens)
    return -float(abs(ideal - n))


def _name(fn):
    """Reward name for logging: __name__, or the wrapped function's for functools.partial."""
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or repr(fn)


def combine(reward_list, completion, **fields):
    """(weighted sum, {fn name: unweighted score}) of a task's [(weight, fn)] rewards."""
    terms, per = [], {}
    for w, fn in reward_list:
        k = _name(fn)
        if k in per:
            raise ValueError(f"duplicate reward name {k!r} in reward list")
        per[k] = float(fn(completion, **fields))
        terms.append(w * per[k])
    return math.fsum(terms), per  # exact: 2.0 + 0.2 + 0.1 + 0.1 + 0.1 is 2.5, not 2.5000000000000004


# GSM8K: format is a small fraction of a right answer. willccbb's gist weights (2.0 correct, 0.5 strict,
# 0.5 soft, 0.5 integer, 1.0 xml_count; max 4.0) make format worth as much as correctness, so a copied template
# pays. Here every format reward is gated on well_formed (real reasoning, one number) and they sum to at most 0.5
# (0.2 + 0.1 + 0.1 + 0.2 * xml_count's max 0.5) against 2.5 for a right, well-formed answer: format-only earns at
# most FORMAT_SHARE_MAX of it.
# GRPO normalises advantages per group, so shaping still drives early learning of the layout; once every
# sample in a group is well-formed those terms are constant, carry zero advantage, and only correctness is
# left as signal.
FORMAT_SHARE_MAX = 0.2  # max GSM8K total when `correct` is 0, as a share of a right, well-formed answer's total
GSM8K_REWARDS = [
    (2.0, correct),
    (0.2, format_strict),
    (0.1, format_soft),
    (0.1, integer_answer),
    (0.2, xml_count),
]

# Wordle (DeepLearning.AI course shape): winning dominates (1 + 0.5 partial); partial credit is dense
# signal; consistency with feedback teaches the game; format is a small floor to learn <guess> tags.
WORDLE_REWARDS = [
    (1.0, wordle_correct),
    (0.5, wordle_partial),
    (0.5, wordle_consistent),
    (0.2, wordle_format),
]
