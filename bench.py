"""Benchmarks: sample.generate throughput against baselines, and TRL's GRPOTrainer step time as a measuring stick.

    python bench.py sampler --model DIR                     # ours vs naive (no KV cache) vs transformers.generate
    python bench.py sampler --model DIR -P 4 -G 8 -N 128 --threads 2
    python bench.py sampler --random-init configs/qwen2.5-0.5b-instruct.json --device cuda --dtype bfloat16
    python bench.py trl-step --model DIR                    # TRL GRPOTrainer seconds per optimizer step (CPU, fp32)
    python bench.py step --model DIR                        # train.py's step time against TRL's, same shape
    python bench.py profile --model DIR                     # where train.py's step time goes, part by part
    python bench.py eval --model DIR                        # the quick start's 200-problem eval: shared prefix or not
    python bench.py quickstart --model DIR                  # the quick start's step: --share-prefix or not
    python bench.py amp --model DIR                         # train.py's step: --dtype fp32 against bf16 autocast
    python bench.py lora --model DIR                        # full fine-tuning vs LoRA r=16 (time, memory); vs TRL+peft
    python bench.py memory                                  # per-rank GiB, DDP vs --fsdp, Qwen2.5 0.5B..7B shapes
    python bench.py fsdp-rss --model DIR                    # peak RSS per rank, 2-rank CPU run, DDP vs --fsdp

The sampler table counts completion tokens only: those inside the completion mask, i.e. up to and including each
row's first stop token (or all N when a row is truncated), the same rule for every implementation.
TRL and transformers are measuring sticks only, never dependencies of the project: TRL runs in a subprocess with
--trl-python (default /tmp/trlenv/bin/python, a venv made with --system-site-packages so it shares this torch).
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch

from model import ModelConfig, Transformer, read_json, rope_inv_freq
from sample import generate, sample_token, uniforms

HERE = os.path.dirname(os.path.abspath(__file__))
TRL_VENV_PYTHON = "/tmp/trlenv/bin/python"
# Short grade-school word problems written for this benchmark, deliberately of different lengths.
QUESTIONS = [
    "Tom has 3 boxes of 12 pencils. He gives away 7 pencils. How many pencils does he have left?",
    "A bakery sells muffins for $2 each and cookies for $0.50 each. On Monday it sold 18 muffins and 40 "
    "cookies, and on Tuesday it sold twice as many muffins but half as many cookies. How much money did the "
    "bakery take in over the two days?",
    "A train travels at 60 km per hour for 2.5 hours. How far does it go?",
    "Maria reads 14 pages on weekdays and 30 pages on each weekend day. Her book has 400 pages. "
    "If she starts on a Monday, on which day of the week does she finish the book?",
    "A garden is 8 m long and 5 m wide. A path 1 m wide runs around the outside of it. What is the area of the path?",
    "Sam saves $15 a week. After 6 weeks he spends a third of his savings on a game. How much does he have left?",
    "A school orders 23 buses for a trip. Each bus holds 48 students, and 5 seats on every bus stay empty. "
    "Teachers take 2 seats per bus. How many students go on the trip?",
    "Lena buys 4 notebooks at $3.25 each and pays with a $20 bill. How much change does she get?",
]


@dataclass
class BenchConfig:
    model: str = field(default="/tmp/smollm2", metadata={"help": "Hugging Face checkpoint directory (ours, "
                                                                 "transformers and TRL all load it)"})
    num_prompts: int = field(default=2, metadata={"help": "P: distinct prompts per batch", "short": "-P"})
    group_size: int = field(default=8, metadata={"help": "G: completions sampled per prompt", "short": "-G"})
    max_new_tokens: int = field(default=64, metadata={"help": "N: completion tokens per row at most", "short": "-N"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0: off)"})
    repeats: int = field(default=3, metadata={"help": "R: timed runs per implementation after one warm-up; tok/s is "
                                                       "their total completion tokens over their total seconds"})
    threads: int = field(default=0, metadata={"help": "torch.set_num_threads (0: torch's default)"})
    device: str = field(default="cpu", metadata={"help": "device", "choices": ["cpu", "cuda"]})
    dtype: str = field(default="float32", metadata={"help": "weights and KV cache dtype",
                                                    "choices": ["float32", "bfloat16"]})
    compile: bool = field(default=False, metadata={"help": "pass compile=True to sample.generate (torch.compile of the "
                                                           "decode step)"})
    random_init: str = field(default="", metadata={"help": "config.json to build a randomly initialised model from "
                                                           "instead of --model; prompts are random ids and every row "
                                                           "runs all N tokens"})
    naive: bool = field(default=True, metadata={"help": "time the no-KV-cache baseline"})
    naive_repeats: int = field(default=1, metadata={"help": "timed runs of the naive baseline (O(N^2) work: minutes "
                                                            "per run on CPU)"})
    transformers: bool = field(default=True, metadata={"help": "time transformers' generate() when transformers is "
                                                               "importable"})
    hbm_bandwidth: float = field(default=3.35e12, metadata={"help": "GPU memory bandwidth in B/s for the decode "
                                                                    "roofline (H100 SXM: 3.35e12)"})
    seed: int = field(default=0, metadata={"help": "sampling / random-init seed"})
    trl_python: str = field(default="", metadata={"help": f"interpreter with trl installed ('': {TRL_VENV_PYTHON} "
                                                          "if present, else this one if it imports trl, else TRL is "
                                                          "skipped)"})
    beta: float = field(default=0.04, metadata={"help": "TRL GRPO KL coefficient (beta > 0 loads a reference model)"})
    trl_steps: int = field(default=3, metadata={"help": "timed TRL optimizer steps after one warm-up step"})


def parse_args(argv=None):
    """One flag per BenchConfig field (type, default and help from the field), plus the subcommand."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS), help="what to benchmark")
    for f in fields(BenchConfig):
        names = ["--" + f.name.replace("_", "-")] + ([f.metadata["short"]] if "short" in f.metadata else [])
        help_ = f.metadata["help"] + " (default: %(default)s)"
        if f.type is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            p.add_argument(*names, type=f.type, default=f.default, help=help_, choices=f.metadata.get("choices"))
    args = vars(p.parse_args(argv))
    return args.pop("command"), BenchConfig(**args)


# ----------------------------------------------------------------------------- inputs

def chat_messages(i):
    """Prompt i as the gsm8k task builds it (system prompt, worked-example turn, question); distinct for every i."""
    from tasks import TASKS
    q = QUESTIONS[i % len(QUESTIONS)]
    if i >= len(QUESTIONS):
        q = f"(Variant {i // len(QUESTIONS)}) {q}"  # keep prompts distinct past the list's end
    return TASKS["gsm8k"].prompt({"question": q})


def chat_prompts(tok, P):
    """P distinct ChatML prompts as token ids, of different lengths."""
    return [tok.encode_chat(chat_messages(i)) for i in range(P)]


def random_prompts(P, vocab_size, seed):
    """P random-id prompts of lengths spread over [32, 96), as chat prompts of this task would be."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(32, 96, (P,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lens]


def build_random_model(config_json, seed):
    """A randomly initialised Transformer on CPU in fp32 (normal(0, initializer_range) weights, zero biases)."""
    raw = read_json(config_json)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_dict(raw))
    std = raw.get("initializer_range", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is the embedding: visited once
            if p.dim() >= 2:
                p.normal_(0.0, std)  # PyTorch's default N(0, 1) embedding makes tied logits absurdly peaked
            elif name.endswith("bias"):
                p.zero_()
    return model


def left_pad(prompts, pad_id, device):
    """(P, Tp) left-padded ids and the (P, Tp) bool mask of real tokens."""
    Tp = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), Tp), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.tensor(p)
    mask = torch.arange(Tp) >= Tp - torch.tensor([len(p) for p in prompts])[:, None]
    return ids.to(device), mask.to(device)


def count_until_stop(completions, stop_ids):
    """Tokens per row up to and including the first stop id (all of them when a row has none): (rows,) long."""
    T = completions.shape[1]
    if not stop_ids:
        return torch.full((completions.shape[0],), T, dtype=torch.long)
    hit = torch.isin(completions.cpu(), torch.tensor(list(stop_ids)))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, T)
    return first.long()


# ----------------------------------------------------------------------------- the three samplers

def run_ours(model, prompts, cfg, stop_ids, vocab_size, pad_id, seed):
    """sample.generate; returns (completion tokens, decode steps)."""
    r = generate(model, prompts, cfg.group_size, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                 stop_ids=stop_ids, generator=seed, vocab_size=vocab_size, pad_id=pad_id, compile=cfg.compile)
    return int(r.completion_mask.sum()), r.completion_ids.shape[1]


@torch.no_grad()
def naive_generate(model, prompts, G, N, temperature, top_p, stop_ids, generator, vocab_size, pad_id):
    """No KV cache: every step re-runs the whole left-padded (P*G, Tp+t) batch; returns per-row lengths, steps."""
    # Same sampling (sample.sample_token) and stop rule as sample.generate. Only the last position goes
    # through lm_head, so what this baseline measures is the missing cache, not a wasted (rows, T, V) projection.
    dev = model.lm_head.weight.device
    ids, mask = left_pad([p for p in prompts for _ in range(G)], pad_id, dev)  # rows p*G .. p*G+G-1: prompt p
    rows = ids.shape[0]
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    length = torch.full((rows,), N, device=dev)
    for t in range(N):
        logits = model.logits(model.forward_hidden(ids, attn_mask=mask)[:, -1]).float()  # (rows, V)
        u = uniforms(generator, rows, dev)  # (rows, 1)
        tok = torch.where(done, pad_id, sample_token(logits, temperature, 0, top_p, u, vocab_size)[0])
        hit = torch.isin(tok, stops) & ~done
        length = torch.where(hit, t + 1, length)
        done |= hit
        if bool(done.all()) or t + 1 == N:
            return length, t + 1
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.bool, device=dev)], 1)


def run_naive(model, prompts, cfg, stop_ids, vocab_size, pad_id, seed, N=None):
    """naive_generate; returns (completion tokens, decode steps)."""
    g = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    length, steps = naive_generate(model, prompts, cfg.group_size, N or cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                   stop_ids, g, vocab_size, pad_id)
    return int(length.sum()), steps


def run_transformers(hf, prompts, cfg, stop_ids, vocab_size, pad_id, seed):
    """transformers generate() on the P left-padded prompts with num_return_sequences=G; (tokens, steps)."""
    # num_return_sequences=G is what transformers (and TRL, which repeats each prompt G times) do: the P prompts
    # are expanded to P*G rows *before* prefill, so transformers prefills every row. Ours prefills each prompt once
    # and copies its cache; that saving is part of what is measured, and it is small next to N decode steps.
    from transformers import GenerationConfig
    ids, mask = left_pad(prompts, pad_id, hf.device)
    N = cfg.max_new_tokens
    gc = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=N,
                          num_return_sequences=cfg.group_size, pad_token_id=pad_id,
                          eos_token_id=list(stop_ids) or None, min_new_tokens=0 if stop_ids else N)
    if vocab_size is not None and vocab_size < hf.config.vocab_size:
        gc.suppress_tokens = list(range(vocab_size, hf.config.vocab_size))  # as ours: ids past the tokenizer's
    torch.manual_seed(seed)
    out = hf.generate(input_ids=ids, attention_mask=mask.long(), generation_config=gc)
    completions = out[:, ids.shape[1]:]
    return int(count_until_stop(completions, stop_ids).sum()), completions.shape[1]


def time_interleaved(runs, repeats, device):
    """Warm up every run, then time them round-robin; {name: ([seconds of each timed call], [its results])}."""
    # runs: {name: (fn(seed), warm_up(), repeats or None for `repeats`)}. Round-robin rather than one
    # implementation after the other, so that load from other processes on a shared machine hits all alike.
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    for fn, warm_up, _ in runs.values():
        warm_up()
        sync()
    secs, res = {k: [] for k in runs}, {k: [] for k in runs}
    for r in range(max(reps or repeats for _, _, reps in runs.values())):
        for k, (fn, _, reps) in runs.items():
            if r >= (reps or repeats):
                continue
            sync()
            t0 = time.perf_counter()
            res[k].append(fn(r + 1))  # a different seed per run: lengths vary as they do in training
            sync()
            secs[k].append(time.perf_counter() - t0)
            print(f"  {k:<13} run {r + 1}: {secs[k][-1]:.2f}s", flush=True)
    return {k: (secs[k], res[k]) for k in runs}


def decode_roofline(model, prompts, cfg, bandwidth):
    """Memory-bandwidth bound on decode tokens/s: rows / ((param bytes + KV bytes read per step) / bandwidth)."""
    # KV bytes: 2 (k, v) * L * rows * K * avg_context * D * bytes, avg_context = mean real prompt length + (N+1)/2,
    # i.e. what an ideal kernel must read (ours reads the padded length, so this bound is on the strict side).
    c = model.config
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}  # tied weights once
    rows = len(prompts) * cfg.group_size
    ctx = sum(len(p) for p in prompts) / len(prompts) + (cfg.max_new_tokens + 1) / 2
    elt = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    kv = 2 * c.num_hidden_layers * rows * c.num_key_value_heads * ctx * c.head_dim * elt
    step_bytes = sum(params.values()) + kv
    return rows / (step_bytes / bandwidth), step_bytes


def cmd_sampler(cfg):
    """Tokens/s of ours, naive and transformers on the same prompts, weights, dtype and sampling settings."""
    dev, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.random_init:
            # random weights emit random tokens: no stop ids anywhere, so every row runs all N tokens
            model = build_random_model(cfg.random_init, cfg.seed)
            model.save_pretrained(tmp, dtype=dtype)  # transformers loads these very weights
            model = model.to(dev, dtype)
            model.inv_freq = rope_inv_freq(model.config, dev)  # .to(dtype) also cast the fp32 RoPE buffer
            prompts = random_prompts(cfg.num_prompts, model.config.vocab_size, cfg.seed)
            stop_ids, vocab_size, pad_id, hf_dir = (), None, 0, tmp
        else:
            from tokenizer import Tokenizer
            tok = Tokenizer(cfg.model)
            model = Transformer.from_pretrained(cfg.model, device=dev, dtype=dtype)
            prompts = chat_prompts(tok, cfg.num_prompts)
            stop_ids, vocab_size, pad_id, hf_dir = tuple(tok.stop_ids), tok.vocab_size, tok.pad_id, cfg.model
        model.eval()
        print(f"prompt lengths {[len(p) for p in prompts]}, rows {len(prompts) * cfg.group_size}, "
              f"stop ids {list(stop_ids)}")

        args = (prompts, cfg, stop_ids, vocab_size, pad_id)
        runs = {"ours": (lambda s: run_ours(model, *args, cfg.seed + s), lambda: run_ours(model, *args, cfg.seed),
                         None)}
        if cfg.naive:
            # the naive warm-up is 2 tokens: it has nothing to compile or cache, and a full one costs minutes on CPU
            runs["naive"] = (lambda s: run_naive(model, *args, cfg.seed + s),
                             lambda: run_naive(model, *args, cfg.seed, N=min(2, cfg.max_new_tokens)), cfg.naive_repeats)
        if cfg.transformers and importlib.util.find_spec("transformers") is None:
            print("transformers: not importable, skipped")
        elif cfg.transformers:
            import transformers
            transformers.utils.logging.disable_progress_bar()
            hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
            if not stop_ids:
                hf.generation_config.eos_token_id = None  # else generate() falls back to config.json's eos
            runs["transformers"] = (lambda s: run_transformers(hf, *args, cfg.seed + s),
                                    lambda: run_transformers(hf, *args, cfg.seed), None)
        timed = time_interleaved(runs, cfg.repeats, cfg.device)  # name -> ([seconds], [(tokens, steps)])

    # each run samples its own completions, so rows stop at different steps: pool all timed runs of each
    # implementation rather than pair one run's tokens with another's time
    mean = lambda xs: sum(xs) / len(xs)
    results = {k: (mean(s), mean([t for t, _ in r]), mean([n for _, n in r])) for k, (s, r) in timed.items()}
    tps = {k: tokens / sec for k, (sec, tokens, steps) in results.items()}
    print(f"\n{'impl':<14}{'seconds':>9}{'tokens':>8}{'steps':>7}{'tok/s':>10}{'ours/x':>9}   (means over timed runs)")
    for k, (sec, tokens, steps) in results.items():
        print(f"{k:<14}{sec:>9.3f}{tokens:>8.1f}{steps:>7.1f}{tps[k]:>10.1f}{tps['ours'] / tps[k]:>8.2f}x")
    if cfg.device == "cuda":
        bound, step_bytes = decode_roofline(model, prompts, cfg, cfg.hbm_bandwidth)
        print(f"decode roofline: {step_bytes / 1e6:.1f} MB/step at {cfg.hbm_bandwidth / 1e12:.2f} TB/s -> "
              f"{bound:.0f} tok/s; ours reaches {tps['ours'] / bound:.1%} (prefill included in ours)")
    fmt = lambda k: f"{tps[k]:.1f}" if k in tps else "n/a"
    ratio = f"{tps['ours'] / tps['transformers']:.2f}x" if "transformers" in tps else "n/a"
    print(f"RESULT sampler ours={fmt('ours')} tok/s naive={fmt('naive')} transformers={fmt('transformers')} "
          f"ratio_vs_transformers={ratio}")


# ----------------------------------------------------------------------------- TRL GRPOTrainer step time

def resolve_trl_python(trl_python=""):
    """The interpreter to run TRL with, or None: the flag, else the venv, else this one if it imports trl."""
    if trl_python:
        return trl_python
    if os.path.exists(TRL_VENV_PYTHON):
        return TRL_VENV_PYTHON
    return sys.executable if importlib.util.find_spec("trl") is not None else None


def time_trl_step(model_dir, P=2, G=8, N=64, beta=0.04, steps=3, threads=None, trl_python="", temperature=0.7,
                  lora_rank=0, lora_alpha=32.0):
    """Median seconds per TRL GRPOTrainer optimizer step (P prompts x G completions, after a warm-up), or None."""
    # Runs in a subprocess under the TRL interpreter (see resolve_trl_python), so TRL never enters this process.
    # None (with a one-line note) when no interpreter with trl is found; a failing TRL run raises RuntimeError.
    python = resolve_trl_python(trl_python)
    if python is None:
        print(f"TRL: skipped (no {TRL_VENV_PYTHON} and this interpreter cannot import trl; see bench.py's docstring)")
        return None
    kwargs = dict(model_dir=os.path.abspath(model_dir), P=P, G=G, N=N, beta=beta, steps=steps, threads=threads,
                  temperature=temperature, lora_rank=lora_rank, lora_alpha=lora_alpha)
    code = "import json, sys, bench; print('TRL_STEP_SECONDS', bench._trl_step_inprocess(**json.loads(sys.argv[1])))"
    proc = subprocess.run([python, "-c", code, json.dumps(kwargs)], cwd=HERE, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    for line in proc.stdout.splitlines():
        if line.startswith("TRL "):
            print(line)
        if line.startswith("TRL_STEP_SECONDS "):
            return float(line.split()[1])
    raise RuntimeError(f"TRL run under {python} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def _trl_step_inprocess(model_dir, P, G, N, beta, steps, threads, temperature, lora_rank=0, lora_alpha=32.0):
    """The body of time_trl_step, run under the TRL interpreter: median seconds per GRPOTrainer step."""
    # GRPOTrainer on CPU, fp32, no vLLM, no saving; with lora_rank, a peft LoraConfig of that rank on lora.py's
    # default targets (TRL then uses the policy with its adapters disabled as the reference, as train.py does).
    import datasets
    import transformers
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from tokenizer import Tokenizer

    if threads:
        torch.set_num_threads(threads)
    # the sampler benchmark's P prompts as ChatML text (tokenized by TRL to the same ids), once per step:
    # with shuffle_dataset=False every step, warm-up included, sees exactly prompts 0 .. P-1
    texts = [Tokenizer.chatml(chat_messages(i)) for i in range(P)]
    data = datasets.Dataset.from_list([{"prompt": texts[i % P]} for i in range((steps + 1) * P)])

    batches = []  # completions per reward call: checks that one step really is P x G

    def reward_len(completions, **kwargs):
        """Trivial reward, so the step time is the trainer's own: shorter completions score higher."""
        batches.append(len(completions))
        return [-len(c) / 100.0 for c in completions]

    extra = {}
    if "max_prompt_length" in {f.name for f in fields(GRPOConfig)}:
        extra["max_prompt_length"] = 4096  # older TRL truncated prompts to 512 by default; keep them whole
    args = GRPOConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "bench_trl"), report_to="none", logging_strategy="no",
        save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, use_vllm=False, seed=0,
        shuffle_dataset=False,
        # recent TRL counts completions in per_device_train_batch_size: P*G of them = P prompts x G generations
        per_device_train_batch_size=P * G, num_generations=G, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_steps=steps + 1, max_completion_length=N,
        temperature=temperature, top_p=1.0, top_k=0, beta=beta, learning_rate=1e-6, dataloader_num_workers=0, **extra)

    class StepTimer(transformers.TrainerCallback):
        """Wall time between on_step_begin and on_step_end: generation, rewards, loss, backward, optimizer."""
        def __init__(self):
            self.t0, self.secs = None, []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.secs.append(time.perf_counter() - self.t0)

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    timer = StepTimer()
    peft_config = None
    if lora_rank:
        import peft
        from lora import TARGETS
        peft_config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                      target_modules=list(TARGETS), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[timer], peft_config=peft_config)
    trainer.train()
    assert len(timer.secs) == steps + 1, f"expected {steps + 1} steps, timed {len(timer.secs)}"
    print(f"TRL {trl.__version__}: step seconds (first is warm-up) {[round(s, 2) for s in timer.secs]}, "
          f"completions per step {batches}")
    return statistics.median(timer.secs[1:])


def cmd_trl_step(cfg):
    """Prints TRL GRPOTrainer's median seconds per step on cfg.model."""
    t0 = time.perf_counter()
    secs = time_trl_step(cfg.model, cfg.num_prompts, cfg.group_size, cfg.max_new_tokens, cfg.beta, cfg.trl_steps,
                         cfg.threads or None, cfg.trl_python, cfg.temperature)
    if secs is not None:
        print(f"(TRL subprocess wall time {time.perf_counter() - t0:.1f}s incl. loading)")
        print(f"RESULT trl_step seconds={secs:.3f}")


def compare_with_trl(cfg, ours_seconds):
    """Hook for a `step` subcommand: time TRL at cfg's shape and print ours vs TRL seconds per step."""
    trl_seconds = time_trl_step(cfg.model, cfg.num_prompts, cfg.group_size, cfg.max_new_tokens, cfg.beta,
                                cfg.trl_steps, cfg.threads or None, cfg.trl_python, cfg.temperature)
    ratio = f"{trl_seconds / ours_seconds:.2f}x" if trl_seconds else "n/a"
    print(f"RESULT step ours={ours_seconds:.3f}s trl={trl_seconds or float('nan'):.3f}s speedup_vs_trl={ratio}")
    return trl_seconds


# ----------------------------------------------------------------------------- our train step vs TRL's

def train_steps(cfg, dtype="fp32", extra=()):
    """train.py's metrics.jsonl rows of cfg.trl_steps + 1 steps on cfg.model (the first is a warm-up)."""
    import train
    examples = [{"i": i} for i in range(cfg.num_prompts)]

    def reward_len(completion, **_):
        """The TRL run's trivial reward, so both step times are the trainers' own."""
        return -len(completion) / 100.0

    # the same P prompts every step, as the TRL run (shuffle_dataset=False) sees them
    train.TASKS["bench"] = train.Task(lambda *a, **k: (examples, examples), lambda ex: chat_messages(ex["i"]),
                                      [(1.0, reward_len)], {})
    with tempfile.TemporaryDirectory() as out:
        train.main(["--task", "bench", "--model", cfg.model, "--out", out, "--steps", str(cfg.trl_steps + 1),
                    "--prompts-per-step", str(cfg.num_prompts), "--group-size", str(cfg.group_size),
                    "--max-new-tokens", str(cfg.max_new_tokens), "--temperature", str(cfg.temperature),
                    "--beta", str(cfg.beta), "--lr", "1e-6", "--eval-n", "0", "--save-every", "1000000",
                    "--micro-batch", str(cfg.num_prompts * cfg.group_size), "--device", cfg.device,
                    "--dtype", dtype, *extra])
        return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def cmd_step(cfg):
    """Median seconds per train.py step (whole step: sample, reward, ref log-probs, update) against TRL's."""
    rows = train_steps(cfg)
    secs = statistics.median(r["step_s"] for r in rows[1:])  # step 1 is the warm-up, as for TRL
    print(f"ours: step seconds (first is warm-up) {[round(r['step_s'], 2) for r in rows]}, "
          f"mean completion length {[round(r['len_mean'], 1) for r in rows]}")
    compare_with_trl(cfg, secs)


class StageClock:
    """Exclusive seconds per label of wrapped functions: a nested wrapped call's time is its own, not its caller's."""
    def __init__(self, device="cpu"):
        self.seconds, self.stack, self.t, self.undo = {}, [], 0.0, []
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # CUDA runs ahead of the host

    def _switch(self, push=None):
        self.sync()
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] = self.seconds.get(self.stack[-1], 0.0) + now - self.t
        self.stack.append(push) if push else self.stack.pop()
        self.t = now

    def wrap(self, owner, name, label):
        """Time owner.name under label (a string, or a function of the call's arguments giving one or None)."""
        fn = getattr(owner, name)

        def timed(*a, **k):
            lab = label(*a, **k) if callable(label) else label
            if lab is None:  # not timed on its own: its time stays its caller's
                return fn(*a, **k)
            self._switch(lab)
            try:
                return fn(*a, **k)
            finally:
                self._switch()
        setattr(owner, name, timed)
        self.undo.append((owner, name, fn))

    def restore(self):
        """Put back every wrapped function."""
        for owner, name, fn in reversed(self.undo):
            setattr(owner, name, fn)


def prefill_or_none(self, input_ids, *a, cache=None, **k):
    """sample.generate's prefill forwards (through the KV cache, several tokens a row); other forwards: None."""
    return "sampling: prefill" if cache is not None and input_ids.shape[1] > 1 else None


PROFILE_PARTS = [  # (module name, attribute, label): what each part of train.py's step is, in step order
    ("train", "rollout", "sampling: other (host checks, uniforms, bookkeeping)"),
    ("model.Transformer", "forward_hidden", prefill_or_none), ("sample", "decode_step", "sampling: decode forward"),
    ("sample", "sample_token", "sampling: token draw"), ("train", "score", "rewards"),
    ("train", "advantages", "advantages"), ("train", "reference_logprobs", "reference forward"),
    ("train", "old_logprobs", "pi_old forward"), ("train", "update", "update: other (zero_grad, lr, syncs)"),
    ("train", "shared_prefix", lambda *a, **k: "policy forward (+ loss)" if torch.is_grad_enabled() else None),
    ("train", "micro_batch_loss", "policy forward (+ loss)"),
    ("torch.Tensor", "backward", "policy backward"), ("grpo.SharedPrefix", "backward", "policy backward"),
    ("torch.nn.utils", "clip_grad_norm_", "optimizer (clip, AdamW)"),
    ("torch.optim.AdamW", "step", "optimizer (clip, AdamW)"), ("train", "log_step", "logging and metric syncs"),
    ("train", "print_step", "logging and metric syncs"), ("train", "log_rollouts", "logging and metric syncs")]


def profile_steps(cfg, extra=()):
    """({part: seconds over the timed steps}, their wall seconds with logging) of train.py at bench step's setting."""
    import importlib
    clock = StageClock(cfg.device)
    for mod, attr, label in PROFILE_PARTS:
        path = mod.split(".")
        owner = importlib.import_module(path[0])
        for p in path[1:]:
            owner = getattr(owner, p)
        clock.wrap(owner, attr, label)
    warm = {}

    def after_warm_up(run, step, *a, **k):  # the first step is the warm-up: its times are not counted
        if step == 1:
            warm.update(clock.seconds)
        return real_log(run, step, *a, **k)
    import train
    real_log, train.log_step = train.log_step, after_warm_up
    try:
        rows = train_steps(cfg, extra=extra)
    finally:
        train.log_step = real_log
        clock.restore()
    parts = {k: v - warm.get(k, 0.0) for k, v in clock.seconds.items()}
    logging = parts.get("logging and metric syncs", 0.0)  # after step_s is taken, so not inside it
    return parts, sum(r["step_s"] for r in rows[1:]) + logging


def cmd_profile(cfg):
    """Where train.py's step time goes (bench step's setting): each part's share, with and without --share-prefix."""
    for label, extra in (("--share-prefix (default)", ()), ("--no-share-prefix", ("--no-share-prefix",))):
        parts, total = profile_steps(cfg, extra)
        steps = cfg.trl_steps
        print(f"\n{label}: {total / steps:.2f} s a step over {steps} timed steps (after one warm-up)")
        named = sum(parts.values())
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<56}{v / steps:>8.3f} s {v / total:>7.1%}")
        print(f"  {'outside the parts (the loop, fail_together, next_prompts)':<56}{(total - named) / steps:>8.3f} s "
              f"{(total - named) / total:>7.1%}")
        print(f"RESULT profile {label.split()[0]} step_s={total / steps:.3f}")


QUICK_START = ["--task", "arith", "--prompts-per-step", "4", "--group-size", "8", "--max-new-tokens", "48",
               "--lr", "2e-5", "--warmup-steps", "2", "--micro-batch", "32", "--eval-every", "0"]  # README's


def cmd_eval(cfg):
    """The quick start's 200-problem arith evaluation (one generate call, greedy): shared prefix or whole prompts."""
    from evaluate import evaluate
    from tasks import TASKS, parse_options
    from tokenizer import Tokenizer
    task, tok = TASKS["arith"], Tokenizer(cfg.model)
    test = task.load("", "", **parse_options("arith", ""))[1]
    model = Transformer.from_pretrained(cfg.model, device=cfg.device).eval()
    prompts = [tok.encode_chat(task.prompt(ex)) for ex in test[:200]]
    from sample import common_prefix
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
          f"{common_prefix(prompts)} of them shared by all")

    def run(share):
        return evaluate(model, tok, task, test, n=200, batch=200, max_new_tokens=48, amp=nullcontext(), rank=0,
                        world=1, log=lambda *a, **k: None, share_prefix=share)
    runs = {"shared prefix": (lambda s: run(True), lambda: None, None),
            "whole prompts": (lambda s: run(False), lambda: None, None)}  # no warm-up: each run is minutes long
    timed = time_interleaved(runs, cfg.repeats, cfg.device)
    (a, ra), (b, rb) = timed["shared prefix"], timed["whole prompts"]
    same = sum(x["completion"] == y["completion"] for x, y in zip(ra[0], rb[0]))
    acc = sum(r["acc_strict"] for r in ra[0]) / len(ra[0])
    print(f"identical completions: {same}/{len(ra[0])}; acc_strict {acc:.3f}")
    ratio = statistics.median(b) / statistics.median(a)
    print(f"RESULT eval shared={statistics.median(a):.1f}s whole={statistics.median(b):.1f}s speedup={ratio:.2f}x")


def cmd_quickstart(cfg):
    """The README quick start's train step (its settings, SmolLM2): --share-prefix against --no-share-prefix."""
    out = {}
    for label, extra in (("shared", ()), ("whole", ("--no-share-prefix",))):
        rows = train_steps(cfg, extra=(*QUICK_START, *extra))  # later flags win: the quick start's task and batch
        out[label] = statistics.median(r["step_s"] for r in rows[1:])
        print(f"{label}: step seconds (first is warm-up) {[round(r['step_s'], 2) for r in rows]}")
    print(f"RESULT quickstart shared={out['shared']:.2f}s whole={out['whole']:.2f}s "
          f"speedup={out['whole'] / out['shared']:.2f}x")


def cpu_flags():
    """The CPU's bf16-relevant instruction sets (Linux): whether bf16 autocast can be fast depends on them."""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"


def cmd_amp(cfg):
    """train.py's step with --dtype fp32 against --dtype bf16 (autocast over fp32 weights), same model, same run."""
    print(f"cpu flags: {cpu_flags()}")
    res = {}
    for dtype in ("fp32", "bf16"):
        rows = train_steps(cfg, dtype)
        res[dtype] = {k: statistics.median(r[k] for r in rows[1:]) for k in ("step_s", "sample_s", "train_s")}
        print(f"{dtype}: step seconds {[round(r['step_s'], 2) for r in rows]} (first is warm-up), step-1 kl "
              f"{rows[0]['kl']}, mean completion length {[round(r['len_mean'], 1) for r in rows]}")
    f, b = res["fp32"], res["bf16"]
    print(f"RESULT amp step fp32={f['step_s']:.3f}s bf16={b['step_s']:.3f}s "
          f"bf16_speedup={f['step_s'] / b['step_s']:.2f}x "
          f"(sample {f['sample_s'] / b['sample_s']:.2f}x, train {f['train_s'] / b['train_s']:.2f}x)")
    # completions differ between the two (other rounding, other samples), so compare per completion token as well
    return res


def _lora_child(cfg_json, rank):
    """One measurement in a fresh process (so its peak RSS is its own): train.py steps, full or LoRA rank r."""
    import resource

    import lora
    cfg = BenchConfig(**json.loads(cfg_json))
    extra = ("--lora-rank", str(rank), "--lora-alpha", str(2 * rank)) if rank else ()
    rows = train_steps(cfg, "fp32", extra)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    m = Transformer.from_pretrained(cfg.model)  # count what the run held: weights, gradients, Adam's 2 moments
    n_all = sum(p.numel() for p in m.parameters())
    n_train = sum(p.numel() for p in lora.add_lora(m, rank, 2.0 * rank).parameters() if p.requires_grad) if rank \
        else n_all
    n_adapters = n_train if rank else 0
    weights = 4 * (n_all + n_adapters + (n_all if cfg.beta and not rank else 0))  # + the reference, full FT only
    print("LORA_CHILD " + json.dumps({
        "step_s": statistics.median(r["step_s"] for r in rows[1:]), "rss": rss, "weights": weights,
        "grads": 4 * n_train, "adam": 8 * n_train, "trainable": n_train, "kl1": rows[0]["kl"]}))


def cmd_lora(cfg):
    """Full fine-tuning against LoRA r=16, and the LoRA step against TRL's; prints them, returns {rank: stats}."""
    # Full fine-tuning and LoRA r=16 each run train.py in its own process, for its own peak RSS; TRL's LoRA step is
    # GRPOTrainer with a peft LoraConfig of the same rank and targets.
    res = {}
    for rank in (0, 16):
        code = "import sys, bench; bench._lora_child(sys.argv[1], int(sys.argv[2]))"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg)), str(rank)], cwd=HERE,
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("LORA_CHILD ")), None)
        if line is None:
            raise RuntimeError(f"train.py run (lora rank {rank}) failed:\n{proc.stderr[-3000:]}")
        res[rank] = json.loads(line.split(" ", 1)[1])
        r = res[rank]
        print(f"{'LoRA r=16' if rank else 'full FT'}: step {r['step_s']:.2f} s, peak RSS {r['rss'] / 2**30:.2f} GiB, "
              f"weights {r['weights'] / 2**20:.0f} MiB + grads {r['grads'] / 2**20:.1f} MiB + Adam "
              f"{r['adam'] / 2**20:.1f} MiB, {r['trainable'] / 1e6:.2f}M trainable, step-1 kl {r['kl1']}")
    trl_s = time_trl_step(cfg.model, cfg.num_prompts, cfg.group_size, cfg.max_new_tokens, cfg.beta, cfg.trl_steps,
                          cfg.threads or None, cfg.trl_python, cfg.temperature, lora_rank=16, lora_alpha=32.0)
    f, l = res[0], res[16]
    print(f"RESULT lora step full={f['step_s']:.3f}s lora16={l['step_s']:.3f}s "
          f"lora_speedup={f['step_s'] / l['step_s']:.2f}x "
          f"rss full={f['rss'] / 2**30:.2f}GiB lora16={l['rss'] / 2**30:.2f}GiB "
          f"state full={(f['weights'] + f['grads'] + f['adam']) / 2**20:.0f}MiB "
          f"lora16={(l['weights'] + l['grads'] + l['adam']) / 2**20:.0f}MiB "
          f"trl_lora16={trl_s or float('nan'):.3f}s vs_trl={(trl_s / l['step_s']) if trl_s else float('nan'):.2f}x")
    return res


# ----------------------------------------------------------------------------- memory per rank: DDP against --fsdp

QWEN_SHAPES = ("0.5b", "1.5b", "3b", "7b")  # configs/qwen2.5-*-instruct.json: the public config.json of each
# the defaults of train.py (TrainConfig): 16 prompts a step over all ranks, G 8, 512 new tokens, micro-batch 8 rows;
# a GSM8K chat prompt is about 200 tokens, so 256 is assumed for the prompt
PROMPT_TOKENS = 256


class LiveBytes:
    """While open, the peak of the bytes held by tensors created inside it (a dispatch mode that sees every op)."""
    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary
        seen, box = WeakIdKeyDictionary(), self
        self.now = self.peak = 0

        def release(n):
            box.now -= n

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage() not in seen:
                        st = t.untyped_storage()
                        seen[st] = n = st.nbytes()
                        box.now += n
                        box.peak = max(box.peak, box.now)
                        weakref.finalize(st, release, n)  # freed: no longer held
                return out
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def activation_bytes(shape, rows=2, prompt=16, completions=(32, 64)):
    """(without, with --grad-ckpt) bytes one micro-batch's forward keeps for its backward, at the default size."""
    # Measured, not typed in: the live tensors (LiveBytes) at the end of token_logprobs' forward under bf16 autocast,
    # with real tensors on CPU, then scaled.
    # - The decoder: 1 and 2 layers of the shape (its widths, a 1000-token vocabulary) at two completion lengths,
    #   fitted as live = t (L a + b) + L c + d for t tokens and L layers: a and b are per token (per layer, and
    #   outside the layers), c per layer whatever the tokens (autocast's bf16 copy of its weights).
    # - Backward adds one logprob chunk's logits, recomputed at the real vocabulary (fp32: the dtype policy): the
    #   growth of its peak from 32 to 64 rows, times 1024 / 32 (its tensors are rows x V), as train.py's 1024-token
    #   chunks run one at a time; with --grad-ckpt also one block's activations, recomputed.
    # At the default micro-batch: t = 8 rows x (PROMPT_TOKENS + 512) tokens, all the shape's layers.
    import grpo
    cfg = json.load(open(os.path.join(HERE, "configs", f"qwen2.5-{shape}-instruct.json")))
    w = torch.randn(cfg["vocab_size"], cfg["hidden_size"], requires_grad=True)
    peaks = []
    for n in (32, 64):
        h = torch.randn(n, cfg["hidden_size"], requires_grad=True)
        with LiveBytes() as live:
            grpo._chunk_logprobs(h, w, torch.randint(0, 1000, (n,)), 1.0, entropy=True)[0].sum().backward()
        peaks.append(live.peak)
        w.grad = None
    chunk = (peaks[1] - peaks[0]) / 32 * 1024  # the part that grows with rows (the weight's gradient does not)
    L, t = cfg["num_hidden_layers"], 8 * (PROMPT_TOKENS + 512)
    out = []
    for ckpt in (False, True):
        live_at = {}
        for layers in (1, 2):
            torch.manual_seed(0)
            m = Transformer(ModelConfig.from_dict(dict(cfg, num_hidden_layers=layers, vocab_size=1000))).train()
            m.gradient_checkpointing = ckpt  # --grad-ckpt: each block's activations recomputed in backward
            for comp in completions:
                ids = torch.randint(0, 1000, (rows, prompt + comp))
                ones = torch.ones(rows, prompt + comp, dtype=torch.bool)
                pids = ids[:1, :prompt].expand(rows, prompt)  # one prompt's G rows, as a default micro-batch holds
                with LiveBytes() as live, torch.autocast("cpu", dtype=torch.bfloat16):
                    lp = grpo.token_logprobs(m, pids, ones[:, :prompt], ids[:, prompt:], ones[:, prompt:])
                    live_at[layers, comp] = live.now
                del lp
        t1, t2 = (rows * (prompt + c) for c in completions)
        slope = {k: (live_at[k, completions[1]] - live_at[k, completions[0]]) / (t2 - t1) for k in (1, 2)}  # L a + b
        a, b = slope[2] - slope[1], 2 * slope[1] - slope[2]
        c = live_at[2, completions[0]] - live_at[1, completions[0]] - a * t1
        out.append(t * (L * a + b) + L * c + chunk)
    per_block = (out[0] - chunk) / L  # roughly one block's share without checkpointing, recomputed in backward
    return out[0], out[1] + per_block


def sharded_bytes(shape, world):
    """{weights, grads, adam, ref, whole}: per-rank bytes of --fsdp on `world` ranks, read off sharded modules."""
    # A fake process group of `world` ranks (no other process) and meta tensors (no memory): fully_shard cuts each
    # parameter as on a real run, a gradient is made for each, and AdamW's step creates its real state, whose
    # local (this rank's) shards are counted. world 1: no sharding, every rank holds everything (DDP).
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fsdp
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(HERE, "configs", f"qwen2.5-{shape}-instruct.json"))))
    with torch.device("meta"):
        m = Transformer(cfg)
    whole = sum(p.numel() * 4 for p in m.parameters())
    # whole gradients that --fsdp's update holds at once: the root unit's (embeddings, lm_head), reduced at the end of
    # each backward, and one block's, reduced as soon as its part of the backward is done
    unit_grads = sum(p.numel() * 4 for n, p in m.named_parameters() if not n.startswith("model.layers.")) + \
        sum(p.numel() * 4 for p in m.model.layers[0].parameters())
    if world > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        fsdp.shard(m, torch.device("cpu"))

    def local_bytes(ts):
        ts = [t.to_local() if isinstance(t, DTensor) else t for t in ts]
        return sum(t.numel() * t.element_size() for t in ts)
    try:
        weights = local_bytes(m.parameters())
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        grads = local_bytes(p.grad for p in m.parameters())
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6, foreach=False)
        opt.step()
        adam = local_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    finally:
        if world > 1:
            dist.destroy_process_group()
    # the reference is the same modules, sharded the same way, without gradients or optimizer state
    return dict(weights=weights, grads=grads, adam=adam, ref=weights, whole=whole, unit_grads=unit_grads)


def kv_bytes(shape, world):
    """The KVCache of one rank's rollout at the defaults (16 / world prompts x G 8, prompt + 512), bf16 (CUDA)."""
    from model import KVCache
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(HERE, "configs", f"qwen2.5-{shape}-instruct.json"))))
    cache = KVCache(cfg, 16 // world * 8, PROMPT_TOKENS + 512, device="meta", dtype=torch.bfloat16)
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def cmd_memory(cfg):
    """Per-rank GiB of DDP and --fsdp for the Qwen2.5 shapes at 1, 2 and 8 ranks, and the peaks of a step."""
    gib = 2 ** 30
    print("per rank, GiB; full fine-tuning, beta > 0 (a reference), fp32 weights and Adam, train.py's defaults:\n"
          "at rest = weights + grads + adam + ref (sharded with --fsdp); rollout = at rest - grads + the whole "
          "weights (--fsdp gathers them) + KV cache; update = at rest + gather (--fsdp: the whole weights and the "
          "whole gradients of the root unit and one block) + activations of one micro-batch (8 rows), without and "
          "with --grad-ckpt")
    print(f"{'shape':>5} {'mode':>5} {'ranks':>5} {'weights':>8} {'grads':>6} {'adam':>6} {'ref':>6} {'at rest':>8} "
          f"{'gather':>6} {'kv':>5} {'act':>6} {'act ck':>6} {'rollout':>8} {'update':>7} {'upd ck':>7} "
          f"{'peak':>6} {'peak ck':>7}")
    rows = []
    for shape in QWEN_SHAPES:
        act, act_ck = activation_bytes(shape)
        for mode, world in (("ddp", 1), ("ddp", 8), ("fsdp", 2), ("fsdp", 8)):
            b = sharded_bytes(shape, world if mode == "fsdp" else 1)
            kv = kv_bytes(shape, world)
            rest = b["weights"] + b["grads"] + b["adam"] + b["ref"]
            gather = b["whole"] + b["unit_grads"] if mode == "fsdp" else 0  # whole weights + the units' grads
            rollout = rest - b["grads"] + b["whole"] * (mode == "fsdp") + kv
            update, update_ck = rest + gather + act, rest + gather + act_ck
            r = dict(shape=shape, mode=mode, ranks=world, **b, rest=rest, gather=gather, kv=kv, act=act,
                     act_ck=act_ck, rollout=rollout, update=update, update_ck=update_ck, peak=max(rollout, update),
                     peak_ck=max(rollout, update_ck))
            rows.append(r)
            print(f"{shape:>5} {mode:>5} {world:>5} " + " ".join(
                f"{r[k] / gib:{w}.1f}" for k, w in (("weights", 8), ("grads", 6), ("adam", 6), ("ref", 6),
                                                    ("rest", 8), ("gather", 6), ("kv", 5), ("act", 6),
                                                    ("act_ck", 6), ("rollout", 8), ("update", 7),
                                                    ("update_ck", 7), ("peak", 6), ("peak_ck", 7))))
    print("RESULT memory " + json.dumps([{k: (round(v / gib, 2) if isinstance(v, (int, float)) and k != "ranks"
                                              else v) for k, v in r.items()} for r in rows]))
    return rows


RSS_LAUNCHER = """
import resource, sys
sys.path.insert(0, {here!r})
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group
import train
gathers, real_gather, real_rollout = [0], fsdp_group.foreach_all_gather, train.rollout
def counted(*a, **k):  # FSDP's all-gathers: one per unit it unshards
    gathers[0] += 1
    return real_gather(*a, **k)
def rollout(*a, **k):
    gathers[0] = 0
    out = real_rollout(*a, **k)
    print(f"all-gathers in rollout: {{gathers[0]}}", flush=True)
    return out
fsdp_group.foreach_all_gather, train.rollout = counted, rollout
try:
    train.main(sys.argv[1:])
finally:
    import os
    print(f"RSS rank {{os.environ.get('RANK', '0')}}: {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}",
          flush=True)
"""


def cmd_fsdp_rss(cfg):
    """Peak RSS per rank of a 2-rank CPU train.py run on cfg.model, without and with --fsdp (GSM8K, 2 steps)."""
    import re
    data = os.path.join(HERE, "..", "shared", "data", "gsm8k")
    res = {}
    with tempfile.TemporaryDirectory() as d:
        launcher = os.path.join(d, "launch.py")
        open(launcher, "w").write(RSS_LAUNCHER.format(here=HERE))
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", launcher,
                   "--task", "gsm8k", "--data-dir", data, "--model", cfg.model, "--out", os.path.join(d, mode),
                   "--steps", "2", "--prompts-per-step", "2", "--group-size", str(cfg.group_size),
                   "--max-new-tokens", str(cfg.max_new_tokens), "--eval-n", "4", "--eval-batch", "2",
                   "--save-every", "2", "--micro-batch", str(cfg.group_size)] + (["--fsdp"] if mode == "fsdp" else [])
            p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            rss = {int(r): int(b) for r, b in re.findall(r"RSS rank (\d+): (\d+)", p.stdout)}
            if p.returncode or len(rss) != 2:
                raise RuntimeError(f"{mode} run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            res[mode] = rss
            gathers = sorted(set(re.findall(r"all-gathers in rollout: (\d+)", p.stdout)))
            print(f"{mode}: peak RSS rank 0 {rss[0] / 2**20:.0f} MiB, rank 1 {rss[1] / 2**20:.0f} MiB; all-gathers "
                  f"per rollout {'/'.join(gathers)}")
    print(f"RESULT fsdp-rss ddp={[round(v / 2**20) for v in res['ddp'].values()]}MiB "
          f"fsdp={[round(v / 2**20) for v in res['fsdp'].values()]}MiB")
    return res


COMMANDS = {"sampler": cmd_sampler, "trl-step": cmd_trl_step, "step": cmd_step, "amp": cmd_amp, "lora": cmd_lora,
            "memory": cmd_memory, "fsdp-rss": cmd_fsdp_rss, "profile": cmd_profile, "eval": cmd_eval,
            "quickstart": cmd_quickstart}


def main(argv=None):
    command, cfg = parse_args(argv)
    print(asdict(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {cfg.device}, {cfg.dtype}")
    load, cores = os.getloadavg()[0], os.cpu_count()
    if load > 0.5 * cores:
        # other processes share the cores: CPU timings drift, and OpenMP's spin-waiting threads slow down badly
        print(f"warning: 1-min load average {load:.1f} on {cores} cores; CPU timings are contended (try --threads 1)")
    t0 = time.perf_counter()
    COMMANDS[command](cfg)
    print(f"({command}: {time.perf_counter() - t0:.0f}s wall in all)")


if __name__ == "__main__":
    main()
