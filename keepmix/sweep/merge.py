"""`keepmix merge RUN`: interpolate a run's final weights back toward its base model, measured.

Contract of `merge_run(run_dir, alphas, ...)`: loads the run's resolved config (run_dir/config.yaml),
its base model θ0 and its final/ model θ; for each α builds θ0 + α(θ − θ0) (torch.lerp; a LoRA run: the
adapter with its update scaled by α) and evaluates it with the run's evals (keepmix.eval.runner's
metrics: the same held-out data, tasks and keys as the run's eval records, held-out data under the run's
train.precision as its evals were). Retention is against the
run's own step-0 baseline; α = 0 *is* the base model, so its metrics are that baseline, reused, unless
`reuse_baseline=False` or the baseline scored something else (a warm start's checkpoint). Writes run_dir/merge.json ({points: [{alpha, metrics, retention, reused}]}, read by
the run's report and a sweep's Pareto plot), prints the table, and with `write=ALPHA` saves that model as
a Hugging Face folder run_dir/merge-alpha-<ALPHA> (a LoRA adapter merged in). Returns the merge.json data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from keepmix.config import parse_config
from keepmix.errors import KeepmixError


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in str(text).split(",") if a.strip()]
    except ValueError:
        raise KeepmixError(f"--alpha {text!r}: expected numbers separated by commas, e.g. 0,0.25,0.5,0.75,1") from None
    if not alphas or any(not math.isfinite(a) for a in alphas):
        raise KeepmixError(f"--alpha {text!r}: expected finite numbers separated by commas, e.g. 0,0.5,1")
    return alphas


def _run_parts(run_dir: Path):
    from keepmix.report.metrics import read_metrics

    saved, final = run_dir / "config.yaml", run_dir / "final"
    if not saved.exists() or not (run_dir / "metrics.jsonl").exists():
        raise KeepmixError(f"{run_dir}: not a keepmix run directory (config.yaml and metrics.jsonl expected)")
    if not final.is_dir():
        raise KeepmixError(f"{run_dir}: has no final/ model yet (the run has not completed); merge needs it")
    cfg = parse_config(yaml.safe_load(saved.read_text()), source=str(saved), base_dir=run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    base = _step0(records)
    if base is None:
        raise KeepmixError(f"{run_dir}/metrics.jsonl has no step-0 (baseline) eval record")
    return cfg, final, base["metrics"], _baseline_is_the_base(records)


def _step0(records: list[dict]) -> dict | None:
    from keepmix.report.metrics import evals

    return next((r for r in evals(records) if r["step"] == 0), None)


def _baseline_is_the_base(records: list[dict], depth: int = 0) -> bool:
    """Whether a run's step-0 eval (in its `records`) scored its base model (model.name), so α = 0 may reuse
    it. A warm start (train.init_from) scores its starting checkpoint at step 0 instead, unless its baseline
    came from a run (eval.baseline_from) whose own step 0 was the base — what a sweep's branches do."""
    from keepmix.report.metrics import of_kind, read_metrics

    step0 = _step0(records)
    if step0 is None:
        return False
    if step0.get("baseline_from"):
        try:
            other = read_metrics(Path(step0["baseline_from"]) / "metrics.jsonl")
        except (OSError, KeepmixError):
            return False
        return depth < 8 and _baseline_is_the_base(other, depth + 1)
    start = next(iter(of_kind(records, "start")), None)
    return start is not None and not start.get("init_from")


def merge_run(run_dir: str | Path, alphas: list[float], *, write: float | None = None, reuse_baseline: bool = True,
              device: str | None = None, say=print) -> dict:
    from keepmix.data.build import cache_root
    from keepmix.eval.retention import compute_retention
    from keepmix.eval.runner import as_the_run, load, load_base, model_metrics
    from keepmix.eval.tasks import task_directions, task_tolerances
    from keepmix.model import interpolate, save_final, with_scaled_adapter
    from keepmix.training.forward import FrozenBase

    run_dir = Path(run_dir).resolve()
    if write is not None and write not in alphas:
        alphas = [*alphas, write]
    cfg, final_dir, baseline, baseline_is_base = _run_parts(run_dir)
    if reuse_baseline and not baseline_is_base:
        say("merge: the run's step-0 baseline scored its warm start (train.init_from), not the base model; "
            "α = 0 is evaluated, and retention stays against that baseline, as in the run's own evals")
        reuse_baseline = False
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"))
    as_the_run(cfg, dev, say=lambda text: say(f"merge: {text}"))
    base_model, tokenizer = load_base(cfg)
    lora = (final_dir / "adapter_config.json").exists()
    final_model = None if lora else load(cfg, str(final_dir))[0]  # as the run built its model: dtype, attention
    frozen = (FrozenBase(load_base(cfg)[0], as_is=True, store=cache_root(cfg) / "base_hidden").to(dev)
              if cfg.eval.kl_to_base else None)
    generated = {}
    if any(s.generate for s in cfg.sources):
        from keepmix.data.rehearsal import generate_sources

        generated = generate_sources(cfg, base_model, tokenizer, cache_dir=cache_root(cfg), device=dev,
                                     log=lambda _: None)
    tolerances = task_tolerances(list(cfg.eval.tasks))
    # an lm_eval task's metrics go the way the harness says (bits_per_byte: lower is better), as in the run
    directions = task_directions(list(cfg.eval.tasks), Path(cfg.base_dir))
    points = []
    for alpha in alphas:
        if alpha == 0 and reuse_baseline:
            metrics, reused = dict(baseline), True
        else:
            model = (with_scaled_adapter(base_model, final_dir, alpha) if lora
                     else interpolate(base_model, final_model, alpha))
            metrics, reused = model_metrics(cfg, model, tokenizer, base=frozen, generated=generated, device=dev), False
            if write is not None and alpha == write:
                out = run_dir / f"merge-alpha-{alpha:g}"
                save_final(model.to("cpu"), tokenizer, out, merge_lora=lora)
                say(f"merge: wrote α={alpha:g} to {out}")
            del model
        say(f"merge: α={alpha:g} evaluated{' (the baseline, reused)' if reused else ''}")
        points.append({"alpha": alpha, "reused": reused, "metrics": metrics,
                       "retention": compute_retention(baseline, metrics, cfg.eval.retention_tolerance, tolerances,
                                                      directions)})
    data = {"run_dir": str(run_dir), "lora": lora, "baseline": baseline, "points": points}
    (run_dir / "merge.json").write_text(json.dumps(data, indent=1) + "\n")
    print(table(data), flush=True)
    return data


def table(data: dict) -> str:
    """α rows × metric columns (value and change vs the baseline, in points for accuracies)."""
    keys = [k for k in data["points"][0]["retention"]]
    keys = [k for k in keys if k.startswith("task/") or k.endswith("/token_acc")] or keys
    lines = ["| α | " + " | ".join(keys) + " | flagged |", "|---" * (len(keys) + 2) + "|"]
    for p in data["points"]:
        cells = []
        for k in keys:
            e = p["retention"][k]
            cells.append(f"{e['now']:.4f} ({100 * e['delta']:+.1f})")
        flagged = sum(e["flagged"] for e in p["retention"].values())
        lines.append(f"| {p['alpha']:g}{' (base)' if p['reused'] else ''} | " + " | ".join(cells) + f" | {flagged} |")
    return "\n".join(lines)
