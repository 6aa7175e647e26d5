"""ExposureWriter / read_exposures: round trip, exact resume, atomic parts, and cost at a million rows."""

import time

import numpy as np
import pyarrow as pa
import pytest

from keepmix.diagnostics.exposures import SCHEMA, ExposureWriter, read_exposures


def _step_rows(step: int, rng_seed: int = 0):
    """Deterministic rows of one step: 3 'general' segments and 2 'sql' ones, one without loss tokens."""
    rng = np.random.default_rng([rng_seed, step])
    losses = rng.uniform(0.5, 3.0, 5).astype(np.float32)
    losses[4] = np.nan
    return {
        "source": ["general", "general", "general", "sql", "sql"],
        "doc_ids": rng.integers(0, 1000, 5),
        "views": np.array([1, 1, 2, 1, 1]),
        "lr": 1e-3 / step,
        "losses": losses,
        "tokens": np.array([10, 20, 30, 40, 0]),
    }


def _write(run_dir, steps, flush_after, writer=None):
    writer = writer or ExposureWriter(run_dir)
    for step in steps:
        writer.add(step, **_step_rows(step))
        if step in flush_after:
            writer.flush()
    return writer


def _assert_same(a: pa.Table, b: pa.Table):
    """Equal schema and values, NaN equal to NaN (Table.equals treats NaN as unequal to itself)."""
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        if name == "source":
            as_text = [t.column(name).cast(pa.string()).to_pylist() for t in (a, b)]
            assert as_text[0] == as_text[1]
        else:
            np.testing.assert_array_equal(a.column(name).to_numpy(), b.column(name).to_numpy())


def test_flush_and_read_round_trip(tmp_path):
    writer = _write(tmp_path, range(1, 7), flush_after={3, 6})
    parts = sorted(p.name for p in (tmp_path / "exposures").iterdir())
    assert parts == ["part-00000001.parquet", "part-00000004.parquet"]
    assert writer.flush() is None  # nothing buffered: no empty part

    table = read_exposures(tmp_path)
    assert table.schema == SCHEMA
    assert table.num_rows == 30
    assert table.column("step").to_pylist() == [s for s in range(1, 7) for _ in range(5)]
    expected = [_step_rows(s) for s in range(1, 7)]
    assert table.column("source").cast(pa.string()).to_pylist() == sum((e["source"] for e in expected), [])
    np.testing.assert_array_equal(table.column("doc_id").to_numpy(),
                                  np.concatenate([e["doc_ids"] for e in expected]))
    np.testing.assert_array_equal(table.column("loss").to_numpy(),
                                  np.concatenate([e["losses"] for e in expected]))  # NaN kept as NaN
    np.testing.assert_allclose(table.column("lr").to_numpy(), np.repeat([1e-3 / s for s in range(1, 7)], 5),
                               rtol=1e-6)
    assert read_exposures(tmp_path, columns=["step", "tokens"]).column_names == ["step", "tokens"]


def test_resumed_log_equals_uninterrupted(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _write(whole, range(1, 11), flush_after={3, 6, 9, 10})

    # The interrupted run flushed parts 1..4 and 5..8 (the second straddles checkpoint 6) and died at 9.
    _write(resumed, range(1, 10), flush_after={4, 8})
    writer = ExposureWriter(resumed)
    with pytest.raises(ValueError, match="truncate_after"):
        writer.add(7, **_step_rows(7))
    writer.truncate_after(6)
    assert read_exposures(resumed).column("step").to_pylist()[-1] == 6
    _write(resumed, range(7, 11), flush_after={9, 10}, writer=writer)

    _assert_same(read_exposures(resumed), read_exposures(whole))
    assert not list((resumed / "exposures").glob(".*"))  # no temp files left behind


def test_truncate_after_also_trims_the_buffer(tmp_path):
    writer = _write(tmp_path, range(1, 6), flush_after={2})
    writer.truncate_after(3)  # steps 3..5 are only in the buffer
    writer.add(4, **_step_rows(4))
    writer.flush()
    assert sorted(set(read_exposures(tmp_path).column("step").to_pylist())) == [1, 2, 3, 4]


def test_readers_ignore_unpublished_temp_files_and_steps_never_go_back(tmp_path):
    writer = _write(tmp_path, range(1, 3), flush_after={2})
    (tmp_path / "exposures" / ".part-00000003.parquet.tmp").write_bytes(b"half a parquet file")
    assert read_exposures(tmp_path).num_rows == 10
    writer.add(5, **_step_rows(5))
    with pytest.raises(ValueError, match="must not go backwards"):
        writer.add(4, **_step_rows(4))
    with pytest.raises(ValueError, match="'losses' has shape"):
        writer.add(6, "sql", [1, 2], [1, 1], 1e-3, [0.5], [3, 4])
    with pytest.raises(FileNotFoundError, match="no exposure log"):
        read_exposures(tmp_path / "elsewhere")


def test_a_million_rows_write_and_read_quickly(tmp_path):
    rng = np.random.default_rng(0)
    steps, rows = 1000, 1000
    n = steps * rows
    # Realistic entropy: every row its own document, view, loss and length (a constant log compresses
    # to nothing and would flatter the size figure).
    sources = np.array(["general", "code", "sql"])[rng.integers(0, 3, n)]
    doc_ids = rng.integers(0, 200_000, n)
    views = rng.integers(1, 4, n)
    losses = rng.uniform(0.5, 4.0, n).astype(np.float32)
    tokens = rng.integers(1, 512, n)

    start = time.perf_counter()
    writer = ExposureWriter(tmp_path)
    for step in range(1, steps + 1):
        at = slice((step - 1) * rows, step * rows)
        writer.add(step, sources[at], doc_ids[at], views[at], 1e-4, losses[at], tokens[at])
        if step % 100 == 0:
            writer.flush()
    written = time.perf_counter() - start
    start = time.perf_counter()
    table = read_exposures(tmp_path)
    read = time.perf_counter() - start

    size = sum(p.stat().st_size for p in (tmp_path / "exposures").iterdir())
    print(f"\n1e6 exposure rows: write {written:.2f} s, read {read:.2f} s, {size / 2**20:.1f} MiB on disk "
          f"({size / table.num_rows:.1f} bytes/row)")
    assert table.num_rows == steps * rows
    assert table.column("source").type == pa.dictionary(pa.int32(), pa.string())
    assert written + read < 15
