"""The fused, chunked LM-head cross-entropy against plain PyTorch and the full-logits path."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from keepmix.training.losses import LOSS_IMPLS, full_linear_cross_entropy, fused_linear_cross_entropy

IMPLS = sorted(LOSS_IMPLS)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def make_inputs(n=24, h=8, v=40, dtype=torch.float64, bias=True, ignore_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    # Non-uniform on purpose: a bug that ignores or misplaces token weights changes the loss.
    token_weights = torch.rand(n, generator=g, dtype=dtype) + 0.1
    return hidden, weight, b, labels, token_weights


def reference(hidden, weight, bias, labels, token_weights, ignore_index=-100):
    """Plain PyTorch, written independently of keepmix: per-token -log softmax at the label."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    safe = labels.clamp(min=0)
    nll = -torch.log_softmax(logits, dim=-1).gather(1, safe[:, None]).squeeze(1)
    token_loss = torch.where(valid, nll, torch.zeros_like(nll))
    loss = (token_loss * token_weights.to(token_loss.dtype)).sum()
    correct = (logits.argmax(-1) == labels) & valid
    return loss, token_loss, correct


def loss_and_grads(fn, hidden, weight, bias, labels, token_weights, scale=1.0, **kwargs):
    """Runs fn with fresh leaves, backprops scale * loss; returns outputs and (d hidden, d weight, d bias)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    loss, token_loss, correct = fn(h, w, labels, token_weights, bias=b, **kwargs)
    (loss * scale).backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return (loss.detach(), token_loss, correct), grads


def assert_close_all(got, want, tol):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        elif w.dtype == torch.bool:
            assert torch.equal(g, w)
        else:  # token_loss is float32 by contract: compare it at float32 precision
            low = TOL[torch.float32] if torch.float32 in (g.dtype, w.dtype) else tol
            torch.testing.assert_close(g.double(), w.double(), **low)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 5, 6, 18, 4096])  # 18 valid rows: 6 divides, 5 does not
@pytest.mark.parametrize("bias", [True, False])
def test_matches_plain_pytorch(impl, dtype, chunk_size, bias):
    hidden, weight, b, labels, token_weights = make_inputs(dtype=dtype, bias=bias)
    ref_out, ref_grads = loss_and_grads(lambda h, w, y, tw, bias: reference(h, w, bias, y, tw),
                                        hidden, weight, b, labels, token_weights, scale=2.5)
    out, grads = loss_and_grads(LOSS_IMPLS[impl], hidden, weight, b, labels, token_weights,
                                scale=2.5, chunk_size=chunk_size)
    tol = TOL[dtype]
    assert_close_all(out, ref_out, tol)
    assert_close_all(grads, ref_grads, tol)
    loss, token_loss, correct = out
    assert token_loss.dtype == torch.float32 and correct.dtype == torch.bool
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    ignored = labels == -100
    assert (token_loss[ignored] == 0).all() and not correct[ignored].any()
    assert (grads[0][ignored] == 0).all()  # ignored positions get no gradient
    assert not token_loss.requires_grad and not correct.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_all_labels_ignored_gives_zero_loss_and_zero_grads(impl):
    hidden, weight, b, labels, token_weights = make_inputs()
    labels = torch.full_like(labels, -100)
    (loss, token_loss, correct), grads = loss_and_grads(LOSS_IMPLS[impl], hidden, weight, b, labels, token_weights)
    assert loss.item() == 0.0
    assert (token_loss == 0).all() and not correct.any()
    for g in grads:
        assert g is not None and (g == 0).all()


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_inputs_that_do_not_require_grad(frozen):
    """LoRA freezes the head (weight); a frozen trunk gives hidden states without grad."""
    hidden, weight, b, labels, token_weights = make_inputs(bias=False)
    _, ref_grads = loss_and_grads(lambda h, w, y, tw, bias: reference(h, w, None, y, tw),
                                  hidden, weight, None, labels, token_weights)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    loss, _, _ = fused_linear_cross_entropy(h, w, labels, token_weights, chunk_size=4)
    loss.backward()
    if frozen == "weight":
        assert w.grad is None
        torch.testing.assert_close(h.grad, ref_grads[0], **TOL[torch.float64])
    else:
        assert h.grad is None
        torch.testing.assert_close(w.grad, ref_grads[1], **TOL[torch.float64])


def test_gradcheck_tiny_float64():
    hidden, weight, b, labels, token_weights = make_inputs(n=7, h=3, v=5, ignore_every=3)
    inputs = tuple(t.clone().requires_grad_() for t in (hidden, weight, b))

    def loss_only(h, w, bias):
        return fused_linear_cross_entropy(h, w, labels, token_weights, bias=bias, chunk_size=2)[0]

    assert torch.autograd.gradcheck(loss_only, inputs)


def test_backward_on_retained_graph_is_repeatable():
    hidden, weight, b, labels, token_weights = make_inputs()
    h = hidden.clone().requires_grad_()
    loss, _, _ = fused_linear_cross_entropy(h, weight, labels, token_weights, chunk_size=5)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


def test_bf16_inputs_against_float32_reference():
    hidden, weight, _, labels, token_weights = make_inputs(n=96, h=32, v=256, dtype=torch.float32, bias=False)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    (ref_loss, ref_token_loss, ref_correct), ref_grads = loss_and_grads(
        lambda h, w, y, tw, bias: reference(h, w, None, y, tw),
        hidden.float(), weight.float(), None, labels, token_weights,
    )
    (loss, token_loss, correct), grads = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, None, labels, token_weights, chunk_size=16
    )
    assert loss.dtype == torch.float32 and token_loss.dtype == torch.float32
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    torch.testing.assert_close(token_loss, ref_token_loss, rtol=2e-2, atol=5e-2)
    assert (correct == ref_correct).float().mean() >= 0.95
    for g, ref in zip(grads[:2], ref_grads[:2]):
        assert (g.float() - ref).norm() / ref.norm() < 2e-2


def test_autocast_uses_the_autocast_dtype_and_keeps_float32_grads():
    hidden, weight, _, labels, token_weights = make_inputs(n=64, h=32, v=128, dtype=torch.float32, bias=False)
    results = []
    for fn in (fused_linear_cross_entropy, full_linear_cross_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(fn, hidden, weight, None, labels, token_weights, chunk_size=16))
    (fused_out, fused_grads), (full_out, full_grads) = results
    assert fused_grads[0].dtype == torch.float32 and fused_grads[1].dtype == torch.float32
    torch.testing.assert_close(fused_out[0], full_out[0], rtol=1e-3, atol=0)
    for g, ref in zip(fused_grads[:2], full_grads[:2]):
        assert (g - ref).norm() / ref.norm() < 2e-2
    # The matmuls really ran in bf16: a float32 computation would differ from the reference less.
    _, exact_grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, None, labels, token_weights)
    assert not torch.equal(fused_grads[1], exact_grads[1])


class _TensorObserver(TorchDispatchMode):
    """Sees every op, forward and backward: peak bytes alive, the largest tensor and the matmul FLOPs.

    Live bytes count the storages ops allocate while the mode is on; a finalizer on each storage
    (PyTorch keeps one Python object per storage) subtracts it the moment it is freed. Storages of
    the tensors passed as `existing` (the inputs) are not allocations: views of them are skipped.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.largest = self.live = self.peak = self.matmul_flops = 0
        self.allocated: list[int] = []  # bytes of each new storage, in order
        self._known = {id(t.untyped_storage()) for t in existing}
        self._existing = list(existing)  # keeps those ids from being reused while we look

    def _freed(self, key, nbytes):
        self._known.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_"):
            a, b = args[-2], args[-1]
            self.matmul_flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            self.largest = max(self.largest, t.numel())
            storage = t.untyped_storage()
            if id(storage) not in self._known:
                self._known.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                self.allocated.append(storage.nbytes())
                weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out


def test_never_holds_full_vocabulary_logits_for_all_rows():
    n, h, v, chunk = 256, 2, 4096, 32
    hidden, weight, _, labels, token_weights = make_inputs(n=n, h=h, v=v, dtype=torch.float32, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    observed = {}
    for name, fn in (("fused", fused_linear_cross_entropy), ("full", full_linear_cross_entropy)):
        saved.clear()
        hidden.grad = weight.grad = None
        with _TensorObserver(existing=(hidden, weight, labels, token_weights)) as obs:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _, _ = fn(hidden, weight, labels, token_weights, chunk_size=chunk)
            loss.backward()
            del loss
        observed[name] = (obs.peak, obs.largest, max(saved))
    # The observer must see the full path's N x V logits, else the fused figures below prove nothing.
    full_peak, full_largest, full_saved = observed["full"]
    assert full_peak >= n * v * 4 and full_largest >= n * v and full_saved >= n * v
    fused_peak, fused_largest, fused_saved = observed["fused"]
    assert fused_saved <= max(n * h, v * h)  # only gradients are saved for backward, never logits
    assert fused_largest <= max(chunk * v, v * h) < n * v
    # One chunk of float32 logits alive at a time, plus the (V, H) and (N, H) gradients and small
    # per-row vectors: a second live chunk or an N x V buffer would break this bound.
    chunk_bytes, grads_bytes = chunk * v * 4, 2 * (v * h + n * h) * 4
    assert fused_peak < 1.25 * chunk_bytes + grads_bytes < full_peak


def test_head_costs_three_matmuls_over_valid_rows_and_one_without_grad():
    n, h, v = 40, 8, 64
    hidden, weight, _, labels, token_weights = make_inputs(n=n, h=h, v=v, dtype=torch.float32, bias=False)
    valid = int((labels != -100).sum())
    hidden.requires_grad_()
    weight.requires_grad_()
    with _TensorObserver() as obs:
        loss, _, _ = fused_linear_cross_entropy(hidden, weight, labels, token_weights, chunk_size=7)
        loss.backward()
    assert obs.matmul_flops == 3 * 2 * valid * h * v  # ignored rows skipped before the matmul
    with _TensorObserver() as obs, torch.no_grad():
        loss, _, _ = fused_linear_cross_entropy(hidden, weight, labels, token_weights, chunk_size=7)
    assert obs.matmul_flops == 2 * valid * h * v  # evaluation: no gradient work at all
    assert not loss.requires_grad


def test_matches_a_transformers_causal_lm_loss():
    """Shifted labels + token_weights = 1/num_loss_tokens reproduce the model's own mean loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    input_ids = torch.randint(0, 96, (2, 12))
    labels = input_ids.clone()
    labels[0, :4] = -100  # a masked prompt
    expected = model(input_ids=input_ids, labels=labels).loss

    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1].reshape(-1, 32)
    shifted = labels[:, 1:].reshape(-1)
    valid = shifted != -100
    token_weights = valid.double() / valid.sum()
    loss, _, _ = fused_linear_cross_entropy(hidden, model.lm_head.weight, shifted, token_weights, chunk_size=5)
    # The model's own loss upcasts its logits to float32, hence float32 precision here.
    torch.testing.assert_close(loss.float(), expected, rtol=1e-6, atol=0)


def test_token_weights_requiring_grad_is_refused():
    hidden, weight, _, labels, token_weights = make_inputs(bias=False)
    with pytest.raises(ValueError, match="token_weights requires grad"):
        fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, token_weights.requires_grad_())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: {**x, "labels": torch.where(x["labels"] == 3, 40, x["labels"])}, "label 40 at position"),
        (lambda x: {**x, "hidden": x["hidden"][None]}, "expected hidden of shape"),
        (lambda x: {**x, "weight": x["weight"][:, :5]}, "hidden has 8 features"),
        (lambda x: {**x, "token_weights": x["token_weights"][:-1]}, "must both have shape"),
        (lambda x: {**x, "labels": x["labels"].double()}, "must be integer token ids"),
        (lambda x: {**x, "bias": x["bias"][:-1]}, "bias"),
        (lambda x: {**x, "chunk_size": 0}, "chunk_size must be a positive"),
    ],
)
def test_bad_inputs_are_explained(impl, change, message):
    hidden, weight, b, labels, token_weights = make_inputs()
    labels[1] = 3  # so the out-of-vocabulary case has a label to change
    args = change(dict(hidden=hidden, weight=weight, labels=labels, token_weights=token_weights, bias=b,
                       chunk_size=4))
    with pytest.raises(ValueError, match=message):
        LOSS_IMPLS[impl](args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("token_weights"),
                         **args)


# ---- KL(base ‖ model) through the same fused, chunked head ----------------------------------------------
def kl_inputs(n=30, h=8, v=40, dtype=torch.float64, seed=1):
    hidden, weight, bias, labels, token_weights = make_inputs(n, h, v, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    base_hidden = torch.randn(n, h, generator=g, dtype=dtype)
    base_weight = weight + 0.3 * torch.randn(v, h, generator=g, dtype=dtype)
    mask = torch.rand(n, generator=g) < 0.6  # some rows with the KL term, some without
    kl_weights = (torch.rand(n, generator=g, dtype=dtype) + 0.5) * mask
    return hidden, weight, bias, labels, token_weights, base_hidden, base_weight, kl_weights, mask


def kl_reference(hidden, weight, bias, labels, token_weights, base_hidden, base_weight, kl_weights, mask):
    """Written independently: CE + sum_i k_i * sum_v p_b (log p_b - log p_m) at the masked targets."""
    loss, token_loss, correct = reference(hidden, weight, bias, labels, token_weights)
    log_pm = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    log_pb = torch.log_softmax(base_hidden @ base_weight.T + bias.detach(), dim=-1)  # the base is frozen
    kl = (log_pb.exp() * (log_pb - log_pm)).sum(-1) * (mask & (labels != -100))
    return loss + (kl_weights * kl).sum(), token_loss, correct, kl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [3, 7, 4096])
def test_kl_to_base_matches_a_plain_full_logits_kl_in_values_and_gradients(impl, chunk_size):
    from keepmix.training.losses import BaseLogits

    hidden, weight, bias, labels, tw, bh, bw, kw, mask = kl_inputs()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    base = BaseLogits(bh, bw, bias, kw, mask)
    loss, token_loss, correct, token_kl = LOSS_IMPLS[impl](*leaves[:2], labels, tw, bias=leaves[2],
                                                           chunk_size=chunk_size, base=base)
    (loss * 0.7).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = kl_reference(*ref_leaves, labels, tw, bh, bw, kw, mask)
    (want[0] * 0.7).backward()
    tol = TOL[torch.float64]
    torch.testing.assert_close(loss.detach(), want[0].detach(), **tol)
    torch.testing.assert_close(token_loss, want[1].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(correct, want[2])
    torch.testing.assert_close(token_kl, want[3].detach().float(), rtol=1e-5, atol=1e-6)
    assert (token_kl[~mask] == 0).all() and (token_kl[mask & (labels != -100)] > 0).all()
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, **tol)


def test_kl_is_zero_against_itself_and_measured_without_gradient():
    from keepmix.training.losses import BaseLogits

    hidden, weight, bias, labels, tw, *_ = kl_inputs(dtype=torch.float32)
    everywhere = labels != -100
    base = BaseLogits(hidden, weight, bias, torch.zeros_like(tw), everywhere)
    with torch.no_grad():
        loss, token_loss, _, token_kl = fused_linear_cross_entropy(hidden, weight, labels, tw, bias=bias, base=base)
        plain, plain_tokens, _ = fused_linear_cross_entropy(hidden, weight, labels, tw, bias=bias)
    assert token_kl.abs().max() < 1e-5
    torch.testing.assert_close(loss, plain)  # kl_weights 0: the loss is the CE alone
    torch.testing.assert_close(token_loss, plain_tokens)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kl", [True, False])
def test_an_evaluation_reuses_one_set_of_chunk_buffers_and_gives_the_same_bits(kl, bias):
    """No gradients, float32, CPU: the first chunk's (c, V) buffers serve every chunk (one for the CE
    chunks, three for the KL ones), and every output equals the allocating pass's (the same call with
    gradients on) to the bit."""
    from keepmix.training.losses import BaseLogits

    v = 200
    hidden, weight, b, labels, tw, bh, bw, kw, mask = kl_inputs(n=61, v=v, dtype=torch.float32)
    b = b if bias else None
    base = BaseLogits(bh, bw, b, kw, mask) if kl else None
    inputs = (hidden, weight, labels, tw, b, bh, bw, kw, mask)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    with _TensorObserver(existing=[t for t in inputs if t is not None] + leaves[:2]) as allocating:
        want = fused_linear_cross_entropy(leaves[0], leaves[1], labels, tw, bias=leaves[2], chunk_size=9, base=base)
    with _TensorObserver(existing=[t for t in inputs if t is not None]) as reusing, torch.no_grad():
        got = fused_linear_cross_entropy(hidden, weight, labels, tw, bias=b, chunk_size=9, base=base)
    assert len(got) == len(want) == (4 if kl else 3)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w.detach())
    targets = labels != -100
    kl_rows = int((targets & mask).sum()) if kl else 0
    ce_chunks, kl_chunks = -(-(int(targets.sum()) - kl_rows) // 9), -(-kl_rows // 3)  # 9 rows, then 3 for KL
    assert ce_chunks >= 2 and (kl_chunks >= 2 or not kl)  # buffers to reuse, in both loops
    chunk_sized = 3 * v * 4  # bytes of the smallest chunk buffer
    assert sum(n >= chunk_sized for n in reusing.allocated) == 1 + (3 if kl else 0)
    assert sum(n >= chunk_sized for n in allocating.allocated) >= ce_chunks + 3 * kl_chunks  # what it replaces


def test_kl_under_bf16_autocast_stays_close_to_fp32():
    from keepmix.training.losses import BaseLogits

    hidden, weight, bias, labels, tw, bh, bw, kw, mask = kl_inputs(n=64, h=16, v=96, dtype=torch.float32)
    base = BaseLogits(bh, bw, bias, kw, mask)
    want = fused_linear_cross_entropy(hidden, weight, labels, tw, bias=bias, base=base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(hidden, weight, labels, tw, bias=bias, base=base)
    torch.testing.assert_close(got[3], want[3], rtol=0.05, atol=0.02)
