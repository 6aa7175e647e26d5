"""Benchmark: what the checkpoint manifest costs — writing it at save time, verifying it at resume.

A checkpoint the size of SmolLM2-135M's full fine-tuning one (135 M fp32 weights + AdamW's two moments:
about 1.6 GB) is saved with and without the manifest, then read back plainly (`load_checkpoint`) and
verified-then-read (`read_checkpoint`). Rounds alternate the variants so that the page cache and the disk
see them alike (and alternate which goes first); the table gives the median seconds and the ratio to the
plain variant. Writing 1.6 GB is dominated by the disk, so the save rows are noisy; the verify row is not.

    python bench/bench_checkpoint.py                      # 135 M parameters, 3 rounds (about 2 minutes)
    python bench/bench_checkpoint.py --params 20e6 --rounds 5     # a quick, smaller run
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from keepmix.training import checkpoint as ckpt


def _state(n_params: int):
    torch.manual_seed(0)
    # a few tensors like a model's (one big embedding, many blocks), not one giant one
    sizes = [n_params // 4] + [n_params * 3 // 4 // 30] * 30
    weights = {f"p{i}": torch.randn(s) for i, s in enumerate(sizes)}
    optimizer = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)}
                           for i, s in enumerate(sizes)},
                 "param_groups": [{"lr": 1e-4, "params": list(range(len(sizes)))}]}
    return weights, optimizer


def _save(root: Path, step: int, weights, optimizer, manifest: bool) -> tuple[float, Path]:
    # without: an empty manifest, so only the hashing is left out
    patch = contextlib.nullcontext() if manifest else mock.patch.object(ckpt, "_manifest", lambda folder: {})
    with patch:
        start = time.perf_counter()
        path = ckpt.save_checkpoint(root, step, weights=weights, optimizer=optimizer, scheduler={"last_epoch": step},
                                    state={"step": step}, keep=1, extra_files={"config.yaml": "x: 1\n"})
        return time.perf_counter() - start, path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=135e6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    weights, optimizer = _state(int(args.params))
    times: dict[str, list[float]] = {k: [] for k in ("save", "save + manifest", "load", "verify + load")}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        size = 0
        for r in range(args.rounds):
            # alternate which variant goes first: the first save of a round meets a fuller page cache
            for step, manifest in sorted([(2 * r + 1, False), (2 * r + 2, True)], key=lambda x: (x[1] + r) % 2):
                t, written = _save(root, step, weights, optimizer, manifest=manifest)
                times["save + manifest" if manifest else "save"].append(t)
                if manifest:
                    path = written
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            start = time.perf_counter()
            ckpt.load_checkpoint(path)
            times["load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.read_checkpoint(path)
            times["verify + load"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"checkpoint of {args.params / 1e6:.0f} M parameters + AdamW state: {size / 1e9:.2f} GB, "
          f"{args.rounds} rounds, median seconds")
    print(f"{'operation':<18}{'seconds':>9}{'spread':>16}{'ratio':>8}")
    for name, base in (("save", "save"), ("save + manifest", "save"), ("load", "load"),
                       ("verify + load", "load")):
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        print(f"{name:<18}{med[name]:>9.2f}{spread:>16}{med[name] / med[base]:>8.2f}")
    print(f"hashing throughput (xxh3-64, verify): {size / 1e9 / max(med['verify + load'] - med['load'], 1e-9):.1f} GB/s")


if __name__ == "__main__":
    main()
