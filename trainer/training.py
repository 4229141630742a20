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
    stream = index_stream(n_examples, cfg.epochs, cfg.seed)
    steps_total = math.ceil(len(stream) / cfg.batch_size)
    if cfg.max_steps > 0:   # an exact number of optimizer steps, cycling the data when needed
        steps_total = cfg.max_steps
        extra = 1
        while len(stream) < steps_total * cfg.batch_size:
            stream += index_stream(n_examples, 1, cfg.seed * 1000 + extra)
            extra += 1
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * steps_total)) if cfg.warmup_ratio > 0 else 0

    def lr_lambda(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        rest = max(1, steps_total - warmup)
        return max(0.0, 1.0 - (step - warmup) / rest) * 0.9 + 0.1

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda)
    start_step = 0
    ckpt = work_dir / CHECKPOINT
    if cfg.checkpoint_every > 0 and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optim.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            start_step = int(state["step"])
            if dist.main:
                log.info("%s: resuming from checkpoint at step %d/%d", desc, start_step, steps_total)
        elif dist.main:
            log.info("%s: checkpoint %s is for other data/settings; starting over", desc, ckpt)
    ddp = model
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    use_bf16 = dist.device.type == "cuda" and torch.cuda.is_bf16_supported()
    bar = None
    if dist.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps_total, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
    history: list[float] = []
    log_every = max(1, steps_total // 20)
    t0 = time.monotonic()
    seen_ex = seen_tok = 0
    model.train()
    for step in range(start_step, steps_total):
        batch = stream[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        denom = sum(weight_of(i) for i in batch) or 1.0
        mine = batch[dist.rank::dist.world]
        micro = [mine[j:j + cfg.micro_batch] for j in range(0, len(mine), cfg.micro_batch)]
        optim.zero_grad(set_to_none=True)
        step_loss = 0.0
        for k, idx in enumerate(micro):
            sync = k == len(micro) - 1
            ctx = ddp.no_sync() if (dist.world > 1 and not sync) else _nullcontext()
            with ctx, torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = forward(ddp, idx) / denom
                (loss * dist.world).backward()
            step_loss += float(loss.detach())
        if dist.world > 1:
            t = torch.tensor([step_loss], device=dist.device)
            torch.distributed.all_reduce(t)
            step_loss = float(t.item())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        sched.step()
        history.append(step_loss)
        seen_ex += len(batch)
        seen_tok += sum(tokens_of(i) for i in batch)
        done = step + 1
        dt = max(1e-6, time.monotonic() - t0)
        if bar is not None:
            bar.set_postfix(loss=f"{step_loss:.4f}", ex_s=f"{seen_ex / dt:.2f}", tok_s=f"{seen_tok / dt:.0f}")
            bar.update(1)
        elif dist.main and (done == steps_total or done - start_step in (1, 2, 5) or done % log_every == 0):
            # no bar (logs to a file, a Job): a progress line now and then, with the same numbers
            log.info("%s: step %d/%d loss %.4f, %.2f examples/s, %.0f tokens/s, eta %.0f s", desc, done,
                     steps_total, step_loss, seen_ex / dt, seen_tok / dt,
                     dt / (done - start_step) * (steps_total - done))
        if cfg.checkpoint_every > 0 and (done % cfg.checkpoint_every == 0) and done < steps_total:
            if dist.main:
                _atomic_torch_save({"fingerprint": fingerprint, "step": done, "model": model.state_dict(),
                                    "optim": optim.state_dict(), "sched": sched.state_dict()}, ckpt)
            barrier(dist)
        if on_step is not None:
            on_step(done, step_loss)
    if bar is not None:
        bar.close()
    model.eval()
    elapsed = time.monotonic() - t0
    return {"steps": steps_total, "resumed_from": start_step, "loss_first": history[0] if history else None,
            "loss_last": history[-1] if history else None, "losses": [round(x, 5) for x in history],
            "seconds": round(elapsed, 2), "examples_seen": seen_ex, "tokens_seen": seen_tok,
            "device": str(dist.device), "world_size": dist.world, "bf16": use_bf16}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def remove_checkpoint(work_dir: Path) -> None:
    (Path(work_dir) / CHECKPOINT).unlink(missing_ok=True)
