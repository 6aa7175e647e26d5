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
dtype, as nn.Linear's would. Double backward is not supported.

`full_linear_cross_entropy` is the plain path (hidden @ weight.T, then F.cross_entropy): the reference,
and the choice for models whose head does something the fused path does not know about.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["fused_linear_cross_entropy", "full_linear_cross_entropy", "LOSS_IMPLS"]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM head + weighted cross-entropy, chunk by chunk, gradients computed in the forward pass."""
    _check_inputs(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index)
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        loss, token_loss, token_correct, _, _, _ = _chunked_head_loss(
            hidden, weight, labels, token_weights, bias, chunk_size, ignore_index, (False, False, False)
        )
        return loss, token_loss, token_correct
    if token_weights.requires_grad:
        raise ValueError(
            "fused_linear_cross_entropy: token_weights requires grad, but it is treated as a constant; "
            "pass token_weights.detach() (or use full_linear_cross_entropy to differentiate through it)."
        )
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index)


def full_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain path: all N x V logits at once, then F.cross_entropy. `chunk_size` is accepted and unused."""
    _check_inputs(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index)
    logits = F.linear(hidden, weight, bias)  # (N, V)
    logits = logits.to(_softmax_dtype(logits.dtype))
    token_loss = F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index)
    loss = (token_loss * token_weights.to(token_loss.dtype)).sum()
    token_correct = (logits.detach().argmax(dim=-1) == labels) & (labels != ignore_index)
    return loss, token_loss.detach().float(), token_correct


# What `train.loss_impl` names: the loop looks the function up here.
LOSS_IMPLS = {"fused": fused_linear_cross_entropy, "full": full_linear_cross_entropy}


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, bias, chunk_size, ignore_index):
        wanted = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        loss, token_loss, token_correct, grad_hidden, grad_weight, grad_bias = _chunked_head_loss(
            hidden, weight, labels, token_weights, bias, chunk_size, ignore_index, wanted
        )
        # The gradients are saved like activations so saved-tensor hooks (offloading) see them.
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(token_loss, token_correct)
        return loss, token_loss, token_correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_token_loss, _grad_token_correct):
        # Out of place, so a retained graph can run backward again; the 0-dim grad_loss keeps each
        # gradient's dtype (bf16 stays bf16) without rounding the scale itself to bf16 first.
        grads = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, None, None, grad_bias, None, None


def _chunked_head_loss(hidden, weight, labels, token_weights, bias, chunk_size, ignore_index, wanted):
    """The shared pass: losses, top-1 correctness and (for the `wanted` inputs) their gradients."""
    want_hidden, want_weight, want_bias = wanted
    n, device = hidden.shape[0], hidden.device
    compute_dtype = _matmul_dtype(hidden, weight)
    acc_dtype = _softmax_dtype(compute_dtype)

    loss = torch.zeros((), dtype=acc_dtype, device=device)
    token_loss = torch.zeros(n, dtype=torch.float32, device=device)
    token_correct = torch.zeros(n, dtype=torch.bool, device=device)
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=device) if want_bias else None

    rows = (labels != ignore_index).nonzero().squeeze(1)  # ignored positions never reach the matmul
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    tok_w = token_weights.to(acc_dtype)
    # Casts are explicit here, so autocast must not re-cast the float32 softmax grads in _head_chunk.
    with torch.autocast(device.type, enabled=False):
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            w_chunk = tok_w.index_select(0, idx)
            ce, correct = _head_chunk(
                hidden, labels, idx, w_chunk, w, b, acc_dtype, grad_hidden, grad_weight, grad_bias
            )
            token_loss.index_copy_(0, idx, ce.float())
            token_correct.index_copy_(0, idx, correct)
            loss += (w_chunk * ce).sum()
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, token_loss, token_correct, grad_hidden, grad_weight, grad_bias


def _head_chunk(hidden, labels, idx, w_chunk, w, b, acc_dtype, grad_hidden, grad_weight, grad_bias):
    """Rows `idx`: returns (CE, top-1 correct) and adds their gradients into the non-None grad buffers.

    A function of its own so the chunk's (c, V) buffer is freed on return, before the next chunk's
    matmul allocates its own: peak extra memory stays one chunk of logits.
    """
    h = hidden.index_select(0, idx).to(w.dtype)  # (c, H)
    y = labels.index_select(0, idx)
    logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).to(acc_dtype)  # (c, V)
    target_logit = logits.gather(1, y[:, None]).squeeze(1)
    # One pass gives the top-1 and the logsumexp shift; the logsumexp itself is done by hand, in
    # place over the logits, because torch.logsumexp would hold a second (c, V) buffer.
    row_max, top1 = logits.max(dim=-1, keepdim=True)
    correct = top1.squeeze(1) == y
    exp_logits = logits.sub_(row_max).exp_()
    sum_exp = exp_logits.sum(dim=-1, keepdim=True)
    ce = (row_max + sum_exp.log()).squeeze(1) - target_logit
    if grad_hidden is None and grad_weight is None and grad_bias is None:
        return ce, correct
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
    return ce, correct


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would multiply in: the autocast dtype when autocast is on, else the common one."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype.is_floating_point:
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the logsumexp even from bf16/fp16 logits; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


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
