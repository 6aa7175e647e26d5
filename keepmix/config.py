"""The run configuration: one YAML file, typed and validated.

Contract: `load_config(path)` returns a `RunConfig` or raises one `ConfigError` that lists every problem
at once, each with its key path (`mixture.schedule[1].weights.sqll: no source named 'sqll' ...`).
Relative paths in the file resolve against the file's folder. `dump_config` writes the resolved config
that every run directory keeps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keepmix.errors import ConfigError
from keepmix.eval.tasks import TaskConfig
from keepmix.yamlfile import apply_override, read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear but the head)."
    )
    merge: bool = Field(False, description="Merge the adapter into the weights when writing final/.")


class ModelConfig(_Strict):
    name: str | None = Field(
        None, description="Hugging Face hub id or local folder of the model (weights and tokenizer)."
    )
    gguf_file: str | None = Field(None, description="GGUF file inside `name` (or a path) to load.")
    tokenizer: str | None = Field(None, description="Tokenizer id/folder when it differs from `name`.")
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="'scratch' builds a randomly initialised model from `architecture`."
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description="For init: scratch, the transformers config (model_type plus its fields), "
        "e.g. {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; 'auto' keeps float32 master weights (bf16 comes from autocast on GPUs)."
    )
    trust_remote_code: bool = Field(False, description="Allow code from the model repository to run.")
    attn_implementation: str | None = Field(
        None, description="'sdpa', 'eager', 'flash_attention_2'; None lets transformers choose."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")

    @model_validator(mode="after")
    def _needs_a_model(self) -> ModelConfig:
        if self.init == "pretrained" and not self.name:
            raise ValueError("model.name is required unless init is 'scratch'")
        if self.init == "scratch":
            if not self.architecture or "model_type" not in self.architecture:
                raise ValueError("init: scratch needs architecture with a model_type (e.g. llama)")
            if not (self.tokenizer or self.name):
                raise ValueError("init: scratch needs a tokenizer (model.tokenizer or model.name)")
        return self


class GenerateConfig(_Strict):
    n_docs: int = Field(gt=0, description="Documents the base model writes for this source.")
    max_new_tokens: int = Field(256, gt=0, description="Tokens sampled per document (after its prompt).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1.0: the model's own distribution).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1.0: off).")
    prompts: str | None = Field(
        None, description="Another source's name (its documents' first prompt_tokens tokens), a prompts file "
        "(JSONL with 'prompt' or 'text', or one prompt per line), or null: unconditional, from BOS."
    )
    prompt_tokens: int = Field(16, gt=0, description="Tokens of each document used as a prompt (prompts: a source).")
    batch_size: int = Field(16, gt=0, description="Documents sampled per generate call.")
    seed: int | None = Field(None, description="Sampling seed (default: train.seed).")


class SourceConfig(_Strict):
    name: str = Field(description="Short name of this kind of data (used in metrics and the schedule).")
    path: str | None = Field(
        None, description="JSONL / Parquet / text file or folder, a dataset saved with save_to_disk, "
        "or a Hugging Face hub dataset id (required unless `generate`)."
    )
    generate: GenerateConfig | None = Field(
        None, description="Self-rehearsal: the base model writes this source's documents before training "
        "(replay without the original data); cached like tokenized data."
    )
    format: Literal["text", "chat", "prompt_completion"] = Field("text", description="Record layout.")
    text_field: str = Field("text", description="Field holding the text (format: text).")
    messages_field: str = Field("messages", description="Field holding the chat messages (format: chat).")
    prompt_field: str = Field("prompt", description="Prompt field (format: prompt_completion).")
    completion_field: str = Field("completion", description="Completion field (prompt_completion).")
    loss_on: Literal["all", "completion"] = Field(
        "all", description="Train on all tokens, or only on completions / assistant turns."
    )
    quality_field: str | None = Field(None, description="Numeric field with each document's quality.")
    hf_config: str | None = Field(None, description="Hub dataset configuration name.")
    hf_split: str = Field("train", description="Hub dataset split to read.")
    valid_path: str | None = Field(None, description="Separate held-out file (else split from path).")
    valid_docs: int | float = Field(
        0.05, ge=0, description="Held-out documents: a count (int) or a fraction (float < 1)."
    )
    max_docs: int | None = Field(None, gt=0, description="Use only the first N records.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="Malformed rows: stop with file:line, or skip, count and report them."
    )
    floor: float | None = Field(None, ge=0, le=1, description="This source's minimum share.")
    kl_to_base: float = Field(
        0.0, ge=0, description="beta: add beta * KL(p_base || p_model) per target token of this source's rows "
        "(0 = off)."
    )
    streaming: bool = Field(
        False, description="Read and tokenize record by record into memory-mapped shards (corpora larger "
        "than memory); the first valid_docs records are held out."
    )


class SchedulePoint(_Strict):
    at: float = Field(description="Training progress t in [0, 1].")
    weights: dict[str, float] = Field(description="Share of each source at t (normalised).")


class QualityPoint(_Strict):
    at: float = Field(description="Training progress t in [0, 1].")
    min: float = Field(description="Documents with quality below this are not drawn at t.")


class GuardConfig(_Strict):
    """The retention guard (keepmix/data/guard.py): raises a protected source's share above the schedule
    while its probe metric is behind its step-0 baseline by more than `tolerance`."""

    every: int = Field(10, gt=0, description="Steps between checks of the probe (the baseline is step 0).")
    sources: list[str] | None = Field(
        None, description="Sources to protect; None = every source with a floor > 0."
    )
    metric: Literal["token_acc", "loss"] = Field(
        "token_acc", description="Probe metric: token accuracy (points) or loss (fraction of the baseline)."
    )
    tolerance: float | None = Field(
        None, ge=0, description="How far behind its baseline a source may fall before the guard acts, in "
        "the metric's unit; None = eval.retention_tolerance."
    )
    max_share: float = Field(0.5, gt=0, le=1, description="The guard never raises a source above this share.")
    gain: float = Field(
        0.05, gt=0, le=1, description="Share added per check per tolerance behind (at most 4 x gain per check)."
    )
    decay: float = Field(
        0.5, ge=0, lt=1, description="Once a source is back within half its tolerance, its extra share is "
        "multiplied by this at each check."
    )
    task_keep: float = Field(
        0.5, ge=0, le=1, description="Each unprotected source keeps at least this fraction of its planned "
        "share (and its floor): the guard cannot starve the task."
    )
    probe_docs: int = Field(16, gt=0, description="Held-out documents of each protected source in the probe "
                            "(the first ones of its held-out split).")
    probe_tokens: int | None = Field(
        2048, gt=0, description="The probe's tokens per source, spread evenly over its probe_docs (each "
        "document cut to its first probe_tokens // probe_docs tokens); None: the whole documents."
    )


class MixtureConfig(_Strict):
    schedule: list[SchedulePoint] | None = Field(
        None, description="Schedule points; None = each source in proportion to its tokens."
    )
    interpolation: Literal["linear", "cosine", "step"] = Field(
        "linear", description="How shares move between schedule points."
    )
    floor: float = Field(0.0, ge=0, le=1, description="Minimum share of every source.")
    quality: list[QualityPoint] | None = Field(
        None, description="Rising quality threshold (piecewise linear in t)."
    )
    guard: GuardConfig | None = Field(
        None, description="Retention guard: a closed-loop correction of the schedule (None: off)."
    )


class InitFromConfig(_Strict):
    run: str = Field(description="Run directory whose checkpoint the weights come from (a warm start, not a resume).")
    step: int = Field(gt=0, description="Step of that run's checkpoint (checkpoints/step-N must be complete).")
    optimizer: bool = Field(False, description="Also take the checkpoint's AdamW state (moments); the LR "
                            "schedule, data order and step counter start fresh from this run's config.")


class TrainConfig(_Strict):
    seq_len: int = Field(512, gt=1, description="Tokens per packed row.")
    batch_size: int = Field(16, gt=0, description="Rows per optimizer step (global, all processes).")
    micro_batch_size: int | None = Field(
        None, gt=0, description="Rows per forward pass on each process (gradient accumulation makes up the rest)."
    )
    steps: int = Field(1000, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR / peak (cosine and wsd).")
    lr_schedule: Literal["constant", "linear", "cosine", "wsd"] = Field(
        "cosine", description="LR shape after warmup; wsd = warmup-stable-decay."
    )
    warmup: float = Field(0.05, ge=0, description="Warmup: a fraction of steps (< 1) or a step count.")
    decay: float = Field(0.2, ge=0, le=1, description="wsd: fraction of steps spent decaying.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="AdamW betas, each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm (None: off).")
    split_docs: bool = Field(
        True, description="Split documents across rows (dense packing); False pads instead."
    )
    seed: int = Field(0, description="Seeds the data order, the mixture and initialisation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU."
    )
    loss_impl: Literal["fused", "full"] = Field(
        "fused", description="fused: chunked LM head + loss (no full logits); full: plain."
    )
    compile: bool | Literal["blocks", "model"] = Field(
        False, description="torch.compile for the training steps: blocks (= true) compiles the repeated decoder "
        "block once for all layers; model compiles the whole model (with fsdp, true means model).")
    fsdp: bool = Field(
        False, description="With several processes, shard weights, gradients and optimizer state (FSDP2)."
    )
    threads: int | None = Field(None, gt=0, description="CPU threads (torch.set_num_threads).")
    keep_freed_memory: bool = Field(
        True, description="On the CPU under glibc (Linux): malloc keeps freed blocks up to 1 GiB in the process "
        "instead of returning them to the kernel, so a step's tensors are not faulted in afresh (a step 1.27x as "
        "fast on the demo; the process keeps its peak heap resident). false: glibc's defaults.")
    l2_to_base: float = Field(
        0.0, ge=0, description="lambda: add lambda/2 * ||theta - theta_0||^2 over the trained weights (L2-SP; "
        "LoRA: the adapter's weight change); 0 = off."
    )
    init_from: InitFromConfig | None = Field(
        None, description="Warm start: this run's weights (and optionally optimizer state) from another run's "
        "checkpoint; the base model (baseline, KL and L2 anchors) stays model.name. Recorded in the start record."
    )
    checkpoint_every: int | None = Field(100, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, gt=0, description="Keep the newest K complete checkpoints.")
    log_every: int = Field(1, gt=0, description="Steps between progress updates.")


class EvalConfig(_Strict):
    every: int | None = Field(100, gt=0, description="Steps between evals (also at step 0 and the end).")
    batch_size: int = Field(8, gt=0, description="Rows per eval forward pass.")
    max_valid_tokens: int | None = Field(
        None, gt=0, description="Cap on validation tokens per source (None: all held-out docs)."
    )
    retention_tolerance: float = Field(0.02, ge=0, description="Allowed loss per metric vs baseline.")
    kl_to_base: bool = Field(
        True, description="Report valid/<source>/kl_to_base: KL(p_base || p_model) per held-out token."
    )
    baseline_from: str | None = Field(
        None, description="A run whose step-0 eval to reuse as the baseline (same model, data and eval; checked)."
    )
    tasks: list[Annotated[TaskConfig, Field(discriminator="kind")]] = Field(
        default_factory=list, description="Task evaluators (multiple_choice, generation, sql_execution, lm_eval, open_book)."
    )


class RunConfig(_Strict):
    model: ModelConfig
    sources: list[SourceConfig] = Field(min_length=1)
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: str = Field("runs/run", description="Run directory.")
    cache_dir: str | None = Field(None, description="Token cache (default ~/.cache/keepmix).")
    trackers: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        default_factory=list, description="Optional experiment trackers."
    )
    base_dir: str = Field(".", exclude=True, description="Folder relative paths resolve against.")

    def resolve(self, path: str | None) -> str | None:
        """A config path made absolute against the config file's folder (hub ids stay as they are)."""
        if path is None:
            return None
        p = Path(os.path.expanduser(path))
        if p.is_absolute():
            return str(p)
        candidate = Path(self.base_dir) / p
        if candidate.exists() or path.startswith((".", "/")) or _looks_local(path):
            return str(candidate.resolve())
        return path

    def resolve_local(self, path: str) -> str:
        """A path that is always local (output, cache), made absolute against the config's folder."""
        return str((Path(self.base_dir) / Path(os.path.expanduser(path))).resolve())

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def micro_batch(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size


def _looks_local(path: str) -> bool:
    return Path(path).suffix.lower() in {".jsonl", ".json", ".parquet", ".txt", ".md", ".sqlite", ".db"}


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("multiple_choice", "generation", "sql_execution", "lm_eval", "open_book", "function-after"):
            continue  # pydantic's union-branch tags are not user keys
        else:
            out += f".{part}" if out else str(part)
    return out


def _pydantic_problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        key = _key_path(e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the README's config reference)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            ctx = e.get("ctx", {})
            key += f".{ctx.get('discriminator', 'kind').strip(chr(39))}"
            got = f"{ctx['tag']!r} is not a task kind; " if "tag" in ctx else "required key is missing; "
            problems.append(f"{key}: {got}expected one of {ctx.get('expected_tags', '')}")
            continue
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = e.get("input")
        if e["type"] not in ("extra_forbidden", "missing") and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        problems.append(f"{key}: {msg}")
    return problems


def _semantic_problems(cfg: RunConfig) -> list[str]:
    """Problems that need the whole config: names, schedules, floors, files."""
    problems = []
    names = cfg.source_names
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            problems.append(f"sources[{i}].name: duplicate source name {name!r}")
        seen.add(name)
    listing = ", ".join(names)
    mix = cfg.mixture
    if mix.schedule is not None:
        if not mix.schedule:
            problems.append("mixture.schedule: needs at least one point (or leave it out)")
        last = -1.0
        for i, point in enumerate(mix.schedule):
            key = f"mixture.schedule[{i}]"
            if not 0.0 <= point.at <= 1.0:
                problems.append(f"{key}.at: must lie in [0, 1] (got {point.at})")
            elif point.at <= last:
                problems.append(f"{key}.at: points must be strictly increasing (got {point.at} after {last})")
            else:
                last = point.at
            for src, w in point.weights.items():
                if src not in names:
                    problems.append(f"{key}.weights.{src}: no source named {src!r} (sources: {listing})")
                if w < 0:
                    problems.append(f"{key}.weights.{src}: weight must be >= 0 (got {w})")
            if sum(w for w in point.weights.values() if w > 0) <= 0:
                problems.append(f"{key}.weights: at least one weight must be positive")
    if mix.quality is not None:
        last = -1.0
        for i, point in enumerate(mix.quality):
            if not 0.0 <= point.at <= 1.0 or point.at <= last:
                problems.append(f"mixture.quality[{i}].at: must lie in [0, 1], strictly increasing")
            last = max(last, point.at)
        if not any(s.quality_field for s in cfg.sources):
            problems.append("mixture.quality: no source has a quality_field to threshold")
    floors = [s.floor if s.floor is not None else mix.floor for s in cfg.sources]
    if sum(floors) > 1.0 + 1e-9:
        problems.append(
            f"mixture.floor: floors sum to {sum(floors):.3f} over {len(floors)} sources; they must sum to <= 1"
        )
    problems += _guard_problems(cfg, floors)
    t = cfg.train
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:  # per process; checked again at launch
        problems.append(
            f"train.micro_batch_size: must divide train.batch_size ({t.batch_size}); got {t.micro_batch_size}"
        )
    if t.compile == "blocks" and t.fsdp:
        problems.append("train.compile: blocks is not supported with train.fsdp; use true or model (the whole "
                        "sharded model is compiled)")
    if t.l2_to_base > 0 and t.fsdp:
        problems.append("train.l2_to_base: not supported with train.fsdp (the anchor weights are not sharded); "
                        "use DDP (fsdp: false) or set it to 0")
    if t.warmup >= 1 and int(t.warmup) != t.warmup:
        problems.append(f"train.warmup: a step count must be a whole number (got {t.warmup})")
    if t.warmup >= 1 and t.warmup > t.steps:
        problems.append(f"train.warmup: {int(t.warmup)} warmup steps exceed train.steps ({t.steps})")
    for i, s in enumerate(cfg.sources):
        if (s.path is None) == (s.generate is None):
            problems.append(f"sources[{i}]: give either path (data to read) or generate (self-rehearsal), "
                            f"{'not both' if s.path else 'one of them'}")
        if s.generate is not None:
            problems += _generate_problems(cfg, i)
        for field, value in (("path", s.path), ("valid_path", s.valid_path)):
            resolved = cfg.resolve(value)
            if resolved and Path(resolved).is_absolute() and not Path(resolved).exists():
                problems.append(f"sources[{i}].{field}: file not found: {resolved}")
        if isinstance(s.valid_docs, float) and not s.valid_docs < 1:
            problems.append(f"sources[{i}].valid_docs: a fraction must be < 1 (got {s.valid_docs})")
        if s.streaming and not isinstance(s.valid_docs, int):
            problems.append(f"sources[{i}].valid_docs: a streaming source holds out a count of documents "
                            f"(the first N), not a fraction (got {s.valid_docs})")
        if s.streaming and s.quality_field:
            problems.append(f"sources[{i}].quality_field: not supported with streaming: true")
        if s.kl_to_base > 0 and cfg.train.fsdp:
            problems.append(f"sources[{i}].kl_to_base: not supported with train.fsdp (the frozen base is not "
                            f"sharded); use DDP (fsdp: false) or set it to 0")
        if s.loss_on == "completion" and s.format == "text":
            problems.append(f"sources[{i}].loss_on: 'completion' needs format chat or prompt_completion")
    m = cfg.model
    if m.init == "scratch" and m.architecture:
        problems += _architecture_problems(m.architecture)
    for key in ("output", "cache_dir"):
        value = getattr(cfg, key)
        if value and Path(cfg.resolve_local(value)).is_file():
            problems.append(f"{key}: {cfg.resolve_local(value)} is a file; expected a folder (or a path to create)")
    for field in ("name", "tokenizer"):
        value = getattr(m, field)
        resolved = cfg.resolve(value)
        if value and resolved and Path(resolved).is_absolute() and not Path(resolved).exists():
            problems.append(f"model.{field}: folder not found: {resolved}")
    for i, task in enumerate(cfg.eval.tasks):
        for field in ("path", "database"):
            resolved = cfg.resolve(getattr(task, field, None))
            if resolved and Path(resolved).is_absolute() and not Path(resolved).exists():
                problems.append(f"eval.tasks[{i}].{field}: file not found: {resolved}")
        if getattr(task, "corpus", None) is not None:
            problems += _corpus_problems(cfg, i)
    if cfg.eval.baseline_from and not (Path(cfg.resolve_local(cfg.eval.baseline_from)) / "metrics.jsonl").exists():
        problems.append(f"eval.baseline_from: no run at {cfg.resolve_local(cfg.eval.baseline_from)} "
                        f"(no metrics.jsonl there)")
    if t.init_from is not None:
        problems += _init_from_problems(cfg)
    task_names = [task.name for task in cfg.eval.tasks]
    for name in {n for n in task_names if task_names.count(n) > 1}:
        problems.append(f"eval.tasks: duplicate task name {name!r}")
    return problems


def _init_from_problems(cfg: RunConfig) -> list[str]:
    """train.init_from names a complete checkpoint of a run of the same model (checked by its files only;
    the weights are verified and loaded when the run begins)."""
    init = cfg.train.init_from
    run = Path(cfg.resolve_local(init.run))
    step = run / "checkpoints" / f"step-{init.step:08d}"
    if not (run / "config.yaml").is_file():
        return [f"train.init_from.run: no run at {run} (no config.yaml there)"]
    if not (step / "COMPLETE").is_file():
        have = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")
                      if (p / "COMPLETE").is_file()) if (run / "checkpoints").is_dir() else []
        return [f"train.init_from.step: {run} has no complete checkpoint at step {init.step} "
                f"(complete checkpoints: {', '.join(map(str, have)) or 'none'})"]
    problems = []
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        return [f"train.init_from.run: cannot read {run / 'config.yaml'} ({err})"]
    mine = config_to_dict(cfg)
    def model_key(data: dict, key: str):
        value = (data.get("model") or {}).get(key)
        return {k: v for k, v in value.items() if k != "merge"} if key == "lora" and value else value

    for key in ("name", "gguf_file", "init", "architecture", "lora"):
        if model_key(saved, key) != model_key(mine, key):
            problems.append(f"train.init_from.run: {run} trained another model (model.{key} differs); its "
                            f"weights do not fit this run's")
    return problems


def _corpus_problems(cfg: RunConfig, i: int) -> list[str]:
    """An open_book task's corpus is a source with data, or a file that exists."""
    corpus, key = cfg.eval.tasks[i].corpus, f"eval.tasks[{i}].corpus"
    if corpus in cfg.source_names:
        if cfg.sources[cfg.source_names.index(corpus)].generate is not None:
            return [f"{key}: source {corpus!r} is generated (self-rehearsal); retrieve from a source with data "
                    f"or a file"]
        return []
    resolved = Path(cfg.resolve_local(corpus))
    if not resolved.is_file():
        return [f"{key}: {corpus!r} is neither a source name ({', '.join(cfg.source_names)}) nor a file "
                f"({resolved} not found)"]
    return []


def _generate_problems(cfg: RunConfig, i: int) -> list[str]:
    s, key = cfg.sources[i], f"sources[{i}].generate"
    problems = []
    if s.format != "text" or s.loss_on != "all":
        problems.append(f"sources[{i}].format: a generated source holds plain text: format text, loss_on all")
    if s.streaming or s.valid_path or s.quality_field:
        problems.append(f"{key}: not with streaming, valid_path or quality_field")
    prompts = s.generate.prompts
    if prompts is not None and prompts not in cfg.source_names:
        resolved = Path(cfg.resolve_local(prompts))
        if not resolved.is_file():
            problems.append(f"{key}.prompts: {prompts!r} is neither a source name ({', '.join(cfg.source_names)}) "
                            f"nor a file ({resolved} not found)")
    elif prompts is not None:
        other = cfg.sources[cfg.source_names.index(prompts)]
        if other.generate is not None:
            problems.append(f"{key}.prompts: source {prompts!r} is generated itself; prompt from a source with data")
    if isinstance(s.valid_docs, int) and s.valid_docs >= s.generate.n_docs:
        problems.append(f"sources[{i}].valid_docs: {s.valid_docs} held out of {s.generate.n_docs} generated "
                        f"documents leaves none for training")
    return problems


def _architecture_problems(arch: dict) -> list[str]:
    """model.architecture checked the way transformers would build it, before any work starts."""
    from transformers import CONFIG_MAPPING

    model_type = arch["model_type"]
    if model_type not in CONFIG_MAPPING:
        near = ", ".join(sorted(k for k in CONFIG_MAPPING if k[:3] == str(model_type)[:3])[:5]) or "llama, qwen2, gpt2"
        return [f"model.architecture.model_type: {model_type!r} is not a model type transformers knows "
                f"(e.g. {near})"]
    try:
        config = CONFIG_MAPPING[model_type](**{k: v for k, v in arch.items() if k != "model_type"})
    except Exception as err:  # noqa: BLE001 - transformers' config classes raise several kinds (strict dataclasses)
        cause = err.__cause__ or err
        return [f"model.architecture: transformers refuses it for {model_type!r}: {cause}"]
    problems = []
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and not getattr(config, "head_dim", None) \
            and heads > 0 and hidden % heads:
        problems.append(f"model.architecture.num_attention_heads: {heads} heads do not divide hidden_size "
                        f"{hidden}; expected a divisor of it (or set head_dim)")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        problems.append(f"model.architecture.num_key_value_heads: {kv} does not divide num_attention_heads "
                        f"{heads}; expected a divisor of it")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value <= 0:
            problems.append(f"model.architecture.{key}: must be a positive integer (got {value})")
    return problems


def guarded_sources(cfg: RunConfig) -> list[str]:
    """The sources the guard protects: the named ones, else every source with a floor > 0."""
    guard = cfg.mixture.guard
    if guard is None:
        return []
    if guard.sources is not None:
        return list(guard.sources)
    return [s.name for s in cfg.sources if (s.floor if s.floor is not None else cfg.mixture.floor) > 0]


def _guard_problems(cfg: RunConfig, floors: list[float]) -> list[str]:
    guard = cfg.mixture.guard
    if guard is None:
        return []
    names, problems = cfg.source_names, []
    key = "mixture.guard"
    for i, name in enumerate(guard.sources or []):
        if name not in names:
            problems.append(f"{key}.sources[{i}]: no source named {name!r} (sources: {', '.join(names)})")
    protected = [n for n in guarded_sources(cfg) if n in names]
    if not protected:
        problems.append(f"{key}.sources: nothing to protect: no source has a floor > 0; name the sources "
                        f"to protect (sources: {', '.join(names)})")
    elif len(set(protected)) == len(names):
        problems.append(f"{key}.sources: protects every source; at least one source must be left "
                        "unprotected to give up the share the guard adds")
    for name in protected:
        i = names.index(name)
        if guard.max_share < floors[i] - 1e-12:
            problems.append(f"{key}.max_share: {guard.max_share:g} is below the floor of {name} "
                            f"({floors[i]:g}); it must be >= the floor of every protected source")
        s = cfg.sources[i]
        if s.valid_path is None and s.valid_docs == 0:
            problems.append(f"{key}.sources: {name} has no held-out documents (sources[{i}].valid_docs is 0 "
                            f"and no valid_path); the guard's probe needs some")
        elif s.valid_path is None and isinstance(s.valid_docs, int) and guard.probe_docs > s.valid_docs:
            problems.append(f"{key}.probe_docs: {guard.probe_docs} is larger than the held-out set of {name} "
                            f"({s.valid_docs} documents, sources[{i}].valid_docs); expected at most {s.valid_docs}")
        else:
            most, where = _held_out_at_most(cfg, s, i)
            if most == 0:
                problems.append(f"{key}.sources: {name} has no held-out documents ({where} hold none); the "
                                "guard's probe needs some")
            elif most is not None and guard.probe_docs > most:
                problems.append(f"{key}.probe_docs: {guard.probe_docs} is larger than the held-out set of {name} "
                                f"(at most {most} documents, {where}); expected at most {most}")
    return problems


_COUNTED_BYTES = 64 << 20  # JSONL files up to this size are counted at validation time


def _held_out_at_most(cfg: RunConfig, s: SourceConfig, i: int) -> tuple[int | None, str]:
    """An upper bound on a source's held-out documents when it is cheap to know before reading the data
    (a local JSONL valid_path, or a fraction of a local JSONL path): its non-blank lines. None otherwise;
    the exact count is checked again once the data are read."""

    def lines(value: str | None) -> int | None:
        path = Path(cfg.resolve(value) or "")
        if path.suffix.lower() != ".jsonl" or not path.is_file() or path.stat().st_size > _COUNTED_BYTES:
            return None
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())

    if s.valid_path is not None:
        return lines(s.valid_path), f"the records of sources[{i}].valid_path"
    if isinstance(s.valid_docs, float):
        n = lines(s.path)
        if n is not None:
            n = min(n, s.max_docs or n)
            return min(int(round(n * s.valid_docs)), max(n - 1, 0)), f"sources[{i}].valid_docs of {n} records"
    return None, ""


def _without(data: dict, locations: list[tuple]) -> dict:
    """A deep copy of data without the keys at the given pydantic error locations."""
    import copy

    out = copy.deepcopy(data)
    for loc in locations:
        node, path = out, [p for p in loc if p not in ("multiple_choice", "generation", "sql_execution", "open_book")]
        for part in path[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                break
        else:
            if isinstance(node, dict) and path:
                node.pop(path[-1], None)
    return out


def parse_config(data: Any, *, source: str = "<config>", base_dir: str | Path = ".") -> RunConfig:
    """Validate a config dict; raise one ConfigError with every problem."""
    if data is None:
        raise ConfigError(source, ["(top level): the file is empty; expected the keys model, sources, ..."])
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of keys, got {type(data).__name__}"])
    data = {**data, "base_dir": str(Path(base_dir).resolve())}
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        problems = _pydantic_problems(err)
        # Report the whole-config problems too: drop the keys already reported and check the rest.
        pruned = _without(data, [e["loc"] for e in err.errors()])
        try:
            problems += [p for p in _semantic_problems(RunConfig.model_validate(pruned)) if p not in problems]
        except ValidationError:
            pass
        raise ConfigError(source, problems) from None
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, validate and resolve a YAML config file; `overrides` are dotted keys (train.steps: 10)."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict):
        for key, value in (overrides or {}).items():
            apply_override(data, key, value)
    return parse_config(data, source=str(path), base_dir=path.parent)


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data, paths made absolute so the run directory is self-contained."""
    data = cfg.model_dump(mode="json")
    for i, s in enumerate(cfg.sources):
        data["sources"][i]["path"] = cfg.resolve(s.path)
        if s.generate is not None and s.generate.prompts and s.generate.prompts not in cfg.source_names:
            data["sources"][i]["generate"]["prompts"] = cfg.resolve_local(s.generate.prompts)
        data["sources"][i]["valid_path"] = cfg.resolve(s.valid_path)
    for field in ("name", "tokenizer", "gguf_file"):
        data["model"][field] = cfg.resolve(getattr(cfg.model, field)) if field != "gguf_file" else cfg.model.gguf_file
    for i, task in enumerate(cfg.eval.tasks):
        for field in ("path", "database"):
            if data["eval"]["tasks"][i].get(field):
                data["eval"]["tasks"][i][field] = cfg.resolve(getattr(task, field))
        corpus = getattr(task, "corpus", None)
        if corpus is not None and corpus not in cfg.source_names:
            data["eval"]["tasks"][i]["corpus"] = cfg.resolve_local(corpus)
        if getattr(task, "include_path", None):
            data["eval"]["tasks"][i]["include_path"] = [cfg.resolve_local(p) for p in task.include_path]
    data["output"] = cfg.resolve_local(cfg.output)
    if cfg.eval.baseline_from:
        data["eval"]["baseline_from"] = cfg.resolve_local(cfg.eval.baseline_from)
    if cfg.train.init_from is not None:
        data["train"]["init_from"]["run"] = cfg.resolve_local(cfg.train.init_from.run)
    data["cache_dir"] = cfg.resolve_local(cfg.cache_dir) if cfg.cache_dir else None
    return data


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# Keys whose change keeps a resumed run exactly equal to an uninterrupted one.
RESUME_SAFE_KEYS = (
    "eval",
    "output",
    "cache_dir",
    "trackers",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.device",
    "train.threads",
    "train.keep_freed_memory",
    "model.lora.merge",
)


# Keys that cannot change what the untouched model scores at step 0: a run may reuse another run's
# baseline eval (eval.baseline_from) when everything else is equal. sources[].floor and kl_to_base are
# dropped separately.
BASELINE_SAFE_KEYS = (
    "mixture",
    "output",
    "cache_dir",
    "trackers",
    "eval.every",
    "eval.retention_tolerance",
    "eval.baseline_from",
    "model.lora.merge",
    *(f"train.{k}" for k in ("steps", "lr", "init_from", "min_lr_ratio", "lr_schedule", "warmup", "decay", "weight_decay",
                             "l2_to_base",
                             "betas", "eps", "grad_clip", "batch_size", "micro_batch_size", "checkpoint_every",
                             "keep_checkpoints", "log_every", "compile", "threads", "keep_freed_memory", "fsdp")),
)


def baseline_changes(old: dict, new: dict) -> list[str]:
    """Keys of two resolved configs whose difference changes what the untouched model scores at step 0
    (sources by position, so a difference names its key, sources.0.path; floors and KL only steer training)."""

    def comparable(data: dict) -> dict:
        return {**data, "sources": {str(i): {k: v for k, v in src.items() if k not in ("floor", "kl_to_base")}
                                    for i, src in enumerate(data.get("sources") or [])}}

    return changed_keys(comparable(old), comparable(new), safe=BASELINE_SAFE_KEYS)


def changed_keys(old: dict, new: dict, prefix: str = "", safe: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, except the `safe` ones."""
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        if any(dotted == k or dotted.startswith(k + ".") for k in safe):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, dotted + ".", safe)
        elif a != b:
            out.append(dotted)
    return out
