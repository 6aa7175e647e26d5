"""Streaming sources: tokenized record by record into memory-mapped shards, resumed mid-stream exactly."""

from __future__ import annotations

import numpy as np

from keepmix.data import tokenize as tk
from keepmix.data.sources import iter_canonical_docs
from keepmix.diagnostics.exposures import read_exposures
from keepmix.training.loop import train
from tests.conftest import prose_docs, train_records, write_jsonl


def test_streamed_shards_equal_in_memory_tokenization(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", prose_docs(57))
    docs = iter_canonical_docs(str(path), skipped=[])
    train_docs, valid_docs, hit = tk.streamed_tokenize(docs, tokenizer, fmt="text", loss_on="all", key="k",
                                                       cache_dir=tmp_path / "cache", valid_docs=7, batch=10)
    assert not hit and isinstance(train_docs.tokens, np.memmap)
    reference = tk.tokenize_docs(prose_docs(57), tokenizer, fmt="text", loss_on="all")
    assert len(valid_docs) == 7 and len(train_docs) == 50
    cut = reference.offsets[7]
    assert (np.asarray(valid_docs.tokens) == reference.tokens[:cut]).all()
    assert (np.asarray(train_docs.tokens) == reference.tokens[cut:]).all()
    assert (train_docs.offsets == reference.offsets[7:] - cut).all()
    again = tk.streamed_tokenize(iter([]), tokenizer, fmt="text", loss_on="all", key="k",
                                 cache_dir=tmp_path / "cache", valid_docs=7, batch=10)
    assert again[2] and (np.asarray(again[0].tokens) == np.asarray(train_docs.tokens)).all()


def test_streaming_source_resumed_mid_stream_continues_at_the_right_document(make_run):
    cfg = {"sources": [{"name": "general", "path": "general.jsonl", "valid_docs": 10, "streaming": True},
                       {"name": "qa", "path": "qa.jsonl", "format": "prompt_completion", "loss_on": "completion",
                        "valid_docs": 10, "streaming": True}],
           "train": {"steps": 10, "checkpoint_every": 5}, "eval": {"every": None}}
    whole, parts = make_run("whole", **cfg), make_run("parts", **cfg)
    train(whole, progress="quiet")
    train(parts, progress="quiet", stop_at=4)
    train(parts, progress="quiet", resume=True)
    a, b = whole.parent / "out", parts.parent / "out"
    assert [r["loss"] for r in train_records(a)] == [r["loss"] for r in train_records(b)]
    ta, tb = read_exposures(a), read_exposures(b)
    assert ta.column("doc_id").to_pylist() == tb.column("doc_id").to_pylist()
    assert max(tb.column("step").to_pylist()) == 10
