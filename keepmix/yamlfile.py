"""Reading keepmix's YAML files strictly, and `--set` overrides.

Contract: `read_yaml(path)` returns the parsed document or raises one `ConfigError` naming the file (and
the line, where there is one) for a path that is missing or a folder, bytes that are not UTF-8, text that
is not YAML, and a key given twice in one mapping — plain YAML would keep the last silently and drop a
whole block. `apply_override` sets a dotted key (`train.steps`) and refuses a path that runs through a
value that is not a mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from keepmix.errors import ConfigError, KeepmixError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, naming both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let SafeLoader report it
                break
            line = key_node.start_mark.line + 1
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first}); each key once per block",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text → data; `where` names the text in errors (a file, or `--set key`)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise ConfigError(at, [f"not valid YAML: {getattr(err, 'problem', None) or err}"]) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError(str(path), ["file not found"])
    if path.is_dir():
        raise ConfigError(str(path), ["is a folder; expected a YAML config file (e.g. run.yaml)"])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                                      f"save the file as UTF-8"]) from None
    except OSError as err:
        raise ConfigError(str(path), [f"cannot be read ({err.strerror})"]) from None
    return parse_yaml(text, str(path))


def parse_override(pair: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is YAML (`--set train.lr=3e-4`)."""
    if "=" not in pair:
        raise KeepmixError(f"--set {pair!r}: expected key=value, e.g. --set train.steps=20")
    key, value = pair.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise KeepmixError(f"--set {pair!r}: expected a dotted key before '=', e.g. train.steps")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise KeepmixError(f"--set {key}: the value {value!r} is not valid YAML "
                           f"({getattr(err, 'problem', None) or err})") from None


def apply_override(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeepmixError(f"--set {dotted}: {'.'.join(parts[:i + 1])} is {node!r}, not a mapping, so it "
                               f"has no key {parts[i + 1]!r}")
    node[parts[-1]] = value
