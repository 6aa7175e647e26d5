"""Standalone evaluation: the same held-out and task metrics as a run's evals, on any models.

Contract: `evaluate(config, models)` loads each model ('base' = the config's model; a folder such as a
run's final/; a keepmix checkpoint, RUN/checkpoints/step-N; a hub id; a PEFT adapter folder) and returns
{model: {metric: value}} with exactly the metric keys a training run logs (`valid/<source>/...`,
`task/<task>/...`; `valid/<source>/kl_to_base` against the config's model when eval.kl_to_base), computed
as the run computes them: on its train.threads, each model built in its model.dtype with its attention
(`load`), held-out data under the autocast of its train.precision (bf16 for a bf16 run, on the CPU too),
tasks in float32 — so a run's step-0, checkpoint and final evals are reproduced to the bit.
`print_comparison` prints them side by side with deltas against the first model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from keepmix.config import RunConfig, load_config
from keepmix.data.build import cache_root, prepare_sources
from keepmix.data.rehearsal import generate_sources
from keepmix.errors import KeepmixError
from keepmix.eval.lm import validation_metrics
from keepmix.model import load_configured, load_model, load_trainable_state, quiet_transformers, weight_dtype
from keepmix.training.forward import FrozenBase, LossModel
from keepmix.training.precision import eval_autocast, slow_bf16_notice


def load(cfg: RunConfig, name: str):
    """(model, tokenizer) for `--model NAME`, built as the config's run builds its model (model.dtype,
    model.attn_implementation): 'base' = the config's model; a keepmix checkpoint folder
    (RUN/checkpoints/step-N) = the model of that run at that step; a PEFT adapter folder; a Hugging
    Face model folder (a run's final/, a merge-alpha-* folder) or hub id."""
    m = cfg.model
    if name == "base":
        return load_configured(cfg, lora=False)
    path = Path(name)
    if (path / "metrics.jsonl").exists() and not (path / "config.json").exists():
        raise KeepmixError(f"--model {name}: is a run directory, not a model; use its final/ folder "
                           f"({path / 'final'}) or one of its checkpoints ({path / 'checkpoints'}/step-N)")
    if (path / "state.json").exists() and (path / "rng.pt").exists():
        return _load_checkpoint(path)
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name):
        raise KeepmixError(f"--model {name}: folder not found (expected a model folder, a run's final/, or a "
                           f"hub id such as HuggingFaceTB/SmolLM2-135M)")
    if path.is_dir() and not any((path / f).exists() for f in ("config.json", "adapter_config.json")):
        raise KeepmixError(f"--model {name}: this folder holds no model (no config.json, no adapter_config.json); "
                           f"expected a Hugging Face model folder such as a run's final/, a PEFT adapter "
                           f"folder, or a keepmix checkpoint (RUN/checkpoints/step-N)")
    if (path / "adapter_config.json").exists():
        return _load_adapter(cfg, path)
    return load_model(name, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                      attn_implementation=m.attn_implementation)


def _load_adapter(cfg: RunConfig, path: Path):
    """A PEFT adapter folder on its base model: the config's own base (built as the run builds it: a
    from-scratch architecture, a GGUF file) when the adapter was trained on it — a run's final/ records
    that base's folder, or none for a scratch model — else the base the adapter names, loaded by PEFT."""
    import json

    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoTokenizer

    try:
        named = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise KeepmixError(f"--model {path}: adapter_config.json is unreadable ({err})") from None
    quiet_transformers()
    if named in (None, cfg.model.name, cfg.resolve(cfg.model.name)):
        base, tokenizer = load_configured(cfg, lora=False)
        return PeftModel.from_pretrained(base, str(path)), tokenizer
    m = cfg.model
    attention = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=weight_dtype(m.dtype), **attention)
    except (OSError, ValueError) as err:
        ours = repr(cfg.model.name) if cfg.model.name else "model.architecture, from scratch"
        raise KeepmixError(f"--model {path}: could not load the adapter's base model {named!r} "
                           f"(adapter_config.json's base_model_name_or_path; the config's model is {ours}): "
                           f"{err}") from None
    return model, AutoTokenizer.from_pretrained(path)


def _load_checkpoint(path: Path):
    """A keepmix checkpoint as the model it holds: its run's model, built from the checkpoint's own config
    (so from the model that run trained, whatever the eval config names), with the checkpoint's trained
    weights (or LoRA adapter) loaded — verified against the manifest first."""
    import yaml
    from safetensors.torch import load_file

    from keepmix.config import parse_config
    from keepmix.training import checkpoint as ckpt

    if (path / ckpt.SHARDED).is_dir():
        raise KeepmixError(f"--model {path}: a sharded (train.fsdp) checkpoint; evaluate the run's final/ (gathered "
                           f"whole), or gather the shards first with torch.distributed.checkpoint.format_utils."
                           f"dcp_to_torch_save")
    problem = ckpt.verify_checkpoint(path)
    if problem is not None:
        raise KeepmixError(f"--model {path}: the checkpoint is incomplete or damaged ({problem})")
    saved = path / "config.yaml"
    if not saved.exists():
        raise KeepmixError(f"--model {path}: the checkpoint has no config.yaml, so the model it trained is unknown")
    run_cfg = parse_config(yaml.safe_load(saved.read_text()), source=str(saved), base_dir=path.parent.parent)
    model, tokenizer = load_configured(run_cfg)
    try:
        load_trainable_state(model, load_file(path / "weights.safetensors"))
    except KeepmixError as err:
        raise KeepmixError(f"--model {path}: {err}") from None
    return model, tokenizer


def as_the_run(cfg: RunConfig, device: torch.device, say) -> None:
    """Set this process up as the config's run set its own: freed memory kept on the CPU, the run's thread
    count (its summation order, and the key of its base's stored states); `say` the slow-bf16 notice
    where it applies. For `keepmix eval` and `keepmix merge`."""
    from keepmix.training.cpu_memory import keep_freed_memory_for_run

    if notice := slow_bf16_notice(cfg.train.precision, device.type == "cuda"):
        say(notice)
    keep_freed_memory_for_run(cfg, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def evaluate(config: RunConfig | str | Path, models: list[str], overrides: dict | None = None,
             device: str | None = None, say=print) -> dict[str, dict[str, float]]:
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"))
    as_the_run(cfg, device, say=lambda text: say(f"eval: {text}"))
    from keepmix.eval.tasks import check_tasks

    check_tasks(list(cfg.eval.tasks), Path(cfg.base_dir), cfg.sources)
    base, generated = None, {}
    if cfg.eval.kl_to_base or any(s.generate for s in cfg.sources):
        base_model, base_tokenizer = load(cfg, "base")
        base_model.to(device)
        # self-rehearsal documents are the base model's (from the cache when a run already wrote them)
        generated = generate_sources(cfg, base_model, base_tokenizer, cache_dir=cache_root(cfg), device=device,
                                     log=lambda _: None)
        if cfg.eval.kl_to_base:  # every model's drift is measured against the config's model
            base = FrozenBase(base_model, as_is=True, store=cache_root(cfg) / "base_hidden")
    results = {}
    for name in models:
        model, tokenizer = load(cfg, name)
        results[name] = model_metrics(cfg, model, tokenizer, base=base, generated=generated, device=device)
        del model
    return results


def model_metrics(cfg: RunConfig, model, tokenizer, *, base=None, generated: dict | None = None,
                  device: torch.device) -> dict[str, float]:
    """One in-memory model's held-out and task metrics (the keys a run's evals log); `base` a FrozenBase
    for valid/<source>/kl_to_base, `generated` the self-rehearsal sources' files."""
    from keepmix.eval.tasks import run_task

    model.to(device).eval()
    sources = prepare_sources(cfg, tokenizer, log=lambda _: None, generated=generated or {})
    # a model with another vocabulary has no next-token distribution comparable with the base's
    comparable = base is not None and model.get_output_embeddings().weight.shape == base.head.weight.shape
    with eval_autocast(cfg.train.precision, device):  # as the run's prepared loss model scores them
        metrics = validation_metrics(LossModel(model, cfg.train.loss_impl, base if comparable else None),
                                     [(s.name, s.valid) for s in sources],
                                     seq_len=cfg.train.seq_len, batch_size=cfg.eval.batch_size,
                                     pad_id=tokenizer.pad_token_id, device=device,
                                     max_tokens=cfg.eval.max_valid_tokens, kl_to_base=comparable)
    for task in cfg.eval.tasks:
        for key, value in run_task(task, model, tokenizer, base_dir=Path(cfg.base_dir), device=device,
                                   batch_size=cfg.eval.batch_size, sources=cfg.sources).items():
            metrics[f"task/{task.name}/{key}"] = value
    return metrics


def print_comparison(results: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(results)
    keys = sorted({k for m in results.values() for k in m})
    table = Table(title="keepmix eval", show_lines=False)
    table.add_column("metric")
    for i, name in enumerate(names):
        table.add_column(name if i == 0 else f"{name} (Δ)", justify="right")
    for key in keys:
        first = results[names[0]].get(key)
        cells = []
        for i, name in enumerate(names):
            value = results[name].get(key)
            if value is None:
                cells.append("—")
            elif i == 0 or first is None:
                cells.append(f"{value:.4g}")
            else:
                cells.append(f"{value:.4g} ({value - first:+.3g})")
        table.add_row(key, *cells)
    Console().print(table)


def load_base(cfg: RunConfig):
    """The config's model, untouched (model, tokenizer)."""
    return load(cfg, "base")
