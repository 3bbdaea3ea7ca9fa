"""What a run reads and writes on disk: the run dir, models to load, step-N/ checkpoints (atomic, rotated), the
state a resumed run continues from, and the one line a Ctrl-C prints.

A run dir holds config.json, metrics.jsonl, rollouts.jsonl, eval.jsonl, eval/step-N.jsonl, curves.png and step-N/
dirs; a step-N/ is a Hugging Face model dir (with LoRA a PEFT adapter dir) plus the tokenizer files and
trainer_state.pt.
"""
import copy
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

import judge
import lora
from config import IDENTITY, BadInput, TrainConfig, lora_targets
from model import Transformer, resolve_checkpoint
from tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
CHECKPOINT_FILES = ("tokenizer.json", "trainer_state.pt")  # a complete step-N/ holds these, and either
WEIGHT_FILES = (("config.json", "model.safetensors"), (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS))  # pair


# ----------------------------------------------------------------------------- the run dir and its records

def check_out_dir(out):
    """Create the run dir now and prove it writable, so a bad --out fails before anything loads."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"--out {out}: cannot write there ({e.strerror})") from None


def holds_run(d):
    """Whether a dir holds (part of) a training run: its records, a step-N/ dir, or a run's config.json."""
    if not os.path.isdir(d):
        return False
    if any(os.path.isfile(os.path.join(d, f)) for f in ("metrics.jsonl", "eval.jsonl")) or \
            glob.glob(os.path.join(d, "step-*")):
        return True
    try:  # a model dir has a config.json too: a run's is TrainConfig's
        return "group_size" in json.load(open(os.path.join(d, "config.json")))
    except (OSError, ValueError, TypeError):
        return False


def prepare_out(cfg, resumed, rank):
    """The run dir (--out, or a new runs/TASK-TIMESTAMP), checked before anything loads; rank 0 creates it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = cfg.out or os.path.join("runs", f"{cfg.task}-{'eval-' if cfg.eval_only else ''}{stamp}")
    if cfg.eval_only and any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "eval.jsonl")):
        raise BadInput(f"--out {out} already holds a run's metrics or evals; --eval-only writes to a new dir")
    if not resumed and not cfg.eval_only:
        check_new_run_dir(out)
    if rank == 0:
        check_out_dir(out)
    return out


def check_new_run_dir(out):
    """A new run never writes over another one: its history would be cut, and a later --resume would mix the two."""
    if holds_run(out):
        ck = checkpoints(out)
        raise BadInput(f"--out {out} already holds a run; continue it with --resume {out}, or pass a new --out" if ck
                       else f"--out {out} already holds a run with no checkpoint to resume; delete it or pass a new "
                       "--out")


def read_jsonl(path):
    """The records of a JSONL file, or [] when there is none."""
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.isfile(path) else []


def append_jsonl(path, record):
    """One more line of a JSONL record file (metrics.jsonl, eval.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path, last_step):
    """Drop records past last_step (a resumed run rewrites them), and a last line that a crash cut short."""
    if os.path.isfile(path):
        # a line without its newline is the torn end of a write that a crash cut (rollouts.jsonl writes big ones)
        keep = [line for line in open(path)
                if line.strip() and line.endswith("\n") and json.loads(line)["step"] <= last_step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def start_records(cfg, start):
    """Records past the checkpoint came from steps about to be redone: drop them; write the run's config.json."""
    truncate_jsonl(os.path.join(cfg.out, "metrics.jsonl"), start)
    truncate_jsonl(os.path.join(cfg.out, "eval.jsonl"), start)
    truncate_jsonl(os.path.join(cfg.out, "rollouts.jsonl"), start)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=2)


# ----------------------------------------------------------------------------- models to load

def resolve_model(cfg, resumed):
    """--model as a local dir (downloaded if a hub id), or one line saying which model could not be found."""
    try:
        path = resolve_checkpoint(cfg.model)
    except OSError as e:
        if resumed:  # the policy comes from the checkpoint; --model is the reference, and it may have moved
            raise BadInput(f"the reference model (the run's initial weights, --model): {e}; if it moved, pass "
                           "--model NEW_PATH with --resume") from None
        raise BadInput(f"--model: {e}") from None
    if holds_run(path):  # a run dir's config.json is the run's, not a model's
        ck = checkpoints(path)
        raise BadInput(f"--model {cfg.model} is a run dir, not a model: pass one of its checkpoints"
                       + (f", e.g. --model {ck[-1]}" if ck else " (it has none yet)"))
    return path


# config keys that a re-save or a move may rewrite without changing the model
VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "base_model_name_or_path")


def fingerprint(path):
    """A model dir's identity (a sha256 hex digest), wherever it lies, from its config and its weight files."""
    # Hashes its config and, per weight file, the header and the first and last 64 KiB of the tensors (cheap for any
    # size, and changed by any real change of the weights' layout or values).
    h = hashlib.sha256()
    for name in ("config.json", lora.ADAPTER_CONFIG):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            kept = {k: v for k, v in json.load(open(f)).items() if k not in VOLATILE}
            h.update(json.dumps(kept, sort_keys=True).encode())
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")  # safetensors: an 8-byte header length, the JSON header, data
            h.update(fh.read(n))
            h.update(fh.read(65536))
            fh.seek(max(size - 65536, 8 + n))
            h.update(fh.read())
    return h.hexdigest()


def resolve_judge(cfg):
    """--judge as a local dir (downloaded if a hub id), or one line saying which judge could not be found."""
    try:
        return resolve_checkpoint(cfg.judge)
    except OSError as e:
        raise BadInput(f"--judge: {e}") from None


def load_judge(cfg, judge_dir, device, dtype):
    """The frozen judge of --judge (judge.py), or one line saying why it cannot be loaded."""
    try:
        return judge.Judge(judge_dir, rubric=cfg.judge_rubric, max_tokens=cfg.judge_max_tokens, device=device,
                           dtype=dtype)
    except (OSError, ValueError) as e:
        raise BadInput(f"could not load the judge {cfg.judge!r}: {e}") from None


def load_reference(cfg, model_dir, device):
    """The frozen reference: --model's weights (the run's initial ones), in eval mode and without gradients."""
    try:
        return load_model(model_dir, device).requires_grad_(False).eval()
    except (OSError, ValueError) as e:
        raise BadInput(f"could not load the reference model {cfg.model!r} (the run's initial weights, --model): "
                       f"{e}") from None


def load_model(path, device):
    """A Hugging Face model dir, or a PEFT LoRA adapter dir (ours: step-N/ of a LoRA run) merged into its base."""
    if os.path.isfile(os.path.join(path, lora.ADAPTER_CONFIG)):
        return lora.merge(lora.load_adapted(path, device=device)).requires_grad_(True)
    return Transformer.from_pretrained(path, device=device)


def load_policy(cfg, resumed, model_dir, device):
    """(tokenizer, {name: bytes} of its files, the policy) from the checkpoint a run resumes, or from --model."""
    # With LoRA the policy is --model's weights, frozen, with the adapters (the checkpoint's, or fresh ones) on them.
    src = resumed.dir if resumed else model_dir
    try:
        tok = Tokenizer(src)
        tok_files = read_tokenizer_files(tok.path)
        if not cfg.lora_rank:
            return tok, tok_files, load_model(src, device)
        model = load_model(model_dir, device)
        if resumed:
            lora.load_adapter(model, src)
        else:  # seeded apart from the global RNG: every rank starts from the same adapters
            lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, dropout=cfg.lora_dropout, targets=lora_targets(cfg),
                          seed=cfg.seed)
        return tok, tok_files, model
    except (OSError, ValueError) as e:
        raise BadInput(f"could not load model {src!r}: {e}") from None


def read_tokenizer_files(src):
    """{name: bytes} of the tokenizer and chat-template files in src; raises if it has no tokenizer.json."""
    # Read once at start-up and written into every checkpoint, because keep-last rotation may delete the
    # checkpoint a run resumed from.
    files = {}
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)):
            with open(os.path.join(src, f), "rb") as fh:
                files[f] = fh.read()
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"{src}: no tokenizer.json to put beside the checkpoints' weights")
    return files


# ----------------------------------------------------------------------------- checkpoints and resume

def checkpoints(run_dir):
    """Complete checkpoint dirs of a run, oldest first."""
    # complete: renamed into place, holding every CHECKPOINT_FILES and the weights (a Hugging Face model, or with
    # LoRA a PEFT adapter)
    def has(d, names):
        return all(os.path.isfile(os.path.join(d, f)) for f in names)
    ck = [d for d in glob.glob(os.path.join(run_dir, "step-*")) if d.rsplit("-", 1)[1].isdigit()
          and has(d, CHECKPOINT_FILES) and any(has(d, pair) for pair in WEIGHT_FILES)]
    return sorted(ck, key=lambda d: int(d.rsplit("-", 1)[1]))


def last_checkpoint(cfg):
    """What a failed run leaves to resume from, for its last line."""
    ck = checkpoints(cfg.out)
    return f"resume from {ck[-1]} with --resume {cfg.out}" if ck else "no checkpoint was written yet"


@dataclass
class Resumed:
    """Where a resumed run picks up: its config (saved, overridden by the flags given now) and last checkpoint."""
    cfg: TrainConfig
    step: int  # the last completed step
    dir: str  # the step-N/ dir
    state: dict  # trainer_state.pt: step, optimizer, config, world_size, data_position, rng


def read_resume(cfg, given):
    """The run --resume names, at its last complete checkpoint, or one line saying why it cannot resume."""
    if not os.path.isdir(cfg.resume):
        raise BadInput(f"--resume {cfg.resume}: no such run dir")
    ck = checkpoints(cfg.resume)
    if not ck:
        raise BadInput(f"--resume {cfg.resume}: no complete checkpoint there (a step-N/ dir holding "
                       f"{', '.join(CHECKPOINT_FILES)} and a model or a LoRA adapter)")
    try:  # mmap: the config is read now, Adam's moments only when loaded
        state = torch.load(os.path.join(ck[-1], "trainer_state.pt"), map_location="cpu", weights_only=False,
                           mmap=True)
    except Exception as e:  # a truncated or foreign file: name it
        raise BadInput(f"--resume {cfg.resume}: cannot read {ck[-1]}/trainer_state.pt "
                       f"({type(e).__name__}: {e})") from None
    names = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in state["config"].items() if k in names})
    for n in IDENTITY:  # what the run is cannot change under it
        if n in given and getattr(cfg, n) != getattr(saved, n):
            flag = "--" + n.replace("_", "-")
            raise BadInput(f"--resume {cfg.resume}: {flag} {getattr(cfg, n)!r} differs from the run's "
                           f"{getattr(saved, n)!r}; a run keeps its task, task options, seed, base model and LoRA "
                           "settings: start a new run with --out to change them")
    merged = TrainConfig(**{n: getattr(cfg if n in given else saved, n) for n in names})
    merged.out = cfg.resume
    return Resumed(cfg=merged, step=state["step"], dir=ck[-1], state=state)


def base_model_of(resumed, model_dir):
    """The fingerprint of the run's base model: the checkpoint's, or (a new run, an older checkpoint) model_dir's."""
    return (resumed.state.get("base_model") if resumed else None) or (fingerprint(model_dir) if model_dir else None)


def check_resume(cfg, resumed, model_dir):
    """The checkpoint's kind (full or LoRA), its adapter's settings and the base model must be the run's."""
    saved = resumed.state.get("base_model")  # None in checkpoints older than the fingerprint
    if model_dir and saved and fingerprint(model_dir) != saved:
        raise BadInput(f"--resume {cfg.resume}: --model {cfg.model} is not the run's base model (its config or "
                       "weights differ from those the run started from); pass the run's own base model, wherever it "
                       "lies now")
    is_lora = os.path.isfile(os.path.join(resumed.dir, lora.ADAPTER_CONFIG))
    if bool(cfg.lora_rank) != is_lora:
        raise BadInput(f"--resume {cfg.resume}: {resumed.dir} is {'a LoRA adapter' if is_lora else 'a full model'}; "
                       f"resume it {'with' if is_lora else 'without'} --lora-rank")
    if cfg.lora_rank:  # the adapter on disk defines the layers and the optimizer's state
        a = lora.read_adapter_config(resumed.dir)
        if (a["r"], float(a["alpha"]), float(a["dropout"]), set(a["targets"])) != \
                (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, set(lora_targets(cfg))):
            raise BadInput(f"--resume {cfg.resume}: its adapter has r={a['r']}, alpha={a['alpha']}, "
                           f"dropout={a['dropout']}, targets {','.join(a['targets'])}; LoRA settings cannot change "
                           "on resume")


def save(step, *, cfg, model, opt_state, tok_files, base_model, rank, world, log):
    """Write step-N/ atomically (a temp dir renamed into place) and delete the checkpoints past --keep-last."""
    # step-N/ = a Hugging Face model dir (with LoRA: a PEFT adapter dir, and at the end also merged/, the merged Hugging
    # Face model) + the tokenizer + trainer_state.pt. A crash mid-write leaves only .step-N.tmp, which resume ignores;
    # older checkpoints are deleted only once the new one is complete, so there is always one to resume from.
    # model: a plain model (with --fsdp, fsdp.plain_model's whole copy on rank 0); opt_state: the optimizer's
    # state_dict with whole tensors, the same layout with or without FSDP
    if rank == 0:
        final, tmp = os.path.join(cfg.out, f"step-{step}"), os.path.join(cfg.out, f".step-{step}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dirs = [tmp]
        if cfg.lora_rank:
            base = os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # loadable from anywhere
            lora.save_adapter(model, tmp, base)
            if step == cfg.steps:  # the deliverable: a plain model that transformers and vLLM load without peft
                lora.merge(copy.deepcopy(model)).save_pretrained(os.path.join(tmp, "merged"))
                dirs.append(os.path.join(tmp, "merged"))
        else:
            model.save_pretrained(tmp)
        for d, (name, data) in itertools.product(dirs, tok_files.items()):
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        torch.save({"step": step, "optimizer": opt_state, "config": asdict(cfg), "world_size": world,
                    "data_position": step * cfg.prompts_per_step, "rng": {"torch": torch.get_rng_state()},
                    "base_model": base_model},  # fingerprint(): a resume checks --model against it
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(cfg.out)[:-cfg.keep_last]:
            shutil.rmtree(old)
        log(f"saved {final}")
    # with world > 1 the caller's fail_together is the barrier after this: every rank waits there for rank 0


def interrupted(cfg, step, rank=0, started=True):
    """Ctrl-C: one line saying what is safe and how to go on (exit code 130, as a shell reports SIGINT)."""
    # Nothing is lost: checkpoints are renamed into place only once complete, so the last one is intact.
    ck = checkpoints(cfg.out) if started else []
    if not started:
        msg = "interrupted while starting"
    elif cfg.eval_only:
        msg = "interrupted during the evaluation; no scores were written"
    elif ck:
        msg = f"interrupted at step {step}; {ck[-1]} is complete. Resume with: python train.py --resume {cfg.out}"
    else:
        msg = (f"interrupted at step {step}, before the first checkpoint (step "
               f"{min(cfg.save_every, cfg.steps)}); nothing to resume, start again with a new --out")
    if not started or rank == 0:
        print(f"train.py: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(130)
