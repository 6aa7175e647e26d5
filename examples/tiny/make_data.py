"""Regenerates the tiny example's data and tokenizer (committed; run only to change them).

general.jsonl  prose: paragraphs of the Python language reference (pydoc_data.topics)
code.jsonl     code: functions from a few standard-library modules
qa.jsonl       a prompt/completion task: two-digit addition written out in words
tokenizer/     a 512-token byte-level BPE trained on the three files
"""

import ast
import inspect
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def prose(limit: int = 400) -> list[dict]:
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            if 200 <= len(para) <= 900:
                paragraphs.append({"text": para})
    return paragraphs[:limit]


def code(limit: int = 300) -> list[dict]:
    import calendar, difflib, fractions, heapq, json as json_mod, pprint, shlex, statistics, string, textwrap

    out = []
    for module in (textwrap, string, fractions, statistics, shlex, json_mod.decoder, difflib, calendar, heapq, pprint):
        source = inspect.getsource(module)
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                text = ast.get_source_segment(source, node)
                if text and 100 <= len(text) <= 2500:
                    out.append({"text": text})
    return out[:limit]


WORDS = "zero one two three four five six seven eight nine".split()


def qa(n: int = 400) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        spelled = " ".join(WORDS[int(d)] for d in str(a + b))
        rows.append({"prompt": f"Q: {a} + {b} = ? Spell the digits.\nA:", "completion": f" {spelled}"})
    return rows


def main() -> None:
    files = {"general.jsonl": prose(), "code.jsonl": code(), "qa.jsonl": qa()}
    for name, rows in files.items():
        with open(HERE / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(name, len(rows))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [r.get("text") or r["prompt"] + r["completion"] for rows in files.values() for r in rows]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(HERE / "tokenizer")


if __name__ == "__main__":
    main()
