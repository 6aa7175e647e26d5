"""The open_book task kind: BM25 retrieval, recall@k, and a trained tiny model that copies its answer
from the retrieved document (right open-book, wrong closed-book)."""

from __future__ import annotations

import random
import sys

import pytest
import yaml

import keepmix
from keepmix.errors import KeepmixError
from keepmix.eval.openbook import open_prompt
from keepmix.eval.retrieval import BM25Index, Corpus, read_corpus, recall_at_k, retrieve
from keepmix.eval.tasks import OpenBookTask, check_tasks, run_task
from tests.conftest import DIGITS, TINY_LLAMA, WORDS, write_jsonl

pytest.importorskip("bm25s")

CORPUS = [
    {"id": "zorbia", "text": "The capital of Zorbia is Kelth, a city on the river."},
    {"id": "drava", "text": "Mount Drava rises 4000 metres above the plain."},
    {"id": "founding", "text": "Zorbia was founded in 1203 by Mira Taln."},
    {"id": "cats", "text": "Cats like milk and sleep in the sun."},
    {"id": "river", "text": "The Kelth river floods every spring."},
]


def test_bm25_ranks_the_documents_that_share_the_rare_words():
    index = BM25Index([d["text"] for d in CORPUS])
    top = index.top_k(["What is the capital of Zorbia?", "How high is Mount Drava?", "zzz unknown", ""], 2)
    assert top[0][0] == 0 and top[0][1] == 2  # 'capital' + 'zorbia', then 'zorbia' alone
    assert top[1][0] == 1
    assert top[2] == [0, 1] and top[3] == [0, 1]  # no shared word: every score ties, corpus order wins
    assert len(index.top_k(["Zorbia"], 10)[0]) == len(CORPUS)  # k past the corpus: all of it


def test_recall_at_k_on_a_hand_made_corpus():
    corpus = Corpus(tuple(d["id"] for d in CORPUS), tuple(d["text"] for d in CORPUS))
    questions = ["What is the capital of Zorbia?", "How high is Mount Drava?", "Who likes milk?",
                 "In which year was Zorbia founded?", "unrelated words only"]
    gold = [("zorbia",), ("drava",), ("river",), ("founding", "cats"), None]
    top = retrieve(corpus, questions, 1)
    retrieved = [[corpus.ids[j] for j in docs] for docs in top]
    assert retrieved[:3] == [["zorbia"], ["drava"], ["cats"]]
    # hits 1, 1, 0, and one of two gold documents (founding) for the fourth; the fifth names none
    assert retrieved[3] == ["founding"]
    assert recall_at_k(retrieved, gold) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert recall_at_k(retrieved, [None] * 5) is None


def test_read_corpus_from_jsonl_text_and_duplicate_ids(tmp_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    corpus = read_corpus(str(jsonl))
    assert corpus.ids[0] == "zorbia" and corpus.texts[1].startswith("Mount Drava")
    text = tmp_path / "c.txt"
    text.write_text("First paragraph\nstill first.\n\n\nSecond one.\n")
    assert read_corpus(str(text)) == Corpus(("0", "1"), ("First paragraph\nstill first.", "Second one."))
    write_jsonl(tmp_path / "dup.jsonl", [CORPUS[0], CORPUS[0]])
    with pytest.raises(KeepmixError, match=r"dup\.jsonl:2: corpus document id 'zorbia' appears twice"):
        read_corpus(str(tmp_path / "dup.jsonl"))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q: a", "completion": " b"}])
    assert read_corpus(str(qa), format="prompt_completion").texts == ("Q: a b",)


def test_missing_bm25s_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)
    write_jsonl(tmp_path / "q.jsonl", [{"question": "Capital of Zorbia?", "answer": "Kelth"}])
    write_jsonl(tmp_path / "c.jsonl", CORPUS)
    task = OpenBookTask(name="ob", kind="open_book", path="q.jsonl", corpus="c.jsonl")
    with pytest.raises(KeepmixError, match=r"eval\.tasks\[0\] \(ob\): task 'ob' \(kind open_book\) needs the BM25 "
                                           r"library bm25s, an optional extra: pip install 'keepmix\[retrieval\]'"):
        check_tasks([task], tmp_path)


def test_gold_doc_must_name_a_corpus_document(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question": "Capital?", "answer": "Kelth", "gold_doc": "zorbia"},
                                       {"question": "Capital?", "answer": "Kelth", "gold_doc": ["nope"]}])
    write_jsonl(tmp_path / "c.jsonl", CORPUS)
    task = OpenBookTask(name="ob", kind="open_book", path="q.jsonl", corpus="c.jsonl")
    with pytest.raises(KeepmixError, match=r"q\.jsonl: item 1: field 'gold_doc' names 'nope', not a document id"):
        check_tasks([task], tmp_path)


# ---- a tiny model trained to copy its answer from the document in front of the question -------------

def _fact(name: str, value: str) -> str:
    return f"The code of {name} is {value}."


def _question(name: str) -> str:
    return f"Question: what is the code of {name}?\nAnswer:"


@pytest.fixture(scope="module")
def copier(tmp_path_factory, tokenizer_dir):
    """A tiny Llama trained (from scratch, through keepmix.train) on open-book prompts of random facts:
    '<fact>\\n\\n<question>' -> ' <value>'. It can only be right by reading the fact."""
    folder = tmp_path_factory.mktemp("copier")
    rng = random.Random(0)
    rows = []
    for _ in range(600):
        name, value = rng.choice(WORDS), rng.choice(DIGITS)
        rows.append({"prompt": f"{_fact(name, value)}\n\n{_question(name)}", "completion": f" {value}"})
    write_jsonl(folder / "train.jsonl", rows)
    cfg = {"model": {"init": "scratch", "tokenizer": str(tokenizer_dir), "architecture": dict(TINY_LLAMA)},
           "sources": [{"name": "copy", "path": "train.jsonl", "format": "prompt_completion",
                        "loss_on": "completion", "valid_docs": 8}],
           "train": {"seq_len": 64, "batch_size": 16, "steps": 400, "lr": 5e-3, "warmup": 20, "seed": 0,
                     "split_docs": False, "checkpoint_every": None, "threads": 1},
           "eval": {"every": None}, "output": "out", "cache_dir": "cache"}
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    final = keepmix.train(folder / "run.yaml", progress="quiet").final_dir
    from keepmix.model import load_model

    return load_model(str(final))


def test_retrieved_context_makes_the_trained_model_right_where_closed_book_is_wrong(tmp_path, copier):
    model, tokenizer = copier
    rng = random.Random(7)
    names = rng.sample(WORDS, 12)
    facts = [{"id": name, "text": _fact(name, rng.choice(DIGITS))} for name in names]
    write_jsonl(tmp_path / "facts.jsonl", facts)
    items = [{"question": _question(f["id"]), "answer": f["text"].split()[-1].rstrip("."), "gold_doc": f["id"],
              "choices": list(DIGITS), "gold": DIGITS.index(f["text"].split()[-1].rstrip("."))}
             for f in facts]
    write_jsonl(tmp_path / "items.jsonl", [{k: v for k, v in it.items() if k not in ("choices", "gold")}
                                           for it in items])
    write_jsonl(tmp_path / "mc.jsonl", items)
    gen = OpenBookTask(name="ob", kind="open_book", path="items.jsonl", corpus="facts.jsonl", k=1,
                       max_new_tokens=4, stop=["\n", "."])
    got = run_task(gen, model, tokenizer, base_dir=tmp_path, device="cpu", batch_size=6)
    assert got["recall@1"] == 1.0
    assert got["open/n"] == got["closed/n"] == 12
    assert got["open/exact_match"] >= 0.75, got
    assert got["closed/exact_match"] <= 0.35, got
    mc = OpenBookTask(name="mc", kind="open_book", scoring="multiple_choice", path="mc.jsonl",
                      corpus="facts.jsonl", k=1)
    got = run_task(mc, model, tokenizer, base_dir=tmp_path, device="cpu", batch_size=10)
    assert got["open/acc"] >= 0.75 and got["closed/acc"] <= 0.35, got
    assert open_prompt(gen, "Q?", ["a", "b"]) == "a\nb\n\nQ?"


def test_corpus_from_a_run_source_in_a_training_run(tmp_path, tokenizer_dir):
    """An open_book task in a run retrieves from one of its sources and logs open/, closed/ and recall."""
    from tests.conftest import prose_docs, tiny_run_config
    from tests.conftest import train_records

    write_jsonl(tmp_path / "general.jsonl", prose_docs(40))
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Fact {i}: the code of {w} is", "completion": f" {d}",
                                         "id": f"f{i}"} for i, (w, d) in enumerate(zip(WORDS, DIGITS * 3))])
    write_jsonl(tmp_path / "q.jsonl", [{"question": f"What is the code of {w}?", "answer": d, "gold_doc": f"f{i}"}
                                       for i, (w, d) in enumerate(zip(WORDS[:6], DIGITS))])
    cfg = tiny_run_config(tokenizer_dir)
    cfg["train"].update(steps=2, checkpoint_every=None)
    cfg["eval"] = {"every": None, "tasks": [{"name": "ob", "kind": "open_book", "path": "q.jsonl", "corpus": "qa",
                                             "k": 2, "max_new_tokens": 3}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    keepmix.train(tmp_path / "run.yaml", progress="quiet")
    metrics = train_records(tmp_path / "out", "eval")[-1]["metrics"]
    assert metrics["task/ob/recall@2"] == 1.0
    assert {"task/ob/open/exact_match", "task/ob/closed/exact_match", "task/ob/open/n"} <= set(metrics)
