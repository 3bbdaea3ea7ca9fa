"""Helpers for data-parallel ranks (torchrun, torch.distributed): start and leave the process group, sums and
maxima over ranks, gathering records, and fail_together, which ends every rank with the failing rank's message.

With one process (world 1) each helper is the identity or a no-op, so the training code reads the same for both.
"""
import os
import sys
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist

from checkpoint import last_checkpoint
from config import BadInput


def world_and_rank():
    """(world size, this rank), as torchrun sets them in WORLD_SIZE and RANK; (1, 0) for one process."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def start_ranks(device, world, out, group=False):
    """Join the process group (NCCL on CUDA, gloo on CPU); returns rank 0's run dir, which every rank then uses."""
    # group: join it even with 1 rank (--fsdp under torchrun --nproc_per_node 1 shards over a group of one)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 and not group:
        return out
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shared = [out]
    dist.broadcast_object_list(shared, src=0)  # a default run dir's name holds a timestamp, which ranks differ in
    return shared[0]


def finish(world):
    """Leave the process group cleanly, so torchrun sees every rank exit 0."""
    if dist.is_initialized():
        # together: no rank tears down gloo while another still uses it (rank 0 writing its plot, say)
        dist.barrier()
        dist.destroy_process_group()


def dist_device():
    """Where collectives' tensors must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values, world):
    """Sum a dict of floats over ranks (metrics are global means, not rank 0's)."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=dist_device())
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def all_max(values, world):
    """The maximum over ranks of each float in a list."""
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        t = t.to(dist_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_or(flags, world):
    """A (K,) bool tensor OR-ed over ranks, where each rank set only its own entries."""
    t = flags.double()
    if world > 1:
        t = t.to(dist_device())
        dist.all_reduce(t)
    return t.cpu().bool()


def sum_grads(params, world):
    """Sum each parameter's gradient over ranks in place; a rank without one (it had no rows) adds zeros."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:  # it still takes part in every all_reduce, or the others would wait for it
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def gather_records(rows, world, order=lambda r: r["index"]):
    """Every rank's records (dicts), sorted by order(record): by default their "index"."""
    if world == 1:
        return rows
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return sorted((r for g in gathered for r in g), key=order)


def oom_advice(cfg, step):
    """The one line for running out of memory: which settings shrink it, and what there is to resume from."""
    return (f"out of memory at step {step}: lower --micro-batch (now {cfg.micro_batch}), --max-new-tokens, "
            f"--group-size or --prompts-per-step, or pass --grad-ckpt; {last_checkpoint(cfg)}")


@contextmanager
def fail_together(cfg, world, step):
    """Run a block that every rank runs; if it fails on any rank, every rank exits with that rank's message."""
    # Without this, one rank's error (a non-finite loss, a reward function raising, an OOM) ends that rank while
    # the others wait for it in their next all_reduce: a hang, or under torchrun a SIGTERM with no message. Here
    # every rank leaves the block, then all exchange one flag (a tiny all_reduce, before any other collective),
    # so all learn of the failure at the same point and exit with the same line. One process: the exception goes
    # on to train.main, which prints the known ones (BadInput, non-finite values, out of memory) as one line.
    if world == 1:
        yield
        return
    err = None
    try:
        yield
    except (Exception, SystemExit) as e:  # SystemExit too: a forked stage that exits must not leave the others
        err = e
    # known failures get their one line; anything else is a bug, whose traceback is printed where it happened
    known = isinstance(err, (FloatingPointError, torch.OutOfMemoryError, BadInput, SystemExit))
    if err is None:
        msg = None
    elif isinstance(err, torch.OutOfMemoryError):
        msg = oom_advice(cfg, step)
    elif isinstance(err, SystemExit):
        msg = str(err.code)
    elif known:
        msg = str(err)
    else:
        msg = f"{type(err).__name__}: {err} (traceback above)"
        traceback.print_exception(err)  # on the rank that failed, before every rank exits
    if err is not None:
        # free the failed stage's tensors (its frames' locals) back to the allocator: after an OOM, the exchange
        # below must not run out of memory itself
        traceback.clear_frames(err.__traceback__)
    flag = torch.tensor([msg is not None], dtype=torch.int32, device=dist_device())
    dist.all_reduce(flag)  # how many ranks failed
    if flag.item():
        msgs = [None] * world
        dist.all_gather_object(msgs, msg)
        r = next(i for i, m in enumerate(msgs) if m is not None)
        # every rank prints, then waits for the others, so that none exits (and has torchrun stop the rest)
        # before all have said why
        print(f"train.py: error: rank {r} of {world} failed at step {step}: {msgs[r]}", file=sys.stderr, flush=True)
        dist.barrier()
        raise SystemExit(1)
