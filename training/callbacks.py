"""Trainer callbacks: a wall-clock budget, a JSONL metrics log, and a compact progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from sitcom.files import write_atomic


class FinalEvalCallback(TrainerCallback):
    """Evaluate and save on the last step, or when `minutes` of this run are spent.

    Trainer only evaluates/saves on multiples of eval_steps/save_steps; forcing both at the
    end means the final weights always take part in choosing the best checkpoint. In a
    data-parallel run rank 0's clock decides for every rank, so all stop at the same step.
    """

    def __init__(self, minutes: float | None = None):
        self.seconds = None if minutes is None else minutes * 60
        self.start = time.monotonic()
        self.budget_hit = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is not None and self.out_of_time(args.device):
            self.budget_hit = True
            control.should_training_stop = True
        if control.should_training_stop or state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control

    def out_of_time(self, device: torch.device) -> bool:
        spent = time.monotonic() - self.start >= self.seconds
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return spent
        flag = torch.tensor([int(spent)], device=device)  # nccl needs it on the rank's GPU
        dist.broadcast(flag, src=0)
        return bool(flag.item())


class MetricsLogCallback(TrainerCallback):
    """Append every Trainer log (train loss, eval nll/bpb) to a JSONL file, with tokens/s.
    Only the world's rank 0 writes it (Trainer's logs are already averaged over ranks)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume, drop lines logged past the checkpoint: those steps are redone.
        if state.is_world_process_zero and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.global_step
            ]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.last = (time.monotonic(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = {"step": state.global_step, "time": round(time.time(), 3), **(logs or {})}
        now, tokens = time.monotonic(), state.num_input_tokens_seen
        if "loss" in record and self.last is not None and now > self.last[0]:
            record["tokens_per_second"] = round((tokens - self.last[1]) / (now - self.last[0]), 1)
            self.last = (now, tokens)
        if logs is not None and "tokens_per_second" in record:
            logs["tokens_per_second"] = record["tokens_per_second"]  # the progress bar shows it
        if not state.is_world_process_zero:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class CompactProgressCallback(ProgressCallback):
    """Trainer's tqdm bar, with loss and tokens/s as a postfix instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        if "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.3f}"}
            if logs.get("tokens_per_second"):
                postfix["tok/s"] = f"{logs['tokens_per_second']:.0f}"
            self.training_bar.set_postfix(postfix, refresh=False)
        elif "eval_bpb" in logs:
            self.training_bar.write(
                f"step {state.global_step}: val loss {logs['eval_nll']:.4f}  "
                f"ppl {logs['eval_ppl']:.2f}  bpb {logs['eval_bpb']:.4f}"
            )
