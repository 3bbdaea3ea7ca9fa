"""LoRA: low-rank adapters on a model.py Transformer, saved and loaded in PEFT's own format.

    y = W x + b + (alpha / r) * B A dropout(x)          (Hu et al., arXiv 2106.09685, eq. 3)

A (r, in) starts as PEFT's default (kaiming_uniform_, a=sqrt(5)) and B (out, r) at zero, so a fresh adapter
gives exactly the base model's output. Only A and B train; the base weights are frozen, so the optimizer holds
2 x (in + out) x r numbers per adapted layer instead of 2 x in x out, and GRPO's KL reference is the same model
with the adapters switched off (`adapters_off`): no second copy of the weights.

Names: each adapted nn.Linear keeps its Hugging Face name and gains `lora_A` / `lora_B` children, so the base
weights still load and save as before, and an adapter tensor's PEFT name is its name here with the prefix
`base_model.model.` (PEFT drops the adapter name "default" on save): no rename table.
Legend: r rank, I in features, O out features, L layers.
"""
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Transformer, write_json_atomic

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias, frozen) plus a trainable low-rank update (alpha / r) B A."""

    def __init__(self, base, r, alpha, dropout=0.0, generator=None):
        with torch.device("meta"):  # the base's own tensors are moved in below, nothing is allocated twice
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt)  # weight (r, I)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt)  # weight (O, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False inside adapters_off(): the base layer alone

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., O)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # (..., I) -> (..., r) -> (..., O)

    def merged_weight(self, always=False):
        """W + (alpha / r) B A (O, I), as the adapted layer computes it (eval mode); W alone when switched off."""
        if not (self.enabled or always):
            return self.weight
        return self.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (O, r) @ (r, I)


def lora_layers(model):
    """(name, LoRALinear) of every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def check_settings(r, alpha, dropout, targets):
    """Raise ValueError naming the first bad LoRA setting."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {r!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"LoRA target {bad[0] if bad else '(none)'!r} is not one of {', '.join(TARGETS)} "
                         "(lm_head and the embeddings are never adapted)")


def add_lora(model, r, alpha, dropout=0.0, targets=TARGETS, seed=0, names=None):
    """Replace each target nn.Linear of model (in place) by a LoRALinear, freeze everything else; returns model."""
    # targets: Hugging Face module names (q_proj, ..., down_proj); every layer's modules of those names are adapted,
    # or with names (full module names, e.g. from a PEFT file) exactly those. seed: the A matrices are drawn from
    # their own generator, so every rank of a torchrun starts with the same adapters, whatever its global RNG.
    targets = tuple(targets)
    check_settings(r, alpha, dropout, targets)
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters")
    modules = dict(model.named_modules())
    for n in sorted(set(names or ()) - set(modules)):
        raise ValueError(f"module {n!r} does not exist in this model")
    model.requires_grad_(False)
    dev = model.lm_head.weight.device
    g = torch.Generator(dev).manual_seed(seed) if dev.type != "meta" else None  # meta: shapes only (fsdp.py)
    for name, mod in modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and type(mod) is nn.Linear and (names is None or name in names):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoRALinear(mod, r, alpha, dropout, g))
    for _, m in lora_layers(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=targets)
    return model


@contextmanager
def adapters_off(model):
    """While open, every LoRA layer computes its base layer alone: the base model's outputs, same weights."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@torch.no_grad()
def merge(model):
    """Fold every adapter into its base weight, in place, and turn each LoRALinear back into a plain nn.Linear."""
    # Done once: afterwards the model has no adapters left to fold (for export: a plain Hugging Face model).
    for name, m in lora_layers(model):
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.merged_weight(always=True), requires_grad=False)  # (O, I), also if off
        plain.bias = m.bias
        parent, leaf = (model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[-1])
        setattr(parent, leaf, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ----------------------------------------------------------------------------- PEFT's format

def adapter_state(model):
    """{PEFT name: tensor} of the adapters, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return {PEFT_PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model, out_dir, base_model_name_or_path=""):
    """Write adapter_config.json and adapter_model.safetensors, as peft.PeftModel.save_pretrained does."""
    from safetensors.torch import save_file
    c = model.lora_config
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "." + ADAPTER_WEIGHTS + ".tmp")
    save_file(adapter_state(model), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, ADAPTER_WEIGHTS))
    write_json_atomic(os.path.join(out_dir, ADAPTER_CONFIG), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c["r"], "lora_alpha": c["alpha"],
        "lora_dropout": c["dropout"], "target_modules": sorted(c["targets"]), "bias": "none",
        "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}})


def read_adapter_config(adapter_dir):
    """The LoRA settings of a PEFT adapter dir: dict(r, alpha, dropout, targets, base); ValueError if unsupported."""
    from model import read_json
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    c = read_json(path)
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r} is not LORA")
    unsupported = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                   "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                   "exclude_modules": None, "layer_replication": None, "target_parameters": None, "lora_bias": False}
    for k, ok in unsupported.items():
        if c.get(k, ok) not in (ok, None, {}, [], False):
            raise ValueError(f"{path}: {k}={c[k]!r} is not supported (only plain LoRA)")
    if str(c.get("init_lora_weights", True)).lower().startswith(("pissa", "olora", "loftq", "corda")):
        raise ValueError(f"{path}: init_lora_weights={c['init_lora_weights']!r} changes the base weights; "
                         "convert it to a plain LoRA adapter with PEFT first")
    targets = c.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    return dict(r=c.get("r"), alpha=c.get("lora_alpha"), dropout=c.get("lora_dropout") or 0.0,
                targets=tuple(targets), base=c.get("base_model_name_or_path") or "")


def load_adapter(model, adapter_dir):
    """Add the adapters of a PEFT LoRA dir (ours or PEFT's) to model, in place; ValueError on any mismatch."""
    # The layers adapted are those the file holds tensors for, so PEFT's "all-linear", regex or full-name
    # target_modules load too (as long as every adapted layer is one of TARGETS).
    from safetensors import safe_open
    c = read_adapter_config(adapter_dir)
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = {k: k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.") for k in f.keys()}
    names = {n[len(PEFT_PREFIX):].split(".lora_")[0] for n in keys.values() if n.startswith(PEFT_PREFIX)}
    try:
        add_lora(model, c["r"], c["alpha"], c["dropout"], sorted({n.rsplit(".", 1)[-1] for n in names}), names=names)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (the adapter was trained on another base model?)") from None
    expected = {PEFT_PREFIX + k: v for k, v in model.state_dict().items() if ".lora_" in k}
    state = {}
    with safe_open(path, framework="pt", device=str(model.lm_head.weight.device)) as f:
        for k, name in keys.items():
            if name not in expected:
                raise ValueError(f"{path}: tensor {k!r} matches no adapted layer of this model "
                                 f"(targets {', '.join(c['targets'])}, {model.config.num_hidden_layers} layers)")
            t = f.get_tensor(k)
            if t.shape != expected[name].shape:
                raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, this base model needs "
                                 f"{tuple(expected[name].shape)}: the adapter was trained on another base model")
            state[name[len(PEFT_PREFIX):]] = t.to(expected[name].dtype)
    missing = [k for k in expected if k[len(PEFT_PREFIX):] not in state]
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=False)
    return model


def load_adapted(adapter_dir, base=None, device=None):
    """A Transformer with the adapter of adapter_dir on its base (default: the dir's base_model_name_or_path)."""
    base = base or read_adapter_config(adapter_dir)["base"]
    if not base:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path; pass the base model")
    return load_adapter(Transformer.from_pretrained(base, device=device), adapter_dir)
