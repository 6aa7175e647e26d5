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
flat in fp32 (docs/PERFORMANCE.md). Under bf16 autocast they do not: a training step's 54 MiB bf16 and
108 MiB float32 copies of the LM head's weight and gradient get split by small long-lived blocks, and
the heap grew by one of them a step (SmolLM2-135M: 3.6 -> 5.9 GB resident in 12 steps, in-use flat at
1.7 GB). `HeapGuard` bounds that: after each step it compares what is resident but not in use with
what it was after the run's second step, and past `HEAP_GUARD_RATIO` times that (`HEAP_GUARD_SLACK` more
at least) it gives the heap's free pages back to the kernel (`malloc_trim`) — one step faults them in
again, the others keep what they reuse; the bf16 demo's max RSS 9.0 -> 6.0 GB, its time unchanged.
Set `train.keep_freed_memory: false` for glibc's defaults.

Process-wide and one-way: glibc has no "restore the defaults". keepmix applies it where it runs on the
CPU (a training run, `keepmix eval`, `keepmix merge`), never on import. Elsewhere than glibc (macOS,
Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["HEAP_BLOCKS_UP_TO", "HEAP_GUARD_RATIO", "HEAP_GUARD_SLACK", "HeapGuard", "heap_guard_for_run",
           "keep_freed_memory", "keep_freed_memory_for_run", "kept_blocks_up_to"]

HEAP_BLOCKS_UP_TO = 1 << 30  # blocks above this are mmapped and returned as before
_TRIM_ABOVE = 2**31 - 1  # free bytes at the heap's top before glibc returns them (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_GLIBC_CAP = 32 << 20  # glibc before 2.35 refuses an mmap threshold above HEAP_MAX_SIZE / 2

HEAP_GUARD_RATIO = 1.25  # resident-but-free memory allowed above the run's second step before a trim
# ...and by at least this much: a trim costs the next step its page faults (about 1.3 s in the bf16 demo), not
# worth paying for the jitter of a small run, whose reference is a few hundred MiB
HEAP_GUARD_SLACK = 256 << 20

_kept: int | None = None  # the threshold glibc took, once applied


def keep_freed_memory() -> int:
    """Tune glibc's malloc to keep freed blocks in the process (see the module doc); idempotent.

    Returns the largest block size now served from the heap, or 0 where there is no glibc."""
    global _kept
    if _kept is None:
        libc = _glibc()
        limits = (HEAP_BLOCKS_UP_TO, _GLIBC_CAP) if libc is not None else ()
        # glibc before 2.35 refuses the larger threshold: the first it takes
        _kept = next((limit for limit in limits if libc.mallopt(_M_MMAP_THRESHOLD, limit) == 1), 0)
        if _kept:
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
    return _kept


@functools.cache
def _glibc():
    """glibc's malloc tuning functions with their prototypes; None where there is no glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory_for_run(cfg, device) -> int:
    """`keep_freed_memory()` for a run on `device` when its config asks (`train.keep_freed_memory`, the
    default) and the device is the CPU — a GPU's memory has its own caching allocator. Returns the same."""
    if not cfg.train.keep_freed_memory or str(device).split(":")[0] != "cpu":
        return 0
    return keep_freed_memory()


def kept_blocks_up_to() -> int:
    """What `keep_freed_memory` set in this process: the largest heap block, 0 if not applied."""
    return _kept or 0


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33; mallinfo()'s int fields overflow past 2 GiB
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapGuard:
    """Bounds the resident memory that kept freed blocks may hold once fragmentation, not use, grows it.

    `after_step()` once per optimizer step: what is resident but not in use by malloc (RSS minus the
    bytes malloc has handed out) is taken as the reference after the second call — a step's own working
    set, kept for the next — and a later step that finds it above `ratio` times that (and `slack` bytes
    more at least) trims the heap.
    Live memory does not count, so a run that needs more does not trim every step."""

    def __init__(self, libc, ratio: float = HEAP_GUARD_RATIO, slack: int = HEAP_GUARD_SLACK):
        self._libc, self.ratio, self.slack = libc, ratio, slack
        self._steps, self.reference = 0, 0
        self.trims, self.released = 0, 0
        libc.malloc_trim(0)  # start from this run's own heap, not what an earlier run in the process left

    def resident_not_in_use(self) -> int:
        info = self._libc.mallinfo2()
        return _resident_bytes() - info.uordblks - info.hblkhd

    def after_step(self) -> None:
        """Trim the heap if its resident free memory has outgrown the reference."""
        self._steps += 1
        spare = self.resident_not_in_use()
        if self._steps <= 2:
            self.reference = max(self.reference, spare)
        elif spare > max(self.ratio * self.reference, self.reference + self.slack):
            before = _resident_bytes()
            self._libc.malloc_trim(0)
            self.trims += 1
            self.released += max(before - _resident_bytes(), 0)

    def record(self) -> dict:
        return {"trims": self.trims, "released_mb": round(self.released / 2**20, 1),
                "reference_mb": round(self.reference / 2**20, 1)}


def heap_guard_for_run() -> HeapGuard | None:
    """A `HeapGuard` where this process keeps freed memory (`keep_freed_memory` applied) and glibc has
    `mallinfo2`; None elsewhere (glibc's defaults give memory back by themselves)."""
    libc = _glibc()
    if not kept_blocks_up_to() or libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.argtypes, libc.mallinfo2.restype = (), _MallInfo2
    return HeapGuard(libc)
