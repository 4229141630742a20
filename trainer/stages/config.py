"""`EvolveConfig`: every setting of `rstar evolve` (flags, env `RSTAR_EVOLVE_<FIELD>`, a `--config` YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from rstar.config import ConfigError, field
from trainer.training import TrainConfig

BOOTSTRAPS = ("reference", "teacher", "policy")


@dataclass
class EvolveConfig:
    store_url: str = field("", "object store URL ('' = $RSTAR_STORE_URL, else $RSTAR_HOME/store)")
    pool: str = field("", "problem pool JSONL (id, problem, answer[, solution]) for synthesis; several files "
                      "comma-separated (e.g. gsm8k_train.jsonl,math_train.jsonl)")
    pool_limit: int = field(0, "use the first N problems of each pool file (0 = all)")
    pool_offset: int = field(0, "skip the first N problems of each pool file (a fresh slice for a later round)")
    exclude: str = field("", "JSONL files whose ids are left out of the pool (comma-separated; the dev set "
                         "is always left out), e.g. math_dev100.jsonl")
    dev: str = field("", "dev set JSONL for the promotion gate (its ids are excluded from the pool)")
    dev_limit: int = field(0, "evaluate on the first N dev problems (0 = all)")
    base_model: str = field("default", "BASE model every round fine-tunes from ('default' = the embedded Qwen2.5-Coder-0.5B-Instruct; or an embedded model's name, or a directory)")
    shards: int = field(1, "synthesis shards (`rstar evolve --rounds` runs them one after the other)")
    chunk: int = field(64, "problems per stored trajectory shard (the unit of resumption)")
    bootstrap: str = field("reference", "round-1 synthesis: reference (GSM8K solutions), teacher, policy, or "
                           "reference+policy / reference+teacher (both: converted references and MCTS trees)")
    teacher_url: str = field("", "OpenAI-compatible server for bootstrap=teacher (e.g. http://host:8000/v1)")
    teacher_model: str = field("", "model name at the teacher endpoint")
    teacher_api_key: str = field("", "bearer token for the teacher endpoint (or env OPENAI_API_KEY)")
    teacher_timeout: float = field(120.0, "seconds per teacher request")
    policy_address: str = field("", "policy service for synthesis ('' = run the current policy in-process)")
    ppm_address: str = field("", "PPM service for PPM-augmented synthesis ('' = in-process)")
    sandbox_address: str = field("", "sandbox service ('' = in-process sandbox)")
    call_timeout: float = field(3600.0, "deadline in seconds of one policy/PPM service call in synthesis (one call "
                                "expands every active tree; a CPU takes minutes)")
    rollouts: str = field("8,16,16,16", "MCTS rollouts per problem by round (the last value repeats)")
    candidates: int = field(4, "k candidate steps per expansion")
    max_depth: int = field(16, "maximum steps per trajectory")
    max_step_tokens: int = field(256, "token limit of one generated step")
    temperature: float = field(0.7, "policy sampling temperature in synthesis")
    ppm_from_round: int = field(3, "first round whose synthesis uses the PPM (PPM-augmented)")
    sft_top_k: int = field(2, "SFT trajectories kept per problem")
    sft_lr: float = field(7e-6, "SFT learning rate (paper 7e-6)")
    sft_epochs: float = field(2.0, "SFT epochs (paper 2)")
    sft_batch_size: int = field(128, "SFT examples per optimizer step (paper 128)")
    sft_micro_batch: int = field(4, "SFT examples per forward pass")
    sft_max_steps: int = field(0, "SFT optimizer steps (0 = epochs decide)")
    sft_max_length: int = field(4096, "SFT sequence length (longer examples are dropped)")
    markers: str = field("added", "step markers in the tokenizer: added, special, none")
    lora_r: int = field(0, "LoRA rank for SFT (0 = full fine-tune)")
    ppm_mode: str = field("full", "what PPM training updates: full (backbone + head, the paper) or head (frozen "
                          "backbone, hidden states computed once, a linear head fitted on them: one forward "
                          "pass per input, sized for a CPU)")
    ppm_holdout: float = field(0.0, "share of the round's problems (a stable hash of the id) whose trees are kept "
                               "out of PPM training; their pairs give the PPM's held-out pairwise accuracy")
    ppm_head_lr: float = field(1e-3, "learning rate of the head in ppm_mode=head")
    ppm_lr: float = field(7e-6, "PPM learning rate (paper 7e-6)")
    ppm_epochs: float = field(1.0, "PPM epochs (paper 1)")
    ppm_batch_size: int = field(512, "PPM pairs per optimizer step (paper 512)")
    ppm_micro_batch: int = field(8, "PPM pairs per forward pass")
    ppm_max_steps: int = field(0, "PPM optimizer steps (0 = epochs decide)")
    ppm_max_length: int = field(2048, "PPM input tokens (longer inputs keep their end)")
    min_q_margin: float = field(0.5, "PPM pair filter: Q(pos) - Q(neg) at least this")
    min_edit_distance: int = field(20, "PPM pair filter: edit distance between the two steps at least this")
    eval_max_tokens: int = field(256, "tokens per step in evaluation")
    eval_max_depth: int = field(16, "steps per trajectory in evaluation")
    eval_batch: int = field(8, "problems per generate call in evaluation")
    max_regression: float = field(0.0, "promotion gate: allowed drop of greedy dev accuracy vs CURRENT")
    min_accuracy: float = field(0.0, "promotion gate: minimum greedy dev accuracy")
    work_dir: str = field("", "local scratch for models and checkpoints ('' = $RSTAR_HOME/evolve)")
    threads: int = field(0, "torch CPU threads (0 = default)")
    seed: int = field(0, "seed of synthesis and training")
    progress: bool = field(True, "progress bars")

    def validate(self) -> None:
        methods = self.bootstrap.split("+")
        if not methods or any(m not in BOOTSTRAPS for m in methods) or len(set(methods)) != len(methods) \
                or ("teacher" in methods and "policy" in methods):
            raise ConfigError(f"bootstrap must be one of {BOOTSTRAPS} or reference+policy / reference+teacher, "
                              f"got {self.bootstrap!r}")
        if self.ppm_mode not in ("full", "head"):
            raise ConfigError(f"ppm_mode must be full or head, got {self.ppm_mode!r}")
        if not 0 <= self.ppm_holdout < 1:
            raise ConfigError(f"ppm_holdout must be in [0, 1), got {self.ppm_holdout}")
        if self.pool_limit < 0 or self.pool_offset < 0:
            raise ConfigError("pool_limit and pool_offset must be >= 0")
        if self.shards < 1 or self.chunk < 1:
            raise ConfigError("shards and chunk must be >= 1")
        try:
            r = [int(x) for x in self.rollouts.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError(f"rollouts: comma-separated integers expected, got {self.rollouts!r}") from e
        if not r or min(r) < 1:
            raise ConfigError("rollouts needs at least one positive value")

    def rollouts_for(self, round_no: int) -> int:
        r = [int(x) for x in self.rollouts.split(",") if x.strip()]
        return r[min(round_no, len(r)) - 1]

    def sft_train(self) -> TrainConfig:
        return TrainConfig(lr=self.sft_lr, epochs=self.sft_epochs, batch_size=self.sft_batch_size,
                           micro_batch=self.sft_micro_batch, max_steps=self.sft_max_steps,
                           max_length=self.sft_max_length, seed=self.seed, lora_r=self.lora_r,
                           threads=self.threads, progress=self.progress)

    def ppm_train(self) -> TrainConfig:
        return TrainConfig(lr=self.ppm_head_lr if self.ppm_mode == "head" else self.ppm_lr, epochs=self.ppm_epochs, batch_size=self.ppm_batch_size,
                           micro_batch=self.ppm_micro_batch, max_steps=self.ppm_max_steps,
                           max_length=self.ppm_max_length, seed=self.seed, threads=self.threads,
                           progress=self.progress)
