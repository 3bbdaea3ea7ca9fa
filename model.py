"""A Qwen2 / Qwen2.5 / Qwen3 / Llama-family decoder in plain PyTorch that loads and saves Hugging Face safetensors.

Module and parameter names equal the Hugging Face ones, so a checkpoint loads with
`load_state_dict(strict=True, assign=True)` onto a meta-device model and saves with no rename table.
The families differ only by flags read from config.json (see ModelConfig.from_dict).
Legend: B batch, T query time, S key time, S0 keys passed in as `past`, C hidden, H heads, K kv heads, D head dim,
F mlp dim, V vocab, L layers, S1 keys every row shares (KVCache.shared), Hg = H/K query heads per kv head.
"""
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2/2.5: bias on q, k, v only; Llama with attention_bias: on o_proj too
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head's D before RoPE
    raw: dict = field(default_factory=dict, repr=False)  # the config.json we were built from, written back on save

    @classmethod
    def from_dict(cls, d):
        """Read the architecture flags out of a Hugging Face config.json dict."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}  # transformers>=5 nests rope_theta here
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                             "(only default RoPE)")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported")
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ValueError("config.json has neither rope_theta nor rope_parameters.rope_theta")
        H = d["num_attention_heads"]
        bias = d.get("attention_bias", mt == "qwen2")  # Qwen2 configs omit the key: q/k/v bias is always on
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=H, num_key_value_heads=d.get("num_key_value_heads") or H,
            head_dim=d.get("head_dim") or d["hidden_size"] // H,  # Qwen3: explicit, != hidden/heads
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(bias), o_bias=bool(bias) and mt != "qwen2", mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt == "qwen3", raw=dict(d),
        )


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 as Hugging Face does."""
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg, device=None):
    """inv_freq_i = theta^(-2i/D), i < D/2 (RoFormer, arXiv 2104.09864)."""
    D = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))


def rope_cos_sin(inv_freq, positions, dtype):
    """cos/sin of angle pos * inv_freq, halves concatenated (the Hugging Face rotate_half layout)."""
    ang = positions[..., None].float() * inv_freq  # (B, T, D/2)
    ang = torch.cat((ang, ang), dim=-1)  # (B, T, D)
    return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]  # (B, 1, T, D) each


def apply_rope(x, cos, sin):
    """x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values of every layer, passed in explicitly by the caller (sample.py)."""
    # Rows are left-padded, so every row writes its next token at the same index `pos`. `valid` marks which
    # indices hold a real token, which is what the attention mask is built from. `rows` selects the rows a
    # forward writes: sample.py prefills P prompts into rows 0, G, 2G, ... and then `fan_out(G)` copies them.
    # `shared`: a 1-row KVCache of a prefix that every row's tokens follow (the prompts' common prefix): its keys and
    # values are stored and read once for all rows, and every query attends to all of them (`attend_shared`).
    # One tensor per layer, written with index_copy_: under torch.compile a slice assignment into one big
    # (L, B, K, S, D) tensor becomes a copy of the whole cache per layer.
    def __init__(self, cfg, batch, max_len, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (B, K, S, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.pos, self.rows, self.shared = 0, slice(None), None

    def write(self, layer, k, v):
        """Store k, v (B, K, T, D) at [pos, pos+T) and return this layer's keys/values up to pos+T."""
        end = self.pos + k.shape[2]
        idx = torch.arange(self.pos, end, device=k.device)
        kc, vc = self.k[layer][self.rows], self.v[layer][self.rows]  # views (B, K, S, D)
        kc.index_copy_(2, idx, k.to(kc.dtype))
        vc.index_copy_(2, idx, v.to(vc.dtype))
        return kc[:, :, :end], vc[:, :, :end]  # (B, K, S', D) each

    def fan_out(self, G):
        """Copy row g*G (filled by prefill) into rows g*G+1 .. g*G+G-1, for positions [0, pos)."""
        for t in self.k + self.v:
            t5 = t.view(-1, G, *t.shape[1:])  # (P, G, K, S, D)
            t5[:, 1:, :, :self.pos] = t5[:, :1, :, :self.pos]
        v3 = self.valid.view(-1, G, self.valid.shape[1])  # (P, G, S)
        v3[:, 1:, :self.pos] = v3[:, :1, :self.pos]
        self.rows = slice(None)

    def keep(self, idx):
        """Keep only rows idx (B',): every tensor shrinks to B' rows (sample.py drops finished rows)."""
        assert self.rows == slice(None), "keep() is for decoding, after fan_out"
        self.k, self.v = [t[idx] for t in self.k], [t[idx] for t in self.v]  # (B', K, S, D) each
        self.valid = self.valid[idx]  # (B', S)


# Devices where SDPA gets k/v repeated to H heads instead of enable_gqa when there is a mask: on CUDA a mask with
# enable_gqa leaves only SDPA's math kernel, which materialises B x H x T x S fp32 scores (transformers passes
# enable_gqa only without a mask for this reason), while on CPU the fused kernel takes enable_gqa with a mask and
# beats repeating. Same result either way (tests/test_model.py).
REPEAT_KV_WITH_MASK = {"cuda"}


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, K, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.H, self.K, self.D = H, K, D
        self.q_proj = nn.Linear(C, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, K * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, K * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, past=None, return_kv=False):
        """(B, T, C) -> (B, T, C), or with return_kv ((B, T, C), (k, v) of this call's T tokens)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.K, self.D)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.K, self.D).transpose(1, 2)  # (B, K, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, K, T, D)
        kv = (k, v)  # this call's keys (already rotated) and values: what a later call takes as `past`
        shared = cache.shared if cache is not None else None
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, K, S, D)
        elif past is not None:
            # functional, not a cache write: a new tensor, so autograd reaches the past's producer through it
            k = torch.cat([past[0], k], 2)  # (B, K, S0+T, D)
            v = torch.cat([past[1], v], 2)  # (B, K, S0+T, D)
        if shared is not None and T == 1:  # decode after a prefix every row follows, its keys stored once
            y = attend_shared(q, shared.k[layer], shared.v[layer], k, v, mask)  # (B, H, 1, D)
        else:  # mask None means plain causal with T == S; otherwise an explicit (B, 1, T, S) bool mask
            if shared is not None:  # a prefill after the shared prefix: its keys join each row's, for SDPA's kernel
                S1 = shared.k[layer].shape[2]
                k = torch.cat([shared.k[layer].expand(B, -1, -1, -1), k], 2)  # (B, K, S1+S, D)
                v = torch.cat([shared.v[layer].expand(B, -1, -1, -1), v], 2)  # (B, K, S1+S, D)
                mask = torch.cat([mask.new_ones(B, 1, T, S1), mask], -1)  # (B, 1, T, S1+S)
            gqa = self.K != self.H
            if gqa and mask is not None and q.device.type in REPEAT_KV_WITH_MASK:
                k = k.repeat_interleave(self.H // self.K, dim=1)  # (B, H, S, D): head h reads kv head h // (H/K)
                v = v.repeat_interleave(self.H // self.K, dim=1)  # (B, H, S, D)
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))  # (B, T, C)
        return (y, kv) if return_kv else y


def attend_shared(q, sk, sv, k, v, mask):
    """Attention of q (B, H, T, D) over keys all rows share, sk/sv (1, K, S1, D), then each row's own (B, K, S, D)."""
    # One softmax over the S1 shared keys and the S own ones (mask (B, 1, T, S) applies to the own ones; every query
    # sees the whole prefix, which precedes all its tokens): the same attention as over the concatenated keys, but
    # the shared keys/values are read once for all B rows, as one (K, B*Hg*T, S1) batch, instead of once per row.
    # For decode (T = 1), where that read is the cost; a prefill takes SDPA's kernel instead (Attention.forward),
    # which never holds the (B, K, Hg*T, S1+S) scores this does.
    # In fp32 also under autocast: bf16 scores would round by up to 0.125 at |s| ~ 16 (SDPA accumulates in fp32 too).
    B, H, T, D = q.shape
    K, S1 = k.shape[1], sk.shape[2]
    Hg = H // K  # query heads per kv head: head h reads kv head h // Hg
    with torch.autocast(q.device.type, enabled=False):
        qg = q.float().reshape(B, K, Hg * T, D) * D ** -0.5  # (B, K, Hg*T, D)
        qs = qg.transpose(0, 1).reshape(1, K, B * Hg * T, D)  # (1, K, B*Hg*T, D): every row's queries, one batch
        s_shared = (qs @ sk.float().transpose(-1, -2)).view(K, B, Hg * T, S1).transpose(0, 1)  # (B, K, Hg*T, S1)
        s_own = qg @ k.float().transpose(-1, -2)  # (B, K, Hg*T, S)
        own = mask.unsqueeze(2).expand(B, 1, Hg, T, mask.shape[-1]).reshape(B, 1, Hg * T, -1)  # (B, 1, Hg*T, S)
        p = torch.cat([s_shared, s_own.masked_fill(~own, float("-inf"))], -1).softmax(-1)  # (B, K, Hg*T, S1+S)
        ps = p[..., :S1].transpose(0, 1).reshape(1, K, B * Hg * T, S1)  # (1, K, B*Hg*T, S1)
        y = (ps @ sv.float()).view(K, B, Hg * T, D).transpose(0, 1) + p[..., S1:] @ v.float()  # (B, K, Hg*T, D)
    return y.reshape(B, H, T, D).to(q.dtype)  # (B, H, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer, arXiv 2002.05202)."""
    def __init__(self, cfg):
        super().__init__()
        C, Fd, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, Fd, bias=b)
        self.up_proj = nn.Linear(C, Fd, bias=b)
        self.down_proj = nn.Linear(Fd, C, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, past=None, return_kv=False):
        """(B, T, C) -> (B, T, C), or with return_kv ((B, T, C), this layer's (k, v)); see Attention.forward."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, past, return_kv)
        a, kv = a if return_kv else (a, None)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, kv) if return_kv else x


class Decoder(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, layers, final norm."""
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build_mask(valid, pos, T):
    """(B, 1, T, S) bool: query i (at index pos+i) sees key j iff j <= pos+i and key j is a real token."""
    # Explicit because SDPA's is_causal is top-left aligned, wrong when T != S. A padding query sees its own
    # key too, so no row is all-False (which would make SDPA return NaN); its output is never used.
    S = pos + T
    j = torch.arange(S, device=valid.device)
    qi = pos + torch.arange(T, device=valid.device)[:, None]  # (T, 1)
    return ((j <= qi) & valid[:, None, :S] | (j == qi))[:, None]  # (B, 1, T, S)


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # training flag: recompute each block in backward to save memory

    def forward_hidden(self, input_ids, positions=None, attn_mask=None, cache=None, past=None, return_kv=False):
        """Final-normed hidden states (B, T, C); `forward` applies lm_head. grpo.py chunks lm_head itself."""
        # positions (B, T): per-row RoPE positions; default from attn_mask (left padding) or 0..T-1.
        # attn_mask (B, T) bool: which input tokens are real; (B, S0+T) with `past`, covering its S0 keys first.
        # cache: a KVCache this call appends to (sample.py), in place.
        # past: a list of one (k, v) per layer, each (B, K, S0, D) and already RoPE-rotated, of S0 earlier
        # positions this call's queries attend to before their own tokens; a plain input, never written, so
        # autograd flows into whatever produced it (grpo.py shares one prompt forward among its G rows this way).
        # return_kv: return (h, kv), kv a list of this call's (k, v) per layer, each (B, K, T, D): a later `past`.
        B, T = input_ids.shape
        S0 = 0 if past is None else past[0][0].shape[2]
        if past is not None:
            if cache is not None:
                raise ValueError("pass either a KVCache or past, not both")
            if attn_mask is None:
                attn_mask = torch.ones(B, S0 + T, dtype=torch.bool, device=input_ids.device)  # (B, S0+T)
            if attn_mask.shape != (B, S0 + T):
                raise ValueError(f"with past, attn_mask must be (B, S0+T) = {(B, S0 + T)}, "
                                 f"got {tuple(attn_mask.shape)}")
        if positions is None:
            if attn_mask is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
            else:
                # a row's real tokens are numbered 0, 1, ... from its first one, past included, so a call with
                # past gets exactly the positions these tokens have in one forward of past + input
                positions = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)[:, S0:]  # (B, T)
        if cache is not None:
            cache.valid[cache.rows, cache.pos:cache.pos + T] = True if attn_mask is None else attn_mask
            mask = build_mask(cache.valid[cache.rows], cache.pos, T)
        elif attn_mask is not None:
            mask = build_mask(attn_mask, S0, T)  # (B, 1, T, S0+T), from the valid flags: never from token ids
        else:
            mask = None
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        kv = []
        for i, block in enumerate(self.model.layers):
            p = None if past is None else past[i]
            if cache is None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: past's tensors get their gradients, and the (x, kv) tuple output is fine
                x = checkpoint(block, x, cos, sin, mask, None, i, p, return_kv, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, p, return_kv)
            if return_kv:
                x, layer_kv = x
                kv.append(layer_kv)
        if cache is not None:
            cache.pos += T
        h = self.model.norm(x)
        return (h, kv) if return_kv else h

    def forward(self, input_ids, positions=None, attn_mask=None, cache=None):
        """Logits (B, T, V)."""
        return self.logits(self.forward_hidden(input_ids, positions, attn_mask, cache))

    def logits(self, h):
        """lm_head of hidden states (..., C) -> (..., V); fp32 under autocast (train.py's dtype policy)."""
        # Under bf16 autocast lm_head would round the logits to bf16, whose step is 0.125 for logits in [16, 32):
        # log-probs off by up to ~0.1 nats, ratio noise as large as the clip range. With fp32 weights (autocast's
        # master weights) this costs only the matmul in fp32, and a (rows, V) fp32 output that .float() made
        # anyway.
        if torch.is_autocast_enabled(h.device.type):
            with torch.autocast(h.device.type, enabled=False):
                return F.linear(h.float(), self.lm_head.weight.float())  # (..., V) fp32
        return self.lm_head(h)  # (..., V)

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, path_or_repo_id, device=None, dtype=None):
        """Load a Hugging Face checkpoint dir or hub repo id; dtype defaults to float32 (fp32 master weights)."""
        path = resolve_checkpoint(path_or_repo_id)
        try:
            cfg = ModelConfig.from_dict(read_json(os.path.join(path, "config.json")))
        except KeyError as e:
            raise ValueError(f"{os.path.join(path, 'config.json')}: missing required key {e}") from None
        dtype = dtype or torch.float32
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = load_safetensors(path, expected, cfg.tie_word_embeddings, device, dtype)
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced each Parameter separately
        model.inv_freq = rope_inv_freq(cfg, device)
        return model

    def save_pretrained(self, out_dir, dtype=None):
        """Write config.json + model.safetensors in Hugging Face layout; each file atomically (temp + rename)."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]  # tied: stored once, as Hugging Face does
        dt = next(iter(state.values())).dtype
        raw = dict(self.config.raw, torch_dtype=str(dt).removeprefix("torch."))
        raw["dtype"] = raw["torch_dtype"]
        tmp = os.path.join(out_dir, ".model.safetensors.tmp")
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates 0600; vLLM or a colleague must read it, as open()
        os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
        write_json_atomic(os.path.join(out_dir, "config.json"), raw)


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def current_umask():
    """The process umask, read without changing it where Linux says it (os.umask alone must set it to read it)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


def is_hub_id(path_or_repo_id):
    """True for 'org/name' that is not a local path: resolve_checkpoint would download it."""
    s = os.path.expanduser(str(path_or_repo_id))
    return not (s.startswith((os.sep, ".", "~")) or s.count("/") != 1 or os.path.exists(s))


def resolve_checkpoint(path_or_repo_id):
    """A local directory as is; 'org/name' is downloaded from the Hugging Face Hub (weights, configs, tokenizer)."""
    s = os.path.expanduser(str(path_or_repo_id))
    if os.path.isdir(s):
        return s
    if not is_hub_id(s):
        raise FileNotFoundError(f"{path_or_repo_id}: model directory not found (and not a hub repo id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(s, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated...: one message, not a stack of them
        raise OSError(f"could not fetch {s!r} from the Hugging Face Hub "
                      f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                      "pass a local checkpoint directory instead") from None


def load_safetensors(path, expected, tied, device, dtype):
    """Read model.safetensors or the shards of model.safetensors.index.json, checking names and shapes."""
    # Tensors are read one by one straight to `device` and cast, so the weights exist once (plus one tensor).
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        files = {}
        for name, shard in read_json(index).get("weight_map", {}).items():
            files.setdefault(os.path.join(path, shard), []).append(name)
    elif os.path.isfile(single):
        files = {single: None}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state, where = {}, {}
    for file, names in files.items():
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: weight shard listed in model.safetensors.index.json is missing")
        try:
            with safe_open(file, framework="pt", device=str(device or "cpu")) as f:
                for name in names or f.keys():
                    if tied and name == "lm_head.weight":
                        continue  # some tied checkpoints store it anyway; the embedding is the truth
                    if name not in expected:
                        raise ValueError(f"{file}: unexpected tensor {name!r} "
                                         f"(not in this {len(expected)}-tensor model)")
                    t = f.get_tensor(name)
                    if t.shape != expected[name]:
                        raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, "
                                         f"config.json implies {tuple(expected[name])}")
                    state[name], where[name] = t.to(dtype), file
        except ValueError:
            raise
        except Exception as e:  # safetensors' own errors for truncated / corrupt files
            raise ValueError(f"{file}: corrupt or unreadable safetensors file ({type(e).__name__}: {e})") from None
    if tied:
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensor {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return state
