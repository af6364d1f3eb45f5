"""Training-loop machinery shared by every stage: thread tuning, per-step seeds, learning rate,
checkpoints and done markers, EMA, progress bars.

Every random draw of step k of a stage comes from a generator seeded with (seed, stage, k), so a resumed
run produces the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from storage.atomic import atomic_write_json

_STAGE_IDS = {name: i + 1 for i, name in enumerate(("vae", "latents", "unet", "classifier", "eval"))}


class Interrupted(Exception):
    """Raised after the checkpoint requested by --interrupt STAGE:STEP has been written."""


class ThreadTuner:
    """Intra-op thread count for the training loops: a fixed number, or `auto`.

    `auto` is for shared machines: every `period` steps it times `probe_steps` steps with 1 thread and
    `probe_steps` with 2, then keeps the faster for the rest of the period (two OpenMP threads on a
    2-core machine that is also running other jobs can be several times slower than one).
    Results then match a fixed-thread run statistically, not bit for bit.
    """

    def __init__(self) -> None:
        self.auto = False
        self.period, self.probe_steps = 100, 3
        self.times: dict[int, list[float]] = {1: [], 2: []}
        self.choice = 2
        self.t0 = 0.0
        self.current = 0
        self.counts = {1: 0, 2: 0}

    def pop_counts(self) -> dict[int, int]:
        """Steps run with each thread count since the last call (recorded in the stage log)."""
        counts, self.counts = self.counts, {1: 0, 2: 0}
        return counts

    def configure(self, setting: str) -> None:
        self.auto = setting == "auto"
        self.choice = 2 if self.auto else int(setting)
        self.set(self.choice)

    def set(self, n: int) -> None:
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n

    def begin(self, step: int) -> None:
        if self.auto:
            pos = step % self.period
            if pos == 0:
                self.times = {1: [], 2: []}
            if pos < 2 * self.probe_steps:
                self.set(1 if pos < self.probe_steps else 2)
            else:
                if pos == 2 * self.probe_steps and self.times[1] and self.times[2]:
                    self.choice = min(self.times, key=lambda k: float(np.median(self.times[k])))
                self.set(self.choice)
        self.t0 = time.perf_counter()

    def probe(self, workload: Any) -> None:
        """`auto`: run `workload` with 1 and with 2 threads, keep the faster (for evaluation loops)."""
        if not self.auto:
            return
        times = {}
        for n in (1, 2):
            self.set(n)
            t0 = time.perf_counter()
            workload()
            times[n] = time.perf_counter() - t0
        self.choice = min(times, key=times.__getitem__)
        self.set(self.choice)

    def end(self, step: int) -> None:
        self.counts[self.current] = self.counts.get(self.current, 0) + 1
        if self.auto and step % self.period < 2 * self.probe_steps:
            self.times[self.current].append(time.perf_counter() - self.t0)


TUNER = ThreadTuner()


def step_seed(seed: int, stage: str, step: int) -> int:
    return (seed * 1_000_003 + _STAGE_IDS[stage] * 100_000_007 + step) % (2**62)


def batch_indices(n: int, batch: int, step: int, seed: int, stage: str) -> torch.Tensor:
    """Positions step*batch ... of an endless sequence of per-epoch permutations (stateless)."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, stage, 10**7 + epoch)))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class Checkpointer:
    """Periodic stage checkpoints in the work dir (torch.save of tensors/ints only; never shipped)."""

    def __init__(
        self,
        work: Path,
        stage: str,
        every_s: float,
        interrupt: tuple[str, int] | None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.path = work / f"ckpt_{stage}.pt"
        self.device = device
        self.stage = stage
        self.every_s = every_s
        self.last = time.monotonic()
        self.interrupt = interrupt

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location=self.device, weights_only=True)

    def maybe_save(self, next_step: int, total: int, state_fn: Any) -> None:
        interrupt_now = self.interrupt is not None and self.interrupt == (self.stage, next_step)
        due = time.monotonic() - self.last >= self.every_s
        if (due or interrupt_now) and next_step < total:
            tmp = self.path.with_suffix(".tmp")
            torch.save({"step": next_step, **state_fn()}, tmp)
            tmp.replace(self.path)
            self.last = time.monotonic()
            tqdm.write(f"[{self.stage}] checkpoint at step {next_step}/{total} -> {self.path}")
        if interrupt_now:
            raise Interrupted(f"interrupted after {self.stage} step {next_step} (--interrupt)")


def progress_bar(total: int, initial: int, desc: str) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, mininterval=0.5 if tty else 20, dynamic_ncols=tty)


def mark_done(work: Path, stage: str, info: dict[str, Any]) -> None:
    atomic_write_json(work / f"{stage}.done.json", info)


def done_info(work: Path, stage: str) -> dict[str, Any] | None:
    p = work / f"{stage}.done.json"
    return json.loads(p.read_text()) if p.is_file() else None


def detached_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EMA:
    """Exponential moving average of parameters (and copied buffers), with warm-up (1+s)/(10+s)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = detached_state(model)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)
