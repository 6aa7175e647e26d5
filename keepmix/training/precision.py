"""What `train.precision` means on the device a run trains on.

`auto` is bf16 autocast on CUDA and fp32 on the CPU: the CPU default stays float32 so a run gives the
same numbers on every CPU (and the demo its published table). `bf16` asks for bf16 autocast on either:
the master weights, the optimizer state and the loss's softmax stay float32, the matmuls run in bf16.

On a CPU that is worth it only where the CPU multiplies bf16 natively — Intel's AMX (Sapphire Rapids
and later) or AVX512-BF16 (Cooper Lake, AMD Zen 4 and later). Measured on a 2-core AMX host: the
SmolLM2 layers' GEMMs 1316–2664 GFLOP/s in bf16 against 278–362 in fp32, a training step 2x as fast
(docs/PERFORMANCE.md, "Sixth pass"). Without those instructions PyTorch converts to float32 and back
around every product, and bf16 is many times slower than fp32 (17x measured on an AVX2 host), so a run
asking for it there says so when it starts.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["cpu_multiplies_bf16", "eval_autocast", "mixed_precision", "slow_bf16_notice"]


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16) PyTorch's kernels use."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own feature checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def mixed_precision(precision: str, cuda: bool) -> str:
    """accelerate's `mixed_precision` for `train.precision` on CUDA or the CPU: "bf16" or "no"."""
    if precision == "bf16" or (precision == "auto" and cuda):
        return "bf16"
    return "no"


def eval_autocast(precision: str, device: torch.device):
    """The autocast a run of this precision scores its held-out data under on `device` (accelerate's for a
    prepared model: bf16 where `mixed_precision` says so), so `keepmix eval` and `keepmix merge` measure a
    model as the run's own evals did. Task evals run outside it, in float32, in both."""
    if mixed_precision(precision, device.type == "cuda") == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def slow_bf16_notice(precision: str, cuda: bool) -> str | None:
    """The start-up notice for bf16 on a CPU that only emulates it, else None."""
    if cuda or mixed_precision(precision, cuda) != "bf16" or cpu_multiplies_bf16():
        return None
    return ("train.precision: bf16 on a CPU without AMX or AVX512-BF16: PyTorch emulates bf16 matmuls here, "
            "which is many times slower than fp32 (precision: fp32 or auto is the fast setting on this CPU)")
