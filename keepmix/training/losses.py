"""The LM head and its cross-entropy: fused and chunked, plus the plain reference path.

Contract (both functions take and return the same things):
  hidden (N, H) final hidden states, flattened by the caller; weight (V, H) the LM head (or tied
  embedding) weight; labels (N,) already shifted (label i is the token after position i), positions
  equal to `ignore_index` carry no loss; token_weights (N,) the weight of each token in the scalar
  loss (the caller folds in 1/num_loss_tokens and gradient accumulation); bias (V,) or None.
  Returns (loss, token_loss, token_correct):
    loss           scalar, sum_i token_weights[i] * CE_i, differentiable w.r.t. hidden, weight and
                   bias; float32 (float64 when the inputs are float64).
    token_loss     (N,) float32, detached, CE_i; 0 where the label is ignored.
    token_correct  (N,) bool, detached, argmax of the logits == label; False where ignored.
  The fused path treats token_weights as a constant and refuses one that requires grad.

`fused_linear_cross_entropy` holds one chunk of logits at a time (`chunk_size` x V in float32, plus
its bf16/fp16 copy when the head runs in half precision): ignored positions are dropped before the
head matmul, the softmax is taken in float32 one chunk of rows at a time, and the gradients w.r.t.
hidden, weight and bias are computed in that same pass and kept, so backward only scales them by the
incoming gradient. The head costs the same three matmuls as the plain path (logits,
grad of hidden, grad of weight). When no gradient is needed (torch.no_grad(), or no input requires
grad: the evaluation path) none is computed. Under torch.autocast the matmuls run in the autocast
dtype, as nn.Linear's would. Double backward is not supported. An evaluation on the CPU (no gradient,
float32) writes every chunk into the first chunk's buffers instead of allocating its own (`_Workspace`).

`full_linear_cross_entropy` is the plain path (hidden @ weight.T, then F.cross_entropy): the reference,
and the choice for models whose head does something the fused path does not know about.

KL to a base model: with `base=BaseLogits(hidden, weight, bias, kl_weights, mask)` both functions also
compute, at the positions of `mask` (a subset of the non-ignored ones), KL_i = KL(p_base ‖ p_model) =
sum_v p_base(v) (log p_base(v) - log p_model(v)) from the base model's final hidden states through the
base head, add sum_i kl_weights[i] * KL_i to the loss and return a fourth output, token_kl (N,) float32,
detached, 0 outside `mask`. The gradient w.r.t. the model's logits is kl_weights[i] * (p_model - p_base);
nothing flows into the base. The fused path takes those rows in chunks of chunk_size // 3, as it holds
three (c, V) buffers for them (model logits, base log-probabilities, base probabilities) plus the
log-sum-exp temporaries: measured, 1.9x the CE path's peak (bench/bench_losses.py, docs/ANCHORS.md).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["BaseLogits", "fused_linear_cross_entropy", "full_linear_cross_entropy", "LOSS_IMPLS"]


class BaseLogits(NamedTuple):
    """What the KL term needs of the frozen base model, aligned with the model's flattened positions."""

    hidden: torch.Tensor  # (N, H) base final hidden states (rows outside `mask` may hold anything)
    weight: torch.Tensor  # (V, H) base head weight
    bias: torch.Tensor | None  # (V,) or None
    kl_weights: torch.Tensor  # (N,) weight of each KL_i in the scalar loss (0: measured only)
    mask: torch.Tensor  # (N,) bool, where KL_i is computed


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    base: BaseLogits | None = None,
) -> tuple[torch.Tensor, ...]:
    """LM head + weighted cross-entropy (+ KL to a base), chunk by chunk, gradients computed in the forward."""
    _check_inputs(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index)
    base = _checked_base(base, hidden, weight, labels, ignore_index)
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        out = _chunked_head_loss(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index,
                                 (False, False, False), base)
        return out[:3] if base is None else (*out[:3], out[6])
    if token_weights.requires_grad or (base is not None and base.kl_weights.requires_grad):
        raise ValueError(
            f"fused_linear_cross_entropy: {'token_weights' if token_weights.requires_grad else 'base.kl_weights'} "
            "requires grad, but it is treated as a constant; pass a detached tensor (or use "
            "full_linear_cross_entropy to differentiate through it)."
        )
    if base is None:
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index,
                                              None, None, None, None, None)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index,
                                          base.hidden.detach(), base.weight.detach(),
                                          None if base.bias is None else base.bias.detach(), base.kl_weights,
                                          base.mask)


def full_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    base: BaseLogits | None = None,
) -> tuple[torch.Tensor, ...]:
    """The plain path: all N x V logits at once, then F.cross_entropy. `chunk_size` is accepted and unused."""
    _check_inputs(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index)
    base = _checked_base(base, hidden, weight, labels, ignore_index)
    logits = F.linear(hidden, weight, bias)  # (N, V)
    logits = logits.to(_softmax_dtype(logits.dtype))
    token_loss = F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index)
    loss = (token_loss * token_weights.to(token_loss.dtype)).sum()
    token_correct = (logits.detach().argmax(dim=-1) == labels) & (labels != ignore_index)
    if base is None:
        return loss, token_loss.detach().float(), token_correct
    with torch.no_grad():
        base_logits = F.linear(base.hidden, base.weight, base.bias).to(logits.dtype)
    log_pb = base_logits.log_softmax(-1)
    kl = (log_pb.exp() * (log_pb - logits.log_softmax(-1))).sum(-1) * base.mask
    loss = loss + (kl * base.kl_weights.to(kl.dtype)).sum()
    return loss, token_loss.detach().float(), token_correct, kl.detach().float()


# What `train.loss_impl` names: the loop looks the function up here.
LOSS_IMPLS = {"fused": fused_linear_cross_entropy, "full": full_linear_cross_entropy}


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, bias, chunk_size, ignore_index,
                base_hidden, base_weight, base_bias, kl_weights, kl_mask):
        wanted = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        base = None if base_hidden is None else BaseLogits(base_hidden, base_weight, base_bias, kl_weights, kl_mask)
        loss, token_loss, token_correct, grad_hidden, grad_weight, grad_bias, token_kl = _chunked_head_loss(
            hidden, weight, labels, token_weights, bias, chunk_size, ignore_index, wanted, base
        )
        # The gradients are saved like activations so saved-tensor hooks (offloading) see them.
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        if base is None:
            ctx.mark_non_differentiable(token_loss, token_correct)
            return loss, token_loss, token_correct
        ctx.mark_non_differentiable(token_loss, token_correct, token_kl)
        return loss, token_loss, token_correct, token_kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_grad_outputs):
        # Out of place, so a retained graph can run backward again; the 0-dim grad_loss keeps each
        # gradient's dtype (bf16 stays bf16) without rounding the scale itself to bf16 first.
        grads = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, None, None, grad_bias, None, None, None, None, None, None, None


def _chunked_head_loss(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index, wanted, base=None):
    """The shared pass: losses, top-1 correctness, KL where `base.mask`, and the `wanted` gradients."""
    want_hidden, want_weight, want_bias = wanted
    n, device = hidden.shape[0], hidden.device
    compute_dtype = _matmul_dtype(hidden, weight)
    acc_dtype = _softmax_dtype(compute_dtype)

    loss = torch.zeros((), dtype=acc_dtype, device=device)
    token_loss = torch.zeros(n, dtype=torch.float32, device=device)
    token_correct = torch.zeros(n, dtype=torch.bool, device=device)
    token_kl = torch.zeros(n, dtype=torch.float32, device=device) if base is not None else None
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=device) if want_bias else None

    targets = labels != ignore_index  # ignored positions never reach the matmul
    kl_rows = base.mask & targets if base is not None else torch.zeros_like(targets)
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    tok_w = token_weights.to(acc_dtype)
    grads = (grad_hidden, grad_weight, grad_bias)
    # An evaluation on the CPU: every chunk's (c, V) buffers are the first chunk's (see _Workspace).
    space = _Workspace() if device.type == "cpu" and compute_dtype == acc_dtype and not any(wanted) else None
    # Casts are explicit here, so autocast must not re-cast the float32 softmax grads in _head_chunk.
    with torch.autocast(device.type, enabled=False):
        rows = (targets & ~kl_rows).nonzero().squeeze(1)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            w_chunk = tok_w.index_select(0, idx)
            ce, correct, _ = _head_chunk(hidden, labels, idx, w_chunk, w, b, acc_dtype, *grads, space=space)
            token_loss.index_copy_(0, idx, ce.float())
            token_correct.index_copy_(0, idx, correct)
            loss += (w_chunk * ce).sum()
        if base is not None:
            bw = base.weight.to(compute_dtype)
            bb = None if base.bias is None else base.bias.to(compute_dtype)
            kl_w = base.kl_weights.to(acc_dtype)
            rows = kl_rows.nonzero().squeeze(1)
            step = max(chunk_size // 3, 1)  # three (c, V) buffers per KL chunk: same peak as a CE chunk
            space = _Workspace() if space is not None else None  # the CE chunks' buffer goes
            for start in range(0, rows.numel(), step):
                idx = rows[start : start + step]
                w_chunk, k_chunk = tok_w.index_select(0, idx), kl_w.index_select(0, idx)
                ce, correct, kl = _head_chunk(hidden, labels, idx, w_chunk, w, b, acc_dtype, *grads,
                                              base=(base.hidden, bw, bb, k_chunk), space=space)
                token_loss.index_copy_(0, idx, ce.float())
                token_correct.index_copy_(0, idx, correct)
                token_kl.index_copy_(0, idx, kl.float())
                loss += (w_chunk * ce).sum() + (k_chunk * kl).sum()
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, token_loss, token_correct, grad_hidden, grad_weight, grad_bias, token_kl


class _Workspace:
    """The (c, V) buffers of an evaluation's chunks, allocated by the first chunk and reused by the rest.

    Why: on the CPU, glibc's malloc maps every block above 32 MB afresh and unmaps it on free, so each new
    (c, V) tensor arrives as untouched pages that the kernel faults in and zero-fills before the first
    byte is computed — five of them per KL chunk. Reused, they are faulted in once per call: the KL
    head of the demo's held-out eval takes 12.1 s instead of 14.4 (docs/PERFORMANCE.md). Only the
    no-gradient float32 path takes it; `_head_chunk` does the same operations either way, only writing
    into these buffers (`out=`), so the numbers are the same to the bit (tests/training/test_losses.py).
    On a GPU the caching allocator already reuses memory.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A contiguous (rows, V) view of buffer `name`, sized by the first (largest) chunk."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers[name] = torch.empty((rows, like.shape[0]), dtype=like.dtype, device=like.device)
        return buffer[:rows]


def _linear(h, w, b, out=None):
    """h @ w.T (+ b), into `out` when given: the matmul nn.Linear does."""
    return torch.mm(h, w.T, out=out) if b is None else torch.addmm(b, h, w.T, out=out)


def _logsumexp(x, scratch=None):
    """torch.logsumexp(x, -1, keepdim=True) as ATen computes it, with its (c, V) temporary in `scratch`."""
    top = x.amax(dim=-1, keepdim=True)
    top.masked_fill_(top.abs() == float("inf"), 0)
    return torch.sub(x, top, out=scratch).exp_().sum(dim=-1, keepdim=True).log_().add_(top)


def _head_chunk(hidden, labels, idx, w_chunk, w, b, acc_dtype, grad_hidden, grad_weight, grad_bias, base=None,
                space: _Workspace | None = None):
    """Rows `idx`: returns (CE, top-1 correct, KL or None) and adds their gradients into the non-None grad
    buffers. `base` = (base hidden, base head weight, base bias, KL weights of these rows) adds the KL term.

    A function of its own so the chunk's (c, V) buffers are freed on return, before the next chunk's
    matmul allocates its own: peak extra memory stays one chunk of logits (three for a KL chunk). With
    `space` (an evaluation: no gradients, the matmul dtype float32) they are the workspace's instead,
    kept for the next chunk; the arithmetic is the same either way.
    """
    h = hidden.index_select(0, idx).to(w.dtype)  # (c, H)
    y = labels.index_select(0, idx)
    c = idx.numel()

    def buffer(name, like):  # None: let the op allocate
        return None if space is None else space.get(name, c, like)

    logits = _linear(h, w, b, buffer("logits", w)).to(acc_dtype)  # (c, V)
    target_logit = logits.gather(1, y[:, None]).squeeze(1)
    # One pass gives the top-1 and the logsumexp shift; the logsumexp itself is done by hand, in
    # place over the logits, because torch.logsumexp would hold a second (c, V) buffer.
    row_max, top1 = logits.max(dim=-1, keepdim=True)
    correct = top1.squeeze(1) == y
    kl = None
    if base is not None:
        base_hidden, bw, bb, k_chunk = base
        # at most three (c, V) buffers live at once: logits, base log-probs, and one temporary / p_base
        lse = row_max + torch.sub(logits, row_max, out=buffer("scratch", w)).exp_().sum(dim=-1, keepdim=True).log()
        hb = base_hidden.index_select(0, idx).to(bw.dtype)
        log_pb = _linear(hb, bw, bb, buffer("base", bw)).to(acc_dtype)  # (c, V)
        log_pb -= _logsumexp(log_pb, buffer("scratch", w))
        p_b = torch.exp(log_pb, out=buffer("scratch", w))  # (c, V)
        log_pb -= logits.sub_(lse)  # log p_base - log p_model; `logits` now holds log p_model
        kl = torch.bmm(p_b.unsqueeze(1), log_pb.unsqueeze(2)).reshape(-1)  # row-wise dot: no (c, V) temporary
        ce = lse.squeeze(1) - target_logit
        del log_pb
        if grad_hidden is None and grad_weight is None and grad_bias is None:
            return ce, correct, kl
        # d/d logits = w (p_model - onehot) + k (p_model - p_base), in the logits' buffer
        grad_logits = logits.exp_().mul_((w_chunk + k_chunk)[:, None]).addcmul_(p_b, k_chunk[:, None], value=-1)
        del p_b
    else:
        exp_logits = logits.sub_(row_max).exp_()
        sum_exp = exp_logits.sum(dim=-1, keepdim=True)
        ce = (row_max + sum_exp.log()).squeeze(1) - target_logit
        if grad_hidden is None and grad_weight is None and grad_bias is None:
            return ce, correct, kl
        # d loss / d logits = token_weight * (softmax - onehot), still in the same buffer, in one pass.
        grad_logits = exp_logits.mul_(w_chunk[:, None] / sum_exp)
    grad_logits[torch.arange(idx.numel(), device=idx.device), y] -= w_chunk
    if grad_bias is not None:
        grad_bias += grad_logits.sum(dim=0)
    g = grad_logits.to(w.dtype)
    if grad_hidden is not None:
        grad_hidden.index_copy_(0, idx, (g @ w).to(grad_hidden.dtype))
    if grad_weight is not None:
        if grad_weight.dtype == w.dtype:
            grad_weight.addmm_(g.T, h)
        else:  # float32 master weight under autocast: accumulate in its own precision
            grad_weight += g.T @ h
    return ce, correct, kl


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would multiply in: the autocast dtype when autocast is on, else the common one."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype.is_floating_point:
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the logsumexp even from bf16/fp16 logits; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _checked_base(base: BaseLogits | None, hidden, weight, labels, ignore_index) -> BaseLogits | None:
    if base is None:
        return None
    n = hidden.shape[0]
    if base.hidden.shape != (n, base.weight.shape[1]) or base.weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"linear cross-entropy: base hidden {tuple(base.hidden.shape)} and base weight "
            f"{tuple(base.weight.shape)} must be ({n}, H_base) and ({weight.shape[0]}, H_base): the same "
            f"positions and vocabulary as the model's."
        )
    if base.kl_weights.shape != (n,) or base.mask.shape != (n,) or base.mask.dtype != torch.bool:
        raise ValueError(f"linear cross-entropy: base.kl_weights and base.mask (bool) must have shape ({n},)")
    return base._replace(mask=base.mask & (labels != ignore_index))


def _check_inputs(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"linear cross-entropy: expected hidden of shape (N, H) and weight of shape (V, H), got "
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}; flatten (B, T, H) to (B*T, H)."
        )
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(
            f"linear cross-entropy: hidden has {h} features but weight {tuple(weight.shape)} expects "
            f"{weight.shape[1]}; weight must be (vocab_size, hidden_size)."
        )
    if labels.shape != (n,) or token_weights.shape != (n,):
        raise ValueError(
            f"linear cross-entropy: labels {tuple(labels.shape)} and token_weights "
            f"{tuple(token_weights.shape)} must both have shape ({n},), one entry per row of hidden."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"linear cross-entropy: labels must be integer token ids, got dtype {labels.dtype}.")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"linear cross-entropy: bias {tuple(bias.shape)} must have shape ({v},), one per vocab entry.")
    if chunk_size < 1:
        raise ValueError(f"linear cross-entropy: chunk_size must be a positive number of rows, got {chunk_size}.")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"linear cross-entropy: label {int(labels[i])} at position {i} is outside the vocabulary "
            f"[0, {v}) and is not ignore_index ({ignore_index})."
        )
