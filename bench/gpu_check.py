"""A short check for a GPU machine (≤ 5 minutes): throughput, peak memory and a resume round-trip.

    python bench/gpu_check.py [--steps 40] [--seq-len 1024] [--batch 16] [--out /tmp/gpu_check]

It trains a ~125M-parameter Llama from scratch (or `--model` / `--gguf`) on text made from the Python
standard library, with bf16 autocast, in three runs: an uninterrupted one, and one stopped half-way and
resumed. It prints a table: tokens/s, model FLOPs utilisation against a bf16 matmul peak it measures,
peak GPU memory, and how far the resumed run's losses are from the uninterrupted one's (GPU kernels are
not bit-reproducible across processes the way CPU ones are, so this is a tolerance, not equality).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(dtype=torch.bfloat16, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def write_data(folder: Path) -> None:
    import sysconfig

    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(folder / "prose.jsonl", "w") as f:
        for text in topics.values():
            f.write(json.dumps({"text": text}) + "\n")
    with open(folder / "code.jsonl", "w") as f:
        for path in sorted(stdlib.glob("*.py"))[:400]:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")


def config(folder: Path, args, output: str) -> dict:
    if args.model:
        model = {"name": args.model, "gguf_file": args.gguf}
    else:
        model = {"init": "scratch", "tokenizer": args.tokenizer, "architecture": {
            "model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": args.seq_len}}
    return {
        "model": model,
        "sources": [{"name": "prose", "path": str(folder / "prose.jsonl"), "valid_docs": 20},
                    {"name": "code", "path": str(folder / "code.jsonl"), "valid_docs": 20}],
        "mixture": {"schedule": [{"at": 0, "weights": {"prose": 0.7, "code": 0.3}},
                                 {"at": 1, "weights": {"prose": 0.3, "code": 0.7}}], "floor": 0.1},
        "train": {"seq_len": args.seq_len, "batch_size": args.batch, "steps": args.steps, "lr": 3e-4,
                  "warmup": 5, "checkpoint_every": args.steps // 2, "device": "cuda"},
        "eval": {"every": None, "max_valid_tokens": 20000},
        "output": output,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default=None, help="hub id / folder (default: a 125M Llama from scratch)")
    p.add_argument("--gguf", default=None)
    p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "examples/tiny/tokenizer"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    from keepmix.config import parse_config
    from keepmix.training.loop import train
    from keepmix.report.metrics import of_kind, read_metrics

    folder = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    folder.mkdir(parents=True, exist_ok=True)
    write_data(folder)
    peak = matmul_peak()
    runs = {}
    for name, stop in (("whole", None), ("resumed", args.steps // 2)):
        cfg = parse_config(config(folder, args, name), base_dir=folder)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        train(cfg, progress="quiet", stop_at=stop)
        if stop:
            train(cfg, progress="quiet", resume=True)
        steps = of_kind(read_metrics(folder / name / "metrics.jsonl"), "train")
        timed = steps[3:]  # the first steps include warm-up (allocator, kernels)
        tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
        runs[name] = {"losses": [r["loss"] for r in steps], "tokens_per_s": tps, "wall_s": time.perf_counter() - t,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder / "whole" / "final").parameters())
    w, r = runs["whole"], runs["resumed"]
    diff = max(abs(a - b) for a, b in zip(w["losses"], r["losses"]))
    mfu = 6 * params * w["tokens_per_s"] / peak
    print(f"\n{torch.cuda.get_device_name()} | bf16 matmul peak {peak / 1e12:.0f} TFLOP/s | {params / 1e6:.0f}M params")
    print(f"{'run':<10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'wall s':>9}")
    for name, run in runs.items():
        print(f"{name:<10}{run['tokens_per_s']:>12.0f}{6 * params * run['tokens_per_s'] / peak:>8.1%}"
              f"{run['peak_gib']:>10.2f}{run['wall_s']:>9.1f}")
    print(f"resume round-trip: max |loss difference| over {len(w['losses'])} steps = {diff:.2e}; MFU {mfu:.1%}")
    return 0 if diff < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
