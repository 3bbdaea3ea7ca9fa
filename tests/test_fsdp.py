"""--fsdp (fsdp.py) on CPU, gloo, 2 ranks, the tiny model: a sharded step equals one process's and DDP's, its
checkpoints resume with or without FSDP and open in transformers, a rank's failure ends both, the weights are
all-gathered once per rollout, and bad settings are refused in one line."""
import os
import re
import shutil
from dataclasses import replace

import pytest
import torch

import config
import fsdp
from conftest import write_checkpoint
from config import BadInput, TrainConfig
from model import Transformer
from test_distributed import assert_metric, make_setup, metrics, run
from test_train import without_timing


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    return make_setup(tmp_path_factory, tiny_ckpt)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return make_setup(tmp_path_factory, write_checkpoint(str(tmp_path_factory.mktemp("untied")), "llama", tied=False))


def weights(d):
    return Transformer.from_pretrained(str(d)).state_dict()


def same_run(a, b, *, steps=(1,), atol=2e-4):
    """Two run dirs logged the same metrics and saved the same weights (lr 1e-2: 2% of Adam's first step)."""
    ma, mb = without_timing(metrics(a)), without_timing(metrics(b))
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for k in x:
            assert_metric(k, x[k], y[k], (x["step"], k))
    for s in steps:
        wa, wb = weights(a / f"step-{s}"), weights(b / f"step-{s}")
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=f"step {s} {k}")


def test_fsdp_step_equals_one_process_and_ddp_and_its_checkpoints_resume_anywhere(setup, tmp_path):
    """Full fine-tuning with beta > 0: loss, grad norm, every metric and the weights after each step; resume."""
    flags = ("--steps", "2", "--save-every", "1", "--keep-last", "5", "--min-lr-ratio", "1")
    run(setup, tmp_path / "one", 1, *flags)
    run(setup, tmp_path / "ddp", 2, *flags)
    log = run(setup, tmp_path / "fsdp", 2, *flags, "--fsdp")
    assert "cpu x 2 (FSDP), fp32; reference model" in log
    m = without_timing(metrics(tmp_path / "one"))
    assert m[0]["kl"] == 0.0 and m[1]["kl"] > 0 and m[0]["grad_norm"] > 0  # a real update, with the KL term
    # a mean over ranks instead of a sum would halve the logged grad norm (Adam would hide it in the weights)
    same_run(tmp_path / "fsdp", tmp_path / "one", steps=(1, 2))
    same_run(tmp_path / "fsdp", tmp_path / "ddp", steps=(1, 2))
    ev = [(tmp_path / d / "eval.jsonl").read_text() for d in ("one", "fsdp")]
    assert ev[0] == ev[1]  # the evaluation, gathered once and sharded over ranks, scores what 1 process scores
    same_logits_in_transformers(tmp_path / "fsdp" / "step-2")

    # a checkpoint written under FSDP resumes under FSDP, in one process without it, and a 1-process one under FSDP
    for src, name, nproc, extra in (("fsdp", "fsdp-fsdp", 2, ("--fsdp",)), ("fsdp", "fsdp-one", 1, ("--no-fsdp",)),
                                    ("one", "one-fsdp", 2, ("--fsdp",))):
        d = tmp_path / name
        shutil.copytree(tmp_path / src, d)
        shutil.rmtree(d / "step-2")
        run(setup, d, nproc, "--resume", str(d), *extra)
        same_run(d, tmp_path / src, steps=(2,))


def test_fsdp_lora_step_equals_one_process(setup, tmp_path):
    """The frozen base sharded, the adapters trained: the adapters saved and the merged model equal 1 process's."""
    # (mu 2, and LoRA with dynamic sampling, are also in test_equivalence.py's FSDP configurations, gradient by
    # gradient)
    extra = ("--steps", "1", "--lora-rank", "4", "--lora-alpha", "8")
    run(setup, tmp_path / "one", 1, *extra)
    run(setup, tmp_path / "fsdp", 2, "--fsdp", *extra)
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "step-1" / "adapter_model.safetensors")) for d in ("one", "fsdp"))
    assert a.keys() == b.keys() and any(".lora_B." in k and a[k].abs().max() > 0 for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=0, msg=k)
    wa, wb = weights(tmp_path / "one" / "step-1" / "merged"), weights(tmp_path / "fsdp" / "step-1" / "merged")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=0, msg=k)
    same_run(tmp_path / "fsdp", tmp_path / "one", steps=())


def test_fsdp_bf16_keeps_the_dtype_policy(setup, tmp_path):
    """bf16 autocast over fp32 shards: the reference is exact (KL exactly 0 at step 1), and the step is 1 process's."""
    run(setup, tmp_path / "one", 1, "--steps", "1", "--dtype", "bf16")
    log = run(setup, tmp_path / "fsdp", 2, "--steps", "1", "--dtype", "bf16", "--fsdp")
    assert "(FSDP), bf16 autocast" in log
    (m1,), (m2,) = without_timing(metrics(tmp_path / "one")), without_timing(metrics(tmp_path / "fsdp"))
    assert m2["kl"] == 0.0 and m1["kl"] == 0.0 and m2["grad_norm"] > 0
    # bf16 rounding of 2 ranks' other batch make-up: compare at bf16's resolution, not fp32's
    for k in ("loss", "grad_norm", "reward_mean", "entropy", "len_mean"):
        assert m2[k] == pytest.approx(m1[k], rel=2e-2, abs=1e-4), k


def same_logits_in_transformers(d):
    """A checkpoint written under FSDP opens in transformers (when installed; CI installs it) with our logits."""
    try:
        import transformers
    except ImportError:
        assert not os.environ.get("CI"), "CI installs transformers, the peer this check needs"
        return
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32).eval()
    x = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(str(d))(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_fsdp_all_gathers_the_weights_once_per_phase(setup, tmp_path):
    """One all-gather per FSDP unit (2 blocks + the root) per rollout, evaluation, reference, pi_old and update pass,
    whatever the tokens, and none outside those phases (a forward outside them would all-gather on its own)."""
    for tokens, mu in (("4", "1"), ("12", "2")):
        log = run(setup, tmp_path / tokens, 2, "--steps", "1", "--fsdp", "--max-new-tokens", tokens, "--mu", mu,
                  env_extra={"COUNT_GATHERS": "1"})

        def counts(phase):
            return [int(n) for n in re.findall(rf"all-gathers in {phase}: (\d+)", log)]
        assert counts("rollout") == [3, 3] and counts("reference_logprobs") == [3, 3], log  # one each, on each rank
        assert counts("run_eval") == [3] * 4  # before and after training, on each rank
        assert counts("old_logprobs") == [0, 0] if mu == "1" else [3, 3]  # mu 1: pi_old is the policy, no forward
        assert counts("update") == [3 * int(mu)] * 2  # once per optimizer pass
        assert [int(n) for n in re.findall(r"all-gathers outside phases: (\d+)", log)] == [0, 0], log


def test_fsdp_untied_lm_head_with_grad_ckpt_equals_one_process(untied, tmp_path):
    """An untied lm_head (Qwen2.5-7B's kind) gets its gradient from outside any forward, as a tied one does."""
    flags = ("--steps", "1", "--grad-ckpt")
    run(untied, tmp_path / "one", 1, *flags)
    run(untied, tmp_path / "fsdp", 2, *flags, "--fsdp")
    same_run(tmp_path / "fsdp", tmp_path / "one")
    head = [weights(tmp_path / d / "step-1")["lm_head.weight"] for d in ("one", "fsdp")]
    assert (head[0] != weights(untied[1])["lm_head.weight"]).any()  # lm_head itself was trained


def test_fsdp_eval_only_scores_what_one_process_scores(setup, tmp_path):
    run(setup, tmp_path / "one", 1, "--eval-only")
    run(setup, tmp_path / "fsdp", 2, "--eval-only", "--fsdp")
    assert (tmp_path / "one" / "eval.jsonl").read_text() == (tmp_path / "fsdp" / "eval.jsonl").read_text()


@pytest.mark.parametrize("env, message", [
    ({"NAN_RANK": "1"}, "rank 1 of 2 failed at step 1: non-finite loss nan"),
    ({"RAISE_RANK": "0"}, "rank 0 of 2 failed at step 1: KeyError: 'gold' (traceback above)"),
])
def test_fsdp_one_rank_failing_ends_every_rank_with_its_message(setup, tmp_path, env, message):
    rc, log = run(setup, tmp_path / "x", 2, "--steps", "2", "--eval-n", "2", "--fsdp", env_extra=env, ok=False)
    assert rc != 0
    assert log.count("train.py: error: " + message) == 2, log


def test_fsdp_refusals_are_one_line(setup, tmp_path, monkeypatch):
    rc, log = run(setup, tmp_path / "one", 1, "--steps", "1", "--fsdp", ok=False)
    assert rc != 0 and "train.py: error: --fsdp shards over torchrun's ranks" in log
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    cfg = replace(TrainConfig(), fsdp=True)
    config.check_settings(cfg, 2)  # this torch (>= 2.9.1) is fine
    with pytest.raises(BadInput, match="mps"):
        config.check_settings(replace(cfg, device="mps"), 2)
    with pytest.raises(BadInput, match="--compile"):
        config.check_settings(replace(cfg, compile=True), 2)
    for old in ("2.8.0+cu128", "2.9.0", "2.5.1"):
        monkeypatch.setattr(torch, "__version__", old)
        with pytest.raises(BadInput, match=re.escape(f"--fsdp needs torch >= 2.9.1, this is {old}") +
                           ".*silently \\(pytorch#162338\\)"):
            config.check_settings(cfg, 2)
    for ok in ("2.9.1", "2.10.0a0+git", "2.13.0+cpu"):
        monkeypatch.setattr(torch, "__version__", ok)
        config.check_settings(cfg, 2)
    assert fsdp.torch_version("2.10.0a0+git") == (2, 10, 0)


def test_fsdp_whole_games_gather_once_per_rollout_and_equal_one_process(setup, tmp_path):
    """Wordle games (play.py: a generate call a turn, turns of any length per rank) under one all-gather per unit."""
    flags = ("--task", "wordle", "--task-opts", "mode=games,per_secret=1", "--data-dir", "", "--prompts-per-step", "2",
             "--group-size", "3", "--max-new-tokens", "6", "--eval-n", "2", "--steps", "1")
    run(setup, tmp_path / "one", 1, *flags)
    log = run(setup, tmp_path / "fsdp", 2, *flags, "--fsdp", env_extra={"COUNT_GATHERS": "1"})
    assert [int(n) for n in re.findall(r"all-gathers in rollout: (\d+)", log)] == [3, 3], log
    (m1,), (m2,) = without_timing(metrics(tmp_path / "one")), without_timing(metrics(tmp_path / "fsdp"))
    assert m1["len_mean"] > 6  # whole games: the model's tokens over several turns
    for k in m1:
        assert_metric(k, m2[k], m1[k], k)
