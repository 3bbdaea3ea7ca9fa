"""play.py: whole games and calculator episodes with a tiny random model; the trajectory's mask, log-probs, rewards."""
import copy

import pytest
import torch

import calc as C
import rewards as R
import wordle as W
from grpo import token_logprobs
from model import Transformer
from play import play, reply_ids
from tokenizer import Tokenizer

SECRETS = ["FLOOR", "FLOOR", "FLOOR", "PLATE", "PLATE", "PLATE"]  # 2 secrets x G=3


@pytest.fixture(scope="module")
def model_tok(tiny_ckpt):
    return Transformer.from_pretrained(tiny_ckpt).eval(), Tokenizer(tiny_ckpt)


def games_played(model, tok, secrets=SECRETS, seed=0, max_new=10, temperature=1.0):
    games = [W.Game(s) for s in secrets]
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(games))]
    ro, texts = play(model, tok, games, max_new, temperature, generators=gens, group_size=3)
    return games, ro, texts


def runs(mask_row):
    """[(start, end)] of the True runs of a 1-D bool list."""
    out, start = [], None
    for i, m in enumerate(mask_row + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_batched_play_finishes_every_game_in_six_turns_counting_invalid_ones(model_tok):
    model, tok = model_tok
    games, ro, texts = games_played(model, tok)
    for g in games:
        assert g.done and len(g.turns) == 6 and not g.won  # a random model's guesses are never words
        assert all(not t["valid"] for t in g.turns)
    assert ro.completion_ids.shape[0] == len(games) and ro.group_size == 3
    # greedy, as evaluation plays: also six turns each
    greedy = [W.Game(s) for s in SECRETS[:2]]
    play(model, tok, greedy, 6)
    assert all(g.done and len(g.turns) == 6 for g in greedy)


def test_mask_covers_exactly_the_models_tokens(model_tok):
    model, tok = model_tok
    games, ro, texts = games_played(model, tok)
    for i, g in enumerate(games):
        ids, mask = ro.completion_ids[i].tolist(), ro.completion_mask[i].tolist()
        spans = runs(mask)
        assert len(spans) == len(g.turns) == 6
        assert int(ro.lengths[i]) == sum(e - s for s, e in spans)
        for (s, e), t in zip(spans, g.turns):  # each masked run is that turn's text (and its stop token, if any)
            stop = ids[e - 1] in tok.stop_ids
            assert tok.decode(ids[s:e - int(stop)]) == t["text"]
        # and what lies between runs is exactly the game's replies, as tokenized by reply_ids
        replay = W.Game(g.secret)
        for (s, e), (s2, _) in zip(spans, spans[1:]):
            reply = replay.play(tok.decode(ids[s:e - int(ids[e - 1] in tok.stop_ids)]))
            assert ids[e:s2] == reply_ids(tok, reply, ids[e - 1] if ids[e - 1] in tok.stop_ids else None)
        assert not any(mask[spans[-1][1]:])  # nothing after the last turn


def test_trainer_logprobs_over_the_interleaved_sequence_equal_the_samplers(model_tok):
    model, tok = model_tok
    games, ro, texts = games_played(model, tok, temperature=0.9)
    m = ro.completion_mask
    for share in (True, False):
        lp = token_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, m, 0.9, share_prompt=share)
        assert torch.allclose(lp[m], ro.logprobs[m], atol=1e-4), (lp[m] - ro.logprobs[m]).abs().max()
        assert (lp[~m] == 0).all() and (ro.logprobs[~m] == 0).all()


def test_a_games_draws_do_not_depend_on_the_other_games(model_tok):
    model, tok = model_tok
    # many stop ids, so turns end at different lengths: generate then draws for every row until its whole batch
    # is done, and without play's per-turn generators a game's later turns would depend on its batch-mates
    tok = copy.copy(tok)
    tok.stop_ids = sorted(set(tok.stop_ids) | set(range(3, 300, 9)))
    games, ro, texts = games_played(model, tok)
    assert len({len(t["text"]) for g in games for t in g.turns}) > 3  # turns of varied lengths
    alone = []
    for i in (1, 4):
        _, t = play(model, tok, [W.Game(SECRETS[i])], 10, 1.0, generators=[torch.Generator().manual_seed(i)])
        alone += t
    assert alone == [texts[1], texts[4]]


def test_a_games_reward_follows_its_transcript(model_tok):
    model, tok = model_tok
    games, ro, texts = games_played(model, tok)
    for g, text in zip(games, texts):
        replay = W.Game(g.secret)  # replaying the turns' texts through a fresh game gives the same record
        for t in g.turns:
            replay.play(t["text"])
        assert replay.record() == g.record()
        assert R.combine(W.GAME_REWARDS, text, game=g.record())[0] == -1.0  # six invalid guesses
    # a scripted transcript: the turns' texts alone decide the reward
    g = W.Game("FLOOR")
    for text in ("<guess>PLATE</guess>", "<guess>FLOOR</guess>"):
        g.play(text)
    assert R.combine(W.GAME_REWARDS, "", game=g.record())[0] == pytest.approx(1 + 0.5 * 5 / 6 + 0.3 + 0.3)


# ----------------------------------------------------------------------------- pauses inside a turn: the calculator

TAGS = ("9", "�")  # short call tags that a tiny random model writes often, so its turns pause and continue


def calc_played(model, tok, n=6, seed=0, max_new=24, temperature=1.0, max_calls=3, share_prefix=True):
    envs = [C.Calculator([{"role": "user", "content": f"question {i // 3}"}], max_calls=max_calls, tags=TAGS)
            for i in range(n)]
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(n)]
    ro, texts = play(model, tok, envs, max_new, temperature, generators=gens, group_size=3, share_prefix=share_prefix)
    return envs, ro, texts


def test_tool_results_lie_outside_the_mask_and_the_models_tokens_inside(model_tok):
    model, tok = model_tok
    envs, ro, texts = calc_played(model, tok, max_new=48)
    assert sum(len(e.record()["calls"]) for e in envs) >= 4  # the episodes did pause and continue
    for i, e in enumerate(envs):
        rec = e.record()
        ids, mask = ro.completion_ids[i].tolist(), ro.completion_mask[i].tolist()
        n = len(mask) if not ro.stopped[i] else len(mask) - mask[::-1].index(True)  # a cut row may end on the tool's
        spans, tools = runs(mask[:n]), [tok.encode(t) for w, t in rec["transcript"] if w == "tool"]
        # what lies between (and after) the model's runs is exactly the tool's results, each tokenized on its own;
        # a row cut at the budget may hold only the start of its last result
        gaps = [ids[e1:s2] for (_, e1), (s2, _) in zip(spans, spans[1:] + [(n, n)])]
        assert len(gaps) == len(spans) and [g for g in gaps if g] == [t[:len(g)] for t, g in zip(tools, gaps) if g]
        assert all(g == t for g, t in zip(gaps, tools[:-1])) and (not ro.stopped[i] or gaps[-1] == [])
        assert len(tools) - len([g for g in gaps if g]) in (0, 1 - int(bool(ro.stopped[i]) or rec["ended"] != "turn"))
        assert int(ro.lengths[i]) == sum(mask) <= 48  # one turn's budget over all its segments, results included
        if ro.stopped[i]:
            assert texts[i] == C.transcript_text(rec)  # what the rewards read: the model's text and the results
        model_parts = [t for w, t in rec["transcript"] if w == "model"]
        assert len(model_parts) == len(spans) + int(not ro.stopped[i] and gaps[-1] != [])
        assert all(e.close in t for t in model_parts[:len(tools)])


def test_trainer_logprobs_over_tool_episodes_equal_the_samplers(model_tok):
    model, tok = model_tok
    envs, ro, texts = calc_played(model, tok, temperature=0.9)
    m = ro.completion_mask
    lp = token_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, m, 0.9)
    assert torch.allclose(lp[m], ro.logprobs[m], atol=1e-4), (lp[m] - ro.logprobs[m]).abs().max()
    assert (lp[~m] == 0).all() and (ro.logprobs[~m] == 0).all()


class Counter:
    """A minimal pausing environment: each '9' the model writes gets '<r>k</r>' (k calls so far), up to 4 calls."""
    stop_texts = ("9",)

    def __init__(self, i):
        self.i, self.calls, self.done, self.turn = i, 0, False, []

    def messages(self):
        return [{"role": "user", "content": f"question {self.i // 3}"}]

    def pause(self, text):
        self.turn.append(text)
        self.calls += 1
        if self.calls > 4:
            self.done = True
            return None
        return f"<r>{self.calls}</r>"

    def play(self, text):
        self.turn.append(text)
        self.done = True


def test_an_episodes_draws_do_not_depend_on_batch_mates_that_make_other_numbers_of_calls(model_tok):
    model, tok = model_tok
    envs = [Counter(i) for i in range(9)]
    gens = [torch.Generator().manual_seed(i) for i in range(9)]
    ro, texts = play(model, tok, envs, 40, 1.0, generators=gens, group_size=3)
    calls = [e.calls for e in envs]
    assert len(set(calls)) > 2, calls  # rows pause different numbers of times
    for i in range(9):
        env = Counter(i)
        _, alone = play(model, tok, [env], 40, 1.0, generators=[torch.Generator().manual_seed(i)])
        assert alone == [texts[i]] and env.turn == envs[i].turn


def test_the_call_cap_and_the_budget_end_an_episode(model_tok):
    model, tok = model_tok
    envs, ro, texts = calc_played(model, tok, n=9, max_calls=1, max_new=128)
    ended = {e.record()["ended"] for e in envs}
    assert "over_cap" in ended  # a second call ends the episode
    for e in envs:
        assert len(e.record()["calls"]) <= 1


def test_every_budget_records_each_model_token_once_and_only_calls_the_model_saw_begin(model_tok):
    # a pause on the budget's last token could not be answered: it must end the turn, not record a call
    model, tok = model_tok
    for budget in range(3, 33):
        envs = [Counter(i) for i in range(3)]
        ro, texts = play(model, tok, envs, budget, 1.0, generators=[torch.Generator().manual_seed(i) for i in range(3)])
        for i, e in enumerate(envs):
            mask, ids = ro.completion_mask[i].tolist(), ro.completion_ids[i].tolist()
            own = [t for t, m in zip(ids, mask) if m]
            own = own[:-1] if ro.stopped[i] and own and own[-1] in tok.stop_ids else own
            assert "".join(e.turn) == tok.decode(own), budget  # no segment recorded twice
            end = len(mask) if not ro.stopped[i] else len(mask) - mask[::-1].index(True)
            results = len([r for r in runs([not m for m in mask[:end]]) if r[0] > 0])  # blocks of fed ids
            assert results == min(e.calls, 4), budget  # every call the env answered reached the model (the fifth:
            # none, it ended the episode)
