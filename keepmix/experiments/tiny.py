"""The tiny from-scratch model the experiments train on a CPU, and the data files they write for it.

Contract: `TinyModel` is a Llama architecture plus the size of its BPE vocabulary and of its training
rows; `train_tokenizer(texts, vocab_size, out)` writes a byte-level BPE (`<eos>`, `<pad>`) trained on
`texts` as a transformers folder; `write_records(path, records)` writes JSONL records, or checks that the
file already holds exactly them — completed arms reused from an earlier call must have been trained on
these very records, so another scale, seed or keepmix version in the same folder is a `KeepmixError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from keepmix.errors import KeepmixError


@dataclass(frozen=True)
class TinyModel:
    """A from-scratch Llama and its own BPE tokenizer."""

    architecture: dict
    vocab_size: int
    steps: int  # steps of its first training phase (pretraining, or domain A)
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    valid_docs: int = 32  # held-out documents per source


TINY_QUICK = TinyModel({"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 256, "tie_word_embeddings": True},
                       vocab_size=512, steps=40)
TINY_FULL = TinyModel({"model_type": "llama", "hidden_size": 128, "intermediate_size": 352,
                       "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "max_position_embeddings": 256, "tie_word_embeddings": True},
                      vocab_size=1024, steps=300)


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Path:
    """A byte-level BPE trained on `texts`, saved as a transformers tokenizer folder (reused when there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (Path(out) / "tokenizer.json").exists():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    """Write JSONL records, or check that the file already holds them (see the module doc)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.exists():
        if path.read_text(encoding="utf-8") != text:
            raise KeepmixError(f"{path} holds other records than this experiment makes (another scale, seed or "
                               "keepmix version made it); delete that folder or pass another --out")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
