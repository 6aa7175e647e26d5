"""A run's recorded metrics: reading metrics.jsonl, pulling series out of it, forwarding it to trackers.

Contract (record kinds and fields: docs/CONTRACTS.md):
- `read_metrics(path)` returns every record that parses, in file order; a line that does not parse (the
  truncated last line of a crashed run) is skipped and its line number kept in `.skipped`.
- `timeline(records)` is the run as it finally happened: when a `start` record says the run resumed from
  step k, records the crashed attempt wrote after step k are dropped, so every step appears once.
- The series helpers take records (ideally a timeline) and return plain lists, steps ascending; a source
  missing from a step is missing from its series rather than filled with a made-up value.
- `make_trackers(names, run_dir, config)` opens TensorBoard / W&B / trackio through accelerate's tracker
  classes; asking for one whose package is not installed is an error naming the package. `Trackers.log`
  flattens a train or eval record into scalars. No tracker package is a dependency of keepmix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from keepmix.errors import KeepmixError


class Records(list):
    """The parsed records of a metrics file; `skipped` holds the 1-based numbers of lines that did not parse."""

    def __init__(self, records=(), skipped: list[int] | None = None):
        super().__init__(records)
        self.skipped: list[int] = list(skipped or [])


class Series(NamedTuple):
    steps: list[int]
    values: list[float]


def read_metrics(path: str | Path) -> Records:
    """Every parseable record of a metrics.jsonl; unparseable lines are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise KeepmixError(f"{path}: metrics file not found; expected the metrics.jsonl a training run writes.")
    records, skipped = [], []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped.append(number)
                continue
            # A cut can also leave a line that parses but is not a record (e.g. `12`).
            if isinstance(record, dict) and "kind" in record:
                records.append(record)
            else:
                skipped.append(number)
    return Records(records, skipped)


def read_run(run_dir: str | Path) -> Records:
    """The records of a run directory, or a KeepmixError saying why the folder is not a readable run."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise KeepmixError(f"{run_dir}: no such folder; expected a run directory (the `output` of a run).")
    if not run_dir.is_dir():
        raise KeepmixError(f"{run_dir}: is a file; expected a run directory holding metrics.jsonl.")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise KeepmixError(f"{run_dir}: not a keepmix run (no metrics.jsonl in it).")
    records = read_metrics(path)
    if not records:
        raise KeepmixError(f"{path}: no readable records ({len(records.skipped)} line(s) that are not keepmix "
                           f"records); expected the JSON lines a training run writes.")
    return records


def timeline(records: list[dict]) -> list[dict]:
    """The records of the run as it finally happened, with what a resume replaced removed."""
    out: list[dict] = []
    for record in records:
        kind = record.get("kind")
        if kind == "start" and record.get("resumed_from") is not None:
            resumed_from = record["resumed_from"]
            out = [r for r in out if r.get("kind") == "start" or _kept_by_resume(r, resumed_from)]
        out.append(record)
    return out


def _kept_by_resume(record: dict, resumed_from: int) -> bool:
    # An `end` before a resume ended an attempt, not the run.
    if record.get("kind") == "end":
        return False
    return record.get("step", 0) <= resumed_from


def of_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("kind") == kind]


def sources_of(records: list[dict]) -> list[str]:
    """Source names in the order the run declared them, then any others met in train or eval records."""
    names: list[str] = []
    for r in records:
        candidates: list[str] = []
        if r.get("kind") == "start":
            candidates = list(r.get("sources") or [])
        elif r.get("kind") == "train":
            candidates = list(r.get("sources") or {}) + list(r.get("planned") or {})
        elif r.get("kind") == "eval":
            candidates = [k.split("/")[1] for k in r.get("metrics") or {} if k.startswith("valid/")]
        elif r.get("kind") == "epoch":
            candidates = [r.get("source")]
        names += [c for c in candidates if c and c not in names]
    return names


def train_series(records: list[dict], key: str) -> Series:
    """A top-level field of the train records (loss, lr, token_acc, grad_norm, tokens_per_s, ...)."""
    rows = [(r["step"], _num(r[key])) for r in of_kind(records, "train") if key in r]
    return _series(rows)


def source_series(records: list[dict], source: str, key: str) -> Series:
    """A per-source training field (loss, token_acc, tokens, rows) over the steps the source was in."""
    rows = []
    for r in of_kind(records, "train"):
        entry = (r.get("sources") or {}).get(source)
        if entry and key in entry:
            rows.append((r["step"], _num(entry[key])))
    return _series(rows)


def evals(records: list[dict]) -> list[dict]:
    """Eval records by step; where an eval was repeated at one step, the later one counts."""
    by_step = {r["step"]: r for r in of_kind(records, "eval")}
    return [by_step[s] for s in sorted(by_step)]


def eval_series(records: list[dict], metric: str) -> Series:
    """One eval metric ("valid/<source>/loss", "task/<task>/<metric>") over the eval steps."""
    rows = [(r["step"], _num(r["metrics"][metric])) for r in evals(records) if metric in (r.get("metrics") or {})]
    return _series(rows)


def metric_keys(records: list[dict], prefix: str = "") -> list[str]:
    """Eval metric keys starting with `prefix`, in first-seen order."""
    keys: list[str] = []
    for r in evals(records):
        keys += [k for k in r.get("metrics") or {} if k.startswith(prefix) and k not in keys]
    return keys


def share_series(records: list[dict], field: str, sources: list[str]) -> tuple[list[int], dict[str, list[float]]]:
    """Mixture shares per step from `planned`, `guarded`, `realized` or `realized_cum`; a source absent from a step
    has share 0 in that step (shares are defined for every source)."""
    steps, shares = [], {s: [] for s in sources}
    for r in of_kind(records, "train"):
        if field not in r:
            continue
        steps.append(r["step"])
        for s in sources:
            shares[s].append(_num(r[field].get(s, 0.0)))
    return steps, shares


def epoch_boundaries(records: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """Per source, (step, epoch) of each boundary: the step whose rows first hold pass `epoch`."""
    out: dict[str, list[tuple[int, int]]] = {}
    for r in of_kind(records, "epoch"):
        out.setdefault(r["source"], []).append((r["step"], r["epoch"]))
    return {s: sorted(set(v)) for s, v in out.items()}


def last_retention(records: list[dict]) -> tuple[int | None, dict[str, dict]]:
    """The step and retention table of the last eval after the baseline that has one ((None, {}) before
    any: the baseline's own table compares it with itself)."""
    for r in reversed(evals(records)):
        if r.get("retention") and r["step"] > 0:
            return r["step"], r["retention"]
    return None, {}


def improvement(row: dict) -> float:
    """How much better a retention row's metric got, in the unit its tolerance uses (the negative of
    keepmix.eval.retention's `worsening`): points for higher-is-better metrics, a fraction of the
    baseline for loss and perplexity."""
    from keepmix.eval.retention import worsening

    return -worsening({"higher_is_better": True, **row})


def row_verdict(row: dict) -> str:
    """"forgot" (flagged), "learned" (better by more than the tolerance) or "kept"."""
    if row.get("flagged"):
        return "forgot"
    return "learned" if improvement(row) > row.get("tolerance", 0.0) else "kept"


def retention_verdict(table: dict[str, dict]) -> dict[str, list[str]]:
    """Metric keys sorted into learned, forgot and kept; perplexity keys are left out (they restate the loss)."""
    out: dict[str, list[str]] = {"learned": [], "forgot": [], "kept": []}
    for key, row in table.items():
        if not key.endswith("/ppl"):
            out[row_verdict(row)].append(key)
    return out


@dataclass
class RunStatus:
    """How far a run got and how fast; `status` is the end record's, or "no end record"."""

    status: str
    ended: bool
    step: int
    total_steps: int | None
    tokens_seen: int
    time_s: float | None
    wall_s: float | None
    tokens_per_s: float | None
    model: str | None
    resumes: int
    final_dir: str | None


def run_status(records: list[dict]) -> RunStatus:
    run = timeline(records)
    starts = of_kind(records, "start")
    trains = of_kind(run, "train")
    ends = of_kind(run, "end")
    end = ends[-1] if ends else None
    last = end or (trains[-1] if trains else {})
    tokens_per_s = end.get("tokens_per_s") if end else (trains[-1].get("tokens_per_s") if trains else None)
    return RunStatus(
        status=end["status"] if end else "no end record",
        ended=end is not None,
        step=last.get("step", 0),
        total_steps=starts[-1].get("total_steps") if starts else None,
        tokens_seen=last.get("tokens_seen", 0),
        time_s=last.get("time"),
        wall_s=end.get("wall_s") if end else None,
        tokens_per_s=tokens_per_s,
        model=starts[-1].get("model") if starts else None,
        resumes=sum(1 for s in starts if s.get("resumed_from") is not None),
        final_dir=end.get("final_dir") if end else None,
    )


def read_diagnostics(run_dir: str | Path) -> dict | None:
    """`<run>/diagnostics.json` if the memorization diagnostics wrote one, else None."""
    path = Path(run_dir) / "diagnostics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KeepmixError(f"{path}: not valid JSON ({err}); expected the diagnostics the run wrote.") from None
    if not isinstance(data, dict):
        raise KeepmixError(f"{path}: expected a JSON object with keys loss_by_view and summary.")
    return data


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _series(rows: list[tuple[int, float]]) -> Series:
    rows.sort(key=lambda row: row[0])
    return Series([s for s, _ in rows], [v for _, v in rows])


# --- experiment trackers ---------------------------------------------------------------------------

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def flatten_record(record: dict) -> dict[str, float]:
    """The scalars of a train or eval record under stable names (train/loss, train/sql/loss,
    mix/planned/sql, valid/sql/loss, retention/valid/sql/loss/delta); other kinds give {}."""
    out: dict[str, float] = {}
    if record.get("kind") == "train":
        for key in ("loss", "token_acc", "lr", "grad_norm", "tokens_per_s", "tokens_seen"):
            if record.get(key) is not None:
                out[f"train/{key}"] = float(record[key])
        for source, entry in (record.get("sources") or {}).items():
            for key in ("loss", "token_acc"):
                if entry.get(key) is not None:
                    out[f"train/{source}/{key}"] = float(entry[key])
        for field in ("planned", "realized", "realized_cum"):
            for source, share in (record.get(field) or {}).items():
                out[f"mix/{field}/{source}"] = float(share)
        for source, passes in (record.get("epoch") or {}).items():
            out[f"epoch/{source}"] = float(passes)
    elif record.get("kind") == "eval":
        out.update({k: float(v) for k, v in (record.get("metrics") or {}).items() if v is not None})
        for key, row in (record.get("retention") or {}).items():
            out[f"retention/{key}/delta"] = float(row["delta"])
    return out


def flatten_config(config: dict, prefix: str = "") -> dict[str, bool | str | float | int | None]:
    """A nested config as dotted scalar keys; lists become JSON text and None the text "null" (trackers
    store scalars only, and TensorBoard's hparams reject None)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        elif value is None:
            out[name] = "null"
        else:
            out[name] = value
    return out


class Trackers:
    """Started accelerate trackers (`GeneralTracker`s) fed from keepmix records."""

    def __init__(self, trackers: list):
        self.trackers = list(trackers)

    def log(self, record: dict) -> None:
        values = flatten_record(record)
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=record["step"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def make_trackers(names: list[str], run_dir: str | Path, config: dict) -> Trackers:
    """Start the named trackers for a run and store its config in them."""
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    run_dir = Path(run_dir)
    available = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "trackio": is_trackio_available,
    }
    for name in names:
        if name not in available:
            known = ", ".join(available)
            raise KeepmixError(f"trackers: unknown tracker {name!r}; expected one of {known}.")
        if not available[name]():
            package = TRACKER_PACKAGES[name]
            raise KeepmixError(
                f"trackers: {name!r} was asked for but the package {package!r} is not installed; "
                f"install it (pip install {package}) or remove {name!r} from trackers."
            )
    started = []
    for name in names:
        tracker = _new_tracker(name, run_dir)
        tracker.start()
        tracker.store_init_configuration(flatten_config(config))
        started.append(tracker)
    return Trackers(started)


def _new_tracker(name: str, run_dir: Path):
    from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(run_dir.name, run_dir / "tensorboard")
    # W&B and trackio take their first argument as the project; the run is named after its directory.
    if name == "wandb":
        return WandBTracker("keepmix", name=run_dir.name, dir=str(run_dir))
    return TrackioTracker("keepmix", name=run_dir.name)
