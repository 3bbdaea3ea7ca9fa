"""wordle.py and the wordle task: word lists, feedback notation, solver, game, states, rewards and their guard."""
import hashlib
import random
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards as R
import tasks
import wordle as W

TRAIN, TEST, ALLOWED = W.word_lists()
words5 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5)


def test_lists_load_offline_and_are_disjoint_and_complete(monkeypatch):
    W.word_lists.cache_clear()
    monkeypatch.setattr(socket, "socket", lambda *a, **k: pytest.fail("the word lists touched the network"))
    train, test, allowed = W.word_lists()
    assert len(train) + len(test) >= 2000 and not set(train) & set(test)
    assert len(allowed) > len(train) + len(test) and set(train) | set(test) <= allowed
    assert all(len(w) == 5 and w.isalpha() and w.isupper() for w in allowed)
    # the documented split: a word is a test secret iff sha256(word)[:8] mod 100 < 20 (data/wordle/README.md)
    side = lambda w: int(hashlib.sha256(w.lower().encode()).hexdigest()[:8], 16) % 100 < 20  # noqa: E731
    assert all(side(w) for w in test) and not any(side(w) for w in train)
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25


def test_a_broken_word_list_is_named(tmp_path):
    for name in ("answers-train", "answers-test", "guesses"):
        (tmp_path / f"{name}.txt").write_text("crane\nslate\n" if name != "answers-test" else "brick\nbrickk\n")
    with pytest.raises(ValueError, match="answers-test.txt: 'BRICKK' is not a 5-letter word"):
        W.word_lists(str(tmp_path))
    with pytest.raises(ValueError, match="cannot read"):
        W.word_lists(str(tmp_path / "nowhere"))


@given(words5, words5)
def test_feedback_rendering_round_trips(guess, secret):
    fb = W.feedback(guess, secret)
    text = W.render(guess, fb)
    assert W.parse_render(text) == (guess, fb)
    # the notation the prompt teaches (README, docs/wordle.md): C(✓) right place, C(-) elsewhere, C(x) absent
    spelled = {"G": "✓", "Y": "-", "X": "x"}  # written out here, not read from W
    assert text.split() == [f"{c}({spelled[f]})" for c, f in zip(guess, fb)]


def test_render_hand_case_and_junk():
    # the system prompt's example
    assert W.render("CRANE", W.feedback("CRANE", "BRICK")) == "C(-) R(✓) A(x) N(x) E(x)"
    for junk in ("C(-) R(✓)", "C(?) R(✓) A(x) N(x) E(x)", "CRANE", ""):
        with pytest.raises(ValueError):
            W.parse_render(junk)


def test_pattern_matrix_equals_the_reward_functions_feedback():
    words = W.answers()
    pm, rng = W.pattern_matrix(words), random.Random(0)
    pairs = [(rng.randrange(len(words)), rng.randrange(len(words))) for _ in range(2000)]
    pairs += [(words.index(a), words.index(b)) for a, b in (("EERIE", "ELDER"), ("LLAMA", "SMALL"))
              if a in words and b in words]
    for i, j in pairs:
        assert pm[i, j] == W.code(W.feedback(words[i], words[j])), (words[i], words[j])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(TRAIN + TEST), st.integers(0, 2 ** 32))
def test_solver_keeps_to_the_feedback_before_each_guess(secret, seed):
    hist = W.solve(secret, random.Random(seed))
    for k, (g, _) in enumerate(hist):
        assert R.wordle_consistent(f"<guess>{g}</guess>", history=hist[:k]) == 1.0  # also: no repeated guess
        assert g in ALLOWED


def test_scripted_solver_wins_every_test_secret_through_the_game_loop():
    guesses = []
    for secret in TEST:
        game = W.Game(secret)
        while not game.done:
            game.play(f"<think>keep to the feedback</think>\n<guess>{W.solver_guess(game.history())}</guess>")
        assert game.won and game.record()["guesses"] <= 6, secret
        guesses.append(game.record()["guesses"])
    assert sum(guesses) / len(guesses) < 4


def test_game_counts_invalid_turns_and_ends():
    game = W.Game("FLOOR")
    assert game.play("no guess at all").startswith("'' is not a valid guess")
    assert "'ZZZZZ' is not a valid guess" in game.play("<guess>ZZZZZ</guess>")
    msg = game.play("<guess>plate</guess>")
    assert "1. PLATE -> P(x) L(✓) A(x) T(x) E(x)" in msg and "You have 3 guesses left" in msg
    assert game.history() == [("PLATE", "XGXXX")]
    for _ in range(3):
        assert not game.done
        last = game.play("<guess>ABIDE</guess>")
    assert last is None and game.done and not game.won and game.record()["guesses"] == 6
    with pytest.raises(ValueError, match="over"):
        game.play("<guess>FLOOR</guess>")
    won = W.Game("FLOOR")
    assert won.play("<guess>floor</guess>") is None and won.won and won.record()["guesses"] == 1


def test_prompt_shows_rules_example_game_then_this_games_turns():
    hist = [("PLATE", W.feedback("PLATE", "FLOOR"))]
    msgs = W.Game("FLOOR", hist).messages()
    assert msgs[0]["role"] == "system" and "✓" in msgs[0]["content"] and "<guess>" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    ex = [m["content"] for m in msgs[2:5:2]]  # the example game's two guesses: never secrets, varied per game
    assert all(c.startswith("<guess>") and c[7:12] not in TRAIN + TEST and c[7:12] in ALLOWED for c in ex)
    assert W.demo("FLOOR") == W.demo("FLOOR") and len({W.demo(s)[0]["guess"] for s in TEST[:20]}) > 15
    assert msgs[-2]["content"] == "<guess>PLATE</guess>" and msgs[-1]["content"].endswith("5 guesses left. "
                                                                                          "Make your next guess.")
    assert W.Game("FLOOR").messages()[-1]["content"] == W.NEW_GAME


def test_states_are_deterministic_varied_and_never_past_the_win():
    a, b = W.states(TRAIN[:60], 3, seed=0), W.states(TRAIN[:60], 3, seed=0)
    assert a == b and a != W.states(TRAIN[:60], 3, seed=1) and len(a) == 180
    lens = [len(s["history"]) for s in a]
    assert set(range(4)) <= set(lens) <= set(range(6))  # 4-5 are rare: the solver usually wins by then
    for s in a:
        assert all(g != s["secret"] for g, _ in s["history"])
        assert all(fb == W.feedback(g, s["secret"]) for g, fb in s["history"])


def test_validity_guard_pays_nothing_for_a_non_word_wrong_length_or_several_guesses():
    hist = [("PLATE", W.feedback("PLATE", "FLOOR"))]
    bad = ["<guess>ZZZZZ</guess>", "<guess>FLOORS</guess>", "<guess>FLO</guess>",
           "<guess>FLOOR</guess> <guess>BLOOM</guess>", "<guess>FLOOR</guess><guess>FLOOR</guess>", ""]
    for text in bad:
        for h in ((), hist):
            for w, fn in W.STATE_REWARDS:
                assert fn(text, secret="FLOOR", history=h) == 0.0, (text, fn.__name__)
    # unguarded, the course's consistency and format rewards paid a non-word with no history 0.7 of weight
    assert R.wordle_consistent("<guess>ZZZZZ</guess>") == 1.0 and R.wordle_format("<guess>ZZZZZ</guess>") == 1.0
    # the copy guard: the example game's words and this game's earlier guesses earn nothing either
    for g in [t["guess"] for t in W.demo("FLOOR")] + ["PLATE"]:
        assert R.combine(W.STATE_REWARDS, f"<guess>{g}</guess>", secret="FLOOR", history=hist)[0] == 0.0, g
    assert R.combine(W.STATE_REWARDS, "<guess>BLOOM</guess>", secret="FLOOR", history=hist)[0] > 0.5
    total, per = R.combine(W.STATE_REWARDS, "<guess>floor</guess>", secret="FLOOR", history=hist)
    assert total == pytest.approx(2.2) and set(per) == {"wordle_correct", "wordle_partial", "wordle_consistent",
                                                         "wordle_format"}


def test_game_rewards_follow_the_record():
    game = W.Game("FLOOR")
    for text in ("<guess>QQQQQ</guess>", "<guess>PLATE</guess>", "<guess>BLOOM</guess>", "<guess>FLOOR</guess>"):
        game.play(text)
    rec = game.record()
    _, per = R.combine(W.GAME_REWARDS, "", game=rec)
    assert per == {"game_win": 1.0, "game_speed": pytest.approx(3 / 6), "game_progress": 1.0,
                   "game_consistent": pytest.approx(3 / 4), "game_invalid": pytest.approx(-1 / 4)}
    lost = W.Game("FLOOR")
    for _ in range(6):
        lost.play("<guess>ZZZZZ</guess>")
    total, per = R.combine(W.GAME_REWARDS, "", game=lost.record())
    assert total == -1.0 and per["game_win"] == 0 and per["game_progress"] == 0


def test_wordle_summary_by_hand():
    won, lost = W.Game("FLOOR"), W.Game("FLOOR")
    won.play("<guess>PLATE</guess>"), won.play("<guess>FLOOR</guess>")
    for t in ["<guess>ZZZZZ</guess>", "nothing"] + ["<guess>PLATE</guess>"] * 4:
        lost.play(t)
    s = tasks.wordle_summary([won.record(), lost.record()])
    assert s == {"acc_win": 0.5, "guesses_won": 2.0, "invalid_rate": 2 / 8, "format_rate": 7 / 8}


def test_wordle_task_loads_states_or_games_and_refuses_bad_options():
    train, test = tasks.wordle_load("", "", "games", 4, 0)
    assert len(train) == len(TRAIN) and all(not ex["history"] for ex in train)
    assert sorted(ex["secret"] for ex in test) == sorted(TEST) and test[:3] != sorted(test, key=str)[:3]
    for opts, msg in (("mode=chess", "mode must be states or games"), ("per_secret=0", "per_secret must be >= 1")):
        o = tasks.parse_options("wordle", opts)
        with pytest.raises(tasks.TaskError, match=msg):
            tasks.wordle_load("", "", **o)
    with pytest.raises(tasks.TaskError, match="--data-dir is not used"):
        tasks.wordle_load("/tmp", "", "states", 4, 0)
