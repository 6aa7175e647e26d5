"""Greedy generation and exact-match scoring.

Contract: `generate_batch` returns, for each prompt in order, the greedy continuation decoded without
special tokens and cut just before the first occurrence of any stop sequence. Prompts are encoded
without special tokens (as lm-evaluation-harness does for causal models; an empty prompt becomes one
BOS/EOS token), left-truncated so that prompt + max_new_tokens fits the model's context, and batched
with LEFT padding, longest first; padding does not change the outputs (tested against batch size 1).
Generation of a row ends at EOS, once its decoded continuation contains a stop sequence, or after
max_new_tokens. (transformers' own `stop_strings` refuses a stop string made of characters missing
from the vocabulary, e.g. "\n" for some tokenizers; decoding the continuation works for any tokenizer.)

How (`reuse_prefix=True`, the default, for models `keepmix.eval.prefix.reuses_prefix` accepts): keepmix's
own greedy loop. The prompts of a batch that begin with the same tokens (a task's schema, a few-shot block)
run that prefix once and share its KV cache; a row leaves the batch as soon as it is done, so the others
decode without it; the stop check decodes only the tail of each row's continuation (a stop sequence that
ends in the newest token lies within it) and confirms a hit on the whole continuation, so a row never
stops before the plain path would, and the text it returns — cut at the first stop — is the same. Greedy
outputs equal `model.generate`'s (`reuse_prefix=False`, also used for models with a sliding-window cache
or a generation config that changes the logits: repetition penalty, suppressed tokens, ...).

`sample_texts` samples continuations (temperature, top-p) of token prompts, seeded per batch, and returns
each prompt with its continuation as text: the generator of self-rehearsal sources.

Exact match, after this normalization of both prediction and answer: if `regex` is given, the
prediction is replaced by the regex's first match in it (its first group when it has groups; no match
means the prediction is wrong); then both are stripped, runs of whitespace become one space, and with
`lowercase` both are lowercased. The answer is not regex-extracted: it holds the bare answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from keepmix.eval.choice import max_context_length, prefix_token_id
from keepmix.eval.prefix import cache_keyword, forward_after_prefixes, left_padded, reuses_prefix, shared_prefix_length

# Generation-config settings that change greedy decoding (transformers' logits processors): a model
# that sets any of them generates through model.generate, which applies them.
_PROCESSOR_SETTINGS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                       "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
                       "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                       "sequence_bias": None, "exponential_decay_length_penalty": None,
                       "forced_decoder_ids": None}


@dataclass(frozen=True)
class GenItem:
    """One generation item: the prompt and the expected answer."""

    prompt: str
    answer: str


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop sequence."""
    end = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                end = min(end, at)
    return text[:end]


class StopOnSequences(StoppingCriteria):
    """Marks a row done once the text generated after `prompt_width` contains any stop sequence."""

    def __init__(self, tokenizer, stop: list[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, stop, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
    device: torch.device | str,
    reuse_prefix: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts` (in order), each cut at its first stop sequence."""
    stop = [s for s in stop if s]
    own_loop = reuse_prefix and _own_loop_fits(model)
    budget = max(1, max_context_length(model, tokenizer) - max_new_tokens)
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False) or [prefix_token_id(tokenizer)]
        encoded.append(ids[-budget:])
    pad = _pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if own_loop:
                continuations = _greedy_batch(model, tokenizer, [encoded[i] for i in rows],
                                              max_new_tokens=max_new_tokens, stop=stop, pad=pad, device=device)
                for i, tokens in zip(rows, continuations, strict=True):
                    outputs[i] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
                continue
            input_ids, attention_mask = left_padded([encoded[i] for i in rows], pad)
            width = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([StopOnSequences(tokenizer, stop, width)] if stop else []),
            )
            for r, i in enumerate(rows):
                text = tokenizer.decode(generated[r, width:], skip_special_tokens=True)
                outputs[i] = cut_at_stop(text, stop)
    return outputs


def _own_loop_fits(model) -> bool:
    """Whether keepmix's greedy loop decodes exactly as model.generate would for this model."""
    config = getattr(model, "generation_config", None)
    changed = config is not None and any(getattr(config, key, default) not in (default, None, [], 1.0)
                                         for key, default in _PROCESSOR_SETTINGS.items())
    return reuses_prefix(model) and not changed


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def _greedy_batch(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, stop: list[str], pad: int,
                  device) -> list[list[int]]:
    """The greedy continuation tokens of one batch of token prompts (see the module doc)."""
    shared = shared_prefix_length(prompts)
    step = forward_after_prefixes(model, [prompts[0][:shared]] if shared else [], [p[shared:] for p in prompts],
                                  [0] * len(prompts), pad=pad, device=device, logits_to_keep=1)
    cache, mask, position = step.cache, step.attention_mask, step.next_position
    eos, tail, keyword = _eos_ids(model), max((len(s) for s in stop), default=0) + 8, cache_keyword(model)
    continuations: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the rows still decoding, in cache order
    logits = step.logits
    for t in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1)
        keep = []
        for k, (row, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
            continuations[row].append(token)
            if token not in eos and not _stopped(tokenizer, continuations[row], stop, tail):
                keep.append(k)
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(live):  # finished rows leave the batch (and the cache)
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, position, tokens = mask[index], position[index], tokens[index]
            live = [live[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None],
                       use_cache=True, **{keyword: cache}).logits
        position = position + 1  # the cache was extended in place
    return continuations


def _stopped(tokenizer, tokens: list[int], stop: list[str], tail: int) -> bool:
    """Whether the decoded continuation holds a stop sequence: the tail first (cheap), then the whole."""
    if not stop or not any(s in tokenizer.decode(tokens[-tail:], skip_special_tokens=True) for s in stop):
        return False
    return any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sample_texts(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    on_batch=None,
) -> list[str]:
    """Prompt + sampled continuation, decoded, for each token prompt in order. Batch b draws from a
    generator seeded with (seed, b) inside a forked RNG, so the texts depend only on the inputs and the
    seed, and the caller's random state is left as it was. `on_batch(done)` is told the progress."""
    pad = _pad_id(tokenizer)
    out: list[str] = []
    was_training = model.training
    model.eval()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            rows = prompts[start : start + batch_size]
            input_ids, attention_mask = left_padded(rows, pad)
            torch.manual_seed(seed * 1_000_003 + b)
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                num_beams=1, pad_token_id=pad,
            )
            width = input_ids.shape[1]
            for r, ids in enumerate(rows):
                out.append(tokenizer.decode(ids + generated[r, width:].tolist(), skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(out))
    if was_training:
        model.train()
    return out


def normalize(text: str, *, lowercase: bool = False) -> str:
    """Strip, collapse whitespace runs to one space, optionally lowercase."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def extract(text: str, regex: str | re.Pattern) -> str | None:
    """The first match of `regex` in `text` (its first group if it has one), or None."""
    match = re.search(regex, text)
    if match is None:
        return None
    return match.group(1) if match.re.groups else match.group(0)


def exact_match(prediction: str, answer: str, *, lowercase: bool = False, regex: str | None = None) -> bool:
    """Whether the prediction equals the answer after the module's normalization."""
    if regex is not None:
        extracted = extract(prediction, regex)
        if extracted is None:
            return False
        prediction = extracted
    return normalize(prediction, lowercase=lowercase) == normalize(answer, lowercase=lowercase)


def score_generation(
    model,
    tokenizer,
    items: list[GenItem],
    *,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
    device: torch.device | str,
    lowercase: bool = False,
    regex: str | None = None,
) -> dict[str, float]:
    """{"exact_match", "n"} of greedy generations against the items' answers."""
    predictions = generate_batch(
        model,
        tokenizer,
        [item.prompt for item in items],
        max_new_tokens=max_new_tokens,
        stop=stop,
        batch_size=batch_size,
        device=device,
    )
    hits = sum(
        exact_match(p, item.answer, lowercase=lowercase, regex=regex)
        for p, item in zip(predictions, items, strict=True)
    )
    return {"exact_match": hits / len(items) if items else float("nan"), "n": float(len(items))}
