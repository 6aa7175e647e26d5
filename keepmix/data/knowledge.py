"""Knowledge documents for continued pre-training: a paraphrase multiplier and RAFT-style examples.

Contract:
  - `templated_paraphrases(records, templates, k, seed)`: k rewrites of each record, each through a
    different template (`str.format_map` over the record's fields, e.g. "{subject} lies in {country}.";
    `{text}` is the record's text field). Record i takes k templates in an order drawn from (seed, i), so
    the same inputs give the same documents; k may not exceed the number of templates, and a template
    naming a field a record lacks is a `KeepmixError` naming the record and the field.
  - `generated_paraphrases(model, tokenizer, texts, k, cache_dir=...)`: k rewrites of each text sampled
    from the model through keepmix's generation path (`keepmix.eval.generate.sample_texts`, seeded per
    batch, the caller's random state untouched), after `prompt` ("...{text}..."), cut at the first
    `stop`. They are cached like self-rehearsal documents: `<cache_dir>/paraphrases/<key>.jsonl`,
    published by rename once complete, keyed by the model's weights, the tokenizer, the settings, the
    texts and the seed; a second call with the same inputs reads the file and samples nothing.
  - `raft_examples(questions, corpus, k, p_gold, seed, template)`: RAFT-style training rows (Zhang et al.
    2024) `{"prompt", "completion"}`: the question after k documents — its gold document (kept with
    probability `p_gold`, drawn per question from the seed) and BM25's best other documents (the
    distractors), in an order drawn from the seed — through the open-book template, and the answer as
    the completion (" " + answer). The template is `keepmix.eval.openbook`'s, so training and evaluation
    prompts match.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from keepmix.errors import KeepmixError
from keepmix.eval.retrieval import Corpus, retrieve

VERSION = 1
PARAPHRASE_PROMPT = "Rewrite the sentence in other words.\nSentence: {text}\nRewrite:"


def templated_paraphrases(records: list[dict], templates: list[str], k: int, seed: int = 0,
                          text_field: str = "text") -> list[list[str]]:
    """k templated rewrites of each record (see the module doc)."""
    if not 0 < k <= len(templates):
        raise KeepmixError(f"paraphrases: k is {k}; expected 1..{len(templates)} (one template per rewrite)")
    out = []
    for i, record in enumerate(records):
        order = list(range(len(templates)))
        random.Random(f"{seed}:{i}").shuffle(order)
        fields = {**record, "text": record.get(text_field, "")}
        try:
            out.append([templates[j].format_map(fields) for j in order[:k]])
        except KeyError as err:
            raise KeepmixError(f"paraphrases: record {i} has no field {err.args[0]!r} that a template names "
                               f"(fields: {', '.join(map(str, record))})") from None
    return out


def _cut(text: str, stop: list[str]) -> str:
    from keepmix.eval.generate import cut_at_stop

    return cut_at_stop(text, stop).strip()


def generated_paraphrases(model, tokenizer, texts: list[str], k: int, *, cache_dir: Path, prompt: str = PARAPHRASE_PROMPT,
                          max_new_tokens: int = 48, temperature: float = 0.8, top_p: float = 0.95,
                          stop: tuple[str, ...] = ("\n",), batch_size: int = 16, seed: int = 0,
                          device="cpu", log=print) -> list[list[str]]:
    """k model-written rewrites of each text, cached (see the module doc)."""
    from keepmix.data.rehearsal import model_fingerprint
    from keepmix.data.tokenize import tokenizer_fingerprint
    from keepmix.eval.generate import sample_texts

    if "{text}" not in prompt:
        raise KeepmixError("paraphrases: the prompt needs the placeholder {text}")
    if k <= 0:
        raise KeepmixError(f"paraphrases: k is {k}; expected 1 or more")
    settings = [VERSION, k, prompt, max_new_tokens, temperature, top_p, list(stop), seed]
    key = hashlib.sha256(json.dumps([model_fingerprint(model), tokenizer_fingerprint(tokenizer), settings,
                                     texts]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / "paraphrases" / f"{key}.jsonl"
    if path.exists():
        log(f"paraphrases: {len(texts)} x {k} from the cache ({path})")
        return [json.loads(line)["paraphrases"] for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [tokenizer.encode(prompt.replace("{text}", t), add_special_tokens=False) for t in texts for _ in range(k)]
    heads = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    sampled = sample_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, batch_size=batch_size, device=device, seed=seed)
    rewrites = [_cut(s[len(h):], list(stop)) for s, h in zip(sampled, heads, strict=True)]
    out = [rewrites[i * k:(i + 1) * k] for i in range(len(texts))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps({"text": t, "paraphrases": p}) + "\n" for t, p in zip(texts, out)),
                   encoding="utf-8")
    os.replace(tmp, path)
    log(f"paraphrases: {len(texts)} x {k} written by the model ({path})")
    return out


def raft_examples(questions: list[dict], corpus: Corpus, *, k: int = 3, p_gold: float = 0.8, seed: int = 0,
                  template: str = "{documents}\n\n{question}", separator: str = "\n",
                  question_field: str = "question", answer_field: str = "answer",
                  gold_doc_field: str = "gold_doc") -> list[dict]:
    """RAFT-style prompt_completion rows (see the module doc)."""
    if k <= 0 or not 0 <= p_gold <= 1:
        raise KeepmixError(f"raft: expected k >= 1 and p_gold in [0, 1], got k={k}, p_gold={p_gold}")
    position = corpus.position()
    texts = [q[question_field] for q in questions]
    ranked = retrieve(corpus, texts, min(k + 1, len(corpus.ids)), what="RAFT-style examples")
    rows = []
    for i, (q, top) in enumerate(zip(questions, ranked)):
        gold_id = str(q.get(gold_doc_field, ""))
        if gold_id not in position:
            raise KeepmixError(f"raft: question {i}: field {gold_doc_field!r} ({q.get(gold_doc_field)!r}) is not a "
                               f"document id of the corpus")
        rng = random.Random(f"{seed}:{i}")
        gold = position[gold_id]
        keep = rng.random() < p_gold
        docs = ([gold] if keep else []) + [j for j in top if j != gold]
        docs = docs[:k]
        rng.shuffle(docs)
        documents = separator.join(corpus.texts[j] for j in docs)
        prompt = template.replace("{documents}", documents).replace("{question}", q[question_field])
        rows.append({"prompt": prompt, "completion": f" {q[answer_field]}"})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def paraphrase_file(source: str, out: Path, k: int, *, templates: str | None = None, model: str | None = None,
                    text_field: str = "text", id_field: str = "id", seed: int = 0, cache_dir: Path | None = None,
                    device: str = "cpu", log=print) -> Path:
    """`keepmix data paraphrase`: k rewrites of each record of `source` (JSONL...) as `{"text", "id",
    "paraphrase"}` rows in `out` — through the templates of a file (one a line), or written by `model`."""
    from keepmix.data.sources import read_records

    if (templates is None) == (model is None):
        raise KeepmixError("keepmix data paraphrase: give either --templates FILE (templated rewrites) or --model "
                           "(rewrites written by a causal LM)")
    records = read_records(source)
    if not records:
        raise KeepmixError(f"{source}: holds no records to paraphrase")
    if templates is not None:
        lines = [t for t in Path(templates).read_text(encoding="utf-8").splitlines() if t.strip()]
        rewrites = templated_paraphrases(records, lines, k, seed, text_field=text_field)
    else:
        from keepmix.model import load_model

        bad = next((i for i, r in enumerate(records) if not isinstance(r.get(text_field), str)), None)
        if bad is not None:
            raise KeepmixError(f"{source}: record {bad} has no string field {text_field!r} to paraphrase")
        loaded, tokenizer = load_model(model)
        loaded.to(device)
        rewrites = generated_paraphrases(loaded, tokenizer, [r[text_field] for r in records], k, seed=seed,
                                         cache_dir=Path(cache_dir or Path(out).parent / ".keepmix-cache"),
                                         device=device, log=log)
    rows = [{"text": text, "id": r.get(id_field, i), "paraphrase": j}
            for i, (r, texts) in enumerate(zip(records, rewrites)) for j, text in enumerate(texts)]
    log(f"paraphrases: {len(rows)} documents ({len(records)} x {k}) written to {out}")
    return _write_jsonl(out, rows)


def raft_file(questions: str, corpus: str, out: Path, *, k: int = 3, p_gold: float = 0.8, seed: int = 0,
              template: str = "{documents}\n\n{question}", text_field: str = "text", id_field: str = "id",
              log=print) -> Path:
    """`keepmix data raft`: RAFT-style prompt_completion rows in `out` from a questions file (question,
    answer, gold_doc) and a corpus file (`keepmix.eval.retrieval.read_corpus`)."""
    from keepmix.data.sources import read_records
    from keepmix.eval.retrieval import read_corpus

    if "{documents}" not in template or "{question}" not in template:
        raise KeepmixError("keepmix data raft: --template needs the placeholders {documents} and {question}")
    rows = read_records(questions)
    for i, row in enumerate(rows):
        missing = [f for f in ("question", "answer", "gold_doc") if f not in row]
        if missing:
            raise KeepmixError(f"{questions}: item {i}: missing field(s) {', '.join(missing)}")
    examples = raft_examples(rows, read_corpus(corpus, fields={"text": text_field}, id_field=id_field), k=k,
                             p_gold=p_gold, seed=seed, template=template)
    log(f"RAFT-style examples: {len(examples)} prompt/completion rows written to {out}")
    return _write_jsonl(out, examples)
