"""Tiny random checkpoints for tests: written to tmp dirs, no network."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelConfig, Transformer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_config(family="qwen2", tied=True, vocab_size=320, **kw):
    """A Hugging Face config.json dict of a 2-layer model of the given family."""
    d = dict(model_type=family, vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=tied, max_position_embeddings=512, eos_token_id=2, bos_token_id=1,
             hidden_act="silu", architectures=[{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                                "llama": "LlamaForCausalLM"}[family]])
    if family == "qwen3":
        d.update(head_dim=24, attention_bias=False)  # explicit head_dim != hidden/heads (16)
    if family == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    d.update(kw)
    return d


def random_model(family="qwen2", tied=True, seed=0, **kw):
    """Our Transformer with random weights (biases and norms randomised too, so they are exercised)."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_dict(tiny_config(family, tied, **kw)))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    return m


def write_tokenizer(out_dir, vocab_size=320, extra_text=()):
    """A byte-level BPE tokenizer.json with ChatML specials (ids 0, 1, 2), trained on a few lines (and extra_text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["<reasoning> The answer is 42. </reasoning> <answer> 42 </answer>",
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."] * 20
    text += list(extra_text) * 20
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


def write_checkpoint(out_dir, family="qwen2", tied=True, seed=0, extra_text=()):
    """A complete tiny checkpoint dir (config.json, model.safetensors, tokenizer.json); embedding > tokenizer vocab."""
    os.makedirs(out_dir, exist_ok=True)
    n = write_tokenizer(out_dir, extra_text=extra_text)
    m = random_model(family, tied, seed, vocab_size=n + 16)  # padded embedding rows, like Qwen's 151936
    m.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    return out_dir


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny")), "qwen2", tied=True)


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory):
    """A tiny checkpoint whose tokenizer has yes/no words as single tokens, as real judges' tokenizers do."""
    return write_checkpoint(str(tmp_path_factory.mktemp("judge")), "llama", tied=False, seed=1,
                            extra_text=["yes no Yes No", "Verdict: yes. Verdict: no."])
