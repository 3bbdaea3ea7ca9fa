"""Rebuild this folder's word lists from SCOWL 2020.12.07 (Debian's `scowl` package): python make_lists.py DIR

DIR holds SCOWL's final word lists (english-words.10, american-words.35, ...): on Debian or Ubuntu,
`apt-get download scowl && dpkg -x scowl_*.deb x`, then DIR = x/usr/share/dict/scowl. Deterministic: the same
SCOWL gives the same files, byte for byte (README.md says what each holds and why).
"""
import hashlib
import os
import re
import sys

SCOWL_ANSWER_SIZE = 35  # SCOWL "small": its common words; Wordle's answers are common words
SCOWL_GUESS_SIZE = 70  # SCOWL "large", the biggest size SCOWL recommends for spell checking
SIZES = (10, 20, 35, 40, 50, 55, 60, 70)
TEST_PERCENT = 20
# not secrets a game should show (slurs and vulgar words among SCOWL's common 5-letter words); still guessable
NOT_ANSWERS = {"bitch", "booby", "fagot", "horny", "kinky", "penis", "pussy", "queer", "sperm", "whore"}


def words(src, categories, max_size, length=None):
    """Lower-case ASCII words of SCOWL's lists up to max_size (SCOWL's sizes are cumulative: 35 = 10 + 20 + 35)."""
    out = set()
    for cat in categories:
        for size in (s for s in SIZES if s <= max_size):
            path = os.path.join(src, f"{cat}-words.{size}")
            if os.path.isfile(path):
                with open(path, encoding="latin-1") as f:
                    out |= {w for w in f.read().split() if re.fullmatch(r"[a-z]+", w)}
    return {w for w in out if length is None or len(w) == length}


def inflected(w, pool):
    """A plural or past tense of a word in pool ('cards', 'boxes', 'baked'): Wordle's answers leave these out."""
    return ((w.endswith("s") and (w[:-1] in pool or (w.endswith("es") and w[:-2] in pool)))
            or (w.endswith("ed") and (w[:-2] in pool or w[:-1] in pool)))


def side(word):
    """'test' for TEST_PERCENT% of the answers, chosen by the word's sha256 alone; 'train' for the rest."""
    return "test" if int(hashlib.sha256(word.encode()).hexdigest()[:8], 16) % 100 < TEST_PERCENT else "train"


def main(src):
    pool = words(src, ("english", "american", "british"), 95)  # every stem, for `inflected`
    answers = sorted(w for w in words(src, ("english", "american"), SCOWL_ANSWER_SIZE, 5)
                     if not inflected(w, pool) and w not in NOT_ANSWERS)
    guesses = sorted(words(src, ("english", "american", "british"), SCOWL_GUESS_SIZE, 5) - set(answers))
    here = os.path.dirname(os.path.abspath(__file__))
    for name, ws in (("answers-train.txt", [w for w in answers if side(w) == "train"]),
                     ("answers-test.txt", [w for w in answers if side(w) == "test"]),
                     ("guesses.txt", guesses)):
        with open(os.path.join(here, name), "w") as f:
            f.write("\n".join(ws) + "\n")
        print(f"{name}: {len(ws)} words")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "english-words.10")):
        sys.exit("usage: python make_lists.py DIR, where DIR holds SCOWL's english-words.10 etc.")
    main(sys.argv[1])
