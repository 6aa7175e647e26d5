"""Key paths: how a sweep names the config value an arm changes.

Contract: a key path is dotted mapping keys (`train.lr`, `mixture.floor`), where a list is entered with
`[NAME]` — the item whose `name` is NAME (`sources[code].kl_to_base`, `eval.tasks[sql].max_new_tokens`)
— or `[INDEX]`, a whole number (`mixture.schedule[0].weights.sql`). One shorthand: `mixture.weights`
sets a constant schedule, `[{at: 0, weights: VALUE}]`. `set_key` changes a deep copy's value in place
and creates missing mapping keys (the run config's validation then reports a key it does not know); a
path through a list item that does not exist, or through a value that is not a mapping or a list, is a
`KeepmixError` that names the key path and what is there.
"""

from __future__ import annotations

import re
from typing import Any

from keepmix.errors import KeepmixError

_PART = re.compile(r"([^.\[\]]+)((?:\[[^\[\]]+\])*)")


def parse_key(path: str) -> list[str | int | tuple[str]]:
    """`sources[code].kl_to_base` → ['sources', ('code',), 'kl_to_base']; [3] → 3 (an index)."""
    if not isinstance(path, str) or not path:
        raise KeepmixError(f"key path {path!r}: expected dotted keys such as train.lr or sources[code].floor")
    parts: list = []
    for chunk in path.split("."):
        m = _PART.fullmatch(chunk)
        if not m:
            raise KeepmixError(f"key path {path!r}: {chunk!r} is not a key (expected name, name[item] or "
                               f"name[0]); see docs/SWEEP.md")
        parts.append(m.group(1))
        for item in re.findall(r"\[([^\[\]]+)\]", m.group(2)):
            parts.append(int(item) if item.lstrip("-").isdigit() else (item,))
    return parts


def _describe(part) -> str:
    return f"[{part[0]}]" if isinstance(part, tuple) else f"[{part}]" if isinstance(part, int) else f".{part}"


def set_key(data: dict, path: str, value: Any) -> None:
    """Set the value at a key path (see the module doc)."""
    if path == "mixture.weights":
        data.setdefault("mixture", {})
        if not isinstance(data["mixture"], dict):
            raise KeepmixError(f"key path {path}: mixture is {data['mixture']!r}, not a mapping")
        data["mixture"]["schedule"] = [{"at": 0.0, "weights": value}]
        return
    parts = parse_key(path)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = "".join(_describe(p) for p in parts[:i]).lstrip(".") or "(top level)"
        if isinstance(part, str):
            if not isinstance(node, dict):
                raise KeepmixError(f"key path {path}: {here} is {_short(node)}, not a mapping, so it has no "
                                   f"key {part!r}")
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
            continue
        if not isinstance(node, list):
            raise KeepmixError(f"key path {path}: {here} is {_short(node)}, not a list, so it has no item "
                               f"{_describe(part)}")
        if isinstance(part, int):
            if not -len(node) <= part < len(node):
                raise KeepmixError(f"key path {path}: {here} has {len(node)} items, no index {part}")
            index = part
        else:
            names = [item.get("name") for item in node if isinstance(item, dict)]
            if part[0] not in names:
                raise KeepmixError(f"key path {path}: {here} has no item named {part[0]!r} "
                                   f"(names: {', '.join(map(str, names)) or 'none'})")
            index = names.index(part[0])
        if last:
            node[index] = value
            return
        node = node[index]


def get_key(data: dict, path: str, default: Any = None) -> Any:
    """The value at a key path, or `default` where the path leads nowhere."""
    if path == "mixture.weights":
        schedule = (data.get("mixture") or {}).get("schedule") or []
        return schedule[0]["weights"] if len(schedule) == 1 else default
    node: Any = data
    for part in parse_key(path):
        if isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(part, int) and isinstance(node, list) and -len(node) <= part < len(node):
            node = node[part]
        elif isinstance(part, tuple) and isinstance(node, list):
            found = [item for item in node if isinstance(item, dict) and item.get("name") == part[0]]
            if not found:
                return default
            node = found[0]
        else:
            return default
    return node


def short_name(path: str) -> str:
    """A readable, folder-safe label of a key path: sources[code].kl_to_base → code.kl_to_base."""
    parts = parse_key(path)
    if path == "mixture.weights":
        return "w"
    keep = [p[0] if isinstance(p, tuple) else str(p) for p in parts
            if not (isinstance(p, str) and p in ("sources", "train", "mixture", "eval", "model", "tasks"))]
    return ".".join(keep) or path


def value_label(value: Any) -> str:
    """A value as a folder-safe string: 0.05 → 0.05, {prose: .25, sql: .75} → prose25-sql75."""
    if isinstance(value, dict):
        return "-".join(f"{k}{_num_label(v, percent=True)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "-".join(value_label(v) for v in value)
    if isinstance(value, float):
        return _num_label(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(value))


def _num_label(v: Any, percent: bool = False) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{100 * v:g}" if percent else f"{v:g}"
    return value_label(v)


def _short(node: Any) -> str:
    text = repr(node)
    return text if len(text) <= 40 else text[:37] + "..."
