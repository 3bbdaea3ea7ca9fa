"""sample.py: the KV-cached group sampler against obviously-correct full re-forward references.

Legend of the file:
  references   greedy_ref (argmax of model(full sequence) per prompt alone), ref_logprobs (log_softmax of a fresh
               full forward over prompt + completion of one row alone, no padding)
  greedy       cache == full re-forward, temperature 0 and top_k=1 are greedy, batch invariance
  sampling     G rows differ, seeds reproduce (int == torch.Generator), prefill runs once per distinct prompt
  stops        first stop token ends a row inside the mask, stop ids in the prompt do not count, truncation flag,
               early exit, sync_every
  log-probs    returned log-probs == fresh full-vocab log_softmax(logits / T), also under top-k/top-p
  sample_token top-k/top-p support and frequencies on hand-made logits
  vocab        ids >= vocab_size are never sampled
  errors, packed CPU linears == plain ones, compile=True (slowest test: inductor compiles C++ on CPU), and a real
               checkpoint vs transformers (GRPO_TEST_MODEL=dir)
Everything runs on CPU in fp32 on the tiny random models of conftest.py, except the opt-in real-checkpoint test.
"""
import contextlib
import os

import pytest
import torch

from conftest import random_model
import sample
from sample import generate, packed_linears, sample_token, uniforms

PROMPTS = [[5, 17, 42, 99, 3, 250, 61], [77], [8, 150, 9, 31]]  # lengths 7, 1, 4: left padding in one batch


@pytest.fixture(autouse=True)
def one_thread(request):
    """The tiny models gain nothing from intra-op threads, and on a busy machine they make the suite ~5x slower."""
    if request.node.name.startswith("test_real_checkpoint"):  # a 100M+ model: let it use every core
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return random_model("qwen2", tied=True, seed=0).eval()


# ----------------------------------------------------------------------------- references

@torch.no_grad()
def greedy_ref(model, prompt, n, stop_ids=(), vocab_size=None):
    """Greedy completion of one prompt alone: re-run the whole sequence each step, argmax of the last logits."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]  # (V,)
        if vocab_size is not None:
            logits = logits[:vocab_size]
        tok = int(logits.argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stop_ids:
            break
    return out


@torch.no_grad()
def ref_logprobs(model, prompt, completion, temperature):
    """log_softmax(logits / T) over the full vocab of each completion token, one fresh forward, no padding."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(ids)[0, len(prompt) - 1:-1].float()  # (Tc, V): position t-1 predicts token t
    lp = (logits / temperature).log_softmax(-1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), logits


def row_completion(r, i):
    """Row i's tokens inside its mask, as a list."""
    return r.completion_ids[i, :int(r.lengths[i])].tolist()


def first_fresh_index(seq, lo):
    """The first k >= lo with seq[k] not in seq[:k] (so stopping on seq[k] stops exactly at k)."""
    return next(k for k in range(lo, len(seq)) if seq[k] not in seq[:k])


# ----------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen3", False), ("llama", True)])
def test_greedy_with_cache_equals_full_reforward(family, tied):
    m = random_model(family, tied=tied, seed=1).eval()
    G, n = 3, 10
    r = generate(m, PROMPTS, G, n, temperature=0)
    assert r.completion_ids.shape == (len(PROMPTS) * G, n) and r.group_size == G
    for p, prompt in enumerate(PROMPTS):
        ref = greedy_ref(m, prompt, n)
        for i in range(p * G, p * G + G):
            assert r.completion_ids[i].tolist() == ref, (p, i)
            assert r.prompt_ids[i][r.prompt_mask[i]].tolist() == prompt  # row layout: p*G .. p*G+G-1
            assert r.prompt_mask[i].sum() == len(prompt) and r.prompt_mask[i, -1]  # left-padded
    assert r.lengths.tolist() == [n] * len(r.lengths) and not r.stopped.any() and r.completion_mask.all()


def test_temperature_zero_is_greedy_and_ignores_top_k_top_p(model):
    r = generate(model, PROMPTS, 2, 8, temperature=0, top_k=3, top_p=0.5, generator=0)
    for p, prompt in enumerate(PROMPTS):
        ref = greedy_ref(model, prompt, 8)
        assert r.completion_ids[2 * p].tolist() == ref and r.completion_ids[2 * p + 1].tolist() == ref


def test_top_k_one_equals_greedy(model):
    r = generate(model, PROMPTS, 3, 8, temperature=1.0, top_k=1, generator=5)
    for p, prompt in enumerate(PROMPTS):
        ref = greedy_ref(model, prompt, 8)
        for i in range(3 * p, 3 * p + 3):
            assert r.completion_ids[i].tolist() == ref


def test_batch_invariance(model):
    """A prompt's greedy completion is the same alone and between a longer and a shorter prompt."""
    x = [40, 41, 42, 43]
    alone = generate(model, [x], 1, 12, temperature=0).completion_ids[0]
    batch = generate(model, [[9] * 11 + [1, 2, 3], x, [200, 7]], 2, 12, temperature=0)
    assert batch.completion_ids[2].tolist() == alone.tolist()
    assert batch.completion_ids[3].tolist() == alone.tolist()
    assert alone.tolist() == greedy_ref(model, x, 12)


# ----------------------------------------------------------------------------- sampling

def test_group_rows_differ_and_seed_reproduces(model):
    G = 4
    a = generate(model, PROMPTS, G, 12, temperature=1.0, generator=torch.Generator().manual_seed(123))
    for p in range(len(PROMPTS)):
        rows = {tuple(a.completion_ids[i].tolist()) for i in range(p * G, p * G + G)}
        assert len(rows) == G, f"prompt {p}: the G rows are not all different"
    b = generate(model, PROMPTS, G, 12, temperature=1.0, generator=torch.Generator().manual_seed(123))
    c = generate(model, PROMPTS, G, 12, temperature=1.0, generator=123)  # int seed == Generator seeded with it
    for r in (b, c):
        assert torch.equal(r.completion_ids, a.completion_ids)
        assert torch.equal(r.logprobs, a.logprobs) and torch.equal(r.lengths, a.lengths)
    d = generate(model, PROMPTS, G, 12, temperature=1.0, generator=124)
    assert not torch.equal(d.completion_ids, a.completion_ids)


def test_one_generator_per_prompt_makes_sampling_batch_invariant(model):
    """generator=[one per prompt]: a prompt's G sampled rows do not depend on the other prompts in the batch."""
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    G, kw = 3, dict(temperature=1.0, top_p=0.95, stop_ids=[3, 42])
    alone = generate(model, [PROMPTS[2]], G, 10, generator=gens(30), **kw)
    batch = generate(model, PROMPTS, G, 10, generator=gens(10, 20, 30), **kw)
    assert torch.equal(batch.lengths[2 * G:], alone.lengths)
    for j in range(G):
        assert row_completion(batch, 2 * G + j) == row_completion(alone, j)
    assert not torch.equal(batch.completion_ids[:G], batch.completion_ids[G:2 * G])  # the seeds do differ
    with pytest.raises(ValueError):
        generate(model, PROMPTS, G, 4, generator=gens(1, 2))


def forward_shapes(model, monkeypatch):
    """A list that gets the input shape of every model.forward_hidden call from now on."""
    shapes, inner = [], model.forward_hidden

    def counting(input_ids, *args, **kw):
        shapes.append(tuple(input_ids.shape))
        return inner(input_ids, *args, **kw)

    monkeypatch.setattr(model, "forward_hidden", counting)
    return shapes


def test_prefill_runs_once_per_distinct_prompt(model, monkeypatch):
    """One prefill call of batch P (not P*G), then one call of T == 1 per decoded step."""
    shapes = forward_shapes(model, monkeypatch)
    P, G, n = len(PROMPTS), 4, 6
    r = generate(model, PROMPTS, G, n, temperature=1.0, generator=0)
    assert shapes[0] == (P, max(map(len, PROMPTS)))
    assert shapes[1:] == [(P * G, 1)] * (r.completion_ids.shape[1] - 1)  # no forward after the last token
    assert len(shapes) == n


# ----------------------------------------------------------------------------- shared prefix

PREFIX = [5, 17, 42, 99, 3, 250, 61, 8, 9]  # a chat template's system turn, as it were: the same in every prompt
SHARING = [PREFIX + [1, 2, 3], PREFIX + [7], PREFIX + [77, 4, 4, 4, 4, 6], PREFIX[:5] + [11]]  # unequal lengths


def test_common_prefix():
    """The longest common prefix, leaving every prompt one token of its own (its last position is its own)."""
    assert sample.common_prefix(SHARING[:3]) == len(PREFIX)
    assert sample.common_prefix(SHARING) == 5
    assert sample.common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts
    assert sample.common_prefix([[1, 2], [1, 2, 3]]) == 1  # one prompt is the other's prefix
    assert sample.common_prefix([[4], [4, 5]]) == 0 and sample.common_prefix([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen3", False), ("llama", True)])
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=20)])
def test_shared_prefix_equals_each_prompt_prefilled_whole(family, tied, kw):
    """Identical tokens and log-probs within 1e-5 fp32, with left padding and prompts of unequal length."""
    m = random_model(family, tied=tied, seed=1).eval()
    # stop ids: rows finish at different steps and leave the batch (KVCache.keep beside the shared prefix's cache)
    for prompts, stops, sync in ((SHARING[:3], (), 1), (SHARING, (), 1), (SHARING, range(0, 320, 7), 1),
                                 (SHARING, range(0, 320, 5), 4)):
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(prompts))]  # noqa: E731
        shared = generate(m, prompts, 3, 12, generator=gens(), stop_ids=stops, sync_every=sync, **kw)
        whole = generate(m, prompts, 3, 12, generator=gens(), stop_ids=stops, sync_every=sync, share_prefix=False,
                         **kw)
        assert not stops or shared.stopped.any()
        assert torch.equal(shared.completion_ids, whole.completion_ids)
        assert torch.equal(shared.prompt_ids, whole.prompt_ids) and torch.equal(shared.prompt_mask, whole.prompt_mask)
        assert torch.equal(shared.lengths, whole.lengths) and torch.equal(shared.stopped, whole.stopped)
        torch.testing.assert_close(shared.logprobs, whole.logprobs, atol=1e-5, rtol=0)


def test_shared_prefix_under_bf16_autocast(model):
    """The CUDA sampler runs under bf16 autocast (CPU autocast here): greedy, the same tokens; the log-probs at the
    bf16 tolerance of test_grpo's autocast tests (the shared keys are attended in fp32, SDPA rounds its inputs)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = generate(model, SHARING, 2, 8, temperature=0)
        whole = generate(model, SHARING, 2, 8, temperature=0, share_prefix=False)
    assert shared.logprobs.dtype == torch.float32
    assert torch.equal(shared.completion_ids, whole.completion_ids)
    torch.testing.assert_close(shared.logprobs, whole.logprobs, atol=0.1, rtol=0.02)


def test_shared_prefix_is_prefilled_once(model, monkeypatch):
    """One forward of the prefix (1 row), one of the P suffixes, then one per decoded step."""
    shapes = forward_shapes(model, monkeypatch)
    generate(model, SHARING[:3], 4, 6, temperature=1.0, generator=0)
    Tp = max(map(len, SHARING[:3]))
    assert shapes[:2] == [(1, len(PREFIX)), (3, Tp - len(PREFIX))] and shapes[2:] == [(12, 1)] * 5


# ----------------------------------------------------------------------------- stops

def test_row_stops_at_first_stop_token(model):
    """Stop id = the token greedy emits first at step k: that row has length k+1; the other row runs to the end."""
    n, pad = 10, 311
    ref_a, ref_b = greedy_ref(model, PROMPTS[0], n), greedy_ref(model, PROMPTS[2], n)
    k = first_fresh_index(ref_a, 2)
    stop = ref_a[k]
    assert stop not in ref_b and stop != pad, "precondition on the random model; pick another prompt/seed"
    r = generate(model, [PROMPTS[0], PROMPTS[2]], 1, n, temperature=0, stop_ids=[stop], pad_id=pad)
    assert r.completion_ids.shape[1] == n  # row 1 is truncated, so no early exit
    assert int(r.lengths[0]) == k + 1 and bool(r.stopped[0])
    assert r.completion_ids[0, :k + 1].tolist() == ref_a[:k + 1]
    assert r.completion_ids[0, k + 1:].tolist() == [pad] * (n - k - 1)
    assert r.completion_mask[0].tolist() == [True] * (k + 1) + [False] * (n - k - 1)
    assert (r.logprobs[0, k + 1:] == 0).all() and (r.logprobs[0, :k + 1] < 0).all()
    # the truncated row: flagged, full length, fully masked in
    assert not bool(r.stopped[1]) and int(r.lengths[1]) == n and r.completion_mask[1].all()
    assert r.completion_ids[1].tolist() == ref_b


def test_stop_id_in_prompt_does_not_stop(model):
    n = 8
    prompt = PROMPTS[0]
    stop = prompt[-1]  # the prompt even ends with it
    ref = greedy_ref(model, prompt, n)
    assert stop not in ref, "precondition on the random model"
    r = generate(model, [prompt, [stop, stop]], 1, n, temperature=0, stop_ids=[stop, 319])
    assert r.completion_ids[0].tolist() == ref
    assert not bool(r.stopped[0]) and int(r.lengths[0]) == n and r.completion_mask[0].all()


def test_early_exit_when_all_rows_stopped(model):
    n = 20
    refs = [greedy_ref(model, p, n) for p in PROMPTS]
    stops = {refs[0][first_fresh_index(refs[0], 1)], refs[1][first_fresh_index(refs[1], 3)],
             refs[2][first_fresh_index(refs[2], 2)]}
    want = [next(t for t, tok in enumerate(ref) if tok in stops) + 1 for ref in refs]  # first stop per row
    assert max(want) < n
    r = generate(model, PROMPTS, 2, n, temperature=0, stop_ids=sorted(stops))
    assert r.completion_ids.shape[1] == max(want) < n
    assert r.lengths.tolist() == [w for w in want for _ in range(2)] and r.stopped.all()
    for i in range(len(r.lengths)):
        assert row_completion(r, i) == refs[i // 2][:want[i // 2]]
    # checking only every 4 steps (the GPU default) changes the width, never what is inside the masks
    r4 = generate(model, PROMPTS, 2, n, temperature=0, stop_ids=sorted(stops), sync_every=4)
    assert r4.completion_ids.shape[1] == min(n, -(-max(want) // 4) * 4)
    assert torch.equal(r4.lengths, r.lengths) and torch.equal(r4.stopped, r.stopped)
    assert torch.equal(r4.completion_ids[:, :r.completion_ids.shape[1]], r.completion_ids)
    assert not r4.completion_mask[:, r.completion_ids.shape[1]:].any()


def test_sampled_rows_stop_invariants(model):
    """Under sampling: a stopped row's only stop token is its last one in the mask; after it only pad."""
    stops, pad, n = [3, 9, 17, 42, 100, 150, 200, 250, 300], 3, 16  # pad is a stop id, as tokenizer.py picks it
    r = generate(model, PROMPTS, 6, n, temperature=1.5, stop_ids=stops, pad_id=pad, generator=7)
    assert r.stopped.any() and not r.stopped.all()  # both kinds of row occur
    for i in range(len(r.lengths)):
        L, ids = int(r.lengths[i]), r.completion_ids[i].tolist()
        assert r.completion_mask[i].tolist() == [t < L for t in range(len(ids))]
        assert not any(t in stops for t in ids[:L - 1])
        assert all(t == pad for t in ids[L:])
        if r.stopped[i]:
            assert ids[L - 1] in stops
        else:
            assert L == n and ids[-1] not in stops


@pytest.mark.parametrize("per_prompt", [False, True])
def test_finished_rows_leave_the_batch_and_change_nothing(model, monkeypatch, per_prompt):
    """Rows that stopped are dropped from the decode batch, and the rollout is exactly the one that keeping them
    (no host check until the end: sync_every > max_new_tokens) gives: same tokens, masks and log-probs."""
    batch = []
    inner = model.forward_hidden
    monkeypatch.setattr(model, "forward_hidden", lambda ids, *a, **k: batch.append(len(ids)) or inner(ids, *a, **k))
    gen = lambda: [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))] if per_prompt else 7
    kw = dict(temperature=1.0, top_k=40, stop_ids=list(range(0, 512, 5)))  # ~1 in 5 tokens stops a row
    G, n = 4, 12
    a = generate(model, PROMPTS, G, n, generator=gen(), sync_every=1, **kw)
    steps_a = batch[1:]
    batch.clear()
    b = generate(model, PROMPTS, G, n, generator=gen(), sync_every=n + 1, **kw)
    assert batch[1:] == [len(PROMPTS) * G] * (n - 1)
    assert steps_a == sorted(steps_a, reverse=True) and steps_a[-1] < len(PROMPTS) * G  # rows really left
    T = a.completion_ids.shape[1]
    assert torch.equal(a.completion_ids, b.completion_ids[:, :T]) and not b.completion_mask[:, T:].any()
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.stopped, b.stopped) and a.stopped.any()
    torch.testing.assert_close(a.logprobs, b.logprobs[:, :T], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.5, 8, 0.8),
                                                     (0.0, 0, 1.0)])
def test_logprobs_equal_fresh_full_forward(model, temperature, top_k, top_p):
    """Full-vocab log_softmax(logits / T) of the sampled tokens (T=0 reports T=1), not renormalised by top-k/top-p."""
    G = 3
    r = generate(model, PROMPTS, G, 9, temperature=temperature, top_k=top_k, top_p=top_p,
                 stop_ids=[3, 9, 17, 42, 100, 150, 200, 250, 300], generator=11)
    assert r.logprobs.dtype == torch.float32
    for i in range(len(r.lengths)):
        L, c = int(r.lengths[i]), row_completion(r, i)
        want, logits = ref_logprobs(model, PROMPTS[i // G], c, temperature or 1.0)
        torch.testing.assert_close(r.logprobs[i, :L], want, atol=1e-5, rtol=1e-5)
        assert (r.logprobs[i, L:] == 0).all()
        if top_k:  # every sampled token is among the k most likely at its step
            rank = (logits > logits.gather(-1, torch.tensor(c)[:, None])).sum(-1)
            assert (rank < top_k).all()
        if top_k or top_p < 1:  # so renormalised log-probs would have been larger: the check above can fail
            assert (want < -1e-3).all()


# ----------------------------------------------------------------------------- sample_token

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def draw(probs, n=20000, seed=0, **kw):
    """Counts of n draws of sample_token on one row of logits log(probs), repeated n times."""
    logits = probs.log().expand(n, -1).contiguous()
    ids, lp = sample_token(logits.clone(), u=uniforms(torch.Generator().manual_seed(seed), n, "cpu"), **kw)
    # the log-prob is the full tempered softmax's, whatever top-k/top-p cut from the draw
    want = (logits / (kw.get("temperature") or 1.0)).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want, atol=1e-6, rtol=1e-6)
    return torch.bincount(ids, minlength=len(probs)).double()


def assert_distribution(counts, expected):
    """Support equals expected's, and a chi-square (df <= 3) far below what a wrong distribution gives."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    expected = expected / expected.sum()
    assert ((counts > 0) == (expected > 0)).all(), (counts, expected)
    n, keep = counts.sum(), expected > 0
    chi2 = (((counts - n * expected)[keep]) ** 2 / (n * expected[keep])).sum()
    assert chi2 < 20, (counts / n, expected)  # p ~ 2e-4 at df=3


@pytest.mark.parametrize("kw,expected", [
    (dict(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
    (dict(temperature=1.0, top_p=0.7), [0.5, 0.3, 0, 0]),
    (dict(temperature=1.0, top_p=0.5), [1, 0, 0, 0]),
    (dict(temperature=1.0, top_p=0.81), [0.5, 0.3, 0.15, 0]),
    (dict(temperature=1.0, top_p=0.6), [0.5, 0.3, 0, 0]),
    (dict(temperature=0.5, top_p=0.6), [1, 0, 0, 0]),  # top-p acts on the tempered distribution (p^2: 0.68 first)
    (dict(temperature=0.5), [0.25, 0.09, 0.0225, 0.0025]),
    (dict(temperature=1.0, top_k=2), [0.5, 0.3, 0, 0]),
    (dict(temperature=1.0, top_k=3, top_p=0.7), [0.5, 0.3, 0, 0]),
])
def test_sample_token_support_and_frequencies(kw, expected):
    assert_distribution(draw(PROBS, **kw), expected)


def test_sample_token_is_per_row():
    """top-k / top-p thresholds are per row: two rows with opposite orders keep opposite ids."""
    logits = torch.stack([PROBS.log(), PROBS.flip(0).log()]).repeat(2000, 1)  # rows alternate
    g = torch.Generator().manual_seed(1)
    for kw in (dict(top_k=2), dict(top_p=0.7)):
        ids, _ = sample_token(logits.clone(), 1.0, u=uniforms(g, len(logits), "cpu"), **kw)
        assert set(ids[0::2].tolist()) == {0, 1} and set(ids[1::2].tolist()) == {2, 3}, kw
    assert sample_token(logits[:2].clone(), 0)[0].tolist() == [0, 3]
    with pytest.raises(ValueError, match="uniforms"):
        sample_token(logits[:2].clone(), 1.0)


# ----------------------------------------------------------------------------- vocabulary

def test_ids_beyond_vocab_size_are_never_sampled():
    m = random_model("qwen2", tied=False, seed=3).eval()
    V, vs = m.config.vocab_size, 300
    with torch.no_grad():
        m.lm_head.weight[vs:] = 0  # padded embedding rows: logit 0, plus the bias below makes them the argmax
    bias = torch.zeros(V)
    bias[vs:] = 30.0
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    n = 8
    # precondition: without vocab_size they would win, greedy and sampled
    assert all(t >= vs for t in generate(m, PROMPTS, 1, n, temperature=0).completion_ids.flatten().tolist())
    assert (generate(m, PROMPTS, 4, n, temperature=1.0, generator=0).completion_ids >= vs).float().mean() > 0.9
    g = generate(m, PROMPTS, 2, n, temperature=0, vocab_size=vs)
    assert (g.completion_ids < vs).all()
    for p, prompt in enumerate(PROMPTS):
        assert g.completion_ids[2 * p].tolist() == greedy_ref(m, prompt, n, vocab_size=vs)
        # the reported log-prob stays the trainer's full-vocab one (grpo.token_logprobs has no vocab cut)
        torch.testing.assert_close(g.logprobs[2 * p], ref_logprobs(m, prompt, g.completion_ids[2 * p].tolist(), 1.0)[0],
                                   atol=1e-5, rtol=1e-5)
    for kw in (dict(), dict(top_p=0.9), dict(top_k=50)):
        s = generate(m, PROMPTS, 8, n, temperature=1.0, vocab_size=vs, generator=0, **kw)
        assert (s.completion_ids < vs).all(), kw
        assert len(set(s.completion_ids.flatten().tolist())) > 10  # really sampled, not collapsed


# ----------------------------------------------------------------------------- errors and compile

@pytest.mark.parametrize("prompts,G,kw", [([], 2, {}), ([[1, 2], []], 2, {}), ([[]], 1, {}), ([[1, 2]], 0, {}),
                                          ([[1, 2]], -1, {}), ([[1, 2]], 2, dict(max_new_tokens=0)),
                                          ([[1, 2]], 2, dict(temperature=-0.5))])
def test_errors(model, prompts, G, kw):
    kw = dict(dict(max_new_tokens=4), **kw)
    with pytest.raises(ValueError):
        generate(model, prompts, G, **kw)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_packed_linears_equal_plain_and_are_undone(model, monkeypatch):
    """CPU generate multiplies by oneDNN-packed weights: same logits (fp32 reordering only), same samples,
    current weights every call, and every nn.Linear is its plain self again afterwards, even after an error."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.tensor([[5, 17, 42, 99], [8, 150, 9, 31]])
    with torch.no_grad():
        ref = model(ids)
        with packed_linears(model, 2):
            assert all("forward" in vars(m) for m in linears)  # really swapped, or this test proves nothing
            torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError), packed_linears(model, 2):
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in linears)
    assert torch.equal(model(ids), ref)

    a = generate(model, PROMPTS, 3, 8, temperature=1.0, stop_ids=[3], generator=5)
    monkeypatch.setattr(sample, "packed_linears", lambda *a, **k: contextlib.nullcontext())
    b = generate(model, PROMPTS, 3, 8, temperature=1.0, stop_ids=[3], generator=5)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)

    m = random_model("qwen2", tied=False, seed=4).eval()  # packs the weights as they are at each call
    with torch.no_grad():
        before = generate(m, PROMPTS, 1, 6, temperature=0).completion_ids
        m.lm_head.weight.mul_(-1)  # greedy now picks the least likely id instead
        after = generate(m, PROMPTS, 1, 6, temperature=0).completion_ids
    assert after[:, 0].tolist() != before[:, 0].tolist()
    assert after[:, 0].tolist() == [greedy_ref(m, p, 1)[0] for p in PROMPTS]


def test_compile_equals_eager(model):
    """compile=True samples the same tokens and log-probs as eager, also as the batch shrinks (CPU inductor: ~11 s
    warm, 23-65 s cold). Same uniforms, and logits that differ by ~1e-6, so a draw could flip only by chance."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    kw = dict(temperature=1.0, top_k=40, stop_ids=list(range(0, 512, 5)), generator=3)  # rows stop at different steps
    a = generate(model, PROMPTS, 2, 8, **kw)
    b = generate(model, PROMPTS, 2, 8, compile=True, **kw)
    assert a.stopped.any() and len(set(a.lengths.tolist())) > 2  # so finished rows left the batch mid-way
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- a real checkpoint (opt-in)

@pytest.mark.skipif(not os.environ.get("GRPO_TEST_MODEL"),
                    reason="set GRPO_TEST_MODEL to a local Hugging Face checkpoint dir to compare with transformers")
def test_real_checkpoint_greedy_equals_transformers():
    tr = pytest.importorskip("transformers")
    from model import Transformer
    from tokenizer import Tokenizer
    path, n = os.environ["GRPO_TEST_MODEL"], 16
    tok = Tokenizer(path)
    ours = Transformer.from_pretrained(path).eval()
    theirs = tr.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # different lengths in one batch of ours; with SmolLM2-135M-Instruct the first stops (at <|im_end|>, which the
    # prompts contain too), the second runs into max_new_tokens
    prompts = [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
               tok.encode_chat([{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": "What is 2+3?"}])]
    r = generate(ours, prompts, 1, n, temperature=0, stop_ids=tok.stop_ids, vocab_size=tok.vocab_size,
                 pad_id=tok.pad_id)
    for i, p in enumerate(prompts):  # each prompt alone in transformers, no padding; it stops at EOS by default
        with torch.no_grad():
            out = theirs.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  do_sample=False, max_new_tokens=n, eos_token_id=tok.stop_ids,
                                  pad_token_id=tok.pad_id)
        want = out[0, len(p):].tolist()
        cut = next((j + 1 for j, t in enumerate(want) if t in tok.stop_ids), len(want))  # up to and incl. the stop
        assert row_completion(r, i) == want[:cut], (tok.decode(row_completion(r, i)), tok.decode(want[:cut]))
        assert bool(r.stopped[i]) == (want[cut - 1] in tok.stop_ids)
