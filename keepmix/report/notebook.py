"""Live progress in a Jupyter notebook: an HTML bar, the per-source table and a loss plot, in place."""

from __future__ import annotations

import base64
import html
import math
import time
from typing import Callable, TextIO

from keepmix.report.progress import Progress, duration, end_line, eval_line, loss_text, pct, si

class NotebookProgress(Progress):
    """In Jupyter: one output area holding an HTML bar, the per-source table, the latest eval and a loss
    plot, redrawn in place. `publish(html)` shows or replaces that area (IPython's display handle by
    default); updates are paced so a fast loop does not flood the kernel."""

    def __init__(self, stream: TextIO | None = None, publish: Callable[[str], None] | None = None,
                 every_s: float = 0.5, plot_every_s: float = 3.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(stream)
        self.publish = publish or _ipython_publisher()
        self.every_s, self.plot_every_s, self.clock = every_s, plot_every_s, clock
        self.train_loss: dict[str, tuple[list[int], list[float]]] = {}
        self.valid_loss: dict[str, tuple[list[int], list[float]]] = {}
        self.notes: list[str] = []
        self._shown_at: float | None = None
        self._plot_at: float | None = None
        self._plot_html = ""

    def start(self, total_steps: int, start_step: int, sources: list[str], title: str) -> None:
        super().start(total_steps, start_step, sources, title)
        self._show(force=True)

    def train(self, record: dict) -> None:
        super().train(record)
        for name, entry in (record.get("sources") or {}).items():
            steps, values = self.train_loss.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(entry.get("loss", math.nan))
        self._show()

    def eval(self, record: dict) -> None:
        super().eval(record)
        for key, value in (record.get("metrics") or {}).items():
            if key.startswith("valid/") and key.endswith("/loss"):
                steps, values = self.valid_loss.setdefault(key.split("/")[1], ([], []))
                steps.append(record["step"])
                values.append(value)
        self.notes.append(eval_line(record))
        self._show(force=True)

    def message(self, text: str) -> None:
        self.notes.append(text)
        self._show(force=True)

    def close(self) -> None:
        if not self._closed:
            super().close()
            self._show(force=True)

    def _show(self, force: bool = False) -> None:
        now = self.clock()
        if not force and self._shown_at is not None and now - self._shown_at < self.every_s:
            return
        if force or self._plot_at is None or now - self._plot_at >= self.plot_every_s:
            self._plot_at = now
            self._plot_html = self._plot()
        self._shown_at = now
        self.publish(self.html())

    def html(self) -> str:
        esc = html.escape
        record = self.last_train or {}
        step = record.get("step", self.start_step)
        total = self.total_steps or 1
        if self.end_record is not None:
            state = end_line(self.end_record)
        elif self._closed:
            state = f"stopped at step {step} without an end record"
        else:
            state = (f"{si(record.get('tokens_per_s'))} tok/s · ETA {duration(self.eta_s())} · "
                     f"lr {record.get('lr', math.nan):.2e} · loss {loss_text(record.get('loss'))}")
        rows = "".join(
            f"<tr><td>{esc(name)}</td><td>{loss_text(self.by_source.get(name, {}).get('loss'))}</td>"
            f"<td>{pct(self.by_source.get(name, {}).get('token_acc'))}</td>"
            f"<td>{pct((record.get('planned') or {}).get(name))}</td>"
            f"<td>{pct((record.get('realized_cum') or {}).get(name))}</td></tr>"
            for name in self.sources)
        notes = "".join(f"<div>{esc(n)}</div>" for n in self.notes[-6:])
        return (f'<div class="keepmix-progress"><div><b>{esc(self.title)}</b> '
                f'<progress value="{step}" max="{total}" style="width:40%"></progress> {step}/{self.total_steps} '
                f"· {esc(state)}</div>"
                f"<table><tr><th>source</th><th>train loss</th><th>train acc</th><th>planned</th>"
                f"<th>realized (cum)</th></tr>{rows}</table>"
                f'<div style="font-family:monospace;font-size:90%">{notes}</div>{self._plot_html}</div>')

    def _plot(self) -> str:
        if not self.train_loss and not self.valid_loss:
            return ""
        from keepmix.report.plots import figure_png, live_loss_figure

        png = figure_png(live_loss_figure(self.train_loss, self.valid_loss, self.sources), dpi=80)
        return f'<img alt="loss" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _ipython_publisher() -> Callable[[str], None]:
    """Show the first HTML in a new output area and replace it in place afterwards."""
    handle = None

    def publish(markup: str) -> None:
        nonlocal handle
        from IPython.display import HTML, display

        if handle is None:
            handle = display(HTML(markup), display_id=True)
        else:
            handle.update(HTML(markup))

    return publish
