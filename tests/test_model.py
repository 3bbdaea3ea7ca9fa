"""model.py: parity with transformers, sharded checkpoints, save round trip, KV cache, `past` keys/values, and
every documented error."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from model import KVCache, ModelConfig, Transformer, attend_shared, build_mask

FAMILIES = [("qwen2", True), ("qwen2", False), ("qwen3", True), ("qwen3", False), ("llama", True), ("llama", False)]


def hf():
    return pytest.importorskip("transformers", reason="transformers is an optional test-only peer; CI installs it")


def hf_random(family, tied, seed=0):
    """A transformers model of a tiny config with every parameter randomised (biases and norms included)."""
    tr = hf()
    d = tiny_config(family, tied)
    cfg = tr.AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    torch.manual_seed(seed)
    m = tr.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return m


def left_padded_batch(V, lens=(9, 5, 1), seed=1):
    """ids (B, T) and a bool mask with rows of different lengths, left-padded."""
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.randint(0, V, (len(lens), T), generator=g)
    mask = torch.arange(T) >= T - torch.tensor(lens)[:, None]
    return ids, mask


def assert_same_logits(ours, theirs, V):
    ids, mask = left_padded_batch(V)
    with torch.no_grad():
        a = ours(ids, attn_mask=mask)
        b = theirs(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(a[mask], b[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_loads_transformers_checkpoint_with_same_logits(tmp_path, family, tied):
    theirs = hf_random(family, tied)
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert_same_logits(ours, theirs, theirs.config.vocab_size)


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen3", False)])
def test_loads_sharded_checkpoint(tmp_path, family, tied):
    theirs = hf_random(family, tied)
    theirs.save_pretrained(tmp_path, max_shard_size="60KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(Transformer.from_pretrained(str(tmp_path)), theirs, theirs.config.vocab_size)


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_our_save_loads_in_transformers(tmp_path, family, tied):
    tr = hf()
    ours = random_model(family, tied)
    ours.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied  # tied weights are saved once
    theirs = tr.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_logits(ours, theirs, ours.config.vocab_size)
    again = Transformer.from_pretrained(str(tmp_path))
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    random_model().save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_cached_prefill_then_decode_equals_full_forward(family):
    m = random_model(family).eval()
    ids, mask = left_padded_batch(m.config.vocab_size, lens=(10, 6, 3))
    B, T = ids.shape
    with torch.no_grad():
        full = m(ids, attn_mask=mask)  # (B, T, V)
        cache = KVCache(m.config, B, T)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        split = 4  # prefill the first 4 columns (some rows are still all padding there), then one at a time
        step = [m(ids[:, :split], pos[:, :split], mask[:, :split], cache)]
        for t in range(split, T):
            step.append(m(ids[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(step, 1)[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_rows_logits():
    m = random_model("qwen3").eval()
    ids, mask = left_padded_batch(m.config.vocab_size, lens=(8, 3))
    with torch.no_grad():
        batched = m(ids, attn_mask=mask)[1, -3:]
        alone = m(ids[1:, -3:])[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_is_off_by_default_and_gives_same_gradients():
    m = random_model("qwen2").train()
    assert m.gradient_checkpointing is False
    ids = torch.randint(0, m.config.vocab_size, (2, 7))
    grads = []
    for flag in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = flag
        m(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_past_then_rest_equals_full_forward_values_and_gradients(family, ckpt):
    """forward_hidden(first S0 columns, return_kv) then forward_hidden(rest, past=kv, attn_mask of all columns)
    equals one forward of everything at every real position, and so do the parameter gradients through both
    calls (the past's gradient reaches the first call): left padding where some rows are still all padding at
    the split, with and without gradient checkpointing."""
    m = random_model(family).train()
    m.gradient_checkpointing = ckpt
    ids, mask = left_padded_batch(m.config.vocab_size, lens=(10, 6, 3))
    S0 = 5  # row 2's first real token is at column 7: its first call is all padding
    w = torch.randn(*ids.shape, m.config.hidden_size, generator=torch.Generator().manual_seed(3))
    runs = []
    for split in (False, True):
        m.zero_grad(set_to_none=True)
        if split:
            h0, kv = m.forward_hidden(ids[:, :S0], attn_mask=mask[:, :S0], return_kv=True)
            h1 = m.forward_hidden(ids[:, S0:], attn_mask=mask, past=kv)
            h = torch.cat([h0, h1], 1)
        else:
            h = m.forward_hidden(ids, attn_mask=mask)
        (h * w)[mask].sum().backward()  # padding positions' outputs are junk by design: left out
        runs.append((h.detach()[mask], {n: p.grad.clone() for n, p in m.named_parameters()}))
    (want, want_g), (got, got_g) = runs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for n in want_g:
        scale = want_g[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got_g[n] / scale, want_g[n] / scale, atol=1e-5, rtol=0, msg=n)


def test_return_kv_is_this_calls_rotated_keys_and_values():
    """One (k, v) per layer, (B, K, T, D), only this call's T tokens even with a past, and equal to what the
    KV cache stores for the same tokens (so: RoPE-rotated keys)."""
    m = random_model("qwen3").eval()
    cfg = m.config
    ids, mask = left_padded_batch(cfg.vocab_size, lens=(7, 4))
    B, T = ids.shape
    with torch.no_grad():
        h, kv = m.forward_hidden(ids[:, :4], attn_mask=mask[:, :4], return_kv=True)
        h2, kv2 = m.forward_hidden(ids[:, 4:], attn_mask=mask, past=kv, return_kv=True)
        cache = KVCache(cfg, B, T)
        m.forward_hidden(ids, attn_mask=mask, cache=cache)
    assert h.shape == (B, 4, cfg.hidden_size) and h2.shape == (B, T - 4, cfg.hidden_size)
    assert len(kv) == len(kv2) == cfg.num_hidden_layers
    for i, ((k, v), (k2, v2)) in enumerate(zip(kv, kv2)):
        assert k.shape == v.shape == (B, cfg.num_key_value_heads, 4, cfg.head_dim)
        assert k2.shape == (B, cfg.num_key_value_heads, T - 4, cfg.head_dim)
        full_k, full_v = torch.cat([k, k2], 2), torch.cat([v, v2], 2)
        sel = mask[:, None, :, None].expand_as(full_k)  # real tokens only: padding keys are junk everywhere
        torch.testing.assert_close(full_k[sel], cache.k[i][sel], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full_v[sel], cache.v[i][sel], atol=1e-5, rtol=1e-5)


def test_past_argument_errors():
    m = random_model().eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 3))
    with torch.no_grad():
        _, kv = m.forward_hidden(ids, return_kv=True)
        with pytest.raises(ValueError, match=r"attn_mask must be \(B, S0\+T\)"):
            m.forward_hidden(ids, attn_mask=torch.ones(2, 3, dtype=torch.bool), past=kv)
        with pytest.raises(ValueError, match="either a KVCache or past"):
            m.forward_hidden(ids, past=kv, cache=KVCache(m.config, 2, 6))
        # no attn_mask with past: every key real, positions S0.. (as one unpadded forward)
        torch.testing.assert_close(m.forward_hidden(ids, past=kv), m.forward_hidden(torch.cat([ids, ids], 1))[:, 3:],
                                   atol=1e-5, rtol=1e-5)


def old_gqa_sdpa(monkeypatch, K):
    """Put back the pre-issue-12 attention call: SDPA with the mask *and* enable_gqa on the K kv heads.

    model.py now repeats k/v to H heads when there is a mask (enable_gqa with a mask leaves CUDA only the math
    kernel); every group of H/K heads is then a copy, so taking one of each recovers the K heads exactly.
    """
    import model as M
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa))
        if attn_mask is not None and k.shape[1] == q.shape[1] != K:
            rep = q.shape[1] // K
            k, v, enable_gqa = k[:, ::rep], v[:, ::rep], True
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    class F:
        def __getattr__(self, name):
            return sdpa if name == "scaled_dot_product_attention" else getattr(torch.nn.functional, name)
    monkeypatch.setattr(M, "F", F())
    return calls


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_masked_attention_repeats_kv_and_equals_enable_gqa(monkeypatch, family):
    from grpo import token_logprobs
    from sample import generate
    m = random_model(family).eval()
    H, K = m.config.num_attention_heads, m.config.num_key_value_heads
    assert K < H
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :4] = mask[2, :2] = False  # left padding: an explicit mask on every path
    cid = torch.randint(3, 300, (3, 5), generator=g)
    cm = torch.ones_like(cid, dtype=torch.bool)

    def run():
        with torch.no_grad():
            logits = m(ids, attn_mask=mask)  # training-style forward with a mask
            ro = generate(m, [[5, 6, 7, 8], [9, 10]], 2, 6, 1.0, generator=1)  # prefill + decode through the cache
            lp_full = token_logprobs(m, ids, mask, cid, cm, share_prompt=False)
        pid = ids[[0, 0, 2]]
        lp_shared = token_logprobs(m, pid, mask[[0, 0, 2]], cid, cm)  # prompt once, completions with `past`
        return logits, ro, lp_full, lp_shared.detach()

    spy = []
    import model as M
    monkeypatch.setattr(M, "REPEAT_KV_WITH_MASK", {"cuda", "cpu"})  # CUDA's path, run here
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(M.F, "scaled_dot_product_attention",
                        lambda *a, **k: spy.append((k.get("attn_mask") is not None, k.get("enable_gqa")))
                        or real(*a, **k))
    new = run()
    monkeypatch.undo()
    assert spy and all(not gqa for has_mask, gqa in spy if has_mask)  # never enable_gqa together with a mask
    calls = old_gqa_sdpa(monkeypatch, K)
    old = run()
    assert any(has_mask for has_mask, _ in calls)
    torch.testing.assert_close(new[0], old[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(new[1].completion_ids, old[1].completion_ids)
    torch.testing.assert_close(new[1].logprobs, old[1].logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[2], old[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[3], old[3], atol=1e-5, rtol=1e-5)


def test_logits_are_fp32_under_autocast():
    m = random_model("qwen2").eval()
    ids = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        ref = m(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = m.forward_hidden(ids)
            z = m.logits(h)
            zb = m.lm_head(h)  # what autocast alone would give
    assert z.dtype == torch.float32 and zb.dtype == torch.bfloat16
    torch.testing.assert_close(z, h.float() @ m.lm_head.weight.t(), atol=1e-5, rtol=1e-5)  # no bf16 rounding
    assert (zb.float() - z).abs().max() > 1e-3  # which autocast alone would have added
    assert ref.dtype == torch.float32


def test_rope_theta_read_from_flat_key_and_from_rope_parameters():
    flat = ModelConfig.from_dict(tiny_config(rope_theta=123.0))
    d = tiny_config()
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 456.0}
    assert flat.rope_theta == 123.0 and ModelConfig.from_dict(d).rope_theta == 456.0


def test_architecture_flags():
    q2, q3, ll = (ModelConfig.from_dict(tiny_config(f)) for f in ("qwen2", "qwen3", "llama"))
    assert q2.qkv_bias and not q2.o_bias and not q2.qk_norm
    assert not q3.qkv_bias and q3.qk_norm and q3.head_dim == 24
    assert not ll.qkv_bias and not ll.qk_norm and ll.head_dim == 16


# ----------------------------------------------------------------------------- errors

def test_unknown_model_type_names_it_and_lists_supported():
    with pytest.raises(ValueError, match=r"'gpt2'.*qwen2, qwen3, llama"):
        ModelConfig.from_dict(tiny_config(model_type="gpt2"))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Transformer.from_pretrained(str(tmp_path / "nope"))


def test_hub_id_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch 'nobody/no-such-model'.*local checkpoint directory"):
        Transformer.from_pretrained("nobody/no-such-model")


def test_missing_weight_file(tmp_path):
    random_model().save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(str(tmp_path))


def test_missing_shard(tmp_path):
    random_model().save_pretrained(tmp_path)
    os.rename(tmp_path / "model.safetensors", tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        wm = {k: "a.safetensors" for k in f.keys()}
    wm["model.norm.weight"] = "b.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(FileNotFoundError, match="b.safetensors"):
        Transformer.from_pretrained(str(tmp_path))


def test_corrupt_weight_file(tmp_path):
    random_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: corrupt"):
        Transformer.from_pretrained(str(tmp_path))


def test_missing_tensor_named(tmp_path):
    from safetensors.torch import save_file
    m = random_model(tied=False)
    sd = {k: v for k, v in m.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    m.save_pretrained(tmp_path)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        Transformer.from_pretrained(str(tmp_path))


def test_unexpected_tensor_named(tmp_path):
    from safetensors.torch import save_file
    m = random_model()
    m.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: unexpected tensor 'model.layers.0.extra.weight'"):
        Transformer.from_pretrained(str(tmp_path))


def test_shape_mismatch_named(tmp_path):
    random_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError,
                       match=r"model.safetensors: tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape"):
        Transformer.from_pretrained(str(tmp_path))


def test_corrupt_config(tmp_path):
    random_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        Transformer.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- a real checkpoint

@pytest.mark.skipif(not os.environ.get("GRPO_TEST_MODEL"), reason="set GRPO_TEST_MODEL to a checkpoint dir")
def test_real_model_greedy_matches_transformers():
    tr = hf()
    from tokenizer import Tokenizer
    path = os.environ["GRPO_TEST_MODEL"]
    ours, tok = Transformer.from_pretrained(path).eval(), Tokenizer(path)
    theirs = tr.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode_chat([{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user",
                                          "content": "Write a long story about a dragon who learns to count."}])])
    with torch.no_grad():
        want = theirs.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
        got = ids
        for _ in range(32):  # plain greedy by full re-forward: this test is about the model, not the sampler
            got = torch.cat([got, ours(got)[:, -1:].argmax(-1)], 1)
    got = got[0, ids.shape[1]:].tolist()
    assert len(want) > 8 and got[:len(want)] == want.tolist()  # transformers stops at EOS; we ran on for 32


@pytest.mark.parametrize("H,K,T", [(4, 2, 1), (4, 2, 3), (6, 6, 2), (9, 3, 1)])
def test_attend_shared_equals_attention_over_the_concatenated_keys(H, K, T):
    """Keys every row shares (stored once) then each row's own, masked: SDPA over [shared, own] keys per row."""
    g = torch.Generator().manual_seed(0)
    B, D, L, S = 3, 8, 5, 6
    q = torch.randn(B, H, T, D, generator=g)
    sk, sv = torch.randn(1, K, L, D, generator=g), torch.randn(1, K, L, D, generator=g)
    k, v = torch.randn(B, K, S, D, generator=g), torch.randn(B, K, S, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :2] = valid[2, :1] = False  # left padding of the rows' own part
    mask = build_mask(valid, S - T, T)  # (B, 1, T, S): the last T own keys are this call's
    full = torch.cat([torch.ones(B, 1, T, L, dtype=torch.bool), mask], -1)  # (B, 1, T, L+S)
    kk, vv = torch.cat([sk.expand(B, -1, -1, -1), k], 2), torch.cat([sv.expand(B, -1, -1, -1), v], 2)
    want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=full, enable_gqa=K != H)
    got = attend_shared(q, sk, sv, k, v, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CUDA dtype policy: bf16 inputs, the softmax in fp32
        got16 = attend_shared(q.bfloat16(), sk.bfloat16(), sv.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), want, atol=0.05, rtol=0.05)
