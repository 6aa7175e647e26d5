"""Reading data sources: every `datasets` call of keepmix lives here.

Contract: `read_records` turns a path or hub id into a list of dict records, with a location for each
("data/x.jsonl:17") so that later validation can name the line. `load_source` validates the records
against a source's format and returns canonical documents:
  text              {"text": str}
  chat              {"messages": [{"role": str, "content": str}, ...]}
  prompt_completion {"prompt": str, "completion": str}
Malformed rows raise `KeepmixError` naming file and line, or — with on_bad_row="skip" — are skipped and
counted. The held-out split is deterministic given the seed and the source name.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from keepmix.errors import KeepmixError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
# Roles chat templates know; any other one (a typo such as "assitant") would silently train on nothing.
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Records:
    rows: list[dict]
    locations: list[str]
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of rows that could not be read


SKIP_HINT = "; fix it, or set on_bad_row: skip for this source"


def _iter_jsonl(path: Path, on_bad_row: str, skipped: list[str] | None, hint: str = SKIP_HINT):
    """(record, "file:line") for each JSON object line; bad lines raise or are appended to `skipped`."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except (ValueError, UnicodeDecodeError) as err:
                msg = f"{where}: malformed row ({err})"
                if on_bad_row == "error":
                    raise KeepmixError(msg + hint) from None
                if skipped is not None:
                    skipped.append(msg)
                continue
            yield row, where


def _read_jsonl(path: Path, on_bad_row: str, hint: str = SKIP_HINT) -> Records:
    skipped: list[str] = []
    pairs = list(_iter_jsonl(path, on_bad_row, skipped, hint))
    return Records([r for r, _ in pairs], [w for _, w in pairs], skipped)


def _read_json_array(path: Path) -> Records:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise KeepmixError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise KeepmixError(f"{path}: expected a JSON list of objects (or use JSON Lines, one object a line)")
    return Records(data, [f"{path}[{i}]" for i in range(len(data))])


def _read_text(path: Path) -> Records:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise KeepmixError(f"{path}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in this folder")
    rows, locations = [], []
    for f in files:
        rows.append({"text": f.read_text(encoding="utf-8", errors="replace")})
        locations.append(str(f))
    return Records(rows, locations)


def _read_hf(path: str, *, hf_config: str | None, hf_split: str | None) -> Records:
    import datasets

    local = Path(path)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            where = str(local)
        elif local.suffix.lower() == ".parquet":
            ds = datasets.Dataset.from_parquet(str(local))
            where = str(local)
        else:
            ds = datasets.load_dataset(path, hf_config, split=hf_split or "train")
            where = f"hub:{path}[{hf_split or 'train'}]"
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise KeepmixError(f"{path}: could not load the dataset ({type(err).__name__}: {err})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = hf_split or "train"
        if split not in ds:
            raise KeepmixError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return Records(ds.to_list(), [f"{where}#{i}" for i in range(len(ds))])


def read_located_records(
    path: str, *, hf_config: str | None = None, hf_split: str | None = None, on_bad_row: str = "error",
    hint: str = SKIP_HINT,
) -> Records:
    """Records with their locations, from JSONL, JSON, Parquet, text files/folders, saved or hub datasets.
    `hint` follows a bad row's location in the error (how to get past it)."""
    local = Path(path)
    suffix = local.suffix.lower()
    if local.is_file() and suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(local, on_bad_row, hint)
    if local.is_file() and suffix == ".json":
        return _read_json_array(local)
    if (local.is_file() and suffix in TEXT_SUFFIXES) or (
        local.is_dir() and not any((local / m).exists() for m in ("dataset_info.json", "dataset_dict.json"))
    ):
        return _read_text(local)
    return _read_hf(path, hf_config=hf_config, hf_split=hf_split)


def iter_located_records(path: str, *, hf_config: str | None = None, hf_split: str | None = None,
                         on_bad_row: str = "error", skipped: list[str] | None = None):
    """(record, location) one at a time, never holding the whole source: for corpora larger than memory.

    JSONL is read line by line, Parquet batch by batch, hub datasets with `streaming=True`; other kinds
    fall back to `read_located_records`. Skipped rows are appended to `skipped`.
    """
    local = Path(path)
    suffix = local.suffix.lower()
    if local.is_file() and suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(local, on_bad_row, skipped)
    elif local.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(local).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield row, f"{local}#{i}"
                i += 1
    elif not local.exists():
        import datasets

        try:
            ds = datasets.load_dataset(path, hf_config, split=hf_split or "train", streaming=True)
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
            raise KeepmixError(f"{path}: could not stream the dataset ({type(err).__name__}: {err})") from None
        for i, row in enumerate(ds):
            yield row, f"hub:{path}[{hf_split or 'train'}]#{i}"
    else:
        records = read_located_records(path, hf_config=hf_config, hf_split=hf_split, on_bad_row=on_bad_row)
        if skipped is not None:
            skipped.extend(records.skipped)
        yield from zip(records.rows, records.locations)


def iter_canonical_docs(path: str, *, format: str = "text", fields: dict[str, str] | None = None,
                        hf_config: str | None = None, hf_split: str = "train", on_bad_row: str = "error",
                        skipped: list[str]):
    """Canonical documents of a streamed source, one at a time (bad rows per `on_bad_row`)."""
    fields = {"text": "text", "messages": "messages", "prompt": "prompt", "completion": "completion", **(fields or {})}
    for row, where in iter_located_records(path, hf_config=hf_config, hf_split=hf_split, on_bad_row=on_bad_row,
                                           skipped=skipped):
        try:
            yield canonical(row, format, fields)
        except ValueError as err:
            msg = f"{where}: {err}"
            if on_bad_row == "error":
                raise KeepmixError(msg + SKIP_HINT) from None
            skipped.append(msg)


def stream_fingerprint(path: str, *, format: str, fields: dict, hf_config: str | None, hf_split: str,
                       valid_docs: int, max_docs: int | None) -> str:
    """Identifies a streamed source without reading it: local files by size and mtime, hub ids by name."""
    local = Path(path)
    stat = [local.stat().st_size, local.stat().st_mtime_ns] if local.exists() else [hf_config, hf_split]
    blob = json.dumps([str(local.resolve()) if local.exists() else path, stat, format, fields, valid_docs, max_docs])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_records(path: str, *, hf_split: str | None = None, hf_config: str | None = None) -> list[dict]:
    """Plain records (e.g. evaluation items); malformed rows are errors naming file and line."""
    return read_located_records(path, hf_config=hf_config, hf_split=hf_split,
                                hint="; expected one JSON object per line").rows


def canonical(row: dict, fmt: str, fields: dict[str, str]) -> dict:
    """One record in its canonical form, or ValueError saying which field is wrong."""

    def text_field(key: str) -> str:
        name = fields[key]
        if name not in row:
            raise ValueError(f"missing field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
        value = row[name]
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
        return value

    if fmt == "text":
        return {"text": text_field("text")}
    if fmt == "prompt_completion":
        return {"prompt": text_field("prompt"), "completion": text_field("completion")}
    name = fields["messages"]
    messages = row.get(name)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {name!r} must be a non-empty list of {{role, content}} messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{name}[{j}] must be an object with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"{name}[{j}] has the role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


@dataclass
class SourceDocs:
    """A source's documents in canonical form, split into train and held-out validation."""

    name: str
    train: list[dict]
    valid: list[dict]
    train_quality: np.ndarray | None
    skipped: list[str]
    fingerprint: str  # content + format options: keys the token cache


def _canonical_docs(records: Records, fmt: str, fields: dict, quality_field: str | None, on_bad_row: str):
    docs, quality, skipped = [], [], list(records.skipped)
    for row, where in zip(records.rows, records.locations):
        try:
            doc = canonical(row, fmt, fields)
            if quality_field is not None:
                q = row.get(quality_field)
                if isinstance(q, bool) or not isinstance(q, (int, float)):
                    raise ValueError(f"quality field {quality_field!r} must be a number, got {q!r}")
                quality.append(float(q))
        except ValueError as err:
            msg = f"{where}: {err}"
            if on_bad_row == "error":
                raise KeepmixError(msg + SKIP_HINT) from None
            skipped.append(msg)
            continue
        docs.append(doc)
    return docs, (np.asarray(quality, dtype=np.float64) if quality_field else None), skipped


def _is_empty(doc: dict) -> bool:
    texts = [m["content"] for m in doc["messages"]] if "messages" in doc else list(doc.values())
    return not any(t.strip() for t in texts)


def split_indices(n: int, valid_docs: int | float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/held-out split of n documents (count, or fraction of n)."""
    n_valid = int(valid_docs) if isinstance(valid_docs, int) else int(round(n * valid_docs))
    n_valid = min(n_valid, max(n - 1, 0))
    perm = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def load_source(
    name: str,
    path: str,
    *,
    format: str = "text",
    fields: dict[str, str] | None = None,
    quality_field: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    valid_path: str | None = None,
    valid_docs: int | float = 0.05,
    max_docs: int | None = None,
    on_bad_row: str = "error",
    seed: int = 0,
) -> SourceDocs:
    fields = {"text": "text", "messages": "messages", "prompt": "prompt", "completion": "completion", **(fields or {})}
    records = read_located_records(path, hf_config=hf_config, hf_split=hf_split, on_bad_row=on_bad_row)
    if max_docs is not None:
        records = Records(records.rows[:max_docs], records.locations[:max_docs], records.skipped)
    docs, quality, skipped = _canonical_docs(records, format, fields, quality_field, on_bad_row)
    if valid_path is not None:
        vrec = read_located_records(valid_path, hf_config=hf_config, hf_split=hf_split, on_bad_row=on_bad_row)
        valid, _, vskipped = _canonical_docs(vrec, format, fields, None, on_bad_row)
        train, skipped = docs, skipped + vskipped
    else:
        train_idx, valid_idx = split_indices(len(docs), valid_docs, seed, name)
        train, valid = [docs[i] for i in train_idx], [docs[i] for i in valid_idx]
        quality = quality[train_idx] if quality is not None else None
    if not docs and skipped:
        raise KeepmixError(f"{path}: every row was skipped as malformed, so no documents are "
                           f"left; {describe_skipped(skipped)}")
    if not docs:
        raise KeepmixError(f"{path}: holds no records; expected at least one document")
    if all(_is_empty(doc) for doc in docs):
        raise KeepmixError(f"{path}: every one of its {len(docs)} documents is empty; "
                           f"check the field names (text_field, prompt_field, ...) and the format")
    if valid_path is None and isinstance(valid_docs, int) and valid_docs >= len(docs):
        raise KeepmixError(f"{path}: valid_docs is {valid_docs} but the source has "
                           f"{len(docs)} usable documents; expected fewer, so that some remain for training")
    if not train:
        raise KeepmixError(f"{path}: no training documents are left after holding out "
                           f"{len(valid)} (valid_docs: {valid_docs})")
    digest = hashlib.sha256()
    digest.update(json.dumps([format, fields, quality_field, valid_path, valid_docs, seed, name]).encode())
    for doc in train:
        digest.update(json.dumps(doc, sort_keys=True).encode())
    digest.update(b"\x00valid")
    for doc in valid:
        digest.update(json.dumps(doc, sort_keys=True).encode())
    return SourceDocs(name, train, valid, quality, skipped, digest.hexdigest()[:24])


def describe_skipped(skipped: list[str], limit: int = 3) -> str:
    head = "; ".join(skipped[:limit])
    more = f" (+{len(skipped) - limit} more)" if len(skipped) > limit else ""
    return f"{len(skipped)} bad rows skipped: {head}{more}"

