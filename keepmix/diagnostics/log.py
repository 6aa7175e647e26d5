"""The exposure log as numpy columns, and per-document views of it, for the diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

COLUMNS = ("step", "source", "doc_id", "view", "lr", "loss", "tokens")


def json_number(x) -> float | None:
    """JSON-safe number: None for NaN/inf."""
    return float(x) if x is not None and math.isfinite(x) else None

@dataclass
class LogColumns:
    names: list[str]
    source: np.ndarray
    step: np.ndarray
    doc_id: np.ndarray
    view: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    tokens: np.ndarray

    def of(self, source: str) -> np.ndarray:
        return self.source == self.names.index(source)


def columns_of(table: pa.Table) -> LogColumns:
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"The exposure table lacks column(s) {missing}; expected {list(COLUMNS)}.")
    src = table.column("source")
    if pa.types.is_dictionary(src.type):
        src = src.cast(pa.string())
    enc = src.combine_chunks().dictionary_encode()
    cols = {c: table.column(c).to_numpy() for c in COLUMNS if c != "source"}
    keep = np.isfinite(cols["loss"]) & (cols["tokens"] > 0)
    return LogColumns(names=enc.dictionary.to_pylist(), source=enc.indices.to_numpy()[keep],
                step=cols["step"][keep].astype(np.int64), doc_id=cols["doc_id"][keep].astype(np.int64),
                view=cols["view"][keep].astype(np.int64), lr=cols["lr"][keep].astype(np.float64),
                loss=cols["loss"][keep].astype(np.float64), tokens=cols["tokens"][keep].astype(np.float64))


def sources_present(log: LogColumns) -> list[str]:
    return [log.names[c] for c in np.unique(log.source)]


def doc_views(log: LogColumns, source: str, loss: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One entry per (document, view) of a source: token-weighted loss and LR, and tokens, sorted by doc.

    loss: per-row values to average instead of the logged loss (one per row of the source).
    """
    m = log.of(source)
    doc, view, tok = log.doc_id[m], log.view[m], log.tokens[m]
    loss = log.loss[m] if loss is None else loss
    span = int(view.max()) + 1
    keys, inv = np.unique(doc * span + view, return_inverse=True)
    total = np.bincount(inv, weights=tok)
    return {"doc": keys // span, "view": keys % span, "tokens": total,
            "loss": np.bincount(inv, weights=loss * tok) / total,
            "lr": np.bincount(inv, weights=log.lr[m] * tok) / total}


def relative_losses(log: LogColumns, source: str, rows_wanted: int = 32) -> np.ndarray:
    """Each row's loss minus the local mean loss of the same source and view around its step.

    The local mean spans enough neighbouring steps (of that view) to hold about rows_wanted rows, so it
    follows the training trend but not the individual document. Returns one value per row of the source.
    """
    m = log.of(source)
    step, view, loss, tok = log.step[m], log.view[m], log.loss[m], log.tokens[m]
    out = np.empty(len(step))
    for v in np.unique(view):
        at = np.flatnonzero(view == v)
        steps, pos = np.unique(step[at], return_inverse=True)
        half = int(math.ceil(rows_wanted / 2 / (len(at) / len(steps))))
        sums = np.r_[0.0, np.cumsum(np.bincount(pos, weights=loss[at] * tok[at]))]
        toks = np.r_[0.0, np.cumsum(np.bincount(pos, weights=tok[at]))]
        here = np.arange(len(steps))
        lo, hi = np.clip(here - half, 0, None), np.clip(here + half + 1, None, len(steps))
        local = (sums[hi] - sums[lo]) / (toks[hi] - toks[lo])
        out[at] = loss[at] - local[pos]
    return out


def paired_views(dv: dict[str, np.ndarray], a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into dv of the documents seen at both view a and view b (same order)."""
    ia, ib = np.flatnonzero(dv["view"] == a), np.flatnonzero(dv["view"] == b)
    _, ja, jb = np.intersect1d(dv["doc"][ia], dv["doc"][ib], assume_unique=True, return_indices=True)
    return ia[ja], ib[jb]
