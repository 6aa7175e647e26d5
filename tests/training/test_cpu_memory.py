"""Freed CPU memory kept in the process (keepmix.training.cpu_memory): a large block comes from glibc's heap
(which keeps freed memory) instead of a mapping of its own, a CPU run applies it unless its config says
no, and it changes no number. (What it saves in page faults and time: docs/PERFORMANCE.md.)

Each check runs in a fresh process: the setting is process-wide and one-way, and glibc's defaults are
what is compared against.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tests.conftest import train_records

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="tunes glibc's malloc; does nothing elsewhere")

# A 64 MiB tensor (above glibc's largest dynamic mmap threshold, 32 MiB), allocated and freed three times:
# whether its memory lies in glibc's heap (where a freed block stays in the process) or in a mapping of
# its own (returned to the kernel on free, faulted in afresh the next time).
REFAULT = """
import json, sys, torch
from keepmix.training.cpu_memory import keep_freed_memory, kept_blocks_up_to
kept = keep_freed_memory() if sys.argv[1] == "keep" else 0
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = line.split()[0].split("-")
            return int(low, 16), int(high, 16)
    return 0, 0
in_heap = []
for _ in range(3):
    block = torch.ones(16 << 20)
    low, high = heap()
    in_heap.append(low <= block.data_ptr() < high)
    del block
reported = kept_blocks_up_to()
print(json.dumps({"kept": kept, "in_heap": in_heap, "reported": reported,
                  "again": keep_freed_memory() if kept else None}))
"""

# What `HeapGuard` bounds: memory the heap keeps resident but malloc no longer hands out, growing round
# after round. In a bf16 run fragmentation grows it (docs/PERFORMANCE.md, seventh pass); where freed blocks
# land is up to glibc, so here the heap's high-water mark rises instead, which leaves the same resident free
# memory behind and does so on every run: "rising" holds one more 64 MiB block each round, "flat" always one.
# (`HEAP_GUARD_SLACK`, 4 such blocks, is what keeps the flat loop's first holes from counting.)
HEAP_ROUNDS = """
import json, sys, torch
from keepmix.training.cpu_memory import _resident_bytes as resident, heap_guard_for_run, keep_freed_memory
keep_freed_memory()
guard = heap_guard_for_run() if sys.argv[1] == "guard" else None
start, held = resident(), []
for round in range(16):
    blocks = [torch.ones(16 << 20) for _ in range(round + 1 if sys.argv[2] == "rising" else 1)]
    del blocks
    if guard is not None:
        guard.after_step()
    held.append((resident() - start) / (64 << 20))
print(json.dumps({"held": held, "trims": guard.trims if guard else None,
                  "released": guard.released / (64 << 20) if guard else None}))
"""

TRAIN = """
import json, sys
from keepmix import train
from keepmix.training.cpu_memory import kept_blocks_up_to
train(sys.argv[1], progress="quiet", overrides={"train.keep_freed_memory": sys.argv[2] == "true"})
print(json.dumps({"kept": kept_blocks_up_to()}))
"""


def _run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_large_block_comes_from_the_heap_instead_of_a_mapping_of_its_own():
    system = _run(REFAULT, "system")
    kept = _run(REFAULT, "keep")
    assert system["kept"] == 0 and system["reported"] == 0
    assert system["in_heap"] == [False] * 3  # glibc's defaults: mmapped, unmapped on free
    assert kept["kept"] >= 32 << 20 and kept["again"] == kept["kept"] == kept["reported"]  # idempotent
    assert kept["in_heap"] == [True] * 3


def test_the_heap_guard_gives_back_resident_free_memory_that_keeps_growing_and_leaves_a_flat_loop_alone():
    unguarded = _run(HEAP_ROUNDS, "none", "rising")
    guarded = _run(HEAP_ROUNDS, "guard", "rising")
    flat = _run(HEAP_ROUNDS, "guard", "flat")
    assert unguarded["held"][-1] >= 15  # kept freed memory is never given back on its own
    assert guarded["trims"] >= 2 and guarded["released"] >= 8  # in 64 MiB blocks
    assert max(guarded["held"]) <= 9
    # a loop that settles (glibc may leave a hole or three first) is never trimmed
    assert flat["trims"] == 0 and max(flat["held"]) <= 6 and flat["held"][-1] - flat["held"][7] <= 1


def test_a_cpu_run_keeps_freed_memory_unless_told_not_to_and_computes_the_same(make_run):
    runs = {}
    for keep in ("true", "false"):
        config = make_run(f"keep-{keep}", train={"steps": 3, "checkpoint_every": None}, eval={"every": None})
        runs[keep] = _run(TRAIN, str(config), keep), config.parent / "out"
    assert runs["true"][0]["kept"] >= 32 << 20
    assert runs["false"][0]["kept"] == 0
    # the run that keeps freed memory guards it, and says how often it gave some back
    heap = [train_records(runs[k][1], "end")[-1].get("heap") for k in ("true", "false")]
    assert heap[1] is None and heap[0]["trims"] == 0 and heap[0]["reference_mb"] > 0  # a small run: no trim
    # where a tensor's memory comes from changes no number: the same losses and evals, bit for bit
    kept, system = (train_records(runs[k][1]) for k in ("true", "false"))
    assert [r["loss"] for r in kept] == [r["loss"] for r in system] and len(kept) == 3
    evals = [[r["metrics"] for r in train_records(runs[k][1], "eval")] for k in ("true", "false")]
    assert evals[0] == evals[1] and len(evals[0]) == 2 and "valid/general/loss" in evals[0][1]  # step 0, the end
