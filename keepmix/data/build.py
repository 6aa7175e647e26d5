"""Builders that turn the config's data sections into ready components.

Contract: `prepare_sources` reads, validates, splits and tokenizes every source (through the token
cache) and returns `PreparedSource`s; `build_sampler` makes the mixture sampler from them (with the
retention guard of `mixture.guard`, if any) and `guard_probes` the guard's fixed probe: the first
`probe_docs` held-out documents of each protected source, `probe_tokens` tokens spread over them. Like
torchtune's builders, these are the only data code that reads the config tree; everything they build
takes plain arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keepmix.config import RunConfig, guarded_sources
from keepmix.data.guard import RetentionGuard
from keepmix.data.mixture import MixtureSampler, QualitySchedule, Schedule
from keepmix.data.packing import DocStream
from keepmix.data.sources import describe_skipped, iter_canonical_docs, load_source, stream_fingerprint
from keepmix.data.tokenize import TokenDocs, cached_tokenize, default_cache_dir, streamed_tokenize
from keepmix.errors import KeepmixError, raise_all


@dataclass
class PreparedSource:
    name: str
    train: TokenDocs
    valid: TokenDocs
    quality: np.ndarray | None
    skipped: list[str]
    cache_hit: bool


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.resolve_local(cfg.cache_dir)) if cfg.cache_dir else default_cache_dir()


def prepare_sources(cfg: RunConfig, tokenizer, log=print, generated: dict[str, str] | None = None
                    ) -> list[PreparedSource]:
    """Every source ready to train on; the data problems of all sources are reported together, each
    prefixed with its config key (`sources[1] (code): ...`). `generated` gives the files of the
    self-rehearsal sources (`keepmix.data.rehearsal.generate_sources`)."""
    cache_dir = cache_root(cfg)
    out, problems = [], []
    for i, s in enumerate(cfg.sources):
        try:
            if s.generate is not None and s.name not in (generated or {}):
                raise KeepmixError("a generated source needs its documents written first (generate_sources)")
            path = (generated or {}).get(s.name) or cfg.resolve(s.path)
            out.append(_prepare_streaming(cfg, s, tokenizer, cache_dir, log) if s.streaming
                       else _prepare(cfg, s, path, tokenizer, cache_dir, log))
        except KeepmixError as err:
            problems.append(f"sources[{i}] ({s.name}): {err}")
    raise_all(problems, "the data")
    return out


def _prepare(cfg: RunConfig, s, path: str, tokenizer, cache_dir: Path, log) -> PreparedSource:
    docs = load_source(
        s.name, path, format=s.format,
        fields={"text": s.text_field, "messages": s.messages_field, "prompt": s.prompt_field,
                "completion": s.completion_field},
        quality_field=s.quality_field, hf_config=s.hf_config, hf_split=s.hf_split,
        valid_path=cfg.resolve(s.valid_path), valid_docs=s.valid_docs, max_docs=s.max_docs,
        on_bad_row=s.on_bad_row, seed=cfg.train.seed,
    )
    if docs.skipped:
        log(f"source {s.name}: {describe_skipped(docs.skipped)}")
    train, hit_t = cached_tokenize(docs.train, tokenizer, fmt=s.format, loss_on=s.loss_on,
                                   key=docs.fingerprint + "/train", cache_dir=cache_dir, where=path)
    valid, hit_v = cached_tokenize(docs.valid, tokenizer, fmt=s.format, loss_on=s.loss_on,
                                   key=docs.fingerprint + "/valid", cache_dir=cache_dir,
                                   where=cfg.resolve(s.valid_path) or path)
    log(f"source {s.name}: {len(train)} train / {len(valid)} held-out documents, "
        f"{int(train.lengths.sum())} tokens ({'token cache hit' if hit_t and hit_v else 'tokenized and cached'})")
    return PreparedSource(s.name, train, valid, docs.train_quality, docs.skipped, hit_t and hit_v)


def _prepare_streaming(cfg: RunConfig, s, tokenizer, cache_dir: Path, log) -> PreparedSource:
    fields = {"text": s.text_field, "messages": s.messages_field, "prompt": s.prompt_field,
              "completion": s.completion_field}
    path = cfg.resolve(s.path)
    skipped: list[str] = []
    docs = iter_canonical_docs(path, format=s.format, fields=fields, hf_config=s.hf_config, hf_split=s.hf_split,
                               on_bad_row=s.on_bad_row, skipped=skipped)
    key = stream_fingerprint(path, format=s.format, fields=fields, hf_config=s.hf_config, hf_split=s.hf_split,
                             valid_docs=int(s.valid_docs), max_docs=s.max_docs)
    train, valid, hit = streamed_tokenize(docs, tokenizer, fmt=s.format, loss_on=s.loss_on, key=key,
                                          cache_dir=cache_dir, valid_docs=int(s.valid_docs), max_docs=s.max_docs,
                                          where=path)
    if skipped:
        log(f"source {s.name}: {describe_skipped(skipped)}")
    log(f"source {s.name} (streaming): {len(train)} train / {len(valid)} held-out documents "
        f"({'token cache hit' if hit else 'tokenized into shards'})")
    return PreparedSource(s.name, train, valid, None, skipped, hit)


def build_schedule(cfg: RunConfig, sources: list[PreparedSource]) -> Schedule:
    names = [s.name for s in sources]
    floors = [s.floor if s.floor is not None else cfg.mixture.floor for s in cfg.sources]
    if cfg.mixture.schedule:
        points = [(p.at, p.weights) for p in cfg.mixture.schedule]
    else:  # the natural mixture: each source in proportion to its training tokens
        points = [(0.0, {s.name: float(s.train.target_tokens) for s in sources})]
    return Schedule(names, points, floors, cfg.mixture.interpolation)


def build_guard(cfg: RunConfig, schedule: Schedule) -> RetentionGuard | None:
    g = cfg.mixture.guard
    if g is None:
        return None
    tolerance = g.tolerance if g.tolerance is not None else cfg.eval.retention_tolerance
    return RetentionGuard(schedule.names, guarded_sources(cfg), schedule.floors, metric=g.metric,
                          tolerance=tolerance, every=g.every, max_share=g.max_share, gain=g.gain, decay=g.decay,
                          task_keep=g.task_keep)


def build_sampler(cfg: RunConfig, sources: list[PreparedSource]) -> MixtureSampler:
    streams = [DocStream(s.train.lengths, seed=cfg.train.seed, source_index=i, quality=s.quality)
               for i, s in enumerate(sources)]
    quality = QualitySchedule([(p.at, p.min) for p in cfg.mixture.quality]) if cfg.mixture.quality else None
    schedule = build_schedule(cfg, sources)
    return MixtureSampler(schedule, streams, batch_rows=cfg.train.batch_size,
                          total_steps=cfg.train.steps, seq_len=cfg.train.seq_len,
                          split_docs=cfg.train.split_docs, quality=quality, guard=build_guard(cfg, schedule))


def guard_probes(cfg: RunConfig, sources: list[PreparedSource]) -> list[tuple[str, TokenDocs]]:
    """The guard's probe: (source, its first probe_docs held-out documents) per protected source."""
    g = cfg.mixture.guard
    if g is None:
        return []
    out = []
    for name in guarded_sources(cfg):
        i = [s.name for s in sources].index(name)
        held_out = len(sources[i].valid)
        if held_out < g.probe_docs:  # held-out counts of fractions and valid_path files are known only now
            raise KeepmixError(f"mixture.guard.probe_docs: {g.probe_docs} is larger than the held-out set of "
                               f"{name} ({held_out} documents); expected at most {held_out}"
                               if held_out else f"mixture.guard.sources: {name} has no held-out documents; "
                               "the guard's probe needs some (sources[].valid_docs or valid_path)")
        out.append((name, sources[i].valid.head(g.probe_docs, g.probe_tokens)))
    return out
