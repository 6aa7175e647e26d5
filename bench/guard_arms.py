"""The retention guard on the demo's setup: fine-tune only, static keepmix and guarded keepmix, side by side.

    python bench/guard_arms.py --out guard_runs                 # the three arms, the demo's FULL settings
    python bench/guard_arms.py --out guard_runs --only guarded --every 2 --tolerance 0.01   # retry one arm
    python bench/guard_arms.py --out guard_runs --only guarded guarded_kl --kl 1   # the guard with KL to base

`guarded_kl` is the guarded arm plus `kl_to_base: --kl` on prose and code (docs/ANCHORS.md); it runs only
when named in --only.
Every arm is `keepmix.demo.run.arm_config` (the demo's data, model, budget and evals); the guarded arm is
the static keepmix arm plus `mixture.guard`. The base model is evaluated once (by the first arm trained, or
read from the finetune_only arm when it is there) and reused.
An arm already in --out is read, not trained again, unless it is named in --only. Prints one table (the
final eval of each arm, deltas vs base in points) and the guard's cost: probe seconds as a share of
training-step seconds, and of the arm's wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from keepmix.config import parse_config
from keepmix.data.guard import guard_summary
from keepmix.demo.data import build_demo_data
from keepmix.demo.model import prepare_model
from keepmix.demo.run import COLUMNS, FULL, QUICK, arm_config
from keepmix.report.metrics import of_kind, read_metrics
from keepmix.training.loop import train

ARMS = ("finetune_only", "static", "guarded", "guarded_kl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--only", nargs="*", default=None, help="arms to (re)train; the others are read if present")
    ap.add_argument("--kl", type=float, default=1.0, help="kl_to_base on prose and code in the guarded_kl arm")
    ap.add_argument("--guard", default="{}", help="mixture.guard as JSON; the flags below override its keys")
    for key, kind in (("every", int), ("tolerance", float), ("max_share", float), ("gain", float),
                      ("probe_tokens", int), ("probe_docs", int), ("task_keep", float), ("decay", float)):
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind)
    args = ap.parse_args()
    s = QUICK if args.quick else FULL
    if args.steps:
        s = replace(s, steps=args.steps)
    guard = {"every": 3, "probe_docs": 8, "probe_tokens": 512, "tolerance": 0.01, "max_share": 0.25,
             **json.loads(args.guard)}
    guard.update({k: getattr(args, k) for k in ("every", "tolerance", "max_share", "gain", "probe_tokens",
                                                 "probe_docs", "task_keep", "decay") if getattr(args, k) is not None})
    out = args.out.resolve()
    data = build_demo_data(out / "data", seed=s.seed, sql_eval_seen=s.sql_eval_seen,
                           sql_eval_unseen=s.sql_eval_unseen, **s.data_sizes)
    model = prepare_model(None, out / "model", log=print)
    wall = {}
    for arm in ARMS:
        run_dir = out / arm
        if (run_dir / "metrics.jsonl").exists() and (args.only is None or arm not in args.only):
            continue
        if arm == "guarded_kl" and (args.only is None or arm not in args.only):
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        settings = replace(s, guard=guard if arm.startswith("guarded") else None)
        cfg = arm_config("finetune_only" if arm == "finetune_only" else "keepmix", data, model, settings, out, "auto")
        cfg["output"] = str(run_dir)
        if arm == "guarded_kl":
            for source in cfg["sources"]:
                if source["name"] in ("prose", "code"):
                    source["kl_to_base"] = args.kl
        cfg["eval"]["baseline_from"] = baseline_run(out, exclude=arm)
        clock = time.perf_counter()
        train(parse_config(cfg, source=f"guard_arms:{arm}", base_dir=out), progress="plain")
        wall[arm] = time.perf_counter() - clock
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    report(out, wall)


def baseline_run(out: Path, exclude: str) -> str | None:
    """An arm already in --out whose step-0 eval is the base model's (None: this arm evaluates it)."""
    for arm in ARMS:
        if arm != exclude and (out / arm / "metrics.jsonl").exists():
            return str(out / arm)
    return None


def report(out: Path, wall: dict) -> None:
    rows, notes = {}, []
    for arm in ARMS:
        if not (out / arm / "metrics.jsonl").exists():
            continue
        records = read_metrics(out / arm / "metrics.jsonl")
        evals = of_kind(records, "eval")
        if "base" not in rows and evals[0]["step"] == 0:
            rows["base"] = evals[0]["metrics"]
        rows[arm] = evals[-1]["metrics"]
        train_records = of_kind(records, "train")
        step_s = step_seconds(train_records)
        probe_s = sum((r.get("guard") or {}).get("probe_s") or 0.0 for r in train_records)
        end = of_kind(records, "end")
        arm_wall = wall.get(arm, end[-1]["wall_s"] if end else float("nan"))
        notes.append(f"{arm}: wall {arm_wall:.0f} s, training steps {step_s:.0f} s"
                     + (f", guard probes {probe_s:.1f} s = {100 * probe_s / step_s:.1f} % of step time, "
                        f"{100 * probe_s / arm_wall:.1f} % of wall" if probe_s else ""))
        notes += [f"  {line}" for line in guard_summary(records)]
        guarded = [r.get("guarded") for r in train_records if r.get("guarded")]
        if guarded:
            notes.append("  guarded shares per step: " + " ".join(
                "/".join(f"{100 * g[n]:.0f}" for n in ("prose", "code", "sql")) for g in guarded))
    base = rows.get("base", {})
    print("\n| arm | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for arm, metrics in rows.items():
        cells = []
        for _, _, key in COLUMNS:
            cell = f"{100 * metrics[key]:.1f}%"
            if arm != "base" and key in base:
                cell += f" ({100 * (metrics[key] - base[key]):+.1f})"
            cells.append(cell)
        print(f"| {arm} | " + " | ".join(cells) + " |")
    print("\n" + "\n".join(notes))


def step_seconds(train_records: list[dict]) -> float:
    """Seconds spent in training steps: each step's tokens over its own throughput (evals, probes and
    checkpoints are not in a step's time)."""
    total, seen = 0.0, 0
    for r in train_records:
        total += (r["tokens_seen"] - seen) / r["tokens_per_s"]
        seen = r["tokens_seen"]
    return total


if __name__ == "__main__":
    main()
