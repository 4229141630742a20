"""The training loop shared by policy SFT and PPM training.

- Steps: an optimizer step consumes `batch_size` examples (global, across
  data-parallel ranks) from a seeded per-epoch shuffle; each rank takes its
  slice and runs it in micro-batches of `micro_batch` (gradient accumulation).
  The loss of a step is sum(example losses) / sum(example weights) over the
  whole global step (token-level mean for SFT, group-weighted mean for the
  PPM), so it does not depend on the micro-batch size or the number of ranks.
- Precision: bf16 autocast on GPU, fp32 on CPU.
- Data parallel: started with `torchrun`, the same entry point wraps the model
  in DistributedDataParallel (NCCL on GPU, gloo on CPU); rank 0 logs, saves
  checkpoints and the final model.
- Checkpoints: every `checkpoint_every` optimizer steps, model + optimizer +
  scheduler + step go (atomically) to `<work>/checkpoint.pt`, tagged with a
  fingerprint of the data and hyperparameters. A rerun with the same
  fingerprint resumes at the saved step; a different fingerprint starts over.
- Progress: a tqdm bar with the loss, examples/s and tokens/s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    lr: float = 7e-6                 # paper: 7e-6 (SFT and PPM)
    epochs: float = 2.0              # paper: SFT 2 epochs, PPM 1
    batch_size: int = 128            # examples per optimizer step (global); paper: SFT 128, PPM 512
    micro_batch: int = 4             # examples per forward pass (per rank)
    max_steps: int = 0               # >0: exactly this many optimizer steps (overrides epochs)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 4096           # tokens; longer SFT examples are dropped, PPM inputs keep their end
    seed: int = 0
    checkpoint_every: int = 50       # optimizer steps (0: no checkpoints)
    lora_r: int = 0                  # >0: LoRA adapters of this rank (needs `peft`), merged on save
    lora_alpha: int = 32
    threads: int = 0                 # torch CPU threads (0: torch default)
    progress: bool = True

    def fingerprint(self, data_digest: str, extra: dict[str, Any] | None = None) -> str:
        d = asdict(self)
        for k in ("checkpoint_every", "progress", "threads", "micro_batch"):
            d.pop(k)
        return hashlib.sha256(json.dumps([d, data_digest, extra or {}], sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        local, device = 0, torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def digest_rows(rows: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def index_stream(n: int, epochs: float, seed: int) -> list[int]:
    """Example indices for the whole run: seeded shuffle per epoch, fractional last epoch."""
    total = max(1, int(math.ceil(n * epochs)))
    out: list[int] = []
    e = 0
    while len(out) < total:
        order = list(range(n))
        random.Random(f"{seed}:{e}").shuffle(order)
        out += order
        e += 1
    return out[:total]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopTraining(Exception):
    """Raised by an `on_step` hook to stop (tests simulate a crash with it)."""


def train_loop(model: torch.nn.Module, n_examples: int, *, cfg: TrainConfig, dist: Dist, work_dir: Path,
               fingerprint: str, forward: Callable[[torch.nn.Module, list[int]], torch.Tensor],
               weight_of: Callable[[int], float], tokens_of: Callable[[int], int],
               on_step: Callable[[int, float], None] | None = None, desc: str = "train") -> dict[str, Any]:
    """Run the optimisation; `forward(model, idx)` returns the summed loss of those examples."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    stream, steps_total = _plan_steps(n_examples, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_schedule(cfg.warmup_ratio, steps_total))
    ckpt = work_dir / CHECKPOINT
    start_step = _resume(ckpt, fingerprint, model, optim, sched, cfg, dist, desc, steps_total)
    ddp = _data_parallel(model, dist)
    use_bf16 = dist.device.type == "cuda" and torch.cuda.is_bf16_supported()
    progress = _Progress(cfg, dist, desc, steps_total, start_step)
    history: list[float] = []
    model.train()
    for step in range(start_step, steps_total):
        batch = stream[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        step_loss = _optimizer_step(ddp, batch, forward, weight_of, params, optim, sched, cfg, dist, use_bf16)
        history.append(step_loss)
        done = step + 1
        progress.update(done, step_loss, len(batch), sum(tokens_of(i) for i in batch))
        if cfg.checkpoint_every > 0 and (done % cfg.checkpoint_every == 0) and done < steps_total:
            _save_checkpoint(ckpt, fingerprint, done, model, optim, sched, dist)
        if on_step is not None:
            on_step(done, step_loss)
    progress.close()
    model.eval()
    return {"steps": steps_total, "resumed_from": start_step, "loss_first": history[0] if history else None,
            "loss_last": history[-1] if history else None, "losses": [round(x, 5) for x in history],
            "seconds": round(progress.elapsed(), 2), "examples_seen": progress.seen_ex,
            "tokens_seen": progress.seen_tok, "device": str(dist.device), "world_size": dist.world, "bf16": use_bf16}


# ------------------------------------------------------------------ preparing: data stream, schedule, resume
def _plan_steps(n_examples: int, cfg: TrainConfig) -> tuple[list[int], int]:
    """The example stream of the whole run and its number of optimizer steps.

    `max_steps > 0` asks for exactly that many steps, the data cycled (with fresh
    seeded shuffles) when the epochs do not cover them.
    """
    stream = index_stream(n_examples, cfg.epochs, cfg.seed)
    steps_total = math.ceil(len(stream) / cfg.batch_size)
    if cfg.max_steps > 0:
        steps_total = cfg.max_steps
        extra = 1
        while len(stream) < steps_total * cfg.batch_size:
            stream += index_stream(n_examples, 1, cfg.seed * 1000 + extra)
            extra += 1
    return stream, steps_total


def _lr_schedule(warmup_ratio: float, steps_total: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup, then linear decay to 10% of the peak."""
    warmup = max(1, int(warmup_ratio * steps_total)) if warmup_ratio > 0 else 0

    def lr_lambda(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        rest = max(1, steps_total - warmup)
        return max(0.0, 1.0 - (step - warmup) / rest) * 0.9 + 0.1

    return lr_lambda


def _resume(ckpt: Path, fingerprint: str, model: torch.nn.Module, optim: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, dist: Dist, desc: str,
            steps_total: int) -> int:
    """Load a checkpoint of the same run (same fingerprint) into model, optimizer and schedule; the step to start at."""
    if cfg.checkpoint_every <= 0 or not ckpt.is_file():
        return 0
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        if dist.main:
            log.info("%s: checkpoint %s is for other data/settings; starting over", desc, ckpt)
        return 0
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    sched.load_state_dict(state["sched"])
    start_step = int(state["step"])
    if dist.main:
        log.info("%s: resuming from checkpoint at step %d/%d", desc, start_step, steps_total)
    return start_step


def _data_parallel(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    if dist.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


# ------------------------------------------------------------------ one optimizer step
def _optimizer_step(ddp: torch.nn.Module, batch: list[int], forward: Callable[[torch.nn.Module, list[int]], torch.Tensor],
                    weight_of: Callable[[int], float], params: list[torch.nn.Parameter], optim: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, dist: Dist,
                    use_bf16: bool) -> float:
    """One optimizer step on the global `batch`; returns its loss (the same on every rank)."""
    optim.zero_grad(set_to_none=True)
    step_loss = _accumulate_gradients(ddp, batch, forward, weight_of, cfg, dist, use_bf16)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optim.step()
    sched.step()
    return step_loss


def _accumulate_gradients(ddp: torch.nn.Module, batch: list[int],
                          forward: Callable[[torch.nn.Module, list[int]], torch.Tensor],
                          weight_of: Callable[[int], float], cfg: TrainConfig, dist: Dist, use_bf16: bool) -> float:
    """Backward over this rank's slice of `batch` in micro-batches; the loss is normalised by the
    weight of the whole global batch, so neither `micro_batch` nor the number of ranks changes it.
    DDP all-reduces the gradients on the last micro-batch only."""
    denom = sum(weight_of(i) for i in batch) or 1.0
    mine = batch[dist.rank::dist.world]
    micro = [mine[j:j + cfg.micro_batch] for j in range(0, len(mine), cfg.micro_batch)]
    step_loss = 0.0
    for k, idx in enumerate(micro):
        sync = k == len(micro) - 1
        ctx = ddp.no_sync() if (dist.world > 1 and not sync) else contextlib.nullcontext()
        with ctx, torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = forward(ddp, idx) / denom
            (loss * dist.world).backward()
        step_loss += float(loss.detach())
    if dist.world > 1:
        t = torch.tensor([step_loss], device=dist.device)
        torch.distributed.all_reduce(t)
        step_loss = float(t.item())
    return step_loss


# ------------------------------------------------------------------ progress and checkpoints
class _Progress:
    """Loss, examples/s and tokens/s on rank 0: a tqdm bar, or without one (logs to a file, a Job)
    a progress line now and then with the same numbers."""

    def __init__(self, cfg: TrainConfig, dist: Dist, desc: str, steps_total: int, start_step: int):
        self.desc, self.steps_total, self.start_step = desc, steps_total, start_step
        self.main = dist.main
        self.bar = None
        if dist.main and cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps_total, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        self.log_every = max(1, steps_total // 20)
        self.t0 = time.monotonic()
        self.seen_ex = self.seen_tok = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def update(self, done: int, step_loss: float, examples: int, tokens: int) -> None:
        self.seen_ex += examples
        self.seen_tok += tokens
        dt = max(1e-6, self.elapsed())
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{step_loss:.4f}", ex_s=f"{self.seen_ex / dt:.2f}",
                                 tok_s=f"{self.seen_tok / dt:.0f}")
            self.bar.update(1)
        elif self.main and (done == self.steps_total or done - self.start_step in (1, 2, 5)
                            or done % self.log_every == 0):
            log.info("%s: step %d/%d loss %.4f, %.2f examples/s, %.0f tokens/s, eta %.0f s", self.desc, done,
                     self.steps_total, step_loss, self.seen_ex / dt, self.seen_tok / dt,
                     dt / (done - self.start_step) * (self.steps_total - done))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _save_checkpoint(ckpt: Path, fingerprint: str, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, dist: Dist) -> None:
    """Rank 0 saves model + optimizer + schedule + step atomically; every rank waits for it."""
    if dist.main:
        _atomic_torch_save({"fingerprint": fingerprint, "step": step, "model": model.state_dict(),
                            "optim": optim.state_dict(), "sched": sched.state_dict()}, ckpt)
    barrier(dist)


def remove_checkpoint(work_dir: Path) -> None:
    (Path(work_dir) / CHECKPOINT).unlink(missing_ok=True)
