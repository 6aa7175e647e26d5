"""The demo's data, made on the spot from what every Python install has; nothing is downloaded.

Three sources:
- prose: the language reference shipped in `pydoc_data.topics`, chunked on paragraph boundaries and
  split by topic into train and held-out;
- code: the running interpreter's standard-library sources, chunked on top-level def/class
  boundaries, split by top-level module (a package counts as one module) and capped by sampling;
- sql: text-to-SQL over a generated shop database (see `keepmix.demo.sql_task`).

Contract of `build_demo_data`: the same seed on the same Python build writes byte-identical files
(the prose and code come from the interpreter, so another Python version gives other documents).
Held-out documents share no topic, module, or (template, values) pair with training documents, and
the unseen SQL templates appear in no training example. manifest.json is written last: its presence
means the build completed.
"""

from __future__ import annotations

import json
import platform
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from keepmix.demo import sql_task
from keepmix.errors import KeepmixError

_PARAGRAPH = re.compile(r"(?<=\n\n)(?=[^\n])")
_LINE = re.compile(r"(?<=\n)(?=[^\n])")
# A definition begins at its comment block and decorators, so they stay with the code they describe.
_TOP_LEVEL_DEF = re.compile(r"^(?:#[^\n]*\n)*(?:@[^\n]*\n)*(?:async def|def|class)\b", re.M)
_NESTED_DEF = re.compile(
    r"^(?:[ \t]*#[^\n]*\n)*(?:[ \t]*@[^\n]*\n)*[ \t]+(?:async def|def|class)\b", re.M)
PROSE_BOUNDARIES = [_PARAGRAPH, _LINE]
CODE_BOUNDARIES = [_TOP_LEVEL_DEF, _NESTED_DEF, _PARAGRAPH, _LINE]
# The fields of a record that hold text a model reads (the manifest counts their characters).
_TEXT_FIELDS = ("text", "prompt", "completion", "sql")
# Paragraphs shorter than this ("Changed in version 3.8.", a one-line example) may legitimately
# recur across topics; longer ones recurring are copies of a whole section.
_MIN_SHARED_PARAGRAPH = 60
# Path parts whose files are not library code (tests, the IDE, vendored packages), are encoding
# tables, or, for pydoc_data, are the prose source itself: keeping it would leak held-out prose.
_SKIPPED_PARTS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                  "lib2to3", "encodings", "pydoc_data", "__phello__", "__pycache__"}


@dataclass(frozen=True)
class DemoData:
    """Where build_demo_data wrote each file, and how many records each JSONL file holds."""

    out_dir: Path
    prose_train: Path
    prose_valid: Path
    code_train: Path
    code_valid: Path
    sql_train: Path
    sql_eval: Path
    database: Path
    manifest: Path
    counts: dict[str, int]  # file stem -> records, e.g. {"sql_train": 400, ...}
    seen_templates: tuple[str, ...]
    unseen_templates: tuple[str, ...]


def chunk_text(text: str, chunk_chars: int, boundaries: list[re.Pattern]) -> list[str]:
    """Cut `text` into chunks of at most ~chunk_chars, preferring the earliest boundary kind.

    A piece longer than chunk_chars between two boundaries of one kind is cut at the next kind, and
    as a last resort every chunk_chars characters; neighbouring pieces are then packed greedily.
    Chunks shorter than chunk_chars // 10 (stray headers, a lone `main()` call) are dropped.
    """
    chunks, current = [], ""
    for piece in _pieces(text, chunk_chars, boundaries):
        if current and len(current) + len(piece) > chunk_chars:
            chunks.append(current)
            current = ""
        current += piece
    chunks.append(current)
    stripped = (c.lstrip("\n").rstrip() for c in chunks)
    return [c for c in stripped if len(c) >= chunk_chars // 10]


def _pieces(text: str, chunk_chars: int, boundaries: list[re.Pattern]) -> list[str]:
    if len(text) <= chunk_chars:
        return [text]
    if not boundaries:
        return [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    cuts = [0, *(m.start() for m in boundaries[0].finditer(text) if m.start() > 0), len(text)]
    out = []
    for start, end in zip(cuts, cuts[1:]):
        out += _pieces(text[start:end], chunk_chars, boundaries[1:])
    return out


def prose_documents(chunk_chars: int) -> dict[str, list[str]]:
    """Topic of the language reference -> its chunks (topics without a chunk are left out)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise KeepmixError("The demo's prose comes from the standard library's pydoc_data.topics, "
                           "which this Python install lacks; install the full standard library "
                           "(e.g. Debian's libpython3-stdlib).") from e
    # Umbrella topics repeat the sections of narrower ones ("specialnames" holds "customization",
    # "compound" holds "try"...), so a split by topic alone would leak held-out text into training.
    # Each long paragraph is kept once, in the narrowest topic that has it.
    kept_paragraphs: set[str] = set()
    docs = {}
    for topic in sorted(topics, key=lambda t: (len(topics[t]), t)):
        paragraphs = []
        for paragraph in topics[topic].split("\n\n"):
            key = paragraph.strip()
            if len(key) >= _MIN_SHARED_PARAGRAPH and key in kept_paragraphs:
                continue
            kept_paragraphs.add(key)
            paragraphs.append(paragraph)
        docs[topic] = chunk_text("\n\n".join(paragraphs), chunk_chars, PROSE_BOUNDARIES)
    return _unique({t: docs[t] for t in sorted(docs)})


def code_documents(chunk_chars: int, stdlib: Path | None = None) -> dict[str, list[str]]:
    """Top-level stdlib module -> chunks of its .py files, in path order (undecodable: skipped)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if (_SKIPPED_PARTS.intersection(parts) or parts[0].startswith("config-")
                or parts[-1].startswith("test_")):
            continue
        try:
            source = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunks = chunk_text(source, chunk_chars, CODE_BOUNDARIES)
        docs.setdefault(parts[0].removesuffix(".py"), []).extend(chunks)
    docs = _unique(docs)
    if len(docs) < 2:
        raise KeepmixError(f"Found standard-library sources for {len(docs)} module(s) under "
                           f"{root}; the demo needs the .py files of at least two modules.")
    return docs


def _unique(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Drop each document seen earlier (in this group or an earlier one), then empty groups.

    Identical documents in two groups (e.g. bz2 and lzma share helper code) would otherwise put the
    same text on both sides of a split by group.
    """
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for name, docs in groups.items():
        for doc in docs:
            if doc not in seen:
                seen.add(doc)
                out.setdefault(name, []).append(doc)
    return out


def split_groups(sizes: dict[str, int], valid_fraction: float, rng: random.Random) -> set[str]:
    """The held-out groups: shuffled groups are taken while their documents fit in valid_fraction.

    At least one group is held out and at least one is left for training.
    """
    names = sorted(sizes)
    rng.shuffle(names)
    target, held, total = valid_fraction * sum(sizes.values()), set(), 0
    for name in names:
        if total + sizes[name] <= target:
            held.add(name)
            total += sizes[name]
    if not held:
        held = {min(names, key=lambda n: (sizes[n], n))}
    if len(held) == len(names):
        raise KeepmixError(f"Cannot hold out {valid_fraction:.0%} of {len(names)} groups and keep "
                           "one for training; lower valid_fraction.")
    return held


def _sample(docs: list[str], k: int, rng: random.Random) -> list[str]:
    """k documents drawn without replacement, kept in source order so files read naturally."""
    return [docs[i] for i in sorted(rng.sample(range(len(docs)), min(k, len(docs))))]


def _write_jsonl(path: Path, records: list[dict]) -> int:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def _spread(total: int, names: list[str]) -> dict[str, int]:
    """total split as evenly as possible over names, the first ones taking the remainder."""
    return {n: total // len(names) + (i < total % len(names)) for i, n in enumerate(names)}


def _check_arguments(chunk_chars: dict[str, int], counts: dict[str, int], valid_fraction: float,
                     unseen: tuple[str, ...]) -> None:
    problems = [f"{k} must be at least 200 characters, got {v}" for k, v in chunk_chars.items()
                if v < 200]
    problems += [f"{k} must be at least 1, got {v}" for k, v in counts.items() if v < 1]
    if not 0 < valid_fraction < 1:
        problems.append(f"valid_fraction must lie strictly between 0 and 1, got {valid_fraction}")
    known = [t.name for t in sql_task.SQL_TEMPLATES]
    problems += [f"unseen_templates names '{u}', which is not one of {known}"
                 for u in unseen if u not in known]
    if not unseen or set(known) <= set(unseen):
        problems.append("unseen_templates must hold out at least one SQL template and leave at "
                        "least one seen")
    if problems:
        raise KeepmixError("build_demo_data got invalid arguments: " + "; ".join(problems) + ".")


def _prose_records(chunk_chars: int, valid_fraction: float, seed: int) -> tuple[dict, dict]:
    prose = prose_documents(chunk_chars)
    held = split_groups({t: len(d) for t, d in prose.items()}, valid_fraction,
                        random.Random(f"prose/{seed}"))
    records = {"prose_train": [{"text": d} for t in prose if t not in held for d in prose[t]],
               "prose_valid": [{"text": d} for t in prose if t in held for d in prose[t]]}
    return records, {"train": sorted(set(prose) - held), "valid": sorted(held)}


def _code_records(chunk_chars: int, max_docs: int, valid_docs: int, valid_fraction: float,
                  seed: int) -> tuple[dict, dict]:
    code = code_documents(chunk_chars)
    rng = random.Random(f"code/{seed}")
    held = split_groups({m: len(d) for m, d in code.items()}, valid_fraction, rng)
    train = [d for m in code if m not in held for d in code[m]]
    valid = [d for m in code if m in held for d in code[m]]
    records = {"code_train": [{"text": d} for d in _sample(train, max_docs, rng)],
               "code_valid": [{"text": d} for d in _sample(valid, valid_docs, rng)]}
    return records, {"train": sorted(set(code) - held), "valid": sorted(held)}


def _sql_records(database: Path, seed: int, n_train: int, n_eval_seen: int, n_eval_unseen: int,
                 unseen: tuple[str, ...]) -> tuple[dict, dict]:
    facts = sql_task.build_shop_database(database, seed)
    seen = [t.name for t in sql_task.SQL_TEMPLATES if t.name not in unseen]
    # Per seen template, its first questions go to evaluation and the rest to training.
    evals, trains = _spread(n_eval_seen, seen), _spread(n_train, seen)
    counts = {**{n: evals[n] + trains[n] for n in seen}, **_spread(n_eval_unseen, list(unseen))}
    questions = sql_task.sample_questions(database, facts, counts, seed)
    train = [q for n in seen for q in questions[n][evals[n]:]]
    random.Random(f"sql-order/{seed}").shuffle(train)  # interleave templates
    eval_items = [(q, "seen") for n in seen for q in questions[n][:evals[n]]]
    eval_items += [(q, "unseen") for n in unseen for q in questions[n]]
    records = {
        "sql_train": [{"prompt": sql_task.format_prompt(q.question), "completion": f"{q.sql};\n",
                       "template": q.template} for q in train],
        "sql_eval": [{"prompt": sql_task.format_prompt(q.question), "sql": q.sql, "group": group,
                      "template": q.template, "question": q.question} for q, group in eval_items]}
    info = {"database": database.name, "seen_templates": seen, "unseen_templates": list(unseen),
            "questions_per_template": counts}
    return records, info


def build_demo_data(out_dir: Path, *, seed: int = 0, prose_chunk_chars: int = 1000,
                    code_chunk_chars: int = 1000, code_max_docs: int = 400,
                    code_valid_docs: int = 48, valid_fraction: float = 0.1, sql_train: int = 400,
                    sql_eval_seen: int = 48, sql_eval_unseen: int = 36,
                    unseen_templates: tuple[str, ...] = sql_task.DEFAULT_UNSEEN_TEMPLATES,
                    ) -> DemoData:
    """Write the demo's data files into out_dir (created if missing) and return where they are.

    Files: prose_train/valid.jsonl and code_train/valid.jsonl ({"text"}), sql_train.jsonl
    ({"prompt", "completion", "template"}), sql_eval.jsonl ({"prompt", "sql", "group", "template",
    "question"}, group "seen" | "unseen"), shop.sqlite, manifest.json.
    """
    unseen = tuple(dict.fromkeys(unseen_templates))
    params = {"prose_chunk_chars": prose_chunk_chars, "code_chunk_chars": code_chunk_chars,
              "code_max_docs": code_max_docs, "code_valid_docs": code_valid_docs,
              "valid_fraction": valid_fraction, "sql_train": sql_train,
              "sql_eval_seen": sql_eval_seen, "sql_eval_unseen": sql_eval_unseen}
    _check_arguments({"prose_chunk_chars": prose_chunk_chars, "code_chunk_chars": code_chunk_chars},
                     {"code_max_docs": code_max_docs, "code_valid_docs": code_valid_docs,
                      "sql_train": sql_train, "sql_eval_seen": sql_eval_seen,
                      "sql_eval_unseen": sql_eval_unseen}, valid_fraction, unseen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # absent until this build completes

    prose, prose_split = _prose_records(prose_chunk_chars, valid_fraction, seed)
    code, code_split = _code_records(code_chunk_chars, code_max_docs, code_valid_docs,
                                     valid_fraction, seed)
    database = out / "shop.sqlite"
    sql, sql_info = _sql_records(database, seed, sql_train, sql_eval_seen, sql_eval_unseen, unseen)
    records = {**prose, **code, **sql}

    paths = {name: out / f"{name}.jsonl" for name in records}
    counts = {name: _write_jsonl(paths[name], recs) for name, recs in records.items()}
    chars = {name: sum(len(r.get(k, "")) for r in recs for k in _TEXT_FIELDS)
             for name, recs in records.items()}
    manifest = {
        "seed": seed, "python": platform.python_version(),
        "files": {f"{n}.jsonl": {"records": counts[n], "chars": chars[n]} for n in records},
        "prose_topics": prose_split, "code_modules": code_split, "sql": sql_info, "params": params,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8", newline="\n")
    return DemoData(out_dir=out, **paths, database=database, manifest=manifest_path,
                    counts=counts, seen_templates=tuple(sql_info["seen_templates"]),
                    unseen_templates=unseen)
