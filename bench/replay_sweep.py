"""The replay-share sweep on the demo's setup (docs/SWEEP.md): SmolLM2-135M-Instruct, prose / code / SQL.

    python bench/replay_sweep.py --out sweep_runs/replay            # writes run.yaml + sweep.yaml, runs it all

It builds the demo's data and model (keepmix.demo), writes the base run config — the demo's budget (FULL:
24 steps x 8 rows x 256 tokens, AdamW 5e-4 wsd) with a constant mixture — and a sweep over the replay share
(prose + code, split evenly) of 0, 10, 20, 30, 40 and 50 %, then runs, in order:
    keepmix sweep sweep.yaml                       (6 arms; the base model evaluated once)
    keepmix merge <out>/arms/replay-00 --alpha 0,0.25,0.5,0.75,1
    keepmix sweep sweep.yaml --verify              (arms reused; the recommendation trained and measured)
Each step is resumable: run it again after an interruption. `--quick` uses the demo's QUICK sizes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import yaml

from keepmix.demo.data import build_demo_data
from keepmix.demo.model import prepare_model
from keepmix.demo.run import FULL, QUICK, arm_config

SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def write_configs(out: Path, settings) -> Path:
    data = build_demo_data(out / "data", seed=settings.seed, sql_eval_seen=settings.sql_eval_seen,
                           sql_eval_unseen=settings.sql_eval_unseen, **settings.data_sizes)
    model = prepare_model(None, out / "model", log=print)
    run = arm_config("finetune_only", data, model, settings, out, "cpu")
    run.pop("output")
    (out / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    arms = {f"replay-{round(100 * r):02d}": {"mixture.weights": {"prose": round(r / 2, 4), "code": round(r / 2, 4),
                                                                "sql": round(1 - r, 4)}} for r in SHARES}
    sweep = {"run": "run.yaml", "output": "arms", "arms": arms,
             "answer": {"task": ["task/sql/acc/seen"], "keep": ["valid/prose/token_acc", "valid/code/token_acc"],
                        "tolerance": 0.02}}
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sweep_runs/replay")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    from keepmix.sweep.merge import merge_run
    from keepmix.sweep.run import run_sweep

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = replace(QUICK if args.quick else FULL)
    clock = time.perf_counter()
    path = write_configs(out, settings)
    run_sweep(path, progress="quiet")
    swept = time.perf_counter() - clock
    merge_run(out / "arms" / "replay-00", [0, 0.25, 0.5, 0.75, 1.0])
    merged = time.perf_counter() - clock - swept
    run_sweep(path, verify=True, progress="quiet")
    total = time.perf_counter() - clock
    (out / "wall.yaml").write_text(yaml.safe_dump({"sweep_s": round(swept, 1), "merge_s": round(merged, 1),
                                                   "verify_s": round(total - swept - merged, 1),
                                                   "total_s": round(total, 1)}))
    print(f"replay sweep: sweep {swept:.0f} s, merge {merged:.0f} s, verify {total - swept - merged:.0f} s, "
          f"total {total:.0f} s; answer in {out / 'arms' / 'sweep.md'}")


if __name__ == "__main__":
    main()
