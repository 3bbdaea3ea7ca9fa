"""Wordle as a GRPO task: the shipped word lists, the game, a solver that keeps to the feedback, game states for
training, and the rewards of one guess and of a whole game. Standard library and numpy; imports rewards only.

The game (the New York Times' rules): guess a secret 5-letter word in at most 6 tries; after each guess every
letter is marked right place, elsewhere in the word, or absent, with duplicates counted (rewards.wordle_feedback).
A guess must be a word of the lists (data/wordle: 2,069 answers split 1,660 train / 409 test, 4,412 more words
accepted as guesses; SCOWL, licence beside them). Here a guess that is not a word still uses up its turn.

The model sees a chat (tasks.py's shape): a system message with the rules and the feedback notation, a user
message starting the game, then per turn its own message (thinking, then <guess>WORD</guess>) and the game's
reply, which lists every guess so far with its feedback, so the latest message alone is enough to go on.
Two ways to train on it (tasks.py option mode):
- states (the DeepLearning.AI course's way): an example is a train secret plus 0 to 5 earlier guesses made by
  `solver_guess` with some randomness; the model makes the next guess, scored by STATE_REWARDS. Earlier turns
  show only the solver's <guess> line: a state has no reasoning of the model's to show.
- games: G whole games per secret, played to the end at the sampling temperature (play.py), scored per game by
  GAME_REWARDS from the game's record.
Evaluation always plays whole games, greedy, on test secrets (play.py, train.py run_eval).

Hack guards (rewards.py lists what each Wordle reward closes and cannot): `guarded` pays nothing, format and
consistency included, for a guess that is not a listed word, so "ZZZZZ" with no history earns 0, not 0.7; nor for
a guess the prompt already shows (the example game's words, this game's earlier guesses).
Legend: A answers, c candidates.
"""
import functools
import hashlib
import os
import random

import numpy as np

import rewards as R

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "wordle")
MAX_TURNS = 6
MARKS = {"G": "✓", "Y": "-", "X": "x"}  # the course's notation: a symbol after each letter, explained in SYSTEM
UNMARK = {v: k for k, v in MARKS.items()}


# ----------------------------------------------------------------------------- the word lists

@functools.lru_cache(maxsize=None)
def word_lists(data_dir=DATA):
    """(train secrets, test secrets, every accepted guess): two tuples and a frozenset of upper-case words."""
    lists = {}
    for name in ("answers-train", "answers-test", "guesses"):
        path = os.path.join(data_dir, name + ".txt")
        try:
            with open(path, encoding="ascii") as f:
                words = [w.strip().upper() for w in f if w.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the Wordle word list ({e})") from None
        bad = next((w for w in words if len(w) != 5 or not w.isalpha()), None)
        if bad or not words:
            raise ValueError(f"{path}: " + (f"{bad!r} is not a 5-letter word" if bad else "no words"))
        lists[name] = tuple(words)
    if set(lists["answers-train"]) & set(lists["answers-test"]):
        raise ValueError(f"{data_dir}: a word is both a train and a test secret")
    return lists["answers-train"], lists["answers-test"], frozenset().union(*lists.values())


def allowed_words():
    return word_lists()[2]


# ----------------------------------------------------------------------------- feedback: rendering and parsing

def render(guess, feedback):
    """'CRANE', 'XYGXG' -> 'C(x) R(-) A(✓) N(x) E(✓)'."""
    return " ".join(f"{a}({MARKS[m]})" for a, m in zip(guess.upper(), feedback))


def parse_render(text):
    """render's inverse: 'C(x) R(-) A(✓) N(x) E(✓)' -> ('CRANE', 'XYGXG'); ValueError if it is not one."""
    parts = text.split()
    if len(parts) != 5 or any(len(p) != 4 or p[1] != "(" or p[3] != ")" or p[2] not in UNMARK for p in parts):
        raise ValueError(f"not a rendered Wordle feedback: {text!r:.60}")
    return "".join(p[0] for p in parts), "".join(UNMARK[p[2]] for p in parts)


def feedback(guess, secret):
    """'XYGXG'-style string of rewards.wordle_feedback."""
    return "".join(R.wordle_feedback(guess, secret))


# ----------------------------------------------------------------------------- the prompt and the game

SYSTEM = ("You are playing Wordle. Find the secret 5-letter English word in at most 6 guesses.\n"
          "After each guess you get feedback on every letter:\n"
          "  ✓ : the letter is in the word, in the right place.\n"
          "  - : the letter is in the word, in another place.\n"
          "  x : the letter is not in the word (or not as many times as you used it).\n"
          "For example, if the word is BRICK, the guess CRANE gets: C(-) R(✓) A(x) N(x) E(x).\n"
          "Each guess must be a real 5-letter English word. Use all the feedback so far.\n"
          "You may think first, briefly, inside <think> </think>. Then answer with your guess inside "
          "<guess> </guess>.")
START = "Let's play. Make your first guess."
# A short example game as earlier chat turns, before the real one: how the protocol is shown decides the cold
# start, and with an example game GRPO gets groups with a spread to learn from. Its turns are bare <guess> lines.
# Its two words differ from game to game (drawn from the accepted guesses that are never secrets, seeded by the
# real game's secret), so no one word is worth copying from it (docs/results.md, Wordle).
NEW_GAME = "You won in 2 guesses! Now a new game, with a new secret word. Make your first guess."


def reply(history, turns_left, invalid=None):
    """The game's message after a turn: what went wrong if anything, every valid guess so far, the turns left."""
    # invalid: the text inside the turn's one <guess> block when it is not a word ('' when there is no single
    # block), quoted up to 20 characters: a long non-guess does not grow the context turn after turn.
    lines = [] if invalid is None else [f"{invalid[:20]!r} is not a valid guess (it must be one 5-letter English "
                                        "word inside <guess> </guess>)."]
    if history:
        lines += ["Your guesses so far:"] + [f"{i}. {g} -> {render(g, fb)}" for i, (g, fb) in enumerate(history, 1)]
    lines.append(f"You have {turns_left} guess{'es' if turns_left != 1 else ''} left. Make your next guess.")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def demo_words():
    """Accepted guesses that are never secrets (sorted): the example games' words, so they give no answer away."""
    train, test, allowed = word_lists()
    return tuple(sorted(allowed - set(train) - set(test)))


def demo(secret):
    """The example game's turns shown before the game of `secret` (as Game.turns holds them)."""
    # A first guess, then the example's secret: two words of demo_words() drawn by a generator seeded by `secret`.
    rng = random.Random(int(hashlib.sha256(f"wordle-demo-{secret}".encode()).hexdigest()[:16], 16))
    first, answer = rng.sample(demo_words(), 2)
    return [{"guess": g, "valid": True, "feedback": feedback(g, answer), "text": None} for g in (first, answer)]


class Game:
    """One game: a secret, the turns played (each {guess, valid, feedback}), and whether it is won or over."""
    # history: earlier (guess, feedback) turns to start from (a training state); they count as turns.

    def __init__(self, secret, history=(), max_turns=MAX_TURNS, allowed=None):
        self.secret, self.max_turns = R._word(secret, "secret"), max_turns
        self.allowed = allowed_words() if allowed is None else allowed
        self.turns = [{"guess": g.upper(), "valid": True, "feedback": "".join(fb), "text": None} for g, fb in history]
        self.won = any(t["guess"] == self.secret for t in self.turns)

    @property
    def done(self):
        return self.won or len(self.turns) >= self.max_turns

    def history(self):
        return [(t["guess"], t["feedback"]) for t in self.turns if t["valid"]]

    def messages(self):
        """The chat up to the model's next turn: rules, the example game, then this game's earlier turns."""
        # This game's earlier turns are bare <guess> lines (a training state's are the solver's) with the replies
        # play() gave them.
        msgs = [{"role": "system", "content": SYSTEM}]
        for turns, start, last in ((demo(self.secret), START, False), (self.turns, NEW_GAME, True)):
            msgs.append({"role": "user", "content": start})
            for k, t in enumerate(turns, 1):
                msgs.append({"role": "assistant", "content": f"<guess>{t['guess'] or ''}</guess>"})
                if k < len(turns) or last:
                    hist = [(u["guess"], u["feedback"]) for u in turns[:k] if u["valid"]]
                    msgs.append({"role": "user", "content": reply(hist, self.max_turns - k,
                                                                  None if t["valid"] else t["guess"] or "")})
        return msgs

    def play(self, completion):
        """Take the model's turn; returns the game's reply (the next user message), or None once the game is over."""
        if self.done:
            raise ValueError("the game is over")
        raw, g = R.parse_guess(completion), valid_guess(completion, self.allowed)
        self.turns.append({"guess": g or raw, "valid": g is not None, "feedback": g and feedback(g, self.secret),
                           "text": completion})
        self.won = g == self.secret
        if self.done:
            return None
        return reply(self.history(), self.max_turns - len(self.turns), None if g else (raw or ""))

    def record(self):
        """What a transcript line and the game rewards read: {secret, turns, won, guesses}."""
        return {"secret": self.secret, "turns": self.turns, "won": self.won, "guesses": len(self.turns)}


# ----------------------------------------------------------------------------- the solver and training states

@functools.lru_cache(maxsize=None)
def pattern_matrix(words):
    """(A, A) uint8: feedback of guess i on secret j as a base-3 number (X=0, Y=1, G=2; letter 0 most significant)."""
    # Vectorised rewards.wordle_feedback (same duplicate rule: yellows left to right while unmatched copies
    # remain); tests check it against that function.
    w = np.array([[ord(c) for c in s] for s in words], dtype=np.uint8)  # (A, 5)
    g, s = w[:, None, :], w[None, :, :]  # guess rows, secret columns
    green = g == s  # (A, A, 5)
    yellow = np.zeros_like(green)
    for i in range(5):
        letter = g[:, :, i:i + 1]  # (A, 1, 1)
        left = ((s == letter) & ~green).sum(-1)  # (A, A) copies of this letter not matched by a green
        used = ((g[:, :, :i] == letter) & yellow[:, :, :i]).sum(-1)  # (A, A) yellows already given to it
        yellow[:, :, i] = ~green[:, :, i] & (left > used)
    digits = green * 2 + yellow  # (A, A, 5)
    return (digits * np.array([81, 27, 9, 3, 1])).sum(-1).astype(np.uint8)  # (A, A)


def code(fb):
    """'XYGXG' -> its base-3 number in pattern_matrix."""
    return sum("XYG".index(m) * 3 ** (4 - i) for i, m in enumerate(fb))


# The deterministic solver's first guess: of the 60 best first guesses by _rank, the best-ranked one after which
# the solver below wins every one of the 2,069 answers, train and test, within 6 guesses (PLATE, PLACE and RINSE
# do; CRATE, _rank's own first choice, loses BATCH/HATCH/.../WATCH, which differ in one letter only).
OPENER = "PLATE"


@functools.lru_cache(maxsize=None)
def answers():
    """Every answer word, train and test, sorted: the solver's candidates, so it can play any secret."""
    return tuple(sorted(word_lists()[0] + word_lists()[1]))


@functools.lru_cache(maxsize=None)
def first_ranking(words):
    """_rank over all answers: the first turn's, the same for every game, so computed once."""
    return _rank(pattern_matrix(words), np.arange(len(words)))


def _rank(pm, cand):
    """cand (c,) answer indices, best guess first."""
    # Best first: the most distinct feedbacks over the candidates, then the fewest candidates left on average (sum
    # of squared bucket sizes), then word order.
    sub = pm[np.ix_(cand, cand)].astype(np.int64)  # (c, c) guess x secret
    c = len(cand)
    counts = np.bincount((np.arange(c)[:, None] * 243 + sub).ravel(), minlength=c * 243).reshape(c, 243)  # (c, 243)
    parts, sq = (counts > 0).sum(1), (counts ** 2).sum(1)  # (c,) each
    return cand[np.lexsort((cand, sq, -parts))]


def _wins(pm, g, cand, turns, memo, width=10):
    """True if guessing g now guarantees a win within `turns` guesses (this one included)."""
    # Each later guess is one of the `width` best-ranked candidates: an exact search, memoised on (candidates, turns).
    rest = cand[cand != g]
    if len(rest) == 0:
        return True
    if turns <= 1:
        return False
    pats = pm[g, rest]  # (c - 1,)
    for p in np.unique(pats):
        sub = rest[pats == p]
        key = (sub.tobytes(), turns - 1)
        if key not in memo:
            memo[key] = len(sub) == 1 or any(_wins(pm, h, sub, turns - 1, memo, width) for h in _rank(pm, sub)[:width])
        if not memo[key]:
            return False
    return True


def candidates(history, words):
    """Indices of the answers that fit every (guess, feedback) so far, less the words already guessed."""
    pm, index = pattern_matrix(words), {w: i for i, w in enumerate(words)}
    cand = np.arange(len(words))  # (c,)
    for g, fb in history:
        tried = index.get(g.upper())
        cand = cand[pm[tried, cand] == code(fb)] if tried is not None else \
            cand[[feedback(g, words[j]) == "".join(fb) for j in cand]]
        cand = cand[[words[j] != g.upper() for j in cand]] if len(cand) > 1 else cand
    return cand


def solver_guess(history, rng=None, top=8, max_turns=MAX_TURNS):
    """The next guess of a solver that keeps to the feedback (hard mode): always a remaining candidate."""
    # With rng (training states): one of the `top` best-ranked candidates, uniformly. Without (the scripted
    # player): OPENER first, then the best-ranked candidate that guarantees a win in the turns left, found by exact
    # search once at most 300 candidates remain, else the best-ranked one.
    words = answers()
    pm, cand = pattern_matrix(words), candidates(history, words)
    if len(cand) == 0:
        raise ValueError("no answer word fits this feedback")
    if rng is not None:
        order = _rank(pm, cand) if history else first_ranking(words)  # (c,) best first
        return words[rng.choice(order[:top])]
    if not history:
        return OPENER
    order, memo = _rank(pm, cand), {}
    if len(cand) <= 300:
        for g in order[:10]:
            if _wins(pm, g, cand, max_turns - len(history), memo):
                return words[g]
    return words[order[0]]


def solve(secret, rng=None, max_turns=MAX_TURNS):
    """The solver's whole game: [(guess, feedback)] up to and including the win (or max_turns guesses)."""
    hist = []
    while len(hist) < max_turns and (not hist or hist[-1][0] != secret.upper()):
        g = solver_guess(hist, rng)
        hist.append((g, feedback(g, secret)))
    return hist


def states(secrets, per_secret, seed):
    """Training states: per secret, `per_secret` examples {secret, history}; history is 0..5 earlier solver guesses."""
    # Each state's number of earlier guesses is drawn uniformly from 0..5, and the solver picks among its 8 best
    # guesses at random, so states vary; a state stops before the solver's winning guess (a won game has no next
    # guess), so 4 or 5 earlier guesses are rare. Seeded per (seed, secret, k): the same list on every machine.
    out = []
    for s in secrets:
        for k in range(per_secret):
            rng = random.Random(int(hashlib.sha256(f"wordle-{seed}-{s}-{k}".encode()).hexdigest()[:16], 16))
            want, hist = rng.randint(0, MAX_TURNS - 1), []
            while len(hist) < want:
                g = solver_guess(hist, rng)
                if g == s:
                    break
                hist.append((g, feedback(g, s)))
            out.append({"secret": s, "history": hist})
    return out


# ----------------------------------------------------------------------------- rewards

def valid_guess(completion, allowed=None):
    """The upper-case guess of exactly one <guess> block if it is a listed word, else None."""
    g = R._valid_guess(completion)
    return g if g is not None and g in (allowed_words() if allowed is None else allowed) else None


def shown_words(secret, history=()):
    """The guesses the prompt already shows: the example game's two and this game's earlier ones."""
    return {t["guess"] for t in demo(secret)} | {g.upper() for g, _ in history}


def guarded(fn):
    """fn, but 0 for a completion whose guess is not a listed word or is a word the prompt already shows as a guess."""
    # Not a listed word: the validity guard. Already shown as a guess: the copy guard (the example game's, or this
    # game's earlier ones).
    # The copy guard: without it a word the prompt already shows (the example game's first guess) earns format and
    # partial credit without any reading of the game (docs/results.md, Wordle).
    @functools.wraps(fn)
    def f(completion, secret=None, history=(), **fields):
        g = valid_guess(completion)
        if g is None or (secret is not None and g in shown_words(secret, history)):
            return 0.0
        return fn(completion, secret=secret, history=history, **fields)
    return f


# One guess (mode states). The course's shape: the win dominates (1.0, and partial adds 0.5 for the secret);
# partial credit (0.2 a green, 0.1 a yellow, x 0.5) is the dense signal; consistency with the feedback (0.5) is
# what playing well means; format (0.2) is the floor for answering with a word at all. Max 2.2, for the secret.
STATE_REWARDS = [(1.0, guarded(R.wordle_correct)), (0.5, guarded(R.wordle_partial)),
                 (0.5, guarded(R.wordle_consistent)), (0.2, guarded(R.wordle_format))]


def game_win(completion, game=None, **_):
    """1 if the game was won."""
    return float(game["won"])


def game_speed(completion, game=None, **_):
    """(7 - guesses) / 6 for a won game (1 for a first-guess win, 1/6 for a sixth-guess one), else 0."""
    return (MAX_TURNS + 1 - game["guesses"]) / MAX_TURNS if game["won"] else 0.0


def game_progress(completion, game=None, **_):
    """The best rewards.wordle_partial of the game's valid guesses (0.2 a green, 0.1 a yellow): dense signal."""
    fbs = [t["feedback"] for t in game["turns"] if t["valid"]]
    return max([min((2 * f.count("G") + f.count("Y")) / 10, 1.0) for f in fbs], default=0.0)


def game_consistent(completion, game=None, **_):
    """The share of the game's turns whose guess was valid and kept to every feedback before it."""
    hist, good = [], 0
    for t in game["turns"]:
        if t["valid"]:
            good += all(feedback(p, t["guess"]) == fb for p, fb in hist)
            hist.append((t["guess"], t["feedback"]))
    return good / max(len(game["turns"]), 1)


def game_invalid(completion, game=None, **_):
    """Minus the share of the game's turns whose guess was not a listed word (0 for a clean game)."""
    return -sum(not t["valid"] for t in game["turns"]) / max(len(game["turns"]), 1)


# One whole game (mode games): a win is worth 1 plus up to 0.5 for speed; progress (the best guess's partial
# credit) and the share of consistent guesses are the dense signal while wins are rare; each invalid turn costs
# its share of 1, so a game of invalid guesses scores -1, below any game of real words.
GAME_REWARDS = [(1.0, game_win), (0.5, game_speed), (0.3, game_progress), (0.3, game_consistent),
                (1.0, game_invalid)]
