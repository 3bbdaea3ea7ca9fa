"""Sharded training with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) for train.py's --fsdp.

What is sharded, 1/N per rank between steps: the fp32 weights, their gradients (after the reduce), Adam's two
moments (they follow the parameters), and the frozen reference. What is gathered, and when:
  - `gathered(model)` all-gathers every block and the root once, and keeps them whole until it closes: around a
    whole rollout (a generate call, a whole game), a whole evaluation, and each forward/backward phase of a step
    (the reference's log-probs, pi_old's, one optimizer pass of the update). Inside it FSDP all-gathers nothing
    more, so ranks may run different numbers of decode steps or forwards (the update's are matched: below); it
    reshards on close. The cost: one whole fp32 copy of the weights per rank while it is open.
  - Each backward of the update reduce-scatters every unit's gradient into its shards as soon as that unit's part
    of the backward is done (FSDP2's post-backward hook), so a rank holds whole gradients only for the root unit
    and the block being reduced. The hook runs once per forward call of a unit, a count that must be the same on
    every rank: token_logprobs always makes its two forwards (fixed_forwards), and a rank with fewer
    micro-batches runs `zero_loss` backwards to match.
Mixed precision: no MixedPrecisionPolicy. Its param_dtype casts every parameter, the norms and lm_head included,
where train.py's dtype policy keeps fp32 weights under autocast with lm_head and log_softmax in fp32 and the
reference exact. So the shards, the gathered weights and the reduce-scatter are fp32 (reduce dtype fp32), and bf16
is the same autocast as without FSDP: the policy's two exactness rules hold as they do there (tests/test_fsdp.py).
Gradient scale: each rank's loss already carries the global normaliser (grpo.loss_normalizer), so the gradient
of the batch is the sum over ranks, as the DDP path's all_reduce sums; FSDP2 averages by default (a divide
factor of N), so every unit's factor is set to 1.
Parameters used outside a forward: grpo.token_logprobs multiplies by model.lm_head.weight itself, and sample.py
calls model.logits; inside `gathered` the root's parameters (embeddings, final norm, lm_head, tied or not) are the
whole tensors, so both read real weights, and their gradients reach the root's reduce-scatter.
Checkpoints are written whole (`whole_state`, `full_optimizer_state`): a plain Hugging Face dir and Adam's state
keyed as without FSDP, so a checkpoint resumes with or without FSDP and at any world size.
Needs torch >= 2.9.1 (MIN_TORCH).
"""
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist

import lora
from grpo import token_logprobs
from model import Transformer

# The oldest torch whose FSDP2 computes a correct gradient on gloo (docs/multi-gpu.md says why, version by version);
# the NCCL path makes the same calls and is held to the same minimum.
MIN_TORCH = (2, 9, 1)


def torch_version(v=None):
    """(major, minor, patch) of a torch version string, e.g. '2.13.0+cpu' -> (2, 13, 0)."""
    parts = (v or torch.__version__).split("+")[0].split(".")[:3]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def check_torch(v=None):
    """Raise ValueError naming the known FSDP2 bug of a torch older than MIN_TORCH."""
    if torch_version(v) < MIN_TORCH:
        raise ValueError(f"--fsdp needs torch >= {'.'.join(map(str, MIN_TORCH))}, this is {v or torch.__version__}: "
                         "torch 2.7 and 2.8's FSDP2 sums gradients over ranks where it should average them on gloo, "
                         "silently (pytorch#162338), and 2.5 and 2.6 fail at the first forward")


def fsdp_modules(model):
    """The model's FSDP units, root first: the whole model, then each decoder block."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model):
    """Whether model was sharded by `shard`."""
    return model is not None and bool(fsdp_modules(model))


def shard(model, device):
    """Shard model in place over all ranks: one FSDP unit per decoder block, one for the rest; returns model."""
    # the root unit holds the embeddings, the final norm and lm_head (tied or not)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # a tied lm_head shares the embeddings' unit
    register_fsdp_forward_method(model, "forward_hidden")  # grpo.py and sample.py call it, not forward
    # forward_hidden's keys/values are views (a transpose); nothing writes to them in place, which is what it warns of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # Whole until `gathered` closes: a reshard in the middle (after a forward or a backward) would all-gather again
    # on the next forward or backward, a collective that ranks running different numbers of forwards would not all
    # reach.
    model.set_reshard_after_backward(False)
    model.set_reduce_scatter_unused_params(True)  # a parameter without a gradient still sends its zeros
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)  # a sum over ranks, not a mean (see the top of this file)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


@contextmanager
def gathered(model):
    """While open, a sharded model holds whole weights (one all-gather per unit); a no-op for any other model."""
    # A collective: every rank opens it at the same point of the step. Running out of memory here (the whole
    # weights) is not exchanged by ranks.fail_together: that rank exits, and torchrun stops the others.
    mods = fsdp_modules(model) if model is not None else []
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()


def zero_loss(model):
    """A loss of exactly 0 with a gradient path through every unit, in the update's two forwards (token_logprobs)."""
    # A rank with fewer micro-batches than another runs these, so that every rank's backwards reduce-scatter the
    # same units the same number of times.
    dev = model.lm_head.weight.device
    ids, real = torch.zeros(1, 1, dtype=torch.long, device=dev), torch.ones(1, 1, dtype=torch.bool, device=dev)
    return token_logprobs(model, ids, real, ids, real, fixed_forwards=True).sum() * 0.0


def whole(t):
    """A DTensor's full value (a collective), e.g. a grad norm over every rank's shards; any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _whole(t, cache, keep):
    """A DTensor's full value on CPU where keep (a collective: every rank calls it in the same order), else None."""
    from torch.distributed.tensor import DTensor
    if id(t) not in cache:  # a tied weight is one Parameter under two names: gathered once
        full = t.full_tensor() if isinstance(t, DTensor) else t
        cache[id(t)] = full.detach().cpu() if keep else None  # one whole tensor at a time on the ranks that drop it
    return cache[id(t)]


@torch.no_grad()
def whole_state(model):
    """A sharded model's state dict, every tensor whole on CPU, on rank 0 (None elsewhere); every rank calls it."""
    cache, keep = {}, dist.get_rank() == 0
    state = {k: _whole(v, cache, keep) for k, v in model.state_dict(keep_vars=True).items()}
    return state if keep else None


def plain_model(model, state):
    """A plain Transformer (LoRA layers too) of a sharded model's structure holding `state` (whole_state's)."""
    with torch.device("meta"):
        plain = Transformer(model.config)
    if hasattr(model, "lora_config"):
        c = model.lora_config
        lora.add_lora(plain, c["r"], c["alpha"], c["dropout"], c["targets"],
                      names={n for n, _ in lora.lora_layers(model)})
    plain.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.inv_freq = model.inv_freq.detach().cpu()
    return plain


def full_optimizer_state(opt):
    """opt.state_dict() with every sharded moment whole on CPU, on rank 0 (None elsewhere): a run without FSDP's."""
    cache, keep, sd = {}, dist.get_rank() == 0, opt.state_dict()
    sd["state"] = {i: {k: _whole(v, cache, keep) if torch.is_tensor(v) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd if keep else None


def load_optimizer_state(opt, sd):
    """Load a saved optimizer state (whole tensors, as full_optimizer_state or a run without FSDP writes it)."""
    # Each moment is cut to this rank's shard of its parameter, so a checkpoint of any world size loads here.
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                    for k, v in st.items()}
    opt.load_state_dict({**sd, "state": state})
