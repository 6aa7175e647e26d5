"""Shared fixtures: a tokenizer trained here, data made here, tiny Llama configs written here."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud light "
         "forest metal glass paper north south east west quick slow bright dark").split()
DIGITS = "zero one two three four five six seven eight nine".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def prose_docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 90))) + "."} for _ in range(n)]


def qa_docs(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        rows.append({"prompt": f"Q: {a} + {b} =", "completion": " " + " ".join(DIGITS[int(d)] for d in str(a + b))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_bpe_tokenizer(texts, vocab_size: int, specials=("<eos>", "<pad>"), full_alphabet: bool = True):
    """A byte-level BPE trained on `texts`, as a transformers fast tokenizer with <eos> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                       initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE with EOS, pad and a chat template, trained on test text."""
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [d["text"] for d in prose_docs(300)] + [d["prompt"] + d["completion"] for d in qa_docs(300)]
    fast = make_bpe_tokenizer(texts, 300)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def tiny_run_config(tokenizer_dir: Path, data: str = "", output: str = "out", cache_dir: str = "cache") -> dict:
    """A 12-step tiny-Llama run on general.jsonl and qa.jsonl (in folder `data`, or the config's own)."""
    return {
        "model": {"init": "scratch", "tokenizer": str(tokenizer_dir), "architecture": dict(TINY_LLAMA)},
        "sources": [
            {"name": "general", "path": str(Path(data) / "general.jsonl"), "valid_docs": 10},
            {"name": "qa", "path": str(Path(data) / "qa.jsonl"), "format": "prompt_completion",
             "loss_on": "completion", "valid_docs": 10},
        ],
        "mixture": {"schedule": [{"at": 0.0, "weights": {"general": 0.8, "qa": 0.2}},
                                 {"at": 1.0, "weights": {"general": 0.3, "qa": 0.7}}], "floor": 0.1},
        "train": {"seq_len": 64, "batch_size": 4, "steps": 12, "lr": 3e-3, "warmup": 2, "seed": 0,
                  "checkpoint_every": 6, "keep_checkpoints": 5, "threads": 1},
        "eval": {"every": 6, "batch_size": 8},
        "output": output,
        "cache_dir": cache_dir,
    }


@pytest.fixture
def make_run(tmp_path, tokenizer_dir):
    """Writes data and a tiny-Llama run config; returns the YAML path. Keyword args update the config."""

    def make(name: str = "run", **updates) -> Path:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        write_jsonl(folder / "general.jsonl", prose_docs(120))
        write_jsonl(folder / "qa.jsonl", qa_docs(120))
        cfg = deep_update(tiny_run_config(tokenizer_dir), updates)
        path = folder / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def train_records(run_dir: Path, kind: str = "train") -> list[dict]:
    from keepmix.report.metrics import of_kind, read_metrics

    return of_kind(read_metrics(run_dir / "metrics.jsonl"), kind)


@pytest.fixture(scope="session")
def general_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama trained from scratch on `general` prose only (40 steps): a model with something to
    forget. Returns its final/ folder."""
    import keepmix

    folder = tmp_path_factory.mktemp("general_model")
    write_jsonl(folder / "general.jsonl", prose_docs(120))
    cfg = {"model": {"init": "scratch", "tokenizer": str(tokenizer_dir), "architecture": dict(TINY_LLAMA)},
           "sources": [{"name": "general", "path": "general.jsonl", "valid_docs": 10}],
           "train": {"seq_len": 64, "batch_size": 4, "steps": 40, "lr": 3e-3, "warmup": 2, "seed": 0,
                     "lr_schedule": "constant", "checkpoint_every": None, "threads": 1},
           "eval": {"every": None}, "output": "out", "cache_dir": "cache"}
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    return keepmix.train(folder / "run.yaml", progress="quiet").final_dir


# A run that starves `general` (weight 0, no floor) on a model that knows it: `general` is forgotten
# unless the guard protects it: make_run(**forgetting_run(general_model, guard={...})).
def forgetting_run(model_dir: Path, guard: dict | None = None, **train) -> dict:
    mixture = {"schedule": [{"at": 0.0, "weights": {"general": 0.0, "qa": 1.0}}], "floor": 0.0}
    if guard is not None:
        mixture["guard"] = guard
    return {"model": {"init": "pretrained", "name": str(model_dir), "tokenizer": None, "architecture": None},
            "mixture": mixture,
            "train": {"steps": 30, "lr_schedule": "constant", "checkpoint_every": None, **train},
            "eval": {"every": 10}}


def pytest_configure(config):
    share_the_cores_between_workers()


def share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker — and every keepmix command
    a test starts, which inherits OMP_NUM_THREADS — takes its share of the cores. Two workers of two
    threads each on a 2-core machine oversubscribe it: OpenMP threads spin waiting for a descheduled
    peer, and both workers run slower than one alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 1:
        return
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
