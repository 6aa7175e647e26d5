"""Knowledge documents: the paraphrase multiplier (templated and model-written, deterministic, cached) and
RAFT-style examples."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from keepmix.cli import main
from keepmix.data.knowledge import generated_paraphrases, raft_examples, templated_paraphrases
from keepmix.errors import KeepmixError
from keepmix.eval.retrieval import Corpus
from tests.conftest import write_jsonl

pytest.importorskip("bm25s")

FACTS = [{"id": "a", "subject": "Zorbia", "capital": "Kelth", "text": "The capital of Zorbia is Kelth."},
         {"id": "b", "subject": "Drava", "capital": "Mounth", "text": "The capital of Drava is Mounth."},
         {"id": "c", "subject": "Quelt", "capital": "Prasso", "text": "The capital of Quelt is Prasso."}]
TEMPLATES = ["{capital} is the capital of {subject}.", "{subject} has its capital at {capital}.",
             "The seat of government of {subject} is {capital}.", "Note: {text}"]


def test_templated_paraphrases_are_deterministic_and_distinct():
    one = templated_paraphrases(FACTS, TEMPLATES, 3, seed=0)
    assert one == templated_paraphrases(FACTS, TEMPLATES, 3, seed=0)
    assert all(len(set(rewrites)) == 3 for rewrites in one)
    assert all(f["capital"] in r and f["subject"] in r for f, rs in zip(FACTS, one) for r in rs)
    others = [templated_paraphrases(FACTS, TEMPLATES, 3, seed=s) for s in range(1, 6)]
    assert any(o != one for o in others)  # the seed draws the templates' order
    assert sorted(templated_paraphrases(FACTS[:1], TEMPLATES, 4)[0]) == sorted(
        t.format_map(FACTS[0]) for t in TEMPLATES)
    with pytest.raises(KeepmixError, match=r"k is 5; expected 1\.\.4"):
        templated_paraphrases(FACTS, TEMPLATES, 5)
    with pytest.raises(KeepmixError, match=r"record 0 has no field 'river'"):
        templated_paraphrases(FACTS, ["{river}"], 1)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


def test_generated_paraphrases_are_deterministic_and_cached(tmp_path, tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    texts = [f["text"] for f in FACTS]
    kwargs = dict(max_new_tokens=6, stop=("\n",), seed=3, log=lambda _: None)
    first = generated_paraphrases(model, tokenizer, texts, 2, cache_dir=tmp_path / "c1", **kwargs)
    assert len(first) == 3 and all(len(r) == 2 for r in first)
    assert any(r for rs in first for r in rs)  # the model wrote something
    files = list((tmp_path / "c1" / "paraphrases").glob("*.jsonl"))
    assert len(files) == 1
    # the same inputs in a fresh cache: the same rewrites (seeded sampling)
    assert generated_paraphrases(model, tokenizer, texts, 2, cache_dir=tmp_path / "c2", **kwargs) == first

    def no_sampling(*args, **kw):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr("keepmix.eval.generate.sample_texts", no_sampling)
    assert generated_paraphrases(model, tokenizer, texts, 2, cache_dir=tmp_path / "c1", **kwargs) == first
    with pytest.raises(AssertionError, match="sampled again"):  # another seed is another file
        generated_paraphrases(model, tokenizer, texts, 2, cache_dir=tmp_path / "c1", **{**kwargs, "seed": 4})


def test_raft_examples_hold_the_gold_document_and_distractors():
    corpus = Corpus(tuple(f["id"] for f in FACTS) + ("d",),
                    tuple(f["text"] for f in FACTS) + ("Zorbia exports glass and wool.",))
    questions = [{"question": "What is the capital of Zorbia?", "answer": "Kelth", "gold_doc": "a"},
                 {"question": "What is the capital of Quelt?", "answer": "Prasso", "gold_doc": "c"}]
    rows = raft_examples(questions, corpus, k=2, p_gold=1.0, seed=0)
    assert rows == raft_examples(questions, corpus, k=2, p_gold=1.0, seed=0)
    assert rows[0]["completion"] == " Kelth" and rows[0]["prompt"].endswith("\n\nWhat is the capital of Zorbia?")
    documents = rows[0]["prompt"].split("\n\n")[0].split("\n")
    assert len(documents) == 2 and FACTS[0]["text"] in documents  # the gold one and a distractor
    without = raft_examples(questions, corpus, k=2, p_gold=0.0, seed=0)
    assert FACTS[0]["text"] not in without[0]["prompt"].split("\n\n")[0]
    assert len(without[0]["prompt"].split("\n\n")[0].split("\n")) == 2  # distractors only
    with pytest.raises(KeepmixError, match=r"question 0: field 'gold_doc' \('zz'\) is not a document id"):
        raft_examples([{**questions[0], "gold_doc": "zz"}], corpus)


def test_cli_data_paraphrase_and_raft(tmp_path, capsys):
    write_jsonl(tmp_path / "facts.jsonl", FACTS)
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    assert main(["data", "paraphrase", str(tmp_path / "facts.jsonl"), str(tmp_path / "para.jsonl"), "--k", "2",
                 "--templates", str(tmp_path / "templates.txt")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "para.jsonl").read_text().splitlines()]
    assert [(r["id"], r["paraphrase"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    write_jsonl(tmp_path / "q.jsonl", [{"question": "Capital of Drava?", "answer": "Mounth", "gold_doc": "b"}])
    assert main(["data", "raft", str(tmp_path / "q.jsonl"), str(tmp_path / "facts.jsonl"), str(tmp_path / "r.jsonl"),
                 "--k", "2", "--p-gold", "1"]) == 0
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["completion"] == " Mounth" and FACTS[1]["text"] in row["prompt"]
    assert main(["data", "paraphrase", str(tmp_path / "facts.jsonl"), str(tmp_path / "x.jsonl")]) == 2
    assert "give either --templates FILE" in capsys.readouterr().err
