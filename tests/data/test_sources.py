"""Readers, formats, bad-row policy and the held-out split."""

from __future__ import annotations

import json

import pytest

from keepmix.data.sources import load_source, read_located_records, split_indices
from keepmix.errors import KeepmixError


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "cut\n{"text": "fine"}\n')
    with pytest.raises(KeepmixError, match=rf"{path}:2: malformed row .*on_bad_row: skip"):
        load_source("d", str(path))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(KeepmixError, match=rf"{path}:3: missing field 'text' \(fields: body\)"):
        load_source("d", str(path))


def test_bad_rows_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = ['{"prompt": "p%d", "completion": "c"}' % i for i in range(10)]
    rows[3] = "not json"
    rows[6] = '{"prompt": 5, "completion": "c"}'
    path.write_text("\n".join(rows) + "\n")
    src = load_source("d", str(path), format="prompt_completion", on_bad_row="skip", valid_docs=2)
    assert len(src.train) + len(src.valid) == 8
    assert len(src.skipped) == 2
    assert src.skipped[0].startswith(f"{path}:4: malformed row")
    assert src.skipped[1] == f"{path}:7: field 'prompt' must be a string, got int"


def test_chat_rows_are_checked(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(KeepmixError, match=r"c\.jsonl:1: messages\[0\] must be an object with string 'role'"):
        load_source("c", str(path), format="chat")


def test_parquet_text_folder_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"text": f"doc {i}", "quality": i / 10} for i in range(10)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"file {i}")
    assert read_located_records(str(tmp_path / "d.parquet")).rows == rows
    assert read_located_records(str(tmp_path / "saved")).rows == rows
    texts = read_located_records(str(tmp_path / "txt"))
    assert [r["text"] for r in texts.rows] == ["file 0", "file 1", "file 2"]
    src = load_source("q", str(tmp_path / "saved"), quality_field="quality", valid_docs=0)
    assert src.train_quality.tolist() == [r["quality"] for r in rows]


def test_split_is_deterministic_disjoint_and_sized():
    a_train, a_valid = split_indices(100, 0.1, seed=0, name="general")
    b_train, b_valid = split_indices(100, 0.1, seed=0, name="general")
    assert (a_train == b_train).all() and (a_valid == b_valid).all()
    assert len(a_valid) == 10 and set(a_train).isdisjoint(a_valid) and len(a_train) + len(a_valid) == 100
    _, other = split_indices(100, 0.1, seed=1, name="general")
    assert set(other) != set(a_valid)
    _, by_count = split_indices(100, 7, seed=0, name="general")
    assert len(by_count) == 7


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    first = load_source("d", str(path), valid_docs=0).fingerprint
    assert load_source("d", str(path), valid_docs=0).fingerprint == first
    path.write_text('{"text": "a"}\n{"text": "c"}\n')
    assert load_source("d", str(path), valid_docs=0).fingerprint != first
