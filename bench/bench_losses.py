"""Benchmark: the fused, chunked LM-head cross-entropy against the plain full-logits path.

Prints one row per (N, implementation): forward and backward wall seconds, the step's wall and CPU
seconds (CPU time, summed over threads, is the steadier figure on a shared machine) as ratios of the
full path's, and the peak extra resident memory of the step as a ratio of the full path's. Each variant runs
in its own subprocess so its peak RSS (`resource.getrusage` ru_maxrss, Linux) is its own; the baseline
is the resident memory once inputs exist, so the figure is what the head + loss + gradients add.
Time is the fastest of `--repeats` steps. Default shapes are SmolLM2-135M's head (H=576, V=49152).

    python bench/bench_losses.py                 # N in {2048, 8192}: about a minute on 2 idle cores
    python bench/bench_losses.py --n 512 --vocab 8192 --repeats 3   # a quick, smaller run
"""

import argparse
import json
import resource
import subprocess
import sys
import time

# fused+kl: the same fused head with KL(base ‖ model) at every target (the cost of sources[].kl_to_base on
# rows that have it; the base's hidden states are an input here, its trunk forward is not timed)
IMPLS = ("full", "fused", "fused+kl")


def run_variant(impl: str, n: int, hidden_size: int, vocab: int, chunk_size: int, repeats: int) -> dict:
    """One variant, in this process: returns timings and the peak memory added over the inputs."""
    import torch

    from keepmix.training.losses import LOSS_IMPLS, BaseLogits

    torch.manual_seed(0)
    # In-place scaling: no V x H temporary inflates the peak before the measurement starts.
    hidden = torch.randn(n, hidden_size).requires_grad_()
    weight = torch.randn(vocab, hidden_size).mul_(0.02).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    labels[::10] = -100  # some masked positions, as with completion-only loss or padding
    token_weights = (labels != -100).float() / (labels != -100).sum()
    base = None
    if impl == "fused+kl":
        base_hidden = torch.randn(n, hidden_size)
        base = BaseLogits(base_hidden, weight.detach().clone(), None, token_weights.clone(), labels != -100)
    baseline_mb = _current_rss_mb()
    loss_fn = LOSS_IMPLS[impl.split("+")[0]]
    extra = {"base": base} if base is not None else {}

    fwd_times, bwd_times, cpu_times = [], [], []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        loss, _, token_correct, *_ = loss_fn(hidden, weight, labels, token_weights, chunk_size=chunk_size, **extra)
        t1 = time.perf_counter()
        loss.backward()
        t2, c2 = time.perf_counter(), time.process_time()
        fwd_times.append(t1 - t0)
        bwd_times.append(t2 - t1)
        cpu_times.append(c2 - c0)
        del loss, token_correct
    best = min(range(repeats), key=lambda i: fwd_times[i] + bwd_times[i])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "fwd_s": fwd_times[best],
        "bwd_s": bwd_times[best],
        "cpu_s": cpu_times[best],
        "peak_extra_mb": peak_mb - baseline_mb,
        "logits_mb": n * vocab * 4 / 2**20,
    }


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 8192], help="rows (batch x seq_len)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_variant(args.child, args.n[0], args.hidden, args.vocab, args.chunk_size, args.repeats)
        print(json.dumps(result))
        return

    header = f"{'N':>6} {'H':>5} {'V':>6} {'impl':>8} {'fwd s':>7} {'bwd s':>7} {'total s':>8} {'time x':>7}"
    header += f" {'cpu s':>7} {'cpu x':>6}"
    header += f" {'peak MB':>8} {'mem x':>6} {'N*V fp32 MB':>12}"
    print(f"chunk_size={args.chunk_size}, repeats={args.repeats} (fastest shown); x = ratio to full")
    print(header)
    for n in args.n:
        rows = {}
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--child", impl, "--n", str(n), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[impl] = json.loads(out.strip().splitlines()[-1])
        full_total = rows["full"]["fwd_s"] + rows["full"]["bwd_s"]
        full_cpu = rows["full"]["cpu_s"]
        for impl in IMPLS:
            r = rows[impl]
            total = r["fwd_s"] + r["bwd_s"]
            print(f"{n:>6} {args.hidden:>5} {args.vocab:>6} {impl:>8} {r['fwd_s']:>7.2f} {r['bwd_s']:>7.2f}"
                  f" {total:>8.2f} {total / full_total:>7.2f} {r['cpu_s']:>7.2f} {r['cpu_s'] / full_cpu:>6.2f}"
                  f" {r['peak_extra_mb']:>8.0f}"
                  f" {r['peak_extra_mb'] / rows['full']['peak_extra_mb']:>6.2f} {r['logits_mb']:>12.0f}")


if __name__ == "__main__":
    main()
