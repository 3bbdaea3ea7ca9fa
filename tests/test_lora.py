"""lora.py: exact base model when fresh or switched off, only adapters train, merge, PEFT's format both ways,
the sampler's packed merged weights, and the errors."""
import json
import os

import pytest
import torch

import lora
from conftest import random_model, write_checkpoint
from model import Transformer
from sample import generate


def trained(m, steps=3, lr=0.05, seed=0):
    """A few SGD steps on a random loss, so the adapters are non-zero (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ids = torch.randint(3, 300, (2, 8), generator=g)
        m(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return m


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_fresh_adapter_is_bit_identical_and_switched_off_is_the_base(family):
    base = random_model(family).eval()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        want = base(ids)
    m = lora.add_lora(random_model(family), 4, 8.0).eval()
    assert len(lora.lora_layers(m)) == 7 * m.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(m(ids), want)  # B = 0: y = W x + b + 0 exactly
    trained(m.train())
    m.eval()
    with torch.no_grad():
        assert not torch.allclose(m(ids), want)  # the adapters learned something
        with lora.adapters_off(m):
            assert torch.equal(m(ids), want)  # and switched off they are gone, bit for bit
        assert not torch.allclose(m(ids), want)  # and back on afterwards


def test_adapters_are_seeded_apart_from_the_global_rng():
    # every torchrun rank seeds its global RNG with seed + rank; the adapters must still start equal
    torch.manual_seed(1)
    a = lora.add_lora(random_model("qwen2"), 4, 8.0, seed=7).state_dict()
    torch.manual_seed(2)
    b = lora.add_lora(random_model("qwen2"), 4, 8.0, seed=7).state_dict()
    c = lora.add_lora(random_model("qwen2"), 4, 8.0, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           c["model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_only_adapters_get_gradients_and_change():
    m = lora.add_lora(random_model("qwen2"), 4, 8.0, targets=("q_proj", "v_proj"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trained(m, steps=1)
    for name, p in m.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
    for k, v in m.state_dict().items():
        changed = not torch.equal(v, before[k])
        if ".lora_B" in k:
            assert changed, k  # B got a gradient (A's is zero at step 1, as B is)
        elif ".lora_" not in k:
            assert not changed, k  # base weights bit-identical
    assert {n.rsplit(".", 1)[-1] for n, _ in lora.lora_layers(m)} == {"q_proj", "v_proj"}
    assert not any("lm_head.lora" in k or "embed_tokens.lora" in k for k in m.state_dict())


def test_merged_model_equals_adapted_and_merges_once():
    m = trained(lora.add_lora(random_model("llama"), 8, 16.0)).eval()
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        want = m(ids)
        lora.merge(m)
        assert not lora.lora_layers(m) and not any(".lora_" in k for k in m.state_dict())
        torch.testing.assert_close(m(ids), want, atol=1e-5, rtol=1e-5)
    lora.merge(m)  # nothing left to fold: a no-op
    with torch.no_grad():
        torch.testing.assert_close(m(ids), want, atol=1e-5, rtol=1e-5)


def test_sampler_packs_the_merged_weights_and_samples_from_the_adapted_model(monkeypatch):
    m = trained(lora.add_lora(random_model("qwen2"), 4, 8.0), lr=0.2).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    packed = generate(m, prompts, 3, 8, 1.0, generator=0)  # CPU: LoRA layers packed with W + s B A
    with lora.adapters_off(m):
        base = generate(m, prompts, 3, 8, 1.0, generator=0)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # no packing: each layer's forward
    unpacked = generate(m, prompts, 3, 8, 1.0, generator=0)
    assert torch.equal(packed.completion_ids, unpacked.completion_ids)
    torch.testing.assert_close(packed.logprobs, unpacked.logprobs, atol=1e-4, rtol=1e-4)
    assert not torch.equal(base.logprobs, packed.logprobs)  # the adapters really are in the rollout


def test_peft_loads_ours_and_we_load_peft(tmp_path):
    peft = pytest.importorskip("peft")
    tr = pytest.importorskip("transformers")
    base_dir = write_checkpoint(str(tmp_path / "base"), "qwen2", tied=True)
    ours = trained(lora.add_lora(Transformer.from_pretrained(base_dir), 4, 8.0)).eval()
    lora.save_adapter(ours, str(tmp_path / "ours"), base_dir)
    cfg = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4 and cfg["bias"] == "none"
    ids = torch.randint(3, 300, (2, 9))
    hf = tr.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)

    # PEFT writes adapters (its own init, then B perturbed so they are not no-ops); we load them and give its
    # logits. "all-linear" is saved as full module names: the file's tensors say which layers are adapted.
    for name, targets, leaves in (("peft", ["k_proj", "up_proj"], {"k_proj", "up_proj"}),
                                  ("peft-all", "all-linear", set(lora.TARGETS))):
        hf2 = tr.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        pm = peft.get_peft_model(hf2, peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        pm.save_pretrained(str(tmp_path / name))
        ours2 = lora.load_adapter(Transformer.from_pretrained(base_dir), str(tmp_path / name)).eval()
        assert {n.rsplit(".", 1)[-1] for n, _ in lora.lora_layers(ours2)} == leaves
        assert len(lora.lora_layers(ours2)) == len(leaves) * ours2.config.num_hidden_layers
        with torch.no_grad():
            torch.testing.assert_close(ours2(ids), pm.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    # and our own save round-trips through load_adapted (base from the config)
    again = lora.load_adapted(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_errors(tmp_path):
    for kw, msg in ((dict(r=0, alpha=8.0), "rank must be an integer >= 1"),
                    (dict(r=4, alpha=0.0), "alpha must be > 0"),
                    (dict(r=4, alpha=8.0, targets=("q_proj", "lm_head")), "'lm_head' is not one of q_proj"),
                    (dict(r=4, alpha=8.0, targets=()), "target '\\(none\\)'"),
                    (dict(r=4, alpha=8.0, dropout=1.0), "dropout must be in")):
        with pytest.raises(ValueError, match=msg):
            lora.add_lora(random_model("qwen2"), **kw)
    m = lora.add_lora(random_model("qwen2"), 4, 8.0)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(m, 4, 8.0)
    lora.save_adapter(m, str(tmp_path / "a"), "x")
    # an adapter whose base model does not match: other shapes
    with pytest.raises(ValueError, match="has shape .* the adapter was trained on another base model"):
        lora.load_adapter(random_model("qwen2", hidden_size=32, intermediate_size=48), str(tmp_path / "a"))
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    json.dump(dict(cfg, use_dora=True), open(tmp_path / "a" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.load_adapter(random_model("qwen2"), str(tmp_path / "a"))
    json.dump(dict(cfg, peft_type="IA3"), open(tmp_path / "a" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not LORA"):
        lora.load_adapter(random_model("qwen2"), str(tmp_path / "a"))
    os.remove(tmp_path / "a" / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_config.json: file not found"):
        lora.load_adapter(random_model("qwen2"), str(tmp_path / "a"))


# ----------------------------------------------------------------------------- train.py with --lora-rank

def test_train_lora_one_model_checkpoints_merged_export_and_exact_resume(tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    import train
    from test_train import args, chars_near_20, metrics, without_timing
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "test"):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(6):
                f.write(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n")
    g = train.TASKS["gsm8k"]
    monkeypatch.setitem(train.TASKS, "toy", train.Task(g.load, g.prompt, [(1.0, chars_near_20)], g.metrics))
    loads = []
    real = Transformer.from_pretrained.__func__
    monkeypatch.setattr(Transformer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    out = tmp_path / "run"
    flags = ["--task", "toy", "--steps", "4", "--save-every", "2", "--keep-last", "5", "--lora-rank", "4",
             "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj,up_proj", "--beta", "0.04"]
    train.main([*flags, *args(tiny_ckpt, str(d), out)])
    assert len(loads) == 1  # beta > 0, yet one model: the reference is the policy with its adapters off
    full = metrics(out)
    assert full[0]["kl"] == 0 and full[-1]["kl"] > 0 and full[0]["reward_std"] > 0
    assert sorted(os.listdir(out / "step-2")) == sorted(["adapter_config.json", "adapter_model.safetensors",
                                                          "generation_config.json", "tokenizer.json",
                                                          "trainer_state.pt"])
    assert {"adapter_config.json", "merged"} <= set(os.listdir(out / "step-4"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out / "step-4" / "merged"))

    # the merged export equals the adapted model, and only the adapted layers differ from the base
    adapted = lora.load_adapted(str(out / "step-4"), base=tiny_ckpt).eval()
    merged = Transformer.from_pretrained(str(out / "step-4" / "merged")).eval()
    base = real(Transformer, tiny_ckpt).state_dict()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=1e-5)
    changed = {k.rsplit(".", 2)[-2] for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {"q_proj", "v_proj", "up_proj"}
    tr = pytest.importorskip("transformers")
    hf = tr.AutoModelForCausalLM.from_pretrained(out / "step-4" / "merged", dtype=torch.float32)  # no peft needed
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, merged(ids), atol=1e-4, rtol=1e-4)

    # a crash after step 2: the resumed steps equal the uninterrupted ones, metrics and adapters
    from safetensors.torch import load_file
    want = load_file(str(out / "step-4" / "adapter_model.safetensors"))
    shutil.rmtree(out / "step-4")
    train.main(["--resume", str(out)])
    assert without_timing(metrics(out)[2:]) == without_timing(full[2:])
    got = load_file(str(out / "step-4" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for flags in (["--lora-rank", "0"], ["--lora-rank", "8"], ["--lora-alpha", "16"]):  # given, and different
        with pytest.raises(SystemExit, match="differs from the run's .*LoRA settings: start a new run"):
            train.main(["--resume", str(out), *flags])
    with open(out / "step-4" / "adapter_config.json") as f:  # an adapter on disk that disagrees with the run
        a = json.load(f)
    with open(out / "step-4" / "adapter_config.json", "w") as f:
        json.dump({**a, "r": 8}, f)
    with pytest.raises(SystemExit, match="its adapter has r=8, alpha=8.0.*LoRA settings cannot change on resume"):
        train.main(["--resume", str(out)])
    with open(out / "step-4" / "adapter_config.json", "w") as f:
        json.dump(a, f)
    # an adapter checkpoint is a --model: merged into its base (from adapter_config.json) and evaluated
    train.main(["--eval-only", "--model", str(out / "step-2"), "--data-dir", str(d), "--out", str(tmp_path / "ev"),
                "--eval-n", "3", "--max-new-tokens", "6"])
    assert json.loads(open(tmp_path / "ev" / "eval.jsonl").readline())["n"] == 3


def test_train_lora_bad_settings_before_loading(tmp_path, monkeypatch):
    import train
    from test_train import forbid_loading
    forbid_loading(monkeypatch)
    with pytest.raises(SystemExit, match="--lora-\\*: LoRA target 'lm_head' is not one of"):
        train.main(["--out", str(tmp_path / "r"), "--lora-rank", "8", "--lora-targets", "q_proj,lm_head"])
    with pytest.raises(SystemExit, match="--lora-\\*: LoRA alpha must be > 0"):
        train.main(["--out", str(tmp_path / "r"), "--lora-rank", "8", "--lora-alpha", "0"])
