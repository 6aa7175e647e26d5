"""Live progress of a training run: a rich display in a terminal, a live HTML bar and loss plot in Jupyter,
plain periodic lines in logs and CI, or only evals and the end line when quiet.

Contract: the training loop calls `make_progress(mode, stream=..., every_s=...)` and then, on the object
it returns, `start(total_steps, start_step, sources, title)` once, `train(record)` per optimizer step,
`eval(record)` per eval, `message(text)` for notes and `end(record)` once, with the records of
docs/CONTRACTS.md. Used as a context manager it closes its live display even when the body raises
(KeyboardInterrupt included). "plain" and "quiet" never write terminal control codes. "auto" picks
notebook inside a Jupyter kernel, rich when the stream is a terminal, plain otherwise. The ETA comes from
the records' own clock (`time`), so evals and checkpoints in between are part of it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Literal, TextIO

from keepmix.eval.retention import is_score

Mode = Literal["auto", "rich", "notebook", "plain", "quiet"]
MODES = ("auto", "rich", "notebook", "plain", "quiet")


def make_progress(mode: Mode = "auto", *, stream: TextIO | None = None, every_s: float = 10.0) -> Progress:
    """The progress display for `mode`; `stream` defaults to stdout, `every_s` paces plain lines."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
    stream = stream if stream is not None else sys.stdout
    if mode == "auto":
        mode = "notebook" if in_notebook() else "rich" if _isatty(stream) else "plain"
    if mode == "rich":
        return RichProgress(stream)
    if mode == "notebook":
        from keepmix.report.notebook import NotebookProgress

        return NotebookProgress(stream)
    if mode == "quiet":
        return QuietProgress(stream)
    return PlainProgress(stream, every_s=every_s)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython is then already imported; it is never imported here)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and (hasattr(shell, "kernel") or "IPKernelApp" in getattr(shell, "config", {}))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --- text shared by every mode -----------------------------------------------------------------------

def si(value: float | None) -> str:
    """1234567 -> '1.23M'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    mins, s = divmod(rest, 60)
    return f"{h}h{mins:02d}m" if h else f"{mins}m{s:02d}s" if mins else f"{s}s"


def pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}%"


def loss_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def train_line(record: dict, total_steps: int | None, eta_s: float | None) -> str:
    """'step 120/1000 12% | 2.1k tok/s | ETA 7m12s | lr 2.5e-04 | loss 2.314 acc 41.2% | sql 1.502/48.0% ...'"""
    step = record["step"]
    head = f"step {step}/{total_steps} {100 * step / total_steps:.0f}%" if total_steps else f"step {step}"
    parts = [head, f"{si(record.get('tokens_per_s'))} tok/s", f"ETA {duration(eta_s)}",
             f"lr {record.get('lr', math.nan):.2e}",
             f"loss {loss_text(record.get('loss'))} acc {pct(record.get('token_acc'))}"]
    per_source = " ".join(f"{name} {loss_text(e.get('loss'))}/{pct(e.get('token_acc'))}"
                          for name, e in (record.get("sources") or {}).items())
    return " | ".join(parts + ([per_source] if per_source else []) + guard_text(record))


def guard_text(record: dict) -> list[str]:
    """['guard: code 21.0% (plan 12.5%)'] while the guard raises a source above the plan, else []."""
    guarded, planned = record.get("guarded") or {}, record.get("planned") or {}
    raised = [f"{name} {pct(share)} (plan {pct(planned.get(name))})" for name, share in guarded.items()
              if share > planned.get(name, 0.0) + 1e-9 and name in (record.get("guard") or {}).get("boost", {})]
    return ["guard: " + ", ".join(raised)] if raised else []


def eval_line(record: dict) -> str:
    """'eval @ step 120: general loss 2.780 (-0.120) acc 28.2% | sql_exec/exec_acc 0.367 (+0.317) | FORGOT: ...'"""
    metrics, retention = record.get("metrics") or {}, record.get("retention") or {}

    def delta(key: str) -> str:
        return f" ({retention[key]['delta']:+.3f})" if key in retention and record["step"] != 0 else ""

    parts = []
    for key in metrics:
        if key.startswith("valid/") and key.endswith("/loss"):
            source = key.split("/")[1]
            acc_key = f"valid/{source}/token_acc"
            acc = f" acc {pct(metrics[acc_key])}" if acc_key in metrics else ""
            parts.append(f"{source} loss {loss_text(metrics[key])}{delta(key)}{acc}")
    parts += [f"{key.removeprefix('task/')} {metrics[key]:.3f}{delta(key)}" for key in metrics
              if key.startswith("task/") and is_score(key)]
    flagged = [f"{k} {row['delta']:+.3f}" for k, row in retention.items()
               if row.get("flagged") and not k.endswith("/ppl")]
    if flagged:
        parts.append("FORGOT: " + ", ".join(flagged))
    label = "baseline" if record["step"] == 0 else f"eval @ step {record['step']}"
    return f"{label}: " + " | ".join(parts)


def end_line(record: dict) -> str:
    """'end: completed at step 1000 | 16.4M tokens | 2.1k tok/s | wall 2h10m | final model: runs/x/final'"""
    parts = [f"end: {record.get('status', '?')} at step {record.get('step', '?')}",
             f"{si(record.get('tokens_seen'))} tokens", f"{si(record.get('tokens_per_s'))} tok/s",
             f"wall {duration(record.get('wall_s'))}"]
    if record.get("final_dir"):
        parts.append(f"final model: {record['final_dir']}")
    return " | ".join(parts)


# --- the interface and its shared state -----------------------------------------------------------------

class Progress:
    """Live progress of one run. Subclasses draw; this class keeps what they draw from."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.total_steps: int | None = None
        self.start_step = 0
        self.sources: list[str] = []
        self.title = ""
        self.last_train: dict | None = None
        self.last_eval: dict | None = None
        self.end_record: dict | None = None
        self.by_source: dict[str, dict] = {}
        self._first: tuple[int, float] | None = None
        self._closed = False

    def start(self, total_steps: int, start_step: int, sources: list[str], title: str) -> None:
        self.total_steps, self.start_step, self.sources, self.title = total_steps, start_step, list(sources), title

    def train(self, record: dict) -> None:
        if self._first is None:
            self._first = (record["step"], record.get("time", 0.0))
        # A source missing from this step keeps its last values in the display.
        self.by_source = {**self.by_source, **(record.get("sources") or {})}
        self.last_train = record

    def eval(self, record: dict) -> None:
        self.last_eval = record

    def message(self, text: str) -> None:
        pass

    def notice(self, text: str) -> None:
        """A line every display shows, quiet ones too: what happened to the run folder (a fallback to an
        older checkpoint, a fresh start under --resume)."""
        self.message(text)

    def end(self, record: dict) -> None:
        self.end_record = record
        self.close()

    def close(self) -> None:
        self._closed = True

    def eta_s(self) -> float | None:
        """Seconds left at the pace of the steps seen by this display (None before two steps)."""
        if self._first is None or self.last_train is None or not self.total_steps:
            return None
        first_step, first_time = self._first
        done = self.last_train["step"] - first_step
        if done <= 0:
            return None
        per_step = (self.last_train.get("time", first_time) - first_time) / done
        return max(0.0, (self.total_steps - self.last_train["step"]) * per_step)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class PlainProgress(Progress):
    """Plain lines: a train line at most every `every_s` seconds, every eval, every message, the end."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(stream)
        self.every_s = every_s
        self.clock = clock
        self._last_line: float | None = None

    def start(self, total_steps: int, start_step: int, sources: list[str], title: str) -> None:
        super().start(total_steps, start_step, sources, title)
        resumed = f", resuming at step {start_step}" if start_step else ""
        self._print(f"{title}: {total_steps} steps on {', '.join(sources)}{resumed}")

    def train(self, record: dict) -> None:
        super().train(record)
        now = self.clock()
        if self._last_line is None or now - self._last_line >= self.every_s:
            self._last_line = now
            self._print(train_line(record, self.total_steps, self.eta_s()))

    def eval(self, record: dict) -> None:
        super().eval(record)
        self._print(eval_line(record))

    def message(self, text: str) -> None:
        self._print(text)

    def end(self, record: dict) -> None:
        super().end(record)
        self._print(end_line(record))


class QuietProgress(PlainProgress):
    """Only evals and the end line."""

    def start(self, total_steps: int, start_step: int, sources: list[str], title: str) -> None:
        Progress.start(self, total_steps, start_step, sources, title)

    def train(self, record: dict) -> None:
        Progress.train(self, record)

    def message(self, text: str) -> None:
        pass

    def notice(self, text: str) -> None:
        self._print(text)


class RichProgress(Progress):
    """A rich live display: bar with step, tokens/s, ETA, LR and loss; a per-source table with the latest
    eval; evals and messages scroll above it."""

    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console

        super().__init__(stream)
        self.console = Console(file=self.stream)
        self.live = None

    def start(self, total_steps: int, start_step: int, sources: list[str], title: str) -> None:
        from rich.live import Live

        super().start(total_steps, start_step, sources, title)
        self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4)
        self.live.start()

    def eval(self, record: dict) -> None:
        super().eval(record)
        self.console.print(eval_line(record), style="bold red" if _any_flagged(record) else "cyan",
                           highlight=False, markup=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def end(self, record: dict) -> None:
        super().end(record)
        self.console.print(end_line(record), style="bold", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None and not self._closed:
            self.live.stop()
            # Off a terminal rich leaves its final render without a line end.
            if not self.console.is_terminal:
                self.console.line()
        super().close()

    def render(self):
        """The live area, built from the latest records (called from rich's refresh thread). Only `Text`
        objects: a live refresh can happen inside a `print(markup=False)`, which would show markup raw."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        record, evaluation = self.last_train or {}, self.last_eval or {}
        step = record.get("step", self.start_step)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text(self.title, style="bold"),
            ProgressBar(total=self.total_steps or 1, completed=step, width=32),
            Text(f"{step}/{self.total_steps}"),
            Text(f"{si(record.get('tokens_per_s'))} tok/s  ETA {duration(self.eta_s())}  "
                 f"lr {record.get('lr', math.nan):.2e}  loss {loss_text(record.get('loss'))}"),
        )
        metrics, retention = evaluation.get("metrics") or {}, evaluation.get("retention") or {}
        eval_at = f" @ {evaluation['step']}" if evaluation else ""
        table = Table(box=None, padding=(0, 1), header_style="bold")
        guarded = record.get("guarded")  # with a retention guard: planned vs guarded share
        columns = ["source", "train loss", "train acc", f"valid loss{eval_at}", "valid acc", "planned",
                   *(["guarded", "guard signal"] if guarded is not None else []), "realized (cum)", "epoch"]
        for column in columns:
            table.add_column(column, justify="left" if column == "source" else "right")
        for name in self.sources:
            entry = self.by_source.get(name, {})
            cells = [name, loss_text(entry.get("loss")), pct(entry.get("token_acc"))]
            planned = (record.get("planned") or {}).get(name)
            guard_cells = []
            if guarded is not None:
                share = guarded.get(name)
                raised = share is not None and planned is not None and share > planned + 1e-9
                guard_cells = [Text(pct(share), style="bold yellow" if raised else ""),
                               Text(_signal_text((record.get("guard") or {}), name))]
            table.add_row(
                *map(Text, cells),
                _with_delta(metrics, retention, f"valid/{name}/loss", loss_text),
                Text(pct(metrics.get(f"valid/{name}/token_acc"))),
                Text(pct(planned)),
                *guard_cells,
                Text(pct((record.get("realized_cum") or {}).get(name))),
                Text(f"{(record.get('epoch') or {}).get(name, 0.0):.2f}"),
            )
        parts = [bar, table]
        tasks = [k for k in metrics if k.startswith("task/") and is_score(k)]
        if tasks:
            parts.append(Text("  ").join(
                Text(k.removeprefix("task/") + " ") + _with_delta(metrics, retention, k, lambda v: f"{v:.3f}")
                for k in tasks))
        return Group(*parts)


def _signal_text(guard: dict, name: str) -> str:
    """A protected source's last probe against its baseline: '-2.4 pts @ 40' (or '+3.1 % @ 40' for loss)."""
    signal = (guard.get("signal") or {}).get(name)
    if not signal:
        return ""
    behind = signal["behind"]
    unit = f"{100 * behind:+.1f} %" if guard.get("metric") == "loss" else f"{-100 * behind:+.1f} pts"
    return f"{unit} @ {signal['step']}"


def _with_delta(metrics: dict, retention: dict, key: str, show: Callable):
    """The metric's value, then its change since the baseline in red (forgotten) or green."""
    from rich.text import Text

    if key not in metrics:
        return Text("-")
    row = retention.get(key)
    if not row or row.get("delta") == 0:
        return Text(show(metrics[key]))
    return Text.assemble(show(metrics[key]), " ", (f"({row['delta']:+.3f})", "red" if row.get("flagged") else "green"))


def _any_flagged(record: dict) -> bool:
    return any(row.get("flagged") for row in (record.get("retention") or {}).values())
