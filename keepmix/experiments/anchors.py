"""The anchors experiment: what a loss term and self-rehearsal buy against forgetting (docs/ANCHORS.md).

Contract of `run_anchors_experiment(out, quick=False, beta=1.0, progress="auto")`: on the demo's setup
(SmolLM2-135M-Instruct, its prose / code / SQL data, its budget: `keepmix.demo.run` FULL or QUICK) it
trains four arms from the same base model with the same steps, rows and learning rate:
  finetune_only  SQL data alone (prose and code measured, never trained on);
  keepmix        the demo's kept mixture (prose and code replayed at their floors);
  keepmix_kl     the same, plus `kl_to_base: beta` on prose and code;
  keepmix_self   the case of a user without the original data: prose and code are not trained on, and a
                 self-rehearsal source written by the base model from BOS takes their share.
Every arm evaluates at step 0, halfway and at the end. The experiment prints and writes
(`<out>/anchors.md`, `<out>/anchors.json`) a table per arm — SQL accuracy (seen / unseen templates),
prose and code token accuracy (and the change from the base), KL to the base on prose and code, tokens/s
of the training steps, wall time — the time the base model took to write the rehearsal documents, and the
correlation between the halfway KL to base and the end's token-accuracy retention over arms and sources.
The arms run through the sweep's arm runner (keepmix.sweep.arms): a completed arm whose config is
unchanged is reused, an interrupted one resumes, and the base model is evaluated once per group of arms
that share it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from keepmix.config import parse_config
from keepmix.demo.data import build_demo_data
from keepmix.demo.model import prepare_model
from keepmix.demo.run import FULL, QUICK, arm_config
from keepmix.report.metrics import evals, of_kind, read_metrics, run_status
from keepmix.sweep.arms import Arm, check_arms, run_arm, share_baseline

ARMS = ("finetune_only", "keepmix", "keepmix_kl", "keepmix_self")
KEPT = ("prose", "code")


def anchor_arm_config(arm: str, data, model_section: dict, s, out: Path, device: str, beta: float,
                      self_docs: int) -> dict:
    """The demo's arm config, changed only where this arm differs."""
    cfg = arm_config("finetune_only" if arm == "finetune_only" else "keepmix", data, model_section, s, out, device)
    cfg["output"] = str(out / arm)
    cfg["eval"]["every"] = max(s.steps // 2, 1)
    if arm == "keepmix_kl":
        for source in cfg["sources"]:
            if source["name"] in KEPT:
                source["kl_to_base"] = beta
    if arm == "keepmix_self":
        share = sum(s.floors[k] for k in KEPT)
        for source in cfg["sources"]:
            if source["name"] in KEPT:
                source["floor"] = 0.0
        for point in cfg["mixture"]["schedule"]:
            kept = sum(point["weights"].pop(k) for k in KEPT)
            point["weights"].update({k: 0.0 for k in KEPT}, self=kept)
        cfg["sources"].append({"name": "self", "floor": share, "valid_docs": max(self_docs // 8, 2),
                               "generate": {"n_docs": self_docs, "max_new_tokens": s.seq_len, "temperature": 1.0,
                                            "batch_size": 16}})
    return cfg


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def correlation(xs: list[float], ys: list[float]) -> dict:
    """Pearson and Spearman correlation of paired values (None with fewer than 3 pairs)."""
    if len(xs) < 3 or np.std(xs) == 0 or np.std(ys) == 0:
        return {"n": len(xs), "pearson": None, "spearman": None}
    return {"n": len(xs), "pearson": float(np.corrcoef(xs, ys)[0, 1]),
            "spearman": float(np.corrcoef(_ranks(xs), _ranks(ys))[0, 1])}


def summarize(run_dirs: dict[str, Path], baseline: dict[str, float]) -> dict:
    rows, pairs = {}, []
    for arm, run_dir in run_dirs.items():
        records = read_metrics(run_dir / "metrics.jsonl")
        ev = evals(records)
        end, mid = ev[-1]["metrics"], ev[len(ev) // 2]["metrics"]
        rates = [r["tokens_per_s"] for r in of_kind(records, "train")[1:]]
        row = {"sql_seen": end.get("task/sql/acc/seen"), "sql_unseen": end.get("task/sql/acc/unseen"),
               "tokens_per_s": statistics.median(rates) if rates else None,
               "wall_s": run_status(records).wall_s, "mid_step": ev[len(ev) // 2]["step"]}
        for src in KEPT:
            row[f"{src}_acc"] = end[f"valid/{src}/token_acc"]
            row[f"{src}_delta"] = end[f"valid/{src}/token_acc"] - baseline[f"valid/{src}/token_acc"]
            row[f"{src}_kl"] = end.get(f"valid/{src}/kl_to_base")
            row[f"{src}_kl_mid"] = mid.get(f"valid/{src}/kl_to_base")
            if row[f"{src}_kl_mid"] is not None:
                pairs.append((row[f"{src}_kl_mid"], row[f"{src}_delta"]))
        rows[arm] = row
    return {"rows": rows, "kl_mid_vs_retention": {**correlation([p[0] for p in pairs], [p[1] for p in pairs]),
                                                  "pairs": pairs}}


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def markdown(summary: dict, baseline: dict[str, float], info: dict) -> str:
    head = ("| arm | SQL seen | SQL unseen | prose token acc | code token acc | KL prose | KL code | "
            "tokens/s | wall |")
    lines = [head, "|" + "---|" * 9,
             f"| base | {_pct(baseline.get('task/sql/acc/seen'))} | {_pct(baseline.get('task/sql/acc/unseen'))} | "
             f"{_pct(baseline['valid/prose/token_acc'])} | {_pct(baseline['valid/code/token_acc'])} | 0 | 0 | - | - |"]
    for arm, r in summary["rows"].items():
        kl = [("-" if r[f"{s}_kl"] is None else f"{r[f'{s}_kl']:.4f}") for s in KEPT]
        lines.append(f"| {arm} | {_pct(r['sql_seen'])} | {_pct(r['sql_unseen'])} | "
                     f"{_pct(r['prose_acc'])} ({r['prose_delta'] * 100:+.1f}) | "
                     f"{_pct(r['code_acc'])} ({r['code_delta'] * 100:+.1f}) | {kl[0]} | {kl[1]} | "
                     f"{r['tokens_per_s']:.0f} | {r['wall_s']:.0f} s |")
    c = summary["kl_mid_vs_retention"]
    lines += ["", f"Halfway KL to base vs end token-accuracy change (points), over arms x {{prose, code}}: "
                  f"n = {c['n']}, Pearson {c['pearson'] if c['pearson'] is None else round(c['pearson'], 3)}, "
                  f"Spearman {c['spearman'] if c['spearman'] is None else round(c['spearman'], 3)}."]
    if info.get("generation"):
        g = info["generation"]
        lines.append(f"Self-rehearsal: {g['n_docs']} documents of {g['max_new_tokens']} tokens written by the base "
                     f"model in {g['seconds']:.0f} s ({g['docs_per_s']:.2f} documents/s; 1,000 such documents "
                     f"would take about {1000 / g['docs_per_s'] / 60:.0f} min).")
    return "\n".join(lines) + "\n"


def run_anchors_experiment(out: Path, *, quick: bool = False, beta: float = 1.0, progress: str = "auto",
                           model: str | None = None, device: str = "auto", settings=None) -> dict:
    s = settings or (QUICK if quick else FULL)
    out = Path(out).resolve()
    started = time.perf_counter()
    data = build_demo_data(out / "data", seed=s.seed, sql_eval_seen=s.sql_eval_seen,
                           sql_eval_unseen=s.sql_eval_unseen, **s.data_sizes)
    model_section = prepare_model(model, out / "model", log=print)
    # the self arm replays as many rows as the kept mixture gives prose and code together
    self_docs = max(int(s.steps * s.batch_size * sum(s.floors[k] for k in KEPT)) + 8, 16)
    info: dict = {}
    run_dirs = {}
    arms = [Arm(arm, anchor_arm_config(arm, data, model_section, s, out, device, beta, self_docs),
                source=f"anchors experiment ({arm})", base_dir=out) for arm in ARMS]
    check_arms(arms)
    share_baseline(arms)  # the self-rehearsal arm has another source, so it evaluates its own baseline
    for arm in arms:
        if arm.name == "keepmix_self":
            info["generation"] = _time_generation(arm.config, out)
        print(f"anchors experiment: arm {arm.name}", flush=True)
        clock = time.perf_counter()
        run_arm(arm, progress=progress, keep_checkpoints=False)
        info[f"{arm.name}_s"] = round(time.perf_counter() - clock, 1)
        run_dirs[arm.name] = arm.run_dir
    baseline = evals(read_metrics(out / ARMS[0] / "metrics.jsonl"))[0]["metrics"]
    summary = summarize(run_dirs, baseline)
    summary.update(info=info, beta=beta, mode="quick" if quick else "full", total_s=time.perf_counter() - started,
                   baseline=baseline)
    text = markdown(summary, baseline, info)
    (out / "anchors.md").write_text(text)
    (out / "anchors.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n" + text, flush=True)
    return summary


def _time_generation(cfg_data: dict, out: Path) -> dict:
    """Write the self-rehearsal documents ahead of the arm (it then reads them from the cache), timed."""
    from keepmix.data.build import cache_root
    from keepmix.data.rehearsal import generate_sources
    from keepmix.model import load_configured

    cfg = parse_config(cfg_data, source="anchors experiment (keepmix_self)", base_dir=out)
    g = next(src.generate for src in cfg.sources if src.generate)
    saved = out / "generation.json"
    if (out / "keepmix_self" / "metrics.jsonl").exists() and saved.exists():
        return json.loads(saved.read_text())  # the arm is reused: its documents were timed when written
    model, tokenizer = load_configured(cfg)  # the arm's own model, so the arm reads these documents back
    clock = time.perf_counter()
    generate_sources(cfg, model, tokenizer, cache_dir=cache_root(cfg), device="cpu", log=print)
    seconds = time.perf_counter() - clock
    timing = {"n_docs": g.n_docs, "max_new_tokens": g.max_new_tokens, "seconds": seconds,
              "docs_per_s": g.n_docs / max(seconds, 1e-9)}
    saved.write_text(json.dumps(timing) + "\n")
    return timing
