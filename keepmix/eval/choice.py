"""Multiple-choice evaluation by log-likelihood, with lm-evaluation-harness semantics.

Contract: for every item, each choice is scored by the sum of its token log-likelihoods given the
context, computed exactly as lm-evaluation-harness (`TemplateLM._encode_pair` / HFLM
`_loglikelihood_tokens`) computes them for its `multiple_choice` tasks, so `acc` and `acc_norm` are
comparable with published numbers:
  - the continuation is `target_delimiter + choice` (default delimiter " ");
  - trailing whitespace of the context moves to the front of the continuation;
  - whole = encode(context + continuation) and context_enc = encode(context), both without special
    tokens; the continuation tokens are whole[len(context_enc):] (so a token that straddles the
    boundary belongs to the continuation, as in the harness);
  - an empty context is replaced by one BOS token (EOS when the tokenizer has no BOS); so is a
    whitespace-only one, which the harness cannot score;
  - a sequence longer than the model's context is cut from the left, keeping max_length tokens of input.
Metrics: `acc` = argmax of the log-likelihoods is the gold index; `acc_norm` divides each
log-likelihood by the choice's length in characters, `acc_bytes` by its UTF-8 length in bytes (the
delimiter is not counted); ties go to the first choice (numpy argmax). `n` is the number of items.

Memory: sequences are scored in right-padded batches; only the positions from the earliest
continuation token of the batch onwards get logits (`logits_to_keep`), and log-softmax runs on the
continuation positions alone, so no full-vocabulary logits outlive a batch.

Shared context (`reuse_prefix=True`, the default, for models `keepmix.eval.prefix.reuses_prefix`
accepts): the choices of an item share its context's tokens; those run once per item and every choice
runs on top of their KV cache (`keepmix.eval.prefix`), so an item with four choices costs one context
and four continuations instead of four contexts. Items are batched whole (up to `batch_size` choices a
batch, an item with more choices alone). Log-likelihoods equal the plain path's to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from keepmix.errors import KeepmixError
from keepmix.eval.prefix import forward_after_prefixes, reuses_prefix, shared_prefix_length

# A tokenizer's model_max_length is this sentinel (about 1e30) when the tokenizer does not know it.
_UNKNOWN_LENGTH = 10**18
_DEFAULT_MAX_LENGTH = 2048  # lm-evaluation-harness's fallback


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: the context, the candidate answers and the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self):
        if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError("a multiple-choice item needs at least one choice, each a non-empty string")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} is out of range for {len(self.choices)} choices")


def max_context_length(model, tokenizer) -> int:
    """The model's context length, looked up as lm-evaluation-harness does (config, tokenizer, 2048)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _UNKNOWN_LENGTH:
        return length
    return _DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context: BOS, or EOS when there is no BOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise KeepmixError("the tokenizer has neither a BOS nor an EOS token; an empty context cannot be scored")
    return token


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) split at the harness's boundary (see the module doc)."""
    if context == "":
        return [prefix_token_id(tokenizer)], tokenizer.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_enc = tokenizer.encode(context, add_special_tokens=False)
    if not context_enc:
        # A whitespace-only context (the harness would fail an assertion here): score it like an empty one.
        return [prefix_token_id(tokenizer)], whole
    return context_enc, whole[len(context_enc) :]


def choice_loglikelihoods(
    model,
    tokenizer,
    items: list[MCItem],
    *,
    batch_size: int,
    device: torch.device | str,
    target_delimiter: str = " ",
    reuse_prefix: bool = True,
) -> list[list[float]]:
    """Log-likelihood of every choice of every item given its context: result[item][choice]."""
    max_length = max_context_length(model, tokenizer)
    requests = []  # (item index, choice index, input tokens, number of continuation tokens)
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            context_enc, cont_enc = encode_pair(tokenizer, item.context, target_delimiter + choice)
            if not cont_enc:
                raise KeepmixError(
                    f"multiple-choice item {i}, choice {j} ({choice!r}): the choice adds no token to the "
                    "context; give every choice some text"
                )
            if len(cont_enc) > max_length:
                raise KeepmixError(
                    f"multiple-choice item {i}, choice {j}: {len(cont_enc)} tokens, more than the model's "
                    f"context of {max_length}"
                )
            # The last token is only a target; inputs are cut from the left to fit the context.
            tokens = (context_enc + cont_enc)[-(max_length + 1) :]
            requests.append((i, j, tokens, len(cont_enc)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [[0.0] * len(item.choices) for item in items]
    plain = requests
    with torch.inference_mode():
        if reuse_prefix and reuses_prefix(model):
            shared, plain = _split_shared(requests)
            for batch in _item_batches(shared, batch_size):
                for (_, (i, j, _, _)), ll in zip(batch, _score_shared(model, batch, pad, device), strict=True):
                    scores[i][j] = ll
        # Longest first, as the harness does: batches hold similar lengths and an OOM shows up at once.
        order = sorted(range(len(plain)), key=lambda r: -len(plain[r][2]))
        for start in range(0, len(order), batch_size):
            batch = [plain[r] for r in order[start : start + batch_size]]
            for (i, j, _, _), ll in zip(batch, _score_batch(model, batch, pad, device), strict=True):
                scores[i][j] = ll
    return scores


def _split_shared(requests: list[tuple]) -> tuple[dict[int, tuple[int, list[tuple]]], list[tuple]]:
    """({item: (shared prefix length, its requests)} for items whose choices share a prefix worth
    reusing, the other requests)."""
    by_item: dict[int, list[tuple]] = {}
    for request in requests:
        by_item.setdefault(request[0], []).append(request)
    shared, plain = {}, []
    for i, group in by_item.items():
        # The prefix ends before the first position whose logits score a continuation token.
        length = shared_prefix_length([tokens[:-1] for _, _, tokens, _ in group], keep=[n for *_, n in group])
        if length and len(group) > 1:
            shared[i] = (length, group)
        else:
            plain += group
    return shared, plain


def _item_batches(shared: dict[int, tuple[int, list[tuple]]], batch_size: int):
    """Batches of (shared length, request) with every item whole, longest items first."""
    order = sorted(shared, key=lambda i: -max(len(t) for _, _, t, _ in shared[i][1]))
    batch: list[tuple[int, tuple]] = []
    for i in order:
        length, group = shared[i]
        if batch and len(batch) + len(group) > batch_size:
            yield batch
            batch = []
        batch += [(length, request) for request in group]
    if batch:
        yield batch


def _score_shared(model, batch: list[tuple[int, tuple]], pad: int, device) -> list[float]:
    """Summed continuation log-probs of requests whose item's choices share a prefix, run once per item."""
    items = list(dict.fromkeys(request[0] for _, request in batch))
    prefixes, suffixes, owners = {}, [], []
    for length, (i, _, tokens, _) in batch:
        prefixes.setdefault(i, tokens[:length])
        suffixes.append(tokens[length:-1])
        owners.append(items.index(i))
    keep = max(n_cont for _, (*_, n_cont) in batch)
    logits = forward_after_prefixes(model, [prefixes[i] for i in items], suffixes, owners, pad=pad, device=device,
                                    logits_to_keep=keep).logits  # (rows, keep, V); left padding: the last columns
    out = []
    for row, (_, (_, _, tokens, n_cont)) in enumerate(batch):
        cont_logits = logits[row, keep - n_cont :].float()
        targets = torch.tensor(tokens[-n_cont:], dtype=torch.long, device=cont_logits.device)
        out.append(float(torch.log_softmax(cont_logits, dim=-1).gather(1, targets[:, None]).sum()))
    return out


def _score_batch(model, batch, pad: int, device) -> list[float]:
    """Summed continuation log-probs of one batch of (i, j, tokens, n_cont) requests."""
    inputs = [tokens[:-1] for _, _, tokens, _ in batch]
    width = max(len(x) for x in inputs)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    for row, x in enumerate(inputs):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    # Right padding after the real tokens cannot change a causal model's earlier positions, so (like
    # the harness) no attention mask is needed. Positions before the first continuation token of the
    # batch are never scored: their logits are not computed.
    first = min(len(x) - n_cont for x, (_, _, _, n_cont) in zip(inputs, batch, strict=True))
    keep = width - first
    logits = model(input_ids=input_ids.to(device), logits_to_keep=keep).logits  # (B, keep, V)
    out = []
    for row, (x, (_, _, tokens, n_cont)) in enumerate(zip(inputs, batch, strict=True)):
        begin = len(x) - n_cont - first
        cont_logits = logits[row, begin : begin + n_cont].float()  # (n_cont, V)
        targets = torch.tensor(tokens[-n_cont:], dtype=torch.long, device=cont_logits.device)
        logprobs = torch.log_softmax(cont_logits, dim=-1).gather(1, targets[:, None])
        out.append(float(logprobs.sum()))
    return out


def mc_metrics(loglikelihoods: list[list[float]], items: list[MCItem]) -> dict[str, float]:
    """acc, acc_norm (per character), acc_bytes (per UTF-8 byte) and n from per-choice log-likelihoods."""
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for lls, item in zip(loglikelihoods, items, strict=True):
        lls = np.asarray(lls, dtype=np.float64)
        chars = np.array([float(len(c)) for c in item.choices])
        nbytes = np.array([float(len(c.encode("utf-8"))) for c in item.choices])
        hits["acc"] += int(np.argmax(lls) == item.gold)
        hits["acc_norm"] += int(np.argmax(lls / chars) == item.gold)
        hits["acc_bytes"] += int(np.argmax(lls / nbytes) == item.gold)
    n = len(items)
    metrics = {name: (count / n if n else float("nan")) for name, count in hits.items()}
    metrics["n"] = float(n)
    return metrics


def score_multiple_choice(
    model,
    tokenizer,
    items: list[MCItem],
    *,
    batch_size: int,
    device: torch.device | str,
    target_delimiter: str = " ",
    reuse_prefix: bool = True,
) -> dict[str, float]:
    """{"acc", "acc_norm", "acc_bytes", "n"} of a model on multiple-choice items."""
    lls = choice_loglikelihoods(
        model, tokenizer, items, batch_size=batch_size, device=device, target_delimiter=target_delimiter,
        reuse_prefix=reuse_prefix,
    )
    return mc_metrics(lls, items)
