"""Freed CPU memory stays in the process: glibc's malloc tuned so a step's tensors are not faulted in afresh.

Why: PyTorch has no caching allocator on the CPU, so every tensor is a malloc and every free goes back to
glibc. glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap and
unmaps it on free, and gives the top of its heap back to the kernel once more than its trim threshold is
free there. A training step frees most of what it allocates — the activations in the backward pass, the
LM head's logits and its (V, H) gradient, the embedding's gradient — so every micro-batch gets untouched
pages again, which the kernel faults in and zero-fills one 4 KiB page at a time: SmolLM2-135M at the
demo's 4 micro-batches of 2 x 256 tokens faults in about 2.4 GB a step, and a step takes 1.27x as long
as with the same memory kept (docs/PERFORMANCE.md, "Fifth pass").

`keep_freed_memory()` raises the mmap threshold to `HEAP_BLOCKS_UP_TO` (1 GiB) and the trim threshold to
2 GiB: blocks up to 1 GiB come from the heap and go back to it on free, so the next step reuses pages that
are already there — what CUDA's caching allocator does for GPU memory. The cost is resident memory: the
process keeps its heap at its high-water mark (the demo: 4.26 GB max RSS against 3.96 GB). A known
weakness of glibc's heap, not made by this but extended by it from blocks under 32 MiB to blocks under
1 GiB: an aligned block freed just below a smaller live one leaves a hole that the next block of the
same size does not quite fit, so a loop that keeps one small tensor per large one grows the heap by the
large one each time (with glibc's defaults too, for blocks under 32 MiB); keepmix's own loops measured
flat (docs/PERFORMANCE.md). Set `train.keep_freed_memory: false` for glibc's defaults.

Process-wide and one-way: glibc has no "restore the defaults". keepmix applies it where it runs on the
CPU (a training run, `keepmix eval`, `keepmix merge`), never on import. Elsewhere than glibc (macOS,
Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["HEAP_BLOCKS_UP_TO", "keep_freed_memory", "keep_freed_memory_for_run", "kept_blocks_up_to"]

HEAP_BLOCKS_UP_TO = 1 << 30  # blocks above this are mmapped and returned as before
_TRIM_ABOVE = 2**31 - 1  # free bytes at the heap's top before glibc returns them (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_GLIBC_CAP = 32 << 20  # glibc before 2.35 refuses an mmap threshold above HEAP_MAX_SIZE / 2

_kept: int | None = None  # the threshold glibc took, once applied


def keep_freed_memory() -> int:
    """Tune glibc's malloc to keep freed blocks in the process (see the module doc); idempotent.

    Returns the largest block size now served from the heap, or 0 where there is no glibc."""
    global _kept
    if _kept is not None:
        return _kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _kept = 0
        return 0
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        _kept = 0
        return 0
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for limit in (HEAP_BLOCKS_UP_TO, _GLIBC_CAP):
        if mallopt(_M_MMAP_THRESHOLD, limit) == 1:
            mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
            _kept = limit
            return limit
    _kept = 0
    return 0


def keep_freed_memory_for_run(cfg, device) -> int:
    """`keep_freed_memory()` for a run on `device` when its config asks (`train.keep_freed_memory`, the
    default) and the device is the CPU — a GPU's memory has its own caching allocator. Returns the same."""
    if not cfg.train.keep_freed_memory or str(device).split(":")[0] != "cpu":
        return 0
    return keep_freed_memory()


def kept_blocks_up_to() -> int:
    """What `keep_freed_memory` set in this process: the largest heap block, 0 if not applied."""
    return _kept or 0
