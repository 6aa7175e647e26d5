"""Canonical documents → token documents with loss masks, cached on disk.

Contract: a `TokenDocs` holds all documents of one split flat: `tokens[offsets[i]:offsets[i+1]]` is
document i, ending with EOS; `loss_mask` marks the tokens that are training *targets* (a token is
predicted from the ones before it). Formats:
  text               every token is a target;
  prompt_completion  prompt and completion are tokenized separately and joined, so the boundary is
                     exact; with loss_on=completion only completion tokens (and the EOS) are targets;
  chat               rendered with the tokenizer's chat template; with loss_on=completion only the
                     characters each assistant turn adds to the rendering (and the EOS) are targets.
The cache key covers the tokenizer (its full serialisation), the source content and format options, so
a second run on the same data and tokenizer does not re-tokenize.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keepmix.errors import KeepmixError

CACHE_VERSION = 1


@dataclass
class TokenDocs:
    tokens: np.ndarray  # int32, all documents back to back
    offsets: np.ndarray  # int64, len = n_docs + 1
    loss_mask: np.ndarray  # bool, same length as tokens

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.loss_mask[a:b]

    @property
    def target_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def head(self, n: int, max_tokens: int | None = None) -> TokenDocs:
        """The first n documents, each cut to its first max_tokens // n tokens when max_tokens is given
        (a budget spread over n documents rather than spent on the first long one)."""
        n = min(n, len(self))
        per_doc = None if max_tokens is None else max(1, max_tokens // max(n, 1))
        tokens, masks, offsets = [], [], [0]
        for i in range(n):
            doc, mask = self.doc(i)
            tokens.append(np.asarray(doc[:per_doc]))
            masks.append(np.asarray(mask[:per_doc]))
            offsets.append(offsets[-1] + len(tokens[-1]))
        return TokenDocs(np.concatenate(tokens or [np.zeros(0, dtype=np.int32)]).astype(np.int32),
                         np.asarray(offsets, dtype=np.int64), np.concatenate(masks or [np.zeros(0, dtype=bool)]))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides how text becomes ids."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None),
             getattr(tokenizer, "add_bos_token", None), type(tokenizer).__name__]
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()[:24]


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _chat_target_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that assistant turns add to it."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError("the chat template does not render conversations incrementally, so assistant "
                             "turns cannot be located; use loss_on: all for this source")
        spans.append((len(before), len(upto)))
    return full, spans


def _tokenize_doc(tokenizer, doc: dict, fmt: str, loss_on: str, eos: int) -> tuple[list[int], list[bool]]:
    if fmt == "text":
        ids = _encode(tokenizer, doc["text"], special=True)
        mask = [True] * len(ids)
    elif fmt == "prompt_completion":
        p = _encode(tokenizer, doc["prompt"], special=True)
        c = _encode(tokenizer, doc["completion"], special=False)
        ids = p + c
        mask = [loss_on == "all"] * len(p) + [True] * len(c)
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; a chat source needs one")
        if loss_on == "all":
            text = tokenizer.apply_chat_template(doc["messages"], tokenize=False)
            ids = _encode(tokenizer, text, special=False)
            mask = [True] * len(ids)
        else:
            text, spans = _chat_target_spans(tokenizer, doc["messages"])
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            # A token is a target when its characters lie in an assistant span.
            mask = [any(a <= s and e <= b and e > s for a, b in spans) for s, e in enc["offset_mapping"]]
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
        mask = mask + [True]
    return ids, mask


def tokenize_docs(docs: list[dict], tokenizer, *, fmt: str, loss_on: str, where: str = "") -> TokenDocs:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KeepmixError("the tokenizer has no EOS token; keepmix joins packed documents with EOS")
    all_ids, all_mask, offsets = [], [], [0]
    for i, doc in enumerate(docs):
        try:
            ids, mask = _tokenize_doc(tokenizer, doc, fmt, loss_on, eos)
        except ValueError as err:
            raise KeepmixError(f"{where} document {i}: {err}") from None
        all_ids.extend(ids)
        all_mask.extend(mask)
        offsets.append(len(all_ids))
    return TokenDocs(
        np.asarray(all_ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64), np.asarray(all_mask, dtype=bool)
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("KEEPMIX_CACHE", Path.home() / ".cache" / "keepmix")) / "tokens"


def cached_tokenize(
    docs: list[dict], tokenizer, *, fmt: str, loss_on: str, key: str, cache_dir: Path | None, where: str = ""
) -> tuple[TokenDocs, bool]:
    """Tokenize, or load the cached result; returns (docs, cache_hit)."""
    if cache_dir is None:
        return tokenize_docs(docs, tokenizer, fmt=fmt, loss_on=loss_on, where=where), False
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, key, tokenizer_fingerprint(tokenizer), fmt, loss_on]).encode())
    path = Path(cache_dir) / f"{digest.hexdigest()[:32]}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return TokenDocs(z["tokens"], z["offsets"], z["loss_mask"]), True
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    result = tokenize_docs(docs, tokenizer, fmt=fmt, loss_on=loss_on, where=where)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, tokens=result.tokens, offsets=result.offsets, loss_mask=result.loss_mask)
    os.replace(tmp, path)
    return result, False


class _ShardWriter:
    """Appends token documents to flat files on disk, so memory holds one batch of documents at a time."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        self.tokens = open(folder / f"{split}.tokens", "wb")
        self.mask = open(folder / f"{split}.mask", "wb")
        self.offsets = [0]

    def add(self, docs: TokenDocs) -> None:
        self.tokens.write(docs.tokens.astype(np.int32).tobytes())
        self.mask.write(docs.loss_mask.astype(bool).tobytes())
        self.offsets.extend((docs.offsets[1:] + self.offsets[-1]).tolist())

    def close(self) -> None:
        self.tokens.close()
        self.mask.close()
        np.save(self.folder / f"{self.split}.offsets.npy", np.asarray(self.offsets, dtype=np.int64))


def _open_shards(folder: Path, split: str) -> TokenDocs:
    offsets = np.load(folder / f"{split}.offsets.npy")
    n = int(offsets[-1])
    if n == 0:
        return TokenDocs(np.zeros(0, np.int32), offsets, np.zeros(0, bool))
    return TokenDocs(np.memmap(folder / f"{split}.tokens", dtype=np.int32, mode="r", shape=(n,)), offsets,
                     np.memmap(folder / f"{split}.mask", dtype=bool, mode="r", shape=(n,)))


def streamed_tokenize(docs, tokenizer, *, fmt: str, loss_on: str, key: str, cache_dir: Path | None,
                      valid_docs: int, max_docs: int | None = None, batch: int = 1000,
                      where: str = "") -> tuple[TokenDocs, TokenDocs, bool]:
    """Tokenize an iterator of documents into memory-mapped shards (train, held-out, cache_hit).

    The first `valid_docs` documents are held out. The shards live in the token cache, published by
    rename when complete, so an interrupted tokenization is redone rather than half-used.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, "stream", key, tokenizer_fingerprint(tokenizer), fmt,
                                        loss_on, valid_docs, max_docs]).encode()).hexdigest()[:32]
    folder = root / f"{digest}.shards"
    if (folder / "train.offsets.npy").exists():
        return _open_shards(folder, "train"), _open_shards(folder, "valid"), True
    tmp = root / f".{digest}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    writers = {"valid": _ShardWriter(tmp, "valid"), "train": _ShardWriter(tmp, "train")}
    pending, count = [], 0

    def flush(split: str) -> None:
        if pending:
            writers[split].add(tokenize_docs(pending, tokenizer, fmt=fmt, loss_on=loss_on, where=where))
            pending.clear()

    for doc in docs:
        if max_docs is not None and count >= max_docs:
            break
        pending.append(doc)
        count += 1
        if count == valid_docs:
            flush("valid")
        elif len(pending) >= batch:
            flush("valid" if count <= valid_docs else "train")
    flush("valid" if count <= valid_docs else "train")
    for w in writers.values():
        w.close()
    if count <= valid_docs:
        raise KeepmixError(f"{where}: only {count} documents, all held out (valid_docs: {valid_docs})")
    os.replace(tmp, folder)
    return _open_shards(folder, "train"), _open_shards(folder, "valid"), False
