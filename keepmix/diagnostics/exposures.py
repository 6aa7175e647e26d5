"""The exposure log: one row per (document segment, training row) seen by a training step.

Contract (docs/CONTRACTS.md, "exposures/"): Parquet parts `<run>/exposures/part-<first step:08d>.parquet`
with columns step int64, source string (stored dictionary-encoded), doc_id int64, view int32 (1 = first
view), lr float32, loss float32 (NaN when the segment has no loss-bearing tokens), tokens int32.

- `ExposureWriter.add` buffers the rows of one step as columns; `flush` publishes them as one part,
  atomically (a temp file, fsync, then `os.replace`), so a crash never leaves a half-written part under a
  name that readers pick up.
- Steps never go backwards: a step's rows all land in one part, and part names sort by step.
- Resume: `truncate_after(step)` removes every row logged after `step` (deleting whole parts and rewriting
  the one that straddles it), so a resumed run's log equals the uninterrupted run's. The writer keeps no
  state that the files on disk do not already hold, hence no state_dict: the loop flushes before each
  checkpoint and calls `truncate_after(checkpoint_step)` on resume.
- `read_exposures` returns one `pyarrow.Table` in step order; it is columnar end to end (numpy in,
  Parquet with zstd out), so a million rows write and read in well under a second.

No per-document view counter lives here: the mixture sampler knows the pass of every document it draws,
so `view` is the pass number and needs no extra state.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("source", pa.dictionary(pa.int32(), pa.string())),
        ("doc_id", pa.int64()),
        ("view", pa.int32()),
        ("lr", pa.float32()),
        ("loss", pa.float32()),
        ("tokens", pa.int32()),
    ]
)
_NUMERIC = {"doc_id": np.int64, "view": np.int32, "lr": np.float32, "loss": np.float32, "tokens": np.int32}
_ARGS = {"doc_id": "doc_ids", "view": "views", "lr": "lr", "loss": "losses", "tokens": "tokens"}
_PART = re.compile(r"^part-(\d+)\.parquet$")


def exposures_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "exposures"


def has_exposures(run_dir: str | Path) -> bool:
    """Whether the run has published at least one exposure part."""
    return bool(_parts(exposures_dir(run_dir)))


def _parts(folder: Path) -> list[Path]:
    """Published parts in step order (by the number in the name, not the string: steps may pass 1e8)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PART.match(p.name))]
    return [p for _, p in sorted(found)]


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd", use_dictionary=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ExposureWriter:
    """Buffers exposure rows step by step and publishes them as Parquet parts under `<run>/exposures/`."""

    def __init__(self, run_dir: str | Path):
        self.folder = exposures_dir(run_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._sources: dict[str, int] = {}
        self._clear()
        # Steps already on disk (a resumed run before truncate_after): new rows must come after them,
        # otherwise a flush could overwrite a part with the same first step.
        parts = _parts(self.folder)
        on_disk = pq.read_table(parts[-1], columns=["step"]).column("step") if parts else None
        self._last_flushed = int(pc.max(on_disk).as_py()) if on_disk is not None and len(on_disk) else 0

    def _clear(self) -> None:
        self._buf: dict[str, list[np.ndarray]] = {name: [] for name in SCHEMA.names}
        self._last_added = 0

    @property
    def buffered_rows(self) -> int:
        return int(sum(len(a) for a in self._buf["step"]))

    def add(self, step: int, source, doc_ids, views, lr, losses, tokens) -> None:
        """Buffer the rows of one step. `source` and `lr` are one value for all rows or one per row."""
        step = int(step)
        if step < 1:
            raise ValueError(f"ExposureWriter.add: step must be 1 or more (steps are 1-based), got {step}.")
        if step <= self._last_flushed:
            raise ValueError(
                f"ExposureWriter.add: step {step} is not after step {self._last_flushed}, which is already "
                f"in {self.folder}; a resumed run must call truncate_after(<checkpoint step>) first."
            )
        if step < self._last_added:
            raise ValueError(
                f"ExposureWriter.add: step {step} comes after step {self._last_added} was added; "
                "steps must not go backwards."
            )
        args = {"doc_ids": doc_ids, "views": views, "lr": lr, "losses": losses, "tokens": tokens}
        cols = {column: np.asarray(args[arg]) for column, arg in _ARGS.items()}
        n = cols["doc_id"].size
        if cols["lr"].ndim == 0:
            cols["lr"] = np.full(n, cols["lr"])
        for column, arr in cols.items():
            if arr.ndim != 1 or arr.size != n:
                raise ValueError(
                    f"ExposureWriter.add: '{_ARGS[column]}' has shape {arr.shape} but doc_ids has {n} rows; "
                    "give one value per row."
                )
        if n == 0:
            return
        if isinstance(source, str):
            codes = np.full(n, self._code(source), dtype=np.int32)
        else:
            names = np.asarray(source, dtype=str)
            if names.shape != (n,):
                raise ValueError(
                    f"ExposureWriter.add: 'source' has shape {names.shape} but doc_ids has {n} rows; "
                    "give one name, or one per row."
                )
            unique, inverse = np.unique(names, return_inverse=True)
            codes = np.array([self._code(str(s)) for s in unique], dtype=np.int32)[inverse]
        self._buf["step"].append(np.full(n, step, dtype=np.int64))
        self._buf["source"].append(codes)
        for name, dtype in _NUMERIC.items():
            self._buf[name].append(cols[name].astype(dtype, copy=False))
        self._last_added = step

    def _code(self, source: str) -> int:
        return self._sources.setdefault(source, len(self._sources))

    def _buffered_table(self) -> pa.Table:
        cols = {name: np.concatenate(arrs) for name, arrs in self._buf.items()}
        names = pa.array(list(self._sources), pa.string())
        arrays = [pa.DictionaryArray.from_arrays(cols["source"], names) if name == "source"
                  else pa.array(cols[name], SCHEMA.field(name).type) for name in SCHEMA.names]
        return pa.Table.from_arrays(arrays, schema=SCHEMA)

    def flush(self) -> Path | None:
        """Publish the buffered rows as `part-<first step:08d>.parquet`; returns its path (None if empty)."""
        if not self.buffered_rows:
            return None
        table = self._buffered_table()
        first = int(self._buf["step"][0][0])
        path = self.folder / f"part-{first:08d}.parquet"
        _write_atomic(table, path)
        self._last_flushed = self._last_added
        self._clear()
        return path

    def truncate_after(self, step: int) -> None:
        """Forget every row with a step after `step`, on disk and in the buffer (resume from `step`)."""
        step = int(step)
        for tmp in self.folder.glob(".part-*.tmp"):
            tmp.unlink()
        for path in _parts(self.folder):
            steps = pq.read_table(path, columns=["step"]).column("step")
            if len(steps) == 0 or pc.min(steps).as_py() > step:
                path.unlink()
            elif pc.max(steps).as_py() > step:
                table = pq.read_table(path)
                _write_atomic(table.filter(pc.less_equal(table.column("step"), step)), path)
        if self.buffered_rows:
            table = self._buffered_table()
            keep = table.filter(pc.less_equal(table.column("step"), step))
            self._clear()
            if keep.num_rows:
                self._rebuffer(keep)
        self._last_flushed = min(self._last_flushed, step)

    def _rebuffer(self, table: pa.Table) -> None:
        self._buf["source"].append(table.column("source").combine_chunks().indices.to_numpy())
        for name in SCHEMA.names:
            if name != "source":
                self._buf[name].append(table.column(name).to_numpy())
        self._last_added = int(self._buf["step"][-1][-1])


def read_exposures(run_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole exposure log of a run as one table in step order (`columns` to read only some)."""
    folder = exposures_dir(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: the run has no exposure log (it is written during training, "
            "one Parquet part per checkpoint)."
        )
    unknown = sorted(set(columns or []) - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"read_exposures: unknown column(s) {unknown}; the log has {SCHEMA.names}.")
    schema = pa.schema([SCHEMA.field(c) for c in columns]) if columns else SCHEMA
    tables = [pq.read_table(p, columns=columns) for p in _parts(folder)]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.cast(schema) for t in tables])
