"""Packed rows: labels, positions, efficiency, and no attention across documents."""

from __future__ import annotations

import numpy as np
import torch

from keepmix.data import tokenize as tk
from keepmix.data.packing import DocStream, RowPlan, Segment, build_rows, eval_plans
from tests.conftest import TINY_LLAMA, prose_docs


def test_labels_positions_and_masks():
    docs = tk.TokenDocs(np.array([5, 6, 7, 1, 8, 9, 1], dtype=np.int32), np.array([0, 4, 7]),
                        np.array([1, 0, 1, 1, 1, 1, 1], dtype=bool))
    plan = RowPlan(0, [Segment(0, 1, 0, 4), Segment(1, 1, 0, 3)])
    rows = build_rows([plan], [docs], seq_len=9, pad_id=0)
    assert rows.input_ids[0].tolist() == [5, 6, 7, 1, 8, 9, 1, 0, 0]
    # token 6 is not a target (mask 0); each segment's last token has no label; padding has none
    assert rows.labels[0].tolist() == [-100, 7, 1, -100, 9, 1, -100, -100, -100]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert rows.segment_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1, -1]
    assert rows.real_tokens == 7


def test_packing_efficiency_on_text(tokenizer):
    docs = tk.tokenize_docs(prose_docs(300), tokenizer, fmt="text", loss_on="all")
    stream = DocStream(docs.lengths, seed=0, source_index=0)
    plans = [RowPlan(0, stream.take_row(128)[0]) for _ in range(200)]
    rows = build_rows(plans, [docs], 128, tokenizer.pad_token_id)
    efficiency = rows.real_tokens / rows.input_ids.numel()
    print(f"packing efficiency on text: {efficiency:.4f}")
    assert efficiency >= 0.98


def test_no_split_mode_pads_instead_of_cutting(tokenizer):
    docs = tk.tokenize_docs(prose_docs(100), tokenizer, fmt="text", loss_on="all")
    stream = DocStream(docs.lengths, seed=0, source_index=0)
    for _ in range(30):
        segments, _ = stream.take_row(128, split_docs=False)
        for seg in segments:
            if docs.lengths[seg.doc_id] <= 128:
                assert seg.start == 0 and seg.length == docs.lengths[seg.doc_id]


def test_eval_plans_cover_each_document_once(tokenizer):
    docs = tk.tokenize_docs(prose_docs(40), tokenizer, fmt="text", loss_on="all")
    plans = eval_plans(docs, 64, source=0)
    covered = np.zeros(len(docs), dtype=int)
    for plan in plans:
        assert sum(s.length for s in plan.segments) <= 64
        for seg in plan.segments:
            covered[seg.doc_id] += seg.length
    assert (covered == docs.lengths).all()


def test_packed_rows_do_not_attend_across_documents(tokenizer):
    """A packed row gives each document the same logits as running it alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tokenizer), **arch)).eval()
    docs = tk.tokenize_docs(prose_docs(3), tokenizer, fmt="text", loss_on="all")
    lengths = [min(int(n), 30) for n in docs.lengths]
    plan = RowPlan(0, [Segment(i, 1, 0, lengths[i]) for i in range(3)])
    rows = build_rows([plan], [docs], sum(lengths) + 5, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits[0]
        start = 0
        for i in range(3):
            ids = torch.as_tensor(docs.doc(i)[0][: lengths[i]], dtype=torch.long)[None]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[start : start + lengths[i]], alone, atol=1e-5, rtol=1e-4)
            start += lengths[i]


def test_count_tokens_matches_built_rows(tokenizer):
    from keepmix.data.packing import count_tokens
    from tests.conftest import qa_docs

    docs = tk.tokenize_docs(qa_docs(50), tokenizer, fmt="prompt_completion", loss_on="completion")
    stream = DocStream(docs.lengths, seed=0, source_index=0)
    # seq_len below the longest document, with splitting on: rows hold documents continued from the last
    # row (segments starting mid-document), as in training by default
    seq_len = int(docs.lengths.max()) - 5
    plans = [RowPlan(0, stream.take_row(seq_len, split_docs=True)[0]) for _ in range(20)]
    assert any(seg.start > 0 for plan in plans for seg in plan.segments)
    rows = build_rows(plans, [docs], seq_len, tokenizer.pad_token_id)
    assert count_tokens(plans, [docs]) == (rows.real_tokens, int((rows.labels != -100).sum()))
