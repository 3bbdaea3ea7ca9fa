"""What a run reports as it goes, besides its run dir: to TensorBoard and Weights & Biases (--report-to, both
optional and imported only when asked for), and a console line when the run has been silent longer than expected.

    python train.py ... --report-to tensorboard     # event files in RUN/tb: tensorboard --logdir RUN/tb
    python train.py ... --report-to wandb           # a W&B run (WANDB_MODE=offline: only its files in RUN/wandb)
Each metrics.jsonl line is sent as train/NAME and each eval.jsonl line as eval/NAME, at its step; None values (no
KL with --beta 0, ...) are left out. Only rank 0 reports. A resumed run continues the same TensorBoard log, whose
redone steps replace the old ones (purge_step), and the same W&B run, whose id RUN/wandb-id keeps.
"""
import importlib.util
import os
import secrets
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict

TOOLS = ("tensorboard", "wandb")


def tools(report_to):
    """The tools --report-to names (comma-joined; '' or 'none': none); ValueError for one unknown or not installed."""
    names = [t.strip() for t in report_to.split(",") if t.strip() not in ("", "none")]
    for t in names:
        if t not in TOOLS:
            raise ValueError(f"--report-to {report_to}: unknown tool {t!r}; known: {', '.join(TOOLS)}, joined by "
                             "commas")
        if importlib.util.find_spec(t) is None:  # found without importing it: a check before anything loads
            raise ValueError(f"--report-to {t}: {t} is not installed; pip install {t}, or leave --report-to out")
    return tuple(dict.fromkeys(names))


class Reporter:
    """Sends the run's records to the tools asked for; without any (or off rank 0) every call does nothing."""

    def __init__(self, tb=None, wb=None):
        self.tb, self.wb = tb, wb  # a torch.utils.tensorboard.SummaryWriter, a wandb Run

    def log(self, record, prefix):
        """One metrics.jsonl or eval.jsonl record, at its step, as PREFIX/NAME; None values are left out."""
        step = record["step"]
        values = {f"{prefix}/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, global_step=step)
            self.tb.flush()  # a step takes seconds: a crash then loses nothing that metrics.jsonl holds
        if self.wb is not None:
            self.wb.log(values, step=step)

    def close(self):
        """Flush and close TensorBoard's file, finish the W&B run."""
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
        self.tb = self.wb = None


def start(cfg, *, start, rank):
    """The run's Reporter: TensorBoard in RUN/tb and/or a W&B run; start is the step the run continues after."""
    names = tools(cfg.report_to) if rank == 0 else ()
    tb = wb = None
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run redoes the steps after its checkpoint: TensorBoard drops their events from the crashed try
        tb = SummaryWriter(os.path.join(cfg.out, "tb"), purge_step=start + 1 if start else None)
    if "wandb" in names:
        import wandb
        id_file = os.path.join(cfg.out, "wandb-id")  # the same W&B run across resumes
        run_id = open(id_file).read().strip() if os.path.isfile(id_file) else secrets.token_hex(6)
        with open(id_file, "w") as f:
            f.write(run_id + "\n")
        # resume="allow": W&B keeps the history it has and drops re-sent steps it already holds; a resume redoes them
        # with the same values but for the timings (train.py's resume is exact). Its files go in the run dir unless
        # WANDB_DIR says where.
        try:
            wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo"), id=run_id, resume="allow",
                            name=os.path.basename(os.path.abspath(cfg.out)), config=asdict(cfg),
                            dir=None if os.environ.get("WANDB_DIR") else cfg.out)
        except Exception as e:  # not logged in, no network: say so in one line (WANDB_MODE=offline needs neither)
            if tb is not None:
                tb.close()
            raise ValueError(f"--report-to wandb: {type(e).__name__}: {e} (offline: WANDB_MODE=offline)") from None
    return Reporter(tb=tb, wb=wb)


# ----------------------------------------------------------------------------- the console's heartbeat

def where(frame, loop):
    """(the loop's `step` and `t_step`, the outermost function of the loop's file it is in) from a thread's frame."""
    # train_loop's locals: step, the step (run.start before the loop) and t_step, when the step began. The stage is
    # the outermost function of the loop's file under it, past wrappers (torch.no_grad); else the function the loop
    # called (plot), unless that is a context manager's (fail_together's exchange): "the loop"
    stage, callee = None, None
    while frame is not None:
        if frame.f_code is loop.__code__:
            name = callee.f_code.co_name if callee is not None else ""
            return frame.f_locals.get("step"), frame.f_locals.get("t_step"), stage or (
                None if name.startswith("_") else name or None)
        if frame.f_code.co_filename == loop.__code__.co_filename:
            stage = frame.f_code.co_name
        callee, frame = frame, frame.f_back
    return None, None, None


class Heartbeat:
    """A log function that notes when it last printed, and a thread that speaks up when it has been silent too long."""
    # Too long: 10 s (first) until this process has finished a step, then twice its last step's time, so a steady
    # run prints only its step lines; each further line of one silence waits twice as long as the one before.

    def __init__(self, log, *, steps, loop, first=10.0, poll=1.0):
        self.log, self.steps, self.loop, self.first, self.poll = log, steps, loop, first, poll
        self.last = time.time()
        self.done = threading.Event()

    def __call__(self, *args, **kwargs):
        self.last = time.time()
        self.log(*args, **kwargs)

    def watch(self, thread_id):
        """Poll the thread's stack; print `step N/M: still in STAGE` when the console has been silent too long."""
        limit, fired, k, began = self.first, 0.0, 0, None  # k: lines this silence has had; began: t_step seen
        while not self.done.wait(self.poll):
            step, t_step, stage = where(sys._current_frames().get(thread_id), self.loop)
            now = time.time()
            if t_step != began:
                if t_step is not None and began is not None:  # a step ended: it took the time between their starts
                    limit = max(self.first, 2 * (t_step - began))
                began = t_step
            if self.last > fired:  # a line since our last one: a new silence
                k = 0
            if step is not None and now - self.last >= limit * (2 ** (k + 1) - 1):
                if stage == "run_eval":
                    what = f"eval step {step}: still running"
                else:
                    what = f"step {step}/{self.steps}: still in {stage or 'the loop'}"
                self.log(f"  {what} ({now - self.last:.0f} s since the last line)", flush=True)
                fired, k = now, k + 1


@contextmanager
def heartbeat(run, *, loop, first=10.0, poll=1.0):
    """While the block runs loop, rank 0's run.log is a Heartbeat: a silence too long gets a line of where it is."""
    if run.rank != 0:
        yield
        return
    hb = Heartbeat(run.log, steps=run.cfg.steps, loop=loop, first=first, poll=poll)
    run.log = hb
    t = threading.Thread(target=hb.watch, args=(threading.get_ident(),), daemon=True, name="heartbeat")
    t.start()
    try:
        yield
    finally:
        hb.done.set()
        t.join()
        run.log = hb.log
