"""Property-based tests for grpo.py: every claim of its module docstring, checked against independent references.

- group_advantages: the definition (float64 reference), zero mean / unit std per group, shift / scale invariance,
  permutation equivariance, sign, exact zeros for constant groups and groups of one, frac_zero_std, the flat
  input, scale="none" / "batch", unbiased, and the argument errors (claims 1, 2).
- k3: >= 0, zero iff equal, zero gradient at equality, its gradient coefficient, a seeded Monte Carlo check that
  it is unbiased for the reverse KL(pi || ref), and the exact expectation of its gradient being the gradient of
  the forward KL(ref || pi) (claim 7).
- grpo_loss / loss_normalizer: equality with a slow per-token loop written from DeepSeekMath eq. 3 for every
  loss_type (claims 3, 4), the plain policy gradient at ratio 1, exactly-zero gradients of clipped tokens, inert
  padding (even +-inf there), micro-batch + gradient accumulation invariance (claim 5), the stats, beta == 0
  skipping the reference (claim 6), and the argument errors.
- token_logprobs: equality (values and parameter gradients) with a naive per-row full log_softmax at a
  temperature (claim 8) for any chunk size, and peak memory scaling with the chunk, not with T * V.
- shared prompts (note 9): rows holding the same prompt, in any order, get the values and parameter gradients
  of the full forward (three families, gradient checkpointing on and off, bf16 autocast), while each distinct
  prompt really is forwarded once.
Everything runs on CPU, on tiny random models (conftest.random_model), with no downloads.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import grpo
from conftest import random_model

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_EPS = 2.0 ** -23  # float32 machine epsilon
ONE_UP = float(np.nextafter(np.float32(1.0), np.float32(2.0)))  # 1 + 2^-23: the float32 right after 1.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation, which on a busy machine made this
    file 5-10x slower. One thread for this module, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- 1. group advantages

# float32-representable rewards: either anything in [-100, 100], or from a small set so ties and constant
# groups are common (as with 0/1 correctness rewards)
ANY_REWARD = st.floats(-100, 100, allow_nan=False, width=32, allow_subnormal=False)
SMALL_SET = st.sampled_from([0.0, 0.5, 1.0, 2.0])
GRID = st.integers(-6400, 6400).map(lambda k: k / 64)  # exact in float32, and so are sums of two of them


@st.composite
def reward_batches(draw, elements=None, min_G=1, max_G=8, max_P=5):
    """(P, G) float32 rewards; some rows may be forced constant."""
    P, G = draw(st.integers(1, max_P)), draw(st.integers(min_G, max_G))
    el = elements
    if el is None:
        el = draw(st.sampled_from([ANY_REWARD, SMALL_SET, st.one_of(ANY_REWARD, SMALL_SET)]))
    near_ties = elements is None  # (not for GRID, whose tests need exact sums)
    rows = []
    for _ in range(P):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            rows.append([draw(el)] * G)  # a constant group
        elif kind == 1 and near_ties:  # a near tie: members within a few float32 ulps of each other
            base = np.float32(draw(st.one_of(st.floats(1e-3, 100), st.floats(-100, -1e-3))))
            ulps = draw(st.lists(st.integers(-3, 3), min_size=G, max_size=G))
            rows.append([float(base + np.float32(k) * np.spacing(base)) for k in ulps])
        else:
            rows.append(draw(st.lists(el, min_size=G, max_size=G)))
    return torch.tensor(rows, dtype=torch.float32)


def ref_advantages(r, scale="group", unbiased=True, eps=1e-4):
    """The docstring's definition in float64: (r - group mean) / (std + eps), constant groups and G == 1 -> 0."""
    x = r.double()
    c = x - x.mean(1, keepdim=True)
    const = x.amax(1) == x.amin(1)
    if scale == "none" or x.shape[1] == 1:
        a = c
    else:
        s = (x if scale == "group" else x.reshape(1, -1)).std(1, keepdim=True, unbiased=unbiased)
        a = c / (s + eps)
    return torch.where(const[:, None], 0.0, a), const


def f32_tol(r, denom):
    """Per-row absolute tolerance for advantages computed in float32: a few ulps of the spread, over denom."""
    x = r.double()
    spread = (x - x.mean(1, keepdim=True)).abs().amax(1, keepdim=True)
    return 1e-6 + 16 * F32_EPS * spread / denom


@FAST
@given(r=reward_batches(), scale=st.sampled_from(["group", "batch", "none"]), unbiased=st.booleans(),
       eps=st.sampled_from([0.0, 1e-4, 1e-2, 1.0]))
@example(r=torch.tensor([[1.0, ONE_UP]]), scale="group", unbiased=True, eps=0.0)
def test_advantages_match_definition(r, scale, unbiased, eps):
    adv, frac = grpo.group_advantages(r, scale=scale, unbiased=unbiased, eps=eps)
    ref, const = ref_advantages(r, scale, unbiased, eps)
    assert adv.shape == r.shape and adv.dtype == torch.float32 and torch.isfinite(adv).all()
    x = r.double()
    if scale == "none" or r.shape[1] == 1:
        denom = torch.ones(r.shape[0], 1, dtype=torch.float64)
    else:
        denom = (x if scale == "group" else x.reshape(1, -1)).std(1, keepdim=True, unbiased=unbiased) + eps
        denom = torch.where(denom > 0, denom, 1.0).expand(r.shape[0], 1)
    tol = f32_tol(r, denom)
    assert ((adv.double() - ref).abs() <= tol + 1e-6 * ref.abs()).all(), (adv, ref)
    assert frac == pytest.approx(const.double().mean().item(), rel=1e-6)


@FAST
@given(r=reward_batches(min_G=2), unbiased=st.booleans())
@example(r=torch.tensor([[1.0, ONE_UP]]), unbiased=True)  # a tie broken by one ulp: the float32 mean rounds
@example(r=torch.tensor([[100.0, float(np.nextafter(np.float32(100), np.float32(200))), 100.0]]), unbiased=False)
def test_advantages_zero_mean_unit_std(r, unbiased):
    """With eps = 0 each non-constant group has mean 0 and std 1 (in the same Bessel convention); constant -> 0."""
    adv, _ = grpo.group_advantages(r, unbiased=unbiased, eps=0.0)
    a = adv.double()
    const = r.amax(1) == r.amin(1)
    assert (a[const] == 0).all()
    if (~const).any():
        a = a[~const]
        assert a.mean(1).abs().max() <= 1e-5, a
        assert torch.allclose(a.std(1, unbiased=unbiased), torch.ones(a.shape[0], dtype=torch.float64), atol=1e-5)


@FAST
@given(value=st.one_of(ANY_REWARD, st.sampled_from([0.1, 0.3, 1 / 3, -7.7, 1e-3, 99.9])),
       G=st.integers(1, 9), scale=st.sampled_from(["group", "batch", "none"]), unbiased=st.booleans(),
       eps=st.one_of(st.sampled_from([0.0, 1e-12, 1e-4]), st.floats(0, 10)), other=st.booleans())
@example(value=0.1, G=5, scale="group", unbiased=True, eps=0.0, other=False)
def test_constant_group_exactly_zero(value, G, scale, unbiased, eps, other):
    """A constant group gets exactly 0 (not 1e-17, not NaN) for any eps >= 0, next to a non-constant group or not."""
    rows = [[value] * G] + ([[float(i) for i in range(G)]] if other else [])
    r = torch.tensor(rows, dtype=torch.float32)
    adv, frac = grpo.group_advantages(r, scale=scale, unbiased=unbiased, eps=eps)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[0], torch.zeros(G))
    expect_frac = 1.0 if not other or G == 1 else 0.5
    assert frac == expect_frac


@FAST
@given(r=reward_batches(elements=GRID), shift=GRID, scale=st.sampled_from(["group", "batch", "none"]),
       unbiased=st.booleans())
def test_advantages_shift_invariant(r, shift, scale, unbiased):
    """Adding one constant to the rewards (exactly, on a float32 grid) does not change the advantages."""
    adv, f = grpo.group_advantages(r, scale=scale, unbiased=unbiased)
    adv2, f2 = grpo.group_advantages(r + shift, scale=scale, unbiased=unbiased)
    assert torch.allclose(adv, adv2, atol=1e-5, rtol=1e-5) and f == f2


@FAST
@given(r=reward_batches(elements=GRID, min_G=2), k=st.floats(0.01, 100), unbiased=st.booleans(),
       scale=st.sampled_from(["group", "batch"]))
def test_advantages_scale_invariant(r, k, unbiased, scale):
    """With eps = 0, multiplying the rewards by k > 0 does not change the advantages (up to float32 rounding of k*r);
    with a power of two, k*r is exact and so is the invariance."""
    adv, f = grpo.group_advantages(r, scale=scale, unbiased=unbiased, eps=0.0)
    adv2, f2 = grpo.group_advantages(r * k, scale=scale, unbiased=unbiased, eps=0.0)
    x = r.double()
    s = (x if scale == "group" else x.reshape(1, -1)).std(1, keepdim=True, unbiased=unbiased)
    s = torch.where(s > 0, s, 1.0)
    tol = 1e-5 + 8 * F32_EPS * x.abs().amax(1, keepdim=True) / s  # rounding of k * r, relative to the spread
    assert ((adv - adv2).abs() <= tol).all() and f == f2
    for k2 in (0.25, 2.0, 1024.0):
        assert torch.equal(grpo.group_advantages(r * k2, scale=scale, unbiased=unbiased, eps=0.0)[0], adv)


@FAST
@given(data=st.data(), r=reward_batches(), scale=st.sampled_from(["group", "batch", "none"]))
def test_advantages_permutation_equivariant(data, r, scale):
    """Permuting the members of each group (and the groups) permutes the advantages the same way."""
    P, G = r.shape
    perm = torch.tensor([data.draw(st.permutations(range(G))) for _ in range(P)])  # (P, G)
    rows = torch.tensor(data.draw(st.permutations(range(P))))
    r2 = r.gather(1, perm)[rows]
    adv, _ = grpo.group_advantages(r, scale=scale)
    adv2, _ = grpo.group_advantages(r2, scale=scale)
    assert torch.allclose(adv.gather(1, perm)[rows], adv2, atol=1e-5, rtol=1e-5)


@FAST
@given(r=reward_batches(), scale=st.sampled_from(["group", "batch", "none"]), unbiased=st.booleans(),
       eps=st.sampled_from([0.0, 1e-4]))
@example(r=torch.tensor([[1.0, ONE_UP, 1.0]]), scale="group", unbiased=True, eps=0.0)
def test_advantages_sign(r, scale, unbiased, eps):
    """sign(A_i) = sign(r_i - mean) wherever r_i is not (within float32 rounding) the mean itself."""
    adv, _ = grpo.group_advantages(r, scale=scale, unbiased=unbiased, eps=eps)
    x = r.double()
    c = x - x.mean(1, keepdim=True)
    clear = c.abs() > 1e-5 * c.abs().amax(1, keepdim=True)
    assert torch.equal(torch.sign(adv.double())[clear], torch.sign(c)[clear])
    assert (adv[r.amax(1) == r.amin(1)] == 0).all()


@FAST
@given(r=st.lists(ANY_REWARD, min_size=1, max_size=10), scale=st.sampled_from(["group", "batch", "none"]),
       eps=st.sampled_from([0.0, 1e-4]))
def test_group_of_one_is_zero(r, scale, eps):
    adv, frac = grpo.group_advantages(torch.tensor(r)[:, None], scale=scale, eps=eps)
    assert torch.equal(adv, torch.zeros(len(r), 1)) and frac == 1.0
    adv, frac = grpo.group_advantages(torch.tensor(r), G=1, scale=scale, eps=eps)
    assert torch.equal(adv, torch.zeros(len(r))) and frac == 1.0


@FAST
@given(r=reward_batches(), scale=st.sampled_from(["group", "batch", "none"]), unbiased=st.booleans())
def test_flat_input_equals_2d(r, scale, unbiased):
    P, G = r.shape
    adv, frac = grpo.group_advantages(r, scale=scale, unbiased=unbiased)
    adv_flat, frac_flat = grpo.group_advantages(r.reshape(-1), G=G, scale=scale, unbiased=unbiased)
    assert adv_flat.shape == (P * G,) and torch.equal(adv_flat, adv.reshape(-1)) and frac_flat == frac


@FAST
@given(r=reward_batches(), eps=st.sampled_from([0.0, 1e-4, 3.0]))
def test_scale_none_is_centering_only(r, eps):
    adv, _ = grpo.group_advantages(r, scale="none", eps=eps)
    c = r.double() - r.double().mean(1, keepdim=True)
    assert ((adv.double() - c).abs() <= 1e-6 + 8 * F32_EPS * c.abs().amax(1, keepdim=True)).all()


@FAST
@given(r=reward_batches(min_G=2), unbiased=st.booleans(), eps=st.sampled_from([0.0, 1e-4]))
def test_scale_batch_divides_by_batch_std(r, unbiased, eps):
    x = r.double()
    s = x.std(unbiased=unbiased)
    assume(s > 1e-3)
    adv, _ = grpo.group_advantages(r, scale="batch", unbiased=unbiased, eps=eps)
    const = r.amax(1) == r.amin(1)
    ref = torch.where(const[:, None], 0.0, (x - x.mean(1, keepdim=True)) / (s + eps))
    assert ((adv.double() - ref).abs() <= 1e-6 + 16 * F32_EPS * x.abs().max() / s).all()


@FAST
@given(r=reward_batches(min_G=2, max_P=6), cut=st.integers(0, 6), unbiased=st.booleans())
def test_scale_batch_split_over_ranks_with_the_global_std_equals_one_batch(r, cut, unbiased):
    """Departure 2 across ranks: each rank holds some groups; given the whole batch's std (batch_std), their
    advantages are the whole batch's. Without it each part would divide by its own std."""
    cut = min(cut, r.shape[0])
    whole, _ = grpo.group_advantages(r, scale="batch", unbiased=unbiased)
    s = (r.double() - r.double().mean()).pow(2).sum() / max(r.numel() - int(unbiased), 1)
    assume(s.sqrt() > 1e-3)
    parts = [grpo.group_advantages(p, scale="batch", unbiased=unbiased, batch_std=s.sqrt().item())[0]
             for p in (r[:cut], r[cut:]) if len(p)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)


def test_advantage_defaults_and_numpy_std():
    """Defaults: unbiased (Bessel) std and eps = 1e-4 (claim 1-2); unbiased=False is np.std (ddof=0)."""
    r = torch.tensor([[0.0, 1.0, 1.0, 2.0], [3.0, -1.0, 0.5, 0.5]])
    rn = r.numpy().astype(np.float64)
    c = rn - rn.mean(1, keepdims=True)
    default, _ = grpo.group_advantages(r)
    assert np.allclose(default.numpy(), c / (rn.std(1, ddof=1, keepdims=True) + 1e-4), atol=1e-6)
    biased, _ = grpo.group_advantages(r, unbiased=False, eps=0.0)
    assert np.allclose(biased.numpy(), c / rn.std(1, keepdims=True), atol=1e-6)


def test_advantage_argument_errors():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(r, scale="sequence")
    with pytest.raises(ValueError, match="eps"):
        grpo.group_advantages(r, eps=-1e-9)
    with pytest.raises(ValueError, match="shape"):
        grpo.group_advantages(torch.zeros(6))  # flat without G


# ----------------------------------------------------------------------------- 2. k3

LOGP = st.floats(-30, 5, allow_nan=False, allow_subnormal=False)


@FAST
@given(pairs=st.lists(st.tuples(LOGP, st.one_of(st.floats(-30, 30), st.floats(-1e-4, 1e-4)), st.booleans()),
                     min_size=1, max_size=20),
       dtype=st.sampled_from([torch.float64, torch.float32]))
@example(pairs=[(0.0, 1e-8, False), (0.0, -1e-8, False), (-3.0, 2e-8, False)], dtype=torch.float64)
@example(pairs=[(0.0, 1e-4, False), (0.0, -3e-4, False), (-1.0, 2e-4, False)], dtype=torch.float32)
def test_k3_nonnegative_and_zero_iff_equal(pairs, dtype):
    """k3 >= 0 as computed (also for tiny differences, where exp(d) - d - 1 can round below 0), exactly 0 where
    logp == ref_logp, and > 0 where they differ by more than 1e-7 (float64) or 1e-3 (float32)."""
    logp = torch.tensor([a for a, _, _ in pairs], dtype=dtype)
    ref = torch.tensor([a if same else a + d for a, d, same in pairs], dtype=dtype)
    k = grpo.k3(logp, ref)
    assert (k >= 0).all(), k  # >= 0 as computed, not just in exact arithmetic
    assert (k[logp == ref] == 0).all()
    far = (logp.double() - ref.double()).abs() > (1e-7 if dtype == torch.float64 else 1e-3)
    assert (k[far] > 0).all()


@FAST
@given(x=st.lists(st.tuples(LOGP, st.floats(-3, 3)), min_size=1, max_size=20))
def test_k3_gradient(x):
    """dk3/dlogp = 1 - pi_ref/pi (claim 7's coefficient), which is exactly 0 where logp == ref_logp."""
    logp = torch.tensor([a for a, _ in x], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([a + d for a, d in x], dtype=torch.float64)
    grpo.k3(logp, ref).sum().backward()
    assert torch.allclose(logp.grad, 1 - torch.exp(ref - logp.detach()), rtol=1e-12, atol=1e-12)
    same = logp.detach().clone().requires_grad_()
    grpo.k3(same, same.detach().clone()).sum().backward()
    assert torch.equal(same.grad, torch.zeros_like(same))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k3_is_unbiased_for_reverse_kl(seed):
    """Tokens drawn from pi: the mean of k3 estimates KL(pi || ref) (within 4 standard errors) and, for these
    distributions, is many standard errors away from the forward KL(ref || pi)."""
    g = torch.Generator().manual_seed(seed)
    logp_all = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64) * 1.5, 0)
    ref_all = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64) * 1.5, 0)
    pi, ref = logp_all.exp(), ref_all.exp()
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    k = grpo.k3(logp_all[x], ref_all[x])
    se = k.std().item() / math.sqrt(len(k))
    kl_reverse = (pi * (logp_all - ref_all)).sum().item()
    kl_forward = (ref * (ref_all - logp_all)).sum().item()
    assert abs(k.mean().item() - kl_reverse) < 4 * se, (k.mean().item(), kl_reverse, se)
    assert abs(kl_forward - kl_reverse) > 10 * se  # the check above could tell the two apart


@FAST
@given(theta=st.lists(st.floats(-3, 3), min_size=2, max_size=6), data=st.data())
def test_k3_gradient_in_expectation_is_forward_kl(theta, data):
    """Claim 7: sum_x pi(x) d/dtheta k3(log pi(x), log ref(x)) (sampling distribution held fixed) equals
    d/dtheta KL(ref || pi_theta), computed exactly over a categorical pi_theta = softmax(theta)."""
    ref_logits = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=len(theta), max_size=len(theta))),
                              dtype=torch.float64)
    ref_logp = torch.log_softmax(ref_logits, 0)
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(th, 0)
    (g_k3,) = torch.autograd.grad((logp.exp().detach() * grpo.k3(logp, ref_logp)).sum(), th)
    th2 = th.detach().clone().requires_grad_()
    (g_fwd,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - torch.log_softmax(th2, 0))).sum(), th2)
    assert torch.allclose(g_k3, g_fwd, atol=1e-10)


def test_k3_gradient_is_not_reverse_kl_gradient():
    th = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([-1.0, 0.7, 0.0], dtype=torch.float64), 0)
    logp = torch.log_softmax(th, 0)
    (g_k3,) = torch.autograd.grad((logp.exp().detach() * grpo.k3(logp, ref_logp)).sum(), th, retain_graph=True)
    (g_rev,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), th)
    assert (g_k3 - g_rev).abs().max() > 1e-2


# ----------------------------------------------------------------------------- 3. the loss

ADV = st.one_of(st.floats(-3, 3, width=32, allow_subnormal=False), st.just(0.0))


@st.composite
def loss_batches(draw, max_N=5, max_T=6, log_ratio=st.one_of(st.floats(-1, 1), st.just(0.0))):
    """float64 logp / old_logp / ref_logp (N, T), float32-exact advantages (N,), a random bool mask (N, T)."""
    N, T = draw(st.integers(1, max_N)), draw(st.integers(1, max_T))
    n = N * T
    lst = lambda el, k: draw(st.lists(el, min_size=k, max_size=k))  # noqa: E731
    logp = torch.tensor(lst(st.floats(-8, 0), n), dtype=torch.float64).view(N, T)
    old = logp - torch.tensor(lst(log_ratio, n), dtype=torch.float64).view(N, T)
    ref = logp + torch.tensor(lst(st.floats(-2, 2), n), dtype=torch.float64).view(N, T)
    mask = torch.tensor(lst(st.booleans(), n)).view(N, T)
    adv = torch.tensor(lst(ADV, N), dtype=torch.float64)
    return dict(logp=logp, old=old, ref=ref, mask=mask, adv=adv, max_new=draw(st.integers(T, T + 4)))


CLIP = dict(beta=st.sampled_from([0.0, 0.04, 0.5]), eps_low=st.floats(0.05, 0.5),
            eps_high=st.one_of(st.none(), st.floats(0.05, 0.5)))


def run_loss(b, loss_type, beta=0.04, eps_low=0.2, eps_high=None, logp=None, normalizer=None):
    logp = b["logp"] if logp is None else logp
    norm = grpo.loss_normalizer(loss_type, b["mask"], b["max_new"]) if normalizer is None else normalizer
    return grpo.grpo_loss(logp, b["old"], b["adv"], b["mask"], norm, loss_type,
                          ref_logp=b["ref"] if beta else None, beta=beta, eps_low=eps_low, eps_high=eps_high)


def loop_reference(b, loss_type, beta, eps_low, eps_high):
    """-J of DeepSeekMath eq. 3 token by token with Python floats, plus the stats; aggregation per loss_type."""
    eps_high = eps_low if eps_high is None else eps_high
    logp, old, ref, mask, adv = (b[k].tolist() for k in ("logp", "old", "ref", "mask", "adv"))
    N, T = len(logp), len(logp[0])
    seq_sums, seq_lens, kls, ratios, lows, highs = [], [], [], [], 0, 0
    for i in range(N):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            term = -min(r * adv[i], clipped * adv[i])
            d = ref[i][t] - logp[i][t]
            kl = math.exp(d) - d - 1
            if beta:
                term += beta * kl
            s, n = s + term, n + 1
            kls.append(kl)
            ratios.append(r)
            lows += adv[i] < 0 and r < 1 - eps_low
            highs += adv[i] > 0 and r > 1 + eps_high
        seq_sums.append(s)
        seq_lens.append(n)
    M = sum(seq_lens)
    if loss_type == "grpo":
        loss = sum(s / n for s, n in zip(seq_sums, seq_lens) if n) / N
    elif loss_type == "token":
        loss = sum(seq_sums) / max(M, 1)
    else:
        loss = sum(seq_sums) / (N * b["max_new"])
    mean = lambda v: sum(v) / M if M else 0.0  # noqa: E731
    stats = dict(kl=mean(kls) if beta else 0.0, ratio=mean(ratios), clip_low=lows / max(M, 1),
                 clip_high=highs / max(M, 1), tokens=M)
    return loss, stats


def away_from_clip_edges(b, eps_low, eps_high):
    eps_high = eps_low if eps_high is None else eps_high
    r = torch.exp(b["logp"] - b["old"])[b["mask"]]
    return bool(((r - (1 - eps_low)).abs() > 1e-6).all() and ((r - (1 + eps_high)).abs() > 1e-6).all())


@MEDIUM
@given(b=loss_batches(), loss_type=st.sampled_from(grpo.LOSS_TYPES), **CLIP)
def test_loss_matches_loop_reference(b, loss_type, beta, eps_low, eps_high):
    assume(away_from_clip_edges(b, eps_low, eps_high))  # the strict clip comparisons of the stats
    loss, stats = run_loss(b, loss_type, beta, eps_low, eps_high)
    ref_loss, ref_stats = loop_reference(b, loss_type, beta, eps_low, eps_high)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    assert stats["tokens"] == ref_stats["tokens"]
    for k in ("kl", "ratio", "clip_low", "clip_high"):
        assert stats[k] == pytest.approx(ref_stats[k], rel=1e-6, abs=1e-9), k


@MEDIUM
@given(b=loss_batches(), loss_type=st.sampled_from(grpo.LOSS_TYPES))
def test_loss_normalizer_values(b, loss_type):
    N, T = b["mask"].shape
    expect = {"grpo": N, "token": max(int(b["mask"].sum()), 1), "dr_grpo": N * b["max_new"]}[loss_type]
    assert grpo.loss_normalizer(loss_type, b["mask"], b["max_new"]) == expect


@MEDIUM
@given(b=loss_batches(log_ratio=st.just(0.0)), loss_type=st.sampled_from(grpo.LOSS_TYPES),
       eps_low=st.floats(0.05, 0.5), eps_high=st.one_of(st.none(), st.floats(0.05, 0.5)))
def test_gradient_at_ratio_one_is_policy_gradient(b, loss_type, eps_low, eps_high):
    """logp == old_logp and beta == 0: d loss / d logp_it = -A_i * weight_it, the plain policy gradient."""
    b["old"] = b["logp"].clone()
    logp = b["logp"].clone().requires_grad_()
    loss, _ = run_loss(b, loss_type, 0.0, eps_low, eps_high, logp=logp)
    loss.backward()
    m = b["mask"].double()
    N = m.shape[0]
    if loss_type == "grpo":
        w = m / (m.sum(1, keepdim=True).clamp(min=1) * N)  # 1 / (|o_i| N)
    elif loss_type == "token":
        w = m / max(m.sum().item(), 1)  # 1 / total tokens
    else:
        w = m / (N * b["max_new"])  # 1 / (N max_new_tokens)
    assert torch.allclose(logp.grad, -b["adv"][:, None] * w, rtol=1e-12, atol=0)


@MEDIUM
@given(b=loss_batches(log_ratio=st.floats(-1, 1)), loss_type=st.sampled_from(grpo.LOSS_TYPES),
       eps_low=st.floats(0.05, 0.5), eps_high=st.one_of(st.none(), st.floats(0.05, 0.5)))
def test_clipped_tokens_have_exactly_zero_gradient(b, loss_type, eps_low, eps_high):
    """beta == 0: the gradient is exactly 0 where (A > 0, ratio > 1+eps_high) or (A < 0, ratio < 1-eps_low), and
    -A * ratio * weight (so nonzero when A != 0) everywhere else in the mask."""
    assume(away_from_clip_edges(b, eps_low, eps_high))
    eh = eps_low if eps_high is None else eps_high
    logp = b["logp"].clone().requires_grad_()
    loss, _ = run_loss(b, loss_type, 0.0, eps_low, eps_high, logp=logp)
    loss.backward()
    ratio, A, m = torch.exp(b["logp"] - b["old"]), b["adv"][:, None], b["mask"]
    clipped = m & (((A > 0) & (ratio > 1 + eh)) | ((A < 0) & (ratio < 1 - eps_low)))
    live = m & ~clipped & (A != 0)
    assert (logp.grad[clipped] == 0).all() and (logp.grad[~m] == 0).all()
    assert (logp.grad[live] != 0).all()
    md = m.double()
    N = m.shape[0]
    w = {"grpo": md / (md.sum(1, keepdim=True).clamp(min=1) * N), "token": md / max(md.sum().item(), 1),
         "dr_grpo": md / (N * b["max_new"])}[loss_type]
    assert torch.allclose(logp.grad[live], (-A * ratio * w)[live], rtol=1e-12, atol=0)


JUNK = st.one_of(st.sampled_from([1e30, -1e30, math.inf, -math.inf, 0.0, 700.0, -700.0]),
                 st.floats(allow_nan=False))


@MEDIUM
@given(b=loss_batches(), loss_type=st.sampled_from(grpo.LOSS_TYPES), data=st.data(), **CLIP)
def test_padding_is_inert(b, loss_type, data, beta, eps_low, eps_high):
    """Whatever logp / old_logp / ref_logp hold outside the mask (+-1e30, +-inf...), the loss, the stats and
    every gradient are unchanged, and the gradients there are 0."""
    def grads(logp, old, ref):
        leaves = [x.clone().requires_grad_() for x in (logp, old, ref)]
        bb = dict(b, old=leaves[1], ref=leaves[2])
        loss, stats = run_loss(bb, loss_type, beta, eps_low, eps_high, logp=leaves[0])
        loss.backward()
        return loss.detach(), stats, [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]

    pad = ~b["mask"]
    n = int(pad.sum())
    junk = [torch.tensor(data.draw(st.lists(JUNK, min_size=n, max_size=n)), dtype=torch.float64) for _ in range(3)]
    dirty = []
    for x, j in zip((b["logp"], b["old"], b["ref"]), junk):
        x = x.clone()
        x[pad] = j
        dirty.append(x)
    loss0, stats0, g0 = grads(b["logp"], b["old"], b["ref"])
    loss1, stats1, g1 = grads(*dirty)
    assert torch.equal(loss0, loss1) and torch.isfinite(loss1) and stats0 == stats1
    for a, c in zip(g0, g1):
        assert torch.equal(a, c) and (c[pad] == 0).all() and torch.isfinite(c).all()


@MEDIUM
@given(b=loss_batches(), loss_type=st.sampled_from(grpo.LOSS_TYPES), data=st.data(), **CLIP)
def test_microbatch_accumulation_equals_whole_batch(b, loss_type, data, beta, eps_low, eps_high):
    """Any partition of the rows into micro-batches, each given the whole batch's normaliser, with gradients
    accumulated into shared parameters, gives the whole batch's loss and gradient."""
    N, T = b["mask"].shape
    k = data.draw(st.integers(1, N))
    part = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=N, max_size=N)))
    norm = grpo.loss_normalizer(loss_type, b["mask"], b["max_new"])
    feat = torch.linspace(-1, 1, N * T, dtype=torch.float64).view(N, T)

    def policy(w):  # logp as a function of shared parameters w (T,), equal to b["logp"] at w = 0.1
        return b["logp"] + feat * (w - 0.1)[None, :]

    w_full = torch.full((T,), 0.1, dtype=torch.float64, requires_grad=True)
    loss_full, _ = run_loss(b, loss_type, beta, eps_low, eps_high, logp=policy(w_full), normalizer=norm)
    loss_full.backward()

    w_acc = torch.full((T,), 0.1, dtype=torch.float64, requires_grad=True)
    total = 0.0
    for j in range(k):
        rows = (part == j).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        mb = {key: (v[rows] if torch.is_tensor(v) else v) for key, v in b.items()}
        loss_mb, _ = run_loss(mb, loss_type, beta, eps_low, eps_high, logp=policy(w_acc)[rows], normalizer=norm)
        loss_mb.backward()  # accumulates into w_acc.grad
        total += loss_mb.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(w_acc.grad, w_full.grad, rtol=1e-10, atol=1e-12)


@MEDIUM
@given(b=loss_batches(), extra=st.integers(1, 5), data=st.data(), **CLIP)
def test_stats_not_diluted_by_padding(b, extra, data, beta, eps_low, eps_high):
    """Appending padded columns (any values, mask False) changes neither the loss (dr_grpo keeping its
    max_new_tokens) nor the stats; kl is the masked mean of k3."""
    N, T = b["mask"].shape
    wide = dict(b)
    for key in ("logp", "old", "ref"):
        junk = torch.tensor(data.draw(st.lists(st.floats(-50, 5), min_size=N * extra, max_size=N * extra)),
                            dtype=torch.float64).view(N, extra)
        wide[key] = torch.cat([b[key], junk], 1)
    wide["mask"] = torch.cat([b["mask"], torch.zeros(N, extra, dtype=torch.bool)], 1)
    for loss_type in grpo.LOSS_TYPES:
        l0, s0 = run_loss(b, loss_type, beta, eps_low, eps_high)
        l1, s1 = run_loss(wide, loss_type, beta, eps_low, eps_high)
        assert l1.item() == pytest.approx(l0.item(), rel=1e-12, abs=1e-15)
        assert s1 == pytest.approx(s0, rel=1e-12, abs=1e-15)
    if beta:
        m = b["mask"]
        expect = grpo.k3(b["logp"], b["ref"])[m].mean().item() if m.any() else 0.0
        assert s0["kl"] == pytest.approx(expect, rel=1e-9, abs=1e-15)


@MEDIUM
@given(b=loss_batches(), loss_type=st.sampled_from(grpo.LOSS_TYPES), eps_low=st.floats(0.05, 0.5))
def test_beta_zero_skips_reference_and_eps_high_default(b, loss_type, eps_low):
    """beta == 0: ref_logp may be None, and a garbage ref_logp (NaN) is never read; eps_high defaults to eps_low."""
    norm = grpo.loss_normalizer(loss_type, b["mask"], b["max_new"])
    args = (b["logp"], b["old"], b["adv"], b["mask"], norm, loss_type)
    l0, s0 = grpo.grpo_loss(*args, ref_logp=None, beta=0.0, eps_low=eps_low)
    l1, s1 = grpo.grpo_loss(*args, ref_logp=torch.full_like(b["logp"], math.nan), beta=0.0, eps_low=eps_low)
    assert torch.equal(l0, l1) and s0 == s1 and s0["kl"] == 0.0
    l2, s2 = grpo.grpo_loss(*args, ref_logp=None, beta=0.0, eps_low=eps_low, eps_high=eps_low)
    assert torch.equal(l0, l2) and s0 == s2


def test_loss_argument_errors():
    x, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(x, x, adv, mask, 2.0, "grpo", ref_logp=None, beta=0.04)
    with pytest.raises(ValueError, match="loss_type"):
        grpo.grpo_loss(x, x, adv, mask, 2.0, "seq", ref_logp=x)
    with pytest.raises(ValueError, match="loss_type"):
        grpo.loss_normalizer("bnpo", mask)
    with pytest.raises(ValueError, match="max_new_tokens"):
        grpo.loss_normalizer("dr_grpo", mask)


# ----------------------------------------------------------------------------- 3b. GSPO, TIS, kept rows (notes 9-11)

def gspo_loop(b, eps_low, eps_high, beta):
    """GSPO eq. 7 with Python floats: -1/N sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log ratio), plus
    beta * each sequence's mean k3 (loss_type "grpo"); rows without tokens add nothing."""
    logp, old, ref, mask, adv = (b[k].tolist() for k in ("logp", "old", "ref", "mask", "adv"))
    total = 0.0
    for i in range(len(logp)):
        ts = [t for t in range(len(logp[i])) if mask[i][t]]
        if not ts:
            continue
        s = math.exp(sum(logp[i][t] - old[i][t] for t in ts) / len(ts))
        c = min(max(s, 1 - eps_low), 1 + eps_high)
        kl = sum(math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1 for t in ts) / len(ts)
        total += -min(s * adv[i], c * adv[i]) + beta * kl
    return total / len(logp)


@MEDIUM
@given(b=loss_batches(), **CLIP)
def test_gspo_equals_a_loop_over_sequences(b, beta, eps_low, eps_high):
    norm = grpo.loss_normalizer("grpo", b["mask"])
    loss, _ = grpo.grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], norm, "grpo", b["ref"] if beta else None, beta,
                             eps_low, eps_high, ratio_level="sequence")
    assert loss.item() == pytest.approx(gspo_loop(b, eps_low, eps_high if eps_high is not None else eps_low, beta),
                                        rel=1e-9, abs=1e-12)


@MEDIUM
@given(b=loss_batches(max_T=1), loss_type=st.sampled_from(grpo.LOSS_TYPES), **CLIP)
def test_gspo_with_one_token_per_sequence_is_the_token_level_loss(b, loss_type, beta, eps_low, eps_high):
    kw = dict(ref_logp=b["ref"] if beta else None, beta=beta, eps_low=eps_low, eps_high=eps_high)
    norm = grpo.loss_normalizer(loss_type, b["mask"], b["max_new"])
    args = (b["logp"], b["old"], b["adv"], b["mask"], norm, loss_type)
    tok, st_tok = grpo.grpo_loss(*args, **kw)
    seq, st_seq = grpo.grpo_loss(*args, **kw, ratio_level="sequence")
    assert seq.item() == pytest.approx(tok.item(), rel=1e-12, abs=1e-15) and st_seq == pytest.approx(st_tok)


@MEDIUM
@given(b=loss_batches(log_ratio=st.just(0.0)), loss_type=st.sampled_from(grpo.LOSS_TYPES))
def test_gspo_at_ratio_one_has_the_policy_gradient(b, loss_type):
    """At pi == pi_old, d loss / d logp_it = -A_i / |o_i| / normaliser x (|o_i| for "token"/"dr_grpo" aggregation,
    which sums the sequence's equal per-token terms): the sequence-mean policy gradient, the same as token level."""
    norm = grpo.loss_normalizer(loss_type, b["mask"], b["max_new"])
    grads = []
    for level in grpo.RATIO_LEVELS:
        lp = b["logp"].clone().requires_grad_(True)
        loss, _ = grpo.grpo_loss(lp, lp.detach(), b["adv"], b["mask"], norm, loss_type, None, 0.0, ratio_level=level)
        loss.backward()
        grads.append(lp.grad)
    m = b["mask"].double()
    n = m.sum(1, keepdim=True).clamp(min=1)
    per_seq = -b["adv"][:, None] / norm * m  # (N, T): d/dlogp of -A * sum_t ratio (token, dr_grpo aggregation)
    expect_tok = per_seq / n if loss_type == "grpo" else per_seq
    torch.testing.assert_close(grads[0], expect_tok, rtol=1e-9, atol=1e-12)
    # sequence level: every token of a sequence gets 1/|o_i| of d s_i, times |o_i| copies for sum aggregation
    torch.testing.assert_close(grads[1], expect_tok if loss_type == "grpo" else per_seq, rtol=1e-9, atol=1e-12)


def test_gspo_clipped_sequence_gets_exactly_zero_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach().clone()
    old[0] -= 0.01  # sequence 0: s = exp(0.01) > 1 + 4e-4, with A > 0: clipped
    old[1, 0] -= 0.03  # sequence 1: one token far off (ratio 1.03), but s = exp(0.01) with A < 0: not clipped
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, st = grpo.grpo_loss(logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, 2.0, "grpo", None, 0.0,
                              3e-4, 4e-4, ratio_level="sequence")
    loss.backward()
    assert torch.equal(logp.grad[0], torch.zeros(3)) and (logp.grad[1] != 0).all()
    assert st["clip_high"] == pytest.approx(0.5)  # the three tokens of sequence 0, of six


@MEDIUM
@given(b=loss_batches(), loss_type=st.sampled_from(grpo.LOSS_TYPES), pad=st.integers(1, 3), junk=st.floats(-50, 50))
def test_gspo_is_invariant_to_padding(b, loss_type, pad, junk):
    """Extra masked columns holding any values change neither the loss nor the gradient of the real tokens."""
    norm = grpo.loss_normalizer(loss_type, b["mask"], b["max_new"])
    widen = lambda x, v: torch.cat([x, torch.full((x.shape[0], pad), v, dtype=x.dtype)], 1)  # noqa: E731
    lp, lp2 = b["logp"].clone().requires_grad_(True), widen(b["logp"], junk).requires_grad_(True)
    l1, _ = grpo.grpo_loss(lp, b["old"], b["adv"], b["mask"], norm, loss_type, b["ref"], 0.04, ratio_level="sequence")
    l2, _ = grpo.grpo_loss(lp2, widen(b["old"], -junk), b["adv"], widen(b["mask"], False), norm, loss_type,
                           widen(b["ref"], junk), 0.04, ratio_level="sequence")
    assert l2.item() == pytest.approx(l1.item(), rel=1e-12, abs=1e-15)
    (l1 + l2).backward()
    torch.testing.assert_close(lp2.grad[:, :lp.shape[1]], lp.grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(lp2.grad[:, lp.shape[1]:], torch.zeros_like(lp2.grad[:, lp.shape[1]:]))


@MEDIUM
@given(b=loss_batches(), loss_type=st.sampled_from(grpo.LOSS_TYPES), level=st.sampled_from(grpo.RATIO_LEVELS),
       cap=st.floats(1.0, 5.0), noise=st.floats(0.0, 2.0))
def test_tis_weights_scale_the_policy_term_only_and_carry_no_gradient(b, loss_type, level, cap, noise):
    norm = grpo.loss_normalizer(loss_type, b["mask"], b["max_new"])
    sampler = b["old"] - noise * torch.linspace(-1, 1, b["old"].numel(), dtype=torch.float64).view_as(b["old"])
    w = grpo.tis_weights(b["old"], sampler, b["mask"], cap)
    assert (w <= cap).all() and (w >= 0).all() and not w.requires_grad
    assert torch.equal(w[~b["mask"]], torch.zeros_like(w[~b["mask"]]))
    kw = dict(loss_type=loss_type, ref_logp=b["ref"], beta=0.04, ratio_level=level)
    args = (b["old"], b["adv"], b["mask"], norm)
    lp1 = b["logp"].clone().requires_grad_(True)
    grpo.grpo_loss(lp1, *args, **kw, is_weight=torch.ones_like(w))[0].backward()
    lp0 = b["logp"].clone().requires_grad_(True)
    grpo.grpo_loss(lp0, *args, **kw)[0].backward()
    torch.testing.assert_close(lp1.grad, lp0.grad, rtol=0, atol=0)  # weight 1: nothing changes
    # the weighted loss is the unweighted KL part plus the weighted policy part, token by token
    lpw = b["logp"].clone().requires_grad_(True)
    full, _ = grpo.grpo_loss(lpw, *args, **kw, is_weight=w.requires_grad_(True))
    full.backward()
    assert w.grad is None  # detached inside: no gradient reaches the weights
    kl_only, _ = grpo.grpo_loss(b["logp"], *args, **kw, is_weight=torch.zeros_like(w))
    pg_only, _ = grpo.grpo_loss(b["logp"], *args, **{**kw, "beta": 0.0, "ref_logp": None}, is_weight=w.detach())
    assert full.item() == pytest.approx(kl_only.item() + pg_only.item(), rel=1e-9, abs=1e-12)


def test_tis_weight_is_capped_and_one_when_sampler_equals_trainer():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(grpo.tis_weights(old, old, mask, 2.0), torch.tensor([[1.0, 1.0, 0.0]]))
    w = grpo.tis_weights(old, old - torch.tensor([[5.0, -0.5, 0.0]]), mask, 2.0)  # ratios e^5, e^-0.5
    torch.testing.assert_close(w, torch.tensor([[2.0, math.exp(-0.5), 0.0]]))


def test_kept_rows_normaliser_excludes_dropped_rows():
    """Overlong filtering's convention (note 11): a dropped row is out of the mask and out of the normaliser."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    keep = torch.tensor([True, False, True])
    kept = mask & keep[:, None]
    assert grpo.loss_normalizer("grpo", kept, keep=keep) == 2.0
    assert grpo.loss_normalizer("token", kept, keep=keep) == 3.0
    assert grpo.loss_normalizer("dr_grpo", kept, 4, keep=keep) == 8.0
    assert grpo.loss_normalizer("grpo", mask) == 3.0  # without keep: unchanged
    logp = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo.grpo_loss(logp, logp.detach() - 0.1, torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), kept,
                             grpo.loss_normalizer("grpo", kept, keep=keep), "grpo", None, 0.0)
    loss.backward()
    assert torch.equal(logp.grad[1], torch.zeros(3, dtype=torch.float64))  # the dropped row: no gradient


def test_mismatch_sums_over_masked_tokens():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    sampler = old - torch.tensor([[0.0, 0.5, 9.0], [-0.1, 0.0, 0.3]])  # the 9.0 sits under the mask
    mask = torch.tensor([[True, True, False], [True, True, True]])
    m = grpo.mismatch(old, sampler, mask)
    assert m["tokens"] == 5 and m["abs"] == pytest.approx(0.9) and m["max"] == pytest.approx(0.5)
    assert m["out"] == 2  # exp(0.5) = 1.65 and exp(0.3) = 1.35 are outside [0.8, 1.25]; exp(-0.1) = 0.90 is not
    assert grpo.mismatch(old, old, mask) == {"abs": 0.0, "max": 0.0, "out": 0, "tokens": 5}


# ----------------------------------------------------------------------------- 4. token log-probs

@pytest.fixture(scope="module")
def tiny64():
    return random_model().double()  # float64, so the reference and the chunked path differ only by rounding


def make_rollout(prompt_lens, comp_lens, T, V, seed):
    """Left-padded prompts (junk ids in the padding) and completions (junk ids after each row's length)."""
    g = torch.Generator().manual_seed(seed)
    N, Tp = len(prompt_lens), max(prompt_lens)
    prompt_ids = torch.randint(0, V, (N, Tp), generator=g)
    prompt_mask = torch.arange(Tp)[None, :] >= Tp - torch.tensor(prompt_lens)[:, None]
    completion_ids = torch.randint(0, V, (N, T), generator=g)
    completion_mask = torch.arange(T)[None, :] < torch.tensor(comp_lens)[:, None]
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def naive_logprobs(model, prompt_ids, prompt_mask, completion_ids, comp_lens, temperature):
    """Row by row, no padding: forward prompt + completion[:len], log_softmax(logits / T), gather."""
    out = []
    for i, L in enumerate(comp_lens):
        p = prompt_ids[i][prompt_mask[i]]
        row = torch.zeros(completion_ids.shape[1], dtype=torch.float64)
        if L:
            ids = torch.cat([p, completion_ids[i, :L]])[None]
            lp = torch.log_softmax(model(ids)[0].double() / temperature, -1)  # (len, V)
            pos = torch.arange(len(p) - 1, len(p) - 1 + L)
            row = torch.cat([lp[pos, completion_ids[i, :L]], torch.zeros(completion_ids.shape[1] - L)])
        out.append(row)
    return torch.stack(out)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_lens=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       chunk=st.sampled_from([1, 2, 3, 7, 1024]), temperature=st.sampled_from([1.0, 0.7, 1.6]),
       seed=st.integers(0, 2 ** 16))
def test_token_logprobs_equal_naive(tiny64, prompt_lens, data, chunk, temperature, seed):
    T = data.draw(st.integers(1, 6))
    comp_lens = data.draw(st.lists(st.integers(0, T), min_size=len(prompt_lens), max_size=len(prompt_lens)))
    V = tiny64.config.vocab_size
    p_ids, p_mask, c_ids, c_mask = make_rollout(prompt_lens, comp_lens, T, V, seed)
    with torch.no_grad():
        ref = naive_logprobs(tiny64, p_ids, p_mask, c_ids, comp_lens, temperature)
        out_nograd = grpo.token_logprobs(tiny64, p_ids, p_mask, c_ids, c_mask, temperature, chunk=chunk)
    out = grpo.token_logprobs(tiny64, p_ids, p_mask, c_ids, c_mask, temperature, chunk=chunk)
    assert out.shape == c_ids.shape and out.dtype == torch.float32
    assert torch.equal(out[~c_mask], torch.zeros(int((~c_mask).sum())))
    assert torch.allclose(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(out.detach(), out_nograd)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_entropy_in_chunks_equals_a_full_softmax(tiny64, chunk):
    """token_logprobs(..., entropy=True): the log-probs are unchanged and carry their gradient; the entropies equal
    -sum p log p of a full float64 softmax at each completion position (at the temperature), 0 outside the mask,
    without gradient."""
    comp_lens = [2, 4, 0]
    p_ids, p_mask, c_ids, c_mask = make_rollout([3, 1, 2], comp_lens, 4, tiny64.config.vocab_size, 5)
    lp, ent = grpo.token_logprobs(tiny64, p_ids, p_mask, c_ids, c_mask, 0.7, chunk=chunk, entropy=True)
    assert torch.equal(lp, grpo.token_logprobs(tiny64, p_ids, p_mask, c_ids, c_mask, 0.7, chunk=chunk))
    assert lp.requires_grad and not ent.requires_grad
    with torch.no_grad():
        for i, n in enumerate(comp_lens):
            ids = torch.cat([p_ids[i][p_mask[i]], c_ids[i, :n]])[None]
            Tp = int(p_mask[i].sum())
            logits = tiny64(ids)[0, Tp - 1:Tp - 1 + n].double() / 0.7  # (n, V): position t-1 predicts token t
            logq = logits.log_softmax(-1)
            expect = -(logq.exp() * logq).sum(-1)
            torch.testing.assert_close(ent[i, :n].double(), expect, atol=2e-5, rtol=1e-5)
            assert torch.equal(ent[i, n:], torch.zeros(4 - n))


def test_temperature_zero_reports_temperature_one(tiny64):
    args = make_rollout([3, 1], [2, 4], 4, tiny64.config.vocab_size, 0)
    with torch.no_grad():
        assert torch.equal(grpo.token_logprobs(tiny64, *args, temperature=0), grpo.token_logprobs(tiny64, *args))


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_token_logprobs_parameter_gradient_equals_naive(tiny64, chunk):
    prompt_lens, comp_lens, T = [4, 1, 3, 2], [5, 2, 0, 3], 5
    p_ids, p_mask, c_ids, c_mask = make_rollout(prompt_lens, comp_lens, T, tiny64.config.vocab_size, 7)
    params = [p for p in tiny64.parameters()]
    tiny64.zero_grad(set_to_none=True)
    grpo.token_logprobs(tiny64, p_ids, p_mask, c_ids, c_mask, 0.8, chunk=chunk).sum().backward()
    got = [p.grad.clone() for p in params]
    tiny64.zero_grad(set_to_none=True)
    naive_logprobs(tiny64, p_ids, p_mask, c_ids, comp_lens, 0.8).sum().backward()
    want = [p.grad.clone() for p in params]
    tiny64.zero_grad(set_to_none=True)
    for (name, _), a, b in zip(tiny64.named_parameters(), got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def grouped_rollout(V, prompt_lens, G, comp_lens, T, seed, shuffle=True):
    """P distinct left-padded prompts, each repeated G times (junk ids in the padding, different per row), rows
    shuffled; completions with the given per-row lengths. Returns the four tensors plus the row permutation."""
    g = torch.Generator().manual_seed(seed)
    P, Tp = len(prompt_lens), max(prompt_lens)
    N = P * G
    pmask = (torch.arange(Tp)[None, :] >= Tp - torch.tensor(prompt_lens)[:, None]).repeat_interleave(G, 0)  # (N, Tp)
    pids = torch.randint(0, V, (P, Tp), generator=g).repeat_interleave(G, 0)  # (N, Tp)
    pids = torch.where(pmask, pids, torch.randint(0, V, (N, Tp), generator=g))  # junk padding, differs per row
    cids = torch.randint(0, V, (N, T), generator=g)
    cmask = torch.arange(T)[None, :] < torch.tensor(comp_lens)[:, None]  # (N, T)
    perm = torch.randperm(N, generator=g) if shuffle else torch.arange(N)
    return pids[perm], pmask[perm], cids[perm], cmask[perm], perm


def test_distinct_prompts_finds_groups_in_any_order():
    pids, pmask, _, _, perm = grouped_rollout(50, [4, 2, 4, 1], 3, [1] * 12, 1, seed=3)
    first, inv = grpo.distinct_prompts(pids, pmask)
    group = perm // 3  # (N,) which prompt each shuffled row holds
    assert len(first) == 4 and torch.equal(inv[first], torch.arange(4))
    assert all(bool(((group == group[i]) == (inv == inv[i])).all()) for i in range(12))
    # first is the lowest row of each prompt, and equal masks with different real ids stay apart
    assert all(int(first[inv[i]]) == int((group == group[i]).nonzero()[0]) for i in range(12))
    same_mask = torch.ones(2, 3, dtype=torch.bool)
    assert len(grpo.distinct_prompts(torch.tensor([[1, 2, 3], [1, 2, 4]]), same_mask)[0]) == 2


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 6), min_size=1, max_size=6), seed=st.integers(0, 2 ** 16))
def test_spread_is_x_of_inv_with_the_index_add_gradient(counts, seed):
    g = torch.Generator().manual_seed(seed)
    inv = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    inv = inv[torch.randperm(len(inv), generator=g)]  # (N,) rows of a prompt anywhere
    slots, c = grpo.shared_slots(inv)
    assert c == max(counts) and len(set(slots.tolist())) == len(inv) and torch.equal(slots // c, inv)
    for u in range(len(counts)):  # a prompt's rows take its first slots, in row order
        assert slots[inv == u].tolist() == [u * c + k for k in range(counts[u])]
    x = torch.randn(len(counts), 3, 2, generator=g, requires_grad=True)
    w = torch.randn(len(inv), 3, 2, generator=g)
    y = grpo.spread(x, slots, c)
    assert torch.equal(y, x[inv])
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x).index_add_(0, inv, w), rtol=1e-6, atol=1e-6)


def test_shared_prompt_gradients_are_the_same_bits_every_time():
    """A rerun (or a resumed run) gets the same bits: each prompt's G row gradients are summed in a fixed order."""
    # x[inv]'s accumulating scatter would add them in whatever order 2 threads reach them
    model = random_model("qwen2").train()
    comp_lens = [5, 3, 5, 1, 4, 5, 2, 5] * 4
    *args, _ = grouped_rollout(model.config.vocab_size, [100, 90, 80, 100], 8, comp_lens, 5, seed=7)
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # as in a run (this module's fixture holds one): the threads are what reorder sums
    try:
        first = logprobs_and_grads(model, args, share_prompt=True)[1]
        for _ in range(6):
            again = logprobs_and_grads(model, args, share_prompt=True)[1]
            assert all(torch.equal(again[k], first[k]) for k in first)
    finally:
        torch.set_num_threads(n)


def logprobs_and_grads(model, args, share_prompt, temperature=0.8, chunk=5, **kw):
    """token_logprobs, and every parameter's gradient of a random weighting of it (so each token counts)."""
    model.zero_grad(set_to_none=True)
    lp = grpo.token_logprobs(model, *args, temperature, chunk, share_prompt=share_prompt, **kw)
    weights = torch.randn(lp.shape, generator=torch.Generator().manual_seed(11))
    (lp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return lp.detach(), grads


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_shared_prompt_equals_full_forward_values_and_gradients(family, ckpt):
    """Left-padded prompts of different lengths, G = 4, shuffled rows, completions of lengths 0..T."""
    model = random_model(family, tied=family != "llama").train()
    model.gradient_checkpointing = ckpt
    T = 6
    comp_lens = [6, 0, 3, 1, 6, 5, 2, 6, 4, 1, 6, 3]
    *args, _ = grouped_rollout(model.config.vocab_size, [7, 3, 5], 4, comp_lens, T, seed=5)
    want, want_g = logprobs_and_grads(model, args, share_prompt=False)
    got, got_g = logprobs_and_grads(model, args, share_prompt=True)
    assert got.dtype == torch.float32 and torch.equal(got[~args[3]], torch.zeros(int((~args[3]).sum())))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_g.keys() == got_g.keys() == {n for n, _ in model.named_parameters()}
    for n in want_g:
        scale = want_g[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got_g[n] / scale, want_g[n] / scale, atol=1e-5, rtol=0, msg=n)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_lens=st.lists(st.integers(1, 5), min_size=1, max_size=3), G=st.integers(2, 3), data=st.data(),
       seed=st.integers(0, 2 ** 16))
def test_shared_prompt_equals_naive(tiny64, prompt_lens, G, data, seed):
    """In float64, against the row-by-row unpadded reference (no shared code path at all)."""
    T = data.draw(st.integers(1, 5))
    N = len(prompt_lens) * G
    comp_lens = data.draw(st.lists(st.integers(0, T), min_size=N, max_size=N))
    *args, _ = grouped_rollout(tiny64.config.vocab_size, prompt_lens, G, comp_lens, T, seed)
    lens = args[3].sum(1).tolist()
    with torch.no_grad():
        ref = naive_logprobs(tiny64, args[0], args[1], args[2], lens, 1.3)
        out = grpo.token_logprobs(tiny64, *args, 1.3, chunk=3)
    assert torch.allclose(out.double(), ref, atol=2e-5, rtol=1e-5)


def count_embedded_tokens(model, fn):
    """How many tokens go through embed_tokens (every forward starts there) while fn runs."""
    n = []
    handle = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: n.append(inp[0].numel()))
    try:
        fn()
    finally:
        handle.remove()
    return sum(n)


@pytest.mark.parametrize("T", [1, 6])
def test_each_distinct_prompt_is_forwarded_once(T):
    model = random_model("qwen3")
    P, G, Tp = 3, 4, 7
    N = P * G
    args = grouped_rollout(model.config.vocab_size, [7, 3, 5], G, [T] * N, T, seed=2)[:4]
    with torch.no_grad():
        full = count_embedded_tokens(model, lambda: grpo.token_logprobs(model, *args, share_prompt=False))
        shared = count_embedded_tokens(model, lambda: grpo.token_logprobs(model, *args))
        # all rows distinct (a different prompt per row): the one full forward, as before
        distinct = grouped_rollout(model.config.vocab_size, [7] * N, 1, [T] * N, T, seed=2)[:4]
        alone = count_embedded_tokens(model, lambda: grpo.token_logprobs(model, *distinct))
    assert full == alone == N * (Tp + T)
    assert shared == P * Tp + N * (T - 1)  # the last completion token predicts nothing, so it is not forwarded
    torch.testing.assert_close(grpo.token_logprobs(model, *args).detach(),
                               grpo.token_logprobs(model, *args, share_prompt=False).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_lens, G, T", [([7, 3, 5], 4, 6), ([7, 3, 5], 4, 1), ([4] * 5, 1, 3), ([6], 1, 1)],
                         ids=["shared", "shared-T1", "distinct", "one-row-T1"])
def test_fixed_forwards_are_always_two_with_the_same_values_and_gradients(prompt_lens, G, T):
    """fixed_forwards (fsdp.py's update): the prompts' forward and the completions' forward, whatever the rows share
    and however long the completions, with the log-probs and gradients of the default path."""
    model = random_model("qwen2", tied=False).train()
    N = len(prompt_lens) * G
    args = grouped_rollout(model.config.vocab_size, prompt_lens, G, [T] * N, T, seed=3)[:4]
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    try:
        got, got_g = logprobs_and_grads(model, args, share_prompt=True, fixed_forwards=True)
    finally:
        handle.remove()
    assert len(calls) == 2 and calls[1] == max(T - 1, 1)  # prompts, then completions (one token when T is 1)
    want, want_g = logprobs_and_grads(model, args, share_prompt=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_g.keys() == got_g.keys() == {n for n, _ in model.named_parameters()}
    for n in want_g:
        scale = want_g[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got_g[n] / scale, want_g[n] / scale, atol=1e-5, rtol=0, msg=n)


def prefixed_rollout(V, prefix_len, suffix_lens, G, comp_lens, T, seed):
    """grouped_rollout whose prompts all begin with the same prefix_len tokens (a chat template's system turn)."""
    pids, pmask, cids, cmask, perm = grouped_rollout(V, [prefix_len + n for n in suffix_lens], G, comp_lens, T, seed)
    start = pids.shape[1] - pmask.sum(1)  # (N,) where each row's real tokens begin
    head = torch.randint(0, V, (prefix_len,), generator=torch.Generator().manual_seed(seed + 1))
    for i in range(len(pids)):
        pids[i, int(start[i]):int(start[i]) + prefix_len] = head
    return pids, pmask, cids, cmask


def test_common_prefix_of_left_padded_rows():
    pids, pmask, *_ = prefixed_rollout(50, 6, [3, 1, 4], 2, [2] * 6, 2, seed=0)
    assert grpo.common_prefix(pids, pmask) == 6
    assert grpo.common_prefix(pids[:2], pmask[:2]) == 6  # one prompt's rows: its own last token stays its own
    same = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]]).bool()
    assert grpo.common_prefix(*same) == 2
    assert grpo.common_prefix(torch.tensor([[9, 1, 2], [1, 2, 3]]), torch.tensor([[0, 1, 1], [1, 1, 1]]).bool()) == 1
    assert grpo.common_prefix(pids[:0], pmask[:0]) == 0


def shared_prefix_logprobs_and_grads(model, args, micro, fixed=False, share_prompt=True, temperature=0.8):
    """train.update's order: the prefix forwarded once, a backward per micro-batch, then the prefix's backward."""
    model.zero_grad(set_to_none=True)
    prefix = grpo.SharedPrefix(model, args[0], args[1], fixed=fixed)
    weights = torch.randn(args[2].shape, generator=torch.Generator().manual_seed(11))
    parts = []
    for s in range(0, args[0].shape[0], micro):
        sl = slice(s, s + micro)
        lp = grpo.token_logprobs(model, *(a[sl] for a in args), temperature, 5, share_prompt=share_prompt,
                                 fixed_forwards=fixed, prefix=prefix)
        (lp * weights[sl]).sum().backward()
        parts.append(lp.detach())
    prefix.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.cat(parts), grads, prefix.length


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("micro,fixed,share_prompt,ckpt", [(4, False, True, False), (3, False, True, True),
                                                           (5, True, True, False), (12, False, False, False)])
def test_shared_prefix_over_micro_batches_equals_full_forward(family, micro, fixed, share_prompt, ckpt):
    """Values and gradients of a prefix forwarded once for every micro-batch equal the whole rows' full forward."""
    model = random_model(family, tied=family != "llama").train()
    model.gradient_checkpointing = ckpt
    args = prefixed_rollout(model.config.vocab_size, 7, [3, 1, 5], 4, [5, 0, 2, 5, 1, 5, 3, 4, 5, 2, 5, 1], 5, seed=4)
    want, want_g = logprobs_and_grads(model, args, share_prompt=False)
    got, got_g, L = shared_prefix_logprobs_and_grads(model, args, micro, fixed=fixed, share_prompt=share_prompt)
    assert L == 7
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_g.keys() == got_g.keys()
    for n in want_g:
        scale = want_g[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got_g[n] / scale, want_g[n] / scale, atol=1e-5, rtol=0, msg=n)


def test_shared_prefix_with_nothing_shared_and_fixed_makes_one_unused_forward(monkeypatch):
    """fixed (fsdp.py): with no common prefix, still one forward (and one backward), which no row attends to."""
    model = random_model("qwen2").train()
    args = grouped_rollout(model.config.vocab_size, [3, 1, 5], 2, [2] * 6, 2, seed=5)[:4]
    assert grpo.common_prefix(args[0], args[1]) == 0
    want, want_g = logprobs_and_grads(model, args, share_prompt=False)
    calls = []
    inner = model.forward_hidden
    monkeypatch.setattr(model, "forward_hidden", lambda ids, *a, **k: calls.append(ids.shape) or inner(ids, *a, **k))
    got, got_g, L = shared_prefix_logprobs_and_grads(model, args, 2, fixed=True)
    assert L == 0 and calls[0] == (1, 1) and len(calls) == 1 + 3 * 2  # the prefix, then two forwards a micro-batch
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], atol=1e-5, rtol=1e-4, msg=n)
    assert grpo.SharedPrefix(model, args[0], args[1]).kv is None  # not fixed: nothing forwarded at all


def test_shared_prefix_under_bf16_autocast():
    """Under CPU autocast (the CUDA trainer's dtype policy) the prefix path stays at the fp32 values' tolerance, and
    its micro-batches' gradients add up in fp32 leaves to the gradients of the whole batch without the prefix."""
    model = random_model("qwen2").train()
    args = prefixed_rollout(model.config.vocab_size, 7, [3, 1, 5], 4, [5] * 12, 5, seed=6)
    with torch.no_grad():
        fp32 = grpo.token_logprobs(model, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prefix = grpo.SharedPrefix(model, args[0], args[1])
        assert prefix._leaves and all(t.dtype == torch.float32 for t in prefix._leaves)
        got, grads, _ = shared_prefix_logprobs_and_grads(model, args, 3, temperature=1.0)
        want, want_g = logprobs_and_grads(model, args, share_prompt=False, temperature=1.0)
    torch.testing.assert_close(got, fp32, atol=0.1, rtol=0.02)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)
    assert got.dtype == torch.float32 and grads.keys() == want_g.keys()
    for n in want_g:  # bf16's rounding of two different computations: a few percent of the tensor's scale
        scale = want_g[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(grads[n] / scale, want_g[n] / scale, atol=0.05, rtol=0, msg=n)


def test_shared_prompt_under_bf16_autocast():
    """The CUDA trainer runs under bf16 autocast: the shared path runs there too (CPU autocast here), with
    gradients, and stays close to the fp32 values."""
    model = random_model("qwen2").train()
    model.gradient_checkpointing = True
    T = 6
    *args, _ = grouped_rollout(model.config.vocab_size, [7, 3, 5], 4, [6, 4, 2, 6] * 3, T, seed=9)
    with torch.no_grad():
        fp32 = grpo.token_logprobs(model, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = grpo.token_logprobs(model, *args)
        full = grpo.token_logprobs(model, *args, share_prompt=False).detach()
    shared.sum().backward()
    assert shared.dtype == torch.float32
    torch.testing.assert_close(shared.detach(), fp32, atol=0.1, rtol=0.02)
    torch.testing.assert_close(shared.detach(), full, atol=0.1, rtol=0.02)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


class LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an aten op returns, forward and backward alike (CPU
    backward runs on this thread, so the mode sees the checkpoint's recomputation and the gradient ops too)."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_memory_scales_with_chunk_not_T_times_V():
    """Claim: peak memory scales with `chunk`, not with T*V.

    Two measurements on a model with V = 8192, C = 32 and M = N*T = 512 completion tokens (N*T*V = 4.2M floats):
    1. The largest tensor any op creates during forward + backward (a TorchDispatchMode): with chunk = c it is
       max(c, C) * V, i.e. the (c, V) logits or the (V, C) gradient of lm_head, which every method needs; it is
       M*V only when one chunk holds every token. The backward alone does recompute (c, V) logits, no bigger.
    2. The tensors kept for backward (saved_tensors_hooks), which is what stays alive between forward and
       backward: no (chunk, V) logits are kept at all (the checkpoint recomputes them), so what is saved
       outside the parameters is far below M*V*4 bytes, whereas the same computation without the checkpoint
       (grpo._chunk_logprobs on all tokens at once) keeps at least M*V*4 bytes.
    """
    V = 8192
    model = random_model(vocab_size=V, hidden_size=32)
    C = model.config.hidden_size
    N, Tp, T = 8, 4, 64
    M = N * T
    g = torch.Generator().manual_seed(0)
    p_ids, c_ids = torch.randint(0, V, (N, Tp), generator=g), torch.randint(0, V, (N, T), generator=g)
    p_mask, c_mask = torch.ones(N, Tp, dtype=torch.bool), torch.ones(N, T, dtype=torch.bool)

    peaks = {}
    for chunk in (16, 128, M):
        fwd, bwd = LargestTensor(), LargestTensor()
        with fwd:
            lp = grpo.token_logprobs(model, p_ids, p_mask, c_ids, c_mask, chunk=chunk)
        with bwd:
            lp.sum().backward()
        model.zero_grad(set_to_none=True)
        peaks[chunk] = (fwd.largest, bwd.largest)
    assert max(peaks[M]) >= M * V  # the instrument does see the logits when they are T*V-sized
    for chunk in (16, 128):
        assert max(peaks[chunk]) <= max(chunk, C) * V
        assert peaks[chunk][1] >= chunk * V  # the backward recomputes (chunk, V) logits...
    assert 8 * max(peaks[16]) <= M * V  # ...and with a small chunk nothing comes near N*T*V

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(fn):
        saved = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in param_storages:
                saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(saved.values()), max(saved.values())

    total, largest = saved_bytes(lambda: grpo.token_logprobs(model, p_ids, p_mask, c_ids, c_mask, chunk=16))
    assert largest < 16 * V * 4 and total < M * V * 4 / 4
    h = torch.randn(M, C, requires_grad=True)
    total_plain, _ = saved_bytes(lambda: grpo._chunk_logprobs(h, model.lm_head.weight, c_ids.reshape(-1), 1.0))
    assert total_plain >= M * V * 4 > 4 * total
