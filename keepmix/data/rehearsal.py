"""Self-rehearsal: a source whose documents the base model writes itself (replay without the original data).

Contract: `generate_sources` returns, for every source with `generate`, the path of a JSONL file of
`{"text": ...}` documents (prompt + sampled continuation) that then goes through the ordinary reading,
held-out split, tokenization, mixture, floors and evals of any text source. The file lives in the cache
(`<cache>/generated/<source>-<key>.jsonl`), published by rename once complete; the key covers the model's
weights, the tokenizer, the generate settings, the prompts and the seed, so a rerun or a resume with the
same model and settings reads it back instead of sampling again, and anything that would change the
documents makes a new file. Sampling is seeded per batch (`keepmix.eval.generate.sample_texts`): the same
seed gives the same documents, and the training run's own random state is untouched.
Prompts: another source's training documents (their first `prompt_tokens` tokens, cycled), a file of
prompts, or none (every document starts from BOS — unconditional samples of what the model knows).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import xxhash

from keepmix.config import RunConfig
from keepmix.data.sources import load_source, read_located_records
from keepmix.data.tokenize import tokenizer_fingerprint
from keepmix.errors import KeepmixError
from keepmix.eval.generate import sample_texts
from keepmix.model import plain_name

VERSION = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every weight (names, shapes, dtypes and bytes): which model writes the documents.

    A PEFT model whose LoRA updates are all still zero (a LoRA run's model before its first step, when it
    writes its documents) computes its base's function to the bit — the adapter adds exactly 0 — so it is
    hashed as its base model: the run, and `keepmix eval`/`merge` with the config's plain base model, then
    share one file instead of each sampling the same documents again."""
    digest = xxhash.xxh3_128()
    for name, tensor in sorted(_function_state(model).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _function_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state that decides the model's outputs: a fresh adapter's model as its base's names and weights."""
    state = model.state_dict()
    if not hasattr(model, "get_base_model"):
        return state
    updates = [t for name, t in state.items() if "lora_B" in name or "lora_embedding_B" in name]
    if any(t.any() for t in updates):
        return state
    return {plain_name(name): t for name, t in model.get_base_model().state_dict().items() if "lora_" not in name}


def _prompt_texts(cfg: RunConfig, index: int) -> list[str] | None:
    """The prompt texts of a generated source (None: from BOS)."""
    prompts = cfg.sources[index].generate.prompts
    if prompts is None:
        return None
    if prompts in cfg.source_names:
        other = cfg.sources[cfg.source_names.index(prompts)]
        docs = load_source(other.name, cfg.resolve(other.path), format=other.format,
                           fields={"text": other.text_field, "messages": other.messages_field,
                                   "prompt": other.prompt_field, "completion": other.completion_field},
                           hf_config=other.hf_config, hf_split=other.hf_split, valid_path=cfg.resolve(other.valid_path),
                           valid_docs=other.valid_docs, max_docs=other.max_docs, on_bad_row="skip",
                           seed=cfg.train.seed).train  # training documents only: the held-out ones stay unseen
        return [d.get("text") or d.get("prompt") or d["messages"][0]["content"] for d in docs]
    path = Path(cfg.resolve_local(prompts))
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = read_located_records(str(path), hint="; expected one JSON object per line").rows
        texts = [r.get("prompt", r.get("text")) for r in rows]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise KeepmixError(f"{path}: item {bad}: expected a string field 'prompt' (or 'text')")
        return texts
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prompt_tokens(texts: list[str] | None, tokenizer, n_docs: int, prompt_tokens: int) -> list[list[int]]:
    from keepmix.eval.choice import prefix_token_id

    start = [prefix_token_id(tokenizer)]
    if not texts:
        return [start] * n_docs
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:prompt_tokens] or start for t in texts]
    return [encoded[i % len(encoded)] for i in range(n_docs)]


def generate_sources(cfg: RunConfig, model, tokenizer, *, cache_dir: Path, device, log, write: bool = True
                     ) -> dict[str, str]:
    """{source name: JSONL path} for the generated sources; samples those not cached (when `write`: the
    main process; the others only compute the paths and read the files once it is done)."""
    out = {}
    for i, s in enumerate(cfg.sources):
        g = s.generate
        if g is None:
            continue
        prompts = _prompt_tokens(_prompt_texts(cfg, i), tokenizer, g.n_docs, g.prompt_tokens)
        seed = cfg.train.seed if g.seed is None else g.seed
        key = hashlib.sha256(json.dumps([VERSION, model_fingerprint(model), tokenizer_fingerprint(tokenizer),
                                         g.model_dump(), seed, prompts]).encode()).hexdigest()[:24]
        path = cache_dir / "generated" / f"{s.name}-{key}.jsonl"
        out[s.name] = str(path)
        if path.exists():
            log(f"source {s.name}: {g.n_docs} self-rehearsal documents from the cache ({path.name})")
            continue
        if not write:
            continue
        clock = time.perf_counter()

        def progress(done: int, name=s.name, n=g.n_docs, clock=clock) -> None:
            rate = done / max(time.perf_counter() - clock, 1e-9)
            log(f"source {name}: generated {done}/{n} documents ({rate:.2f} docs/s, about "
                f"{(n - done) / max(rate, 1e-9):.0f} s left)")

        texts = sample_texts(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                             top_p=g.top_p, batch_size=g.batch_size, device=device, seed=seed, on_batch=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        os.replace(tmp, path)
        log(f"source {s.name}: {len(texts)} self-rehearsal documents written in "
            f"{time.perf_counter() - clock:.1f} s ({path})")
    return out
