"""tasks.py: the arith generator (deterministic, disjoint, right answers), prompts, options, GSM8K loading, and
the reward hacks each task's reward list must not pay for."""
import io
import os
import re

import pytest
from hypothesis import given, settings, strategies as st

import rewards as R
import tasks as T


def arith(**kw):
    return T.arith_load("", "", **{**T.TASKS["arith"].options, **kw})


# ----------------------------------------------------------------------------- arith generator

def test_arith_is_deterministic_per_seed_and_differs_across_seeds():
    a, b = arith(train_size=300, test_size=50), arith(train_size=300, test_size=50)
    assert a == b
    c = arith(train_size=300, test_size=50, seed=1)
    assert c[0] != a[0] and c[1] != a[1]


@pytest.mark.parametrize("kw", [dict(), dict(digits=1), dict(digits=3, ops="+-*", terms=3), dict(ops="*", terms=2),
                                dict(digits=1, ops="-", terms=4, seed=7)])
def test_arith_train_and_test_are_disjoint_and_distinct(kw):
    train, test = arith(train_size=3000, test_size=500, **kw)
    qs_train, qs_test = [e["question"] for e in train], [e["question"] for e in test]
    assert len(set(qs_train)) == len(qs_train) and len(set(qs_test)) == len(qs_test)
    assert not set(qs_train) & set(qs_test)
    # disjoint by construction, whatever the seed: the hash of the text alone says which side a problem is on
    other_train, _ = arith(train_size=3000, test_size=1, **{**kw, "seed": kw.get("seed", 0) + 100})
    assert not {e["question"] for e in other_train} & set(qs_test)


def test_arith_small_space_is_exhausted_not_looped():
    train, test = arith(digits=1, ops="+", terms=2, train_size=10_000, test_size=10_000)
    assert len(train) + len(test) == 100  # 0..9 x 0..9, every problem exactly once


@pytest.mark.parametrize("kw", [dict(), dict(digits=3, ops="+-*", terms=4), dict(ops="-*", terms=3, digits=1)])
def test_every_gold_answer_is_pythons_arithmetic(kw):
    train, test = arith(train_size=500, test_size=200, **kw)
    for e in train + test:
        expr = re.fullmatch(r"What is (.*)\?", e["question"]).group(1)
        assert re.fullmatch(r"-?\d+( [-+*] -?\d+)*", expr)
        assert int(e["gold"]) == eval(expr), e  # noqa: S307 (digits and + - * only, checked above)
        assert R.correct(T.answer("we add the numbers up", e["gold"]), **e) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=2, max_size=5), st.data())
def test_worked_reasoning_is_right_line_by_line(nums, data):
    ops = data.draw(st.lists(st.sampled_from("+-*"), min_size=len(nums) - 1, max_size=len(nums) - 1))
    text = T.arith_reasoning(nums, ops)
    for line in text.split("\n"):  # every "=" in a line joins two expressions of the same value
        parts = line.split(" = ")
        assert len({eval(p) for p in parts}) == 1, line  # noqa: S307
    last = text.split("\n")[-1].split(" = ")[-1]
    assert eval(last) == T.arith_eval(nums, ops) == eval(T.arith_text(nums, ops))  # noqa: S307


def test_arith_prompt_shows_two_worked_turns_from_the_train_side():
    train, test = arith(train_size=2000, test_size=200)
    msgs = T.arith_prompt(test[0])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == test[0]["question"]
    for q, a in zip(msgs[1:5:2], msgs[2:5:2]):
        gold = str(eval(q["content"][len("What is "):-1]))  # noqa: S307
        assert R.correct(a["content"], gold=gold) == 1.0 and R.format_strict(a["content"]) == 1.0
        assert T.arith_split(q["content"][len("What is "):-1], 20) == "train"
    assert "..." not in msgs[0]["content"]  # no placeholder template to copy
    # the same examples for every problem of a setting, so the prompt prefix is the same
    assert T.arith_prompt(test[1])[:5] == msgs[:5]


def test_arith_rewards_pay_correctness_first():
    _, test = arith(train_size=10, test_size=5)
    ex = test[0]
    p = T.prompt_text(T.arith_prompt(ex))
    good = T.answer(f"I add them: {ex['expr']} = {ex['gold']}", ex["gold"])
    wrong = T.answer(f"I add them: {ex['expr']} = {int(ex['gold']) + 1}", int(ex["gold"]) + 1)
    total = lambda c: R.combine(T.ARITH_REWARDS, c, prompt=p, **ex)[0]  # noqa: E731
    assert total(good) == pytest.approx(1.1)
    assert 0 < total(wrong) <= 0.1 * total(good)  # format-only: a small fraction of a correct answer
    shot = T.arith_prompt(ex)[2]["content"]  # a verbatim copy of a worked example: its reasoning is in the prompt
    for hack in ("<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>", shot,
                 f"<answer>\n{ex['gold']}1\n</answer>", "<reasoning>\nx\n</reasoning>\n<answer>\n0\n</answer>"):
        assert total(hack) == 0.0, hack


def test_gsm8k_reward_list_refuses_the_three_known_hacks():
    ex = {"question": "Tom has 3 apples and buys 4 more. How many apples?", "gold": "7"}
    msgs = T.gsm8k_prompt(ex)
    p = T.prompt_text(msgs)
    total = lambda c: R.combine(R.GSM8K_REWARDS, c, prompt=p, **ex)[0]  # noqa: E731
    right = total(T.answer("He has 3 apples and buys 4, so 3 + 4 = 7.", 7))
    for hack in ("<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>",  # the template with "..."
                 "<reasoning>\nx\n</reasoning>\n<answer>\n0\n</answer>", "<answer>\n0\n</answer>",  # x, bare block
                 msgs[2]["content"],  # the worked example copied verbatim
                 T.answer(T.PROTOCOL, 5)):  # the instruction copied as reasoning
        assert total(hack) <= R.FORMAT_SHARE_MAX * right and total(hack) == 0.0, hack
    assert "..." not in "".join(m["content"] for m in msgs)


# ----------------------------------------------------------------------------- options and errors

def test_parse_options_types_and_errors():
    assert T.parse_options("arith", "digits=3, ops=+-*,terms=3") == {**T.TASKS["arith"].options, "digits": 3,
                                                                     "ops": "+-*", "terms": 3}
    assert T.parse_options("gsm8k", "") == {"tools": "none", "calls": 4}
    assert T.parse_options("gsm8k", "tools=calc") == {"tools": "calc", "calls": 4}
    with pytest.raises(T.TaskError, match="bad task option 'depth=2' for arith; options"):
        T.parse_options("arith", "depth=2")
    with pytest.raises(T.TaskError, match="bad task option 'digits' for arith"):
        T.parse_options("arith", "digits")
    with pytest.raises(T.TaskError, match=r"digits='two' is not a valid int"):
        T.parse_options("arith", "digits=two")
    with pytest.raises(T.TaskError, match="options \\(with defaults\\): tools=none, calls=4"):
        T.parse_options("gsm8k", "digits=2")


@pytest.mark.parametrize("kw, msg", [(dict(digits=0), "digits must be 1..9"), (dict(ops="/"), "ops must be"),
                                     (dict(ops=""), "ops must be"), (dict(terms=1), "terms must be 2..6"),
                                     (dict(test_size=0), "must be >= 1")])
def test_arith_bad_options(kw, msg):
    with pytest.raises(T.TaskError, match=msg):
        arith(**kw)


# ----------------------------------------------------------------------------- GSM8K files

def test_gsm8k_offline_says_how_to_pass_data_dir(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(T.urllib.request, "urlopen", offline)
    with pytest.raises(T.TaskError, match="could not download GSM8K train.*pass --data-dir DIR"):
        T.gsm8k_load("", str(tmp_path))


def test_gsm8k_download_is_checksummed(tmp_path, monkeypatch):
    monkeypatch.setattr(T.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"tampered\n"))
    with pytest.raises(T.TaskError, match="wrong sha256"):
        T.gsm8k_file("", str(tmp_path), "test")
    assert not os.path.exists(tmp_path / "gsm8k" / "test.jsonl")


def test_gsm8k_checksummed_file_is_used_without_network(tmp_path, monkeypatch):
    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "test.jsonl")
    if not os.path.isfile(shared) and not os.environ.get("CI"):  # CI lays ../shared beside the clone: never skip there
        pytest.skip("no ../shared/data/gsm8k beside the repository")
    os.makedirs(tmp_path / "gsm8k")
    with open(shared, "rb") as f, open(tmp_path / "gsm8k" / "test.jsonl", "wb") as g:
        g.write(f.read())
    monkeypatch.setattr(T.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded again"))
    assert len(T.read_gsm8k(T.gsm8k_file("", str(tmp_path), "test"))) == 1319


def test_judge_view_of_each_task():
    assert T.judge_view(T.TASKS["arith"], {"question": "What is 1 + 2?", "gold": "3"}) == ("What is 1 + 2?", "3")
    assert T.judge_view(T.TASKS["gsm8k"], {"question": "Q?", "gold": 18}) == ("Q?", "18")
    q, ref = T.judge_view(T.TASKS["wordle"], {"secret": "CRANE", "history": []})
    assert ref is None and "CRANE" not in q and "guess" in q.lower()  # the game, never its secret


def test_example_view_shows_the_gold_answer_and_a_games_secret():
    assert T.example_view(T.TASKS["arith"], {"question": "What is 1 + 2?", "gold": "3"}) == ("What is 1 + 2?", "3")
    q, gold = T.example_view(T.TASKS["wordle"], {"secret": "CRANE", "history": []})
    assert gold == "CRANE" and q == T.judge_view(T.TASKS["wordle"], {"secret": "CRANE", "history": []})[0]


# ----------------------------------------------------------------------------- wordprob and the calculator option

def wordprob(**kw):
    return T.TASKS["wordprob"].load("", "", **{**T.TASKS["wordprob"].options, **kw})


def test_wordprob_is_held_out_by_template_and_its_answers_follow_its_steps():
    import calc as C
    import wordprob as WP
    train, test = wordprob(train_size=3000, test_size=800)
    assert wordprob(train_size=3000, test_size=800) == (train, test)  # deterministic
    assert wordprob(train_size=50, test_size=50, seed=1)[1] != test[:50]
    tr, te = {e["template"] for e in train}, {e["template"] for e in test}
    assert not tr & te and len(tr) == len(WP.TRAIN) and len(te) == len(WP.TEST)  # every template drawn, none shared
    # a test template words at least one step in a way no training template does
    for phrases in WP.PHRASES.values():
        held = phrases[WP.HELD_OUT].split("{")[0]
        assert not any(held in e["question"] for e in train) and any(held in e["question"] for e in test)
    shots = {f"{a}{b}/{i}{j}" for a, b, i, j in WP.SHOTS}
    assert shots <= tr and not shots & te  # the worked examples: training templates, never tested
    for e in train[:300] + test[:300]:
        (a, b) = e["steps"]
        v1, v2 = C.calculate(a)[0], C.calculate(b)[0]
        assert b.startswith(f"{v1} ") and v2 == int(e["gold"]) > 0 and v1.denominator == 1 == v2.denominator
        x, op, y = a.split()
        assert x in e["question"] and y in e["question"] and b.split()[2] in e["question"]


def test_wordprob_prompts_show_calls_only_with_the_tool():
    ex = wordprob(train_size=5, test_size=5)[1][0]
    calc = T.wordprob_prompt(ex)
    none = T.wordprob_prompt({**ex, "tools": "none"})
    assert "<calc>" in calc[0]["content"] and "<calc>" not in none[0]["content"]
    shots = [m["content"] for m in calc[1:-1] if m["role"] == "assistant"]
    assert len(shots) == 2 and all(s.count("<calc>") == 2 == s.count("<result>") for s in shots)
    assert all("<calc>" not in m["content"] for m in none)
    assert calc[-1]["content"] == none[-1]["content"] == ex["question"]
    # each worked example's results are the calculator's own, and its answer is right
    for s, m in zip(shots, (m for m in calc[1:-1] if m["role"] == "user")):
        assert R.format_strict(s) == 1


@pytest.mark.parametrize("opts,msg", [("tools=abacus", "tools must be one of none, calc, got 'abacus'"),
                                      ("calls=0", "calls (calculator calls per completion) must be 1..16, got 0"),
                                      ("train_size=0", "train_size and test_size must be >= 1")])
def test_wordprob_bad_options_are_one_line(opts, msg):
    with pytest.raises(T.TaskError, match=re.escape(msg)):
        wordprob(**T.parse_options("wordprob", opts))


def test_tool_tasks_play_episodes_and_others_do_not():
    for name, plays in (("wordprob", True), ("gsm8k", False), ("arith", False)):
        t = T.TASKS[name]
        assert t.train_plays(t.options) == plays == t.eval_plays(t.options)
    g = T.TASKS["gsm8k"]
    assert g.train_plays({**g.options, "tools": "calc"}) and not T.TASKS["wordprob"].train_plays({"tools": "none"})
    w = T.TASKS["wordle"]
    assert w.eval_plays(w.options) and not w.train_plays(w.options) and w.train_plays({**w.options, "mode": "games"})
    ex = {"question": "Q?", "gold": "3", "tools": "calc", "calls": 2}
    env = g.game(ex)
    assert env.max_calls == 2 and "<calc>" in env.messages()[0]["content"] and "<calc>" in env.messages()[2]["content"]
    assert "<calc>" not in T.gsm8k_prompt({**ex, "tools": "none"})[0]["content"]
