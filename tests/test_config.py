"""config.py: the one-line summary a run prints first, in place of the whole config (which is in RUN/config.json)."""
import config


def test_describe_says_what_the_run_is_in_one_short_line():
    cfg = config.TrainConfig(task="arith", task_opts="digits=1", model="m", out="runs/x", steps=24, prompts_per_step=4,
                             group_size=8, lr=2e-5)
    assert config.describe(cfg) == ("training arith (digits=1) on m: 24 steps of 4 prompts x 8 completions, lr 2e-05, "
                                    "beta 0.04; run dir runs/x, every setting in runs/x/config.json")
    ev = config.describe(config.TrainConfig(model="m", out="runs/e", eval_only=True, eval_n=200))
    assert ev == "evaluating gsm8k on m: 200 test problems at most; every setting in runs/e/config.json"
