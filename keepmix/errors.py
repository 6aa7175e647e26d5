"""User-facing errors.

A `KeepmixError` carries a message written for the person running keepmix: what was wrong, where
(file:line or config key) and what was expected. The CLI prints it without a traceback.
"""


class KeepmixError(Exception):
    """An error caused by the user's input (config, data files, run directory)."""


class ConfigError(KeepmixError):
    """A config with one or more problems; `problems` lists every one of them as 'key: message'."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun} in the config:\n{lines}")


class NonFiniteLossError(KeepmixError):
    """Training stopped because a loss or gradient was not finite; the weights were not updated."""


def raise_all(problems: list[str], what: str) -> None:
    """One KeepmixError holding every problem found (`what`: e.g. "the data"); nothing when there are none."""
    if len(problems) == 1:
        raise KeepmixError(problems[0])
    if problems:
        raise KeepmixError(f"{len(problems)} problems in {what}:\n" + "\n".join(f"  - {p}" for p in problems))
