"""Greedy generation and exact-match scoring.

Contract: `generate_batch` returns, for each prompt in order, the greedy continuation decoded without
special tokens and cut just before the first occurrence of any stop sequence. Prompts are encoded
without special tokens (as lm-evaluation-harness does for causal models; an empty prompt becomes one
BOS/EOS token), left-truncated so that prompt + max_new_tokens fits the model's context, and batched
with LEFT padding, longest first; padding does not change the outputs (tested against batch size 1).
Generation of a row ends at EOS, once its decoded continuation contains a stop sequence, or after
max_new_tokens. (transformers' own `stop_strings` refuses a stop string made of characters missing
from the vocabulary, e.g. "\n" for some tokenizers; decoding the continuation works for any tokenizer.)

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
) -> list[str]:
    """Greedy continuations of `prompts` (in order), each cut at its first stop sequence."""
    stop = [s for s in stop if s]
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
            input_ids, attention_mask = _left_padded([encoded[i] for i in rows], pad)
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


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows, padded on the left to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids) :] = 1
    return input_ids, attention_mask


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
            input_ids, attention_mask = _left_padded(rows, pad)
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
