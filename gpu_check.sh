#!/usr/bin/env bash
# The CUDA checks, prepared for the day a GPU is lent (never run yet): bash gpu_check.sh [OUT_DIR]
# 1. the environment (GPUs, torch, CUDA, NCCL);
# 2. a train.py step on CUDA in one process (bf16 autocast, the default there), on a random-weight model of the
#    Qwen2.5-0.5B shape with a small local tokenizer (nothing is downloaded), task arith: its KL at step 1 must be
#    exactly 0 (the dtype policy), and its peak GPU memory is reported;
# 3. the same under torchrun: with 2+ GPUs, 2 ranks data-parallel and 2 ranks --fsdp (NCCL), whose logged step
#    must equal the 1-process one; with 1 GPU, --fsdp on a group of one rank (the code path, without sharding);
#    each rank's peak GPU memory (torch.cuda.max_memory_allocated) is printed, so DDP and FSDP can be compared.
# It prints RESULT lines and leaves the runs in OUT_DIR (default $OUT, else /tmp/gpu-check).
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, torch.distributed as d; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count(), 'nccl available', d.is_nccl_available())"
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")

# a random-weight Qwen2.5-0.5B-shape checkpoint (fp32) with the tests' small tokenizer
python - "$out/model" <<'EOF'
import json, os, sys
sys.path[:0] = [".", "tests"]
import torch
from conftest import write_tokenizer
from model import ModelConfig, Transformer
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
write_tokenizer(d)
cfg = dict(json.load(open("configs/qwen2.5-0.5b-instruct.json")), eos_token_id=2, bos_token_id=1)
torch.manual_seed(0)
m = Transformer(ModelConfig.from_dict(cfg))
m.save_pretrained(d)
print("wrote", d)
EOF

cat > "$out/launch.py" <<'EOF'
import os, sys
sys.path.insert(0, os.getcwd())
import torch
import train
try:
    train.main(sys.argv[1:])
finally:
    print(f"GPU rank {os.environ.get('RANK', '0')}: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
          flush=True)
EOF
flags=(--task arith --model "$out/model" --steps 2 --prompts-per-step 4 --group-size 8 --max-new-tokens 64
       --eval-n 16 --eval-batch 16 --save-every 2 --micro-batch 8 --lr 1e-5 --print-every 0)
rm -rf "$out"/one "$out"/ddp "$out"/fsdp
python "$out/launch.py" "${flags[@]}" --out "$out/one" 2>&1 | grep -v "^W" | tail -6
if [ "$ngpu" -ge 2 ]; then
  torchrun --standalone --nproc_per_node 2 "$out/launch.py" "${flags[@]}" --out "$out/ddp" 2>&1 | grep -v "^W" | tail -4
  torchrun --standalone --nproc_per_node 2 "$out/launch.py" "${flags[@]}" --out "$out/fsdp" --fsdp 2>&1 \
    | grep -v "^W" | tail -4
else
  torchrun --standalone --nproc_per_node 1 "$out/launch.py" "${flags[@]}" --out "$out/fsdp" --fsdp 2>&1 \
    | grep -v "^W" | tail -4
fi

python - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def rows(d):
    return [json.loads(l) for l in open(os.path.join(out, d, "metrics.jsonl"))]
one = rows("one")
assert one[0]["kl"] == 0.0, f"KL at step 1 is {one[0]['kl']}, not exactly 0: the dtype policy broke on CUDA"
print("RESULT cuda one-process ok: step-1 kl 0.0, loss", one[0]["loss"], "grad_norm", one[0]["grad_norm"])
for d in ("ddp", "fsdp"):
    if not os.path.isdir(os.path.join(out, d)):
        continue
    assert len(rows(d)) == len(one), f"{d}: {len(rows(d))} steps logged against {len(one)}"
    worst = 0.0
    for a, b in zip(rows(d), one):
        for k in ("loss", "grad_norm", "reward_mean", "kl", "entropy", "len_mean"):
            if isinstance(a[k], float) and isinstance(b[k], float):
                worst = max(worst, abs(a[k] - b[k]) / (abs(b[k]) + 1e-6))
    print(f"RESULT cuda {d}: largest relative difference from one process {worst:.2e}")
    assert worst < 2e-2, f"{d} differs from one process by {worst:.2e}, more than bf16 rounding (2e-2)"
EOF
