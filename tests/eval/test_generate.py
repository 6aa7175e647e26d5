"""Greedy generation: stop sequences, left padding, truncation, and exact-match normalization."""

import pytest
import torch
import transformers

from keepmix.eval.generate import (
    GenItem,
    cut_at_stop,
    exact_match,
    extract,
    generate_batch,
    normalize,
    score_generation,
)
from tests.conftest import make_bpe_tokenizer

SENTENCES = [
    "The cat sat on the mat.",
    "A dog ran in the park!",
    "Question: what is two plus two? Answer: four",
    "SELECT name FROM users WHERE id = 1;",
    "the quick brown fox jumps over the lazy dog",
] * 3
CONTEXT_LIMIT = 64
PROMPTS = [
    "The cat",
    "Question: what is two plus two? Answer:",
    "A dog ran in the park! The quick brown fox",
    "SELECT",
    "the lazy dog jumps",
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer(SENTENCES, 200, specials=("<pad>", "<eos>"), full_alphabet=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LIMIT,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def unstopped(model, tokenizer):
    """Each prompt's greedy continuation, generated alone (no padding) with no stop sequence."""
    return [
        generate_batch(model, tokenizer, [p], max_new_tokens=10, stop=[], batch_size=1, device="cpu", reuse_prefix=False)[0]
        for p in PROMPTS
    ]


def test_left_padding_does_not_change_greedy_outputs(model, tokenizer, unstopped):
    assert all(len(text) > 0 for text in unstopped)
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) > 2  # really different lengths: real padding
    for batch_size in (2, len(PROMPTS)):
        batched = generate_batch(
            model, tokenizer, PROMPTS, max_new_tokens=10, stop=[], batch_size=batch_size, device="cpu"
        )
        assert batched == unstopped


@pytest.mark.parametrize("reuse_prefix", [False, True], ids=["model.generate", "own loop"])
def test_generation_stops_at_the_first_stop_sequence(model, tokenizer, unstopped, reuse_prefix):
    text = unstopped[1]
    stop = text[4:6]  # a piece from the middle of the free-running output
    cut = text.find(stop)
    assert 0 < cut < len(text) - len(stop)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        alone = generate_batch(model, tokenizer, [PROMPTS[1]], max_new_tokens=10, stop=[stop], batch_size=1,
                               device="cpu", reuse_prefix=reuse_prefix)
    finally:
        hook.remove()
    assert alone == [text[:cut]]
    assert len(calls) < 10  # generation itself ended early, not just the text

    # In a batch, every row is cut at its own first stop sequence (or not at all).
    batched = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=10, stop=["zz", stop], batch_size=5,
                             device="cpu", reuse_prefix=reuse_prefix)
    assert batched == [cut_at_stop(t, [stop]) for t in unstopped]


def test_stop_sequences_outside_the_vocabulary_are_fine(model, tokenizer, unstopped):
    # No "\n" or "§" token exists in this vocabulary (transformers' stop_strings would refuse them).
    assert "\n" not in tokenizer.decode(list(range(len(tokenizer))))
    got = generate_batch(model, tokenizer, PROMPTS[:2], max_new_tokens=10, stop=["\n", "§"], batch_size=2, device="cpu")
    assert got == unstopped[:2]
    # An empty prompt starts from the EOS token instead of failing.
    (out,) = generate_batch(model, tokenizer, [""], max_new_tokens=3, stop=["\n"], batch_size=1, device="cpu")
    assert isinstance(out, str) and out


def test_long_prompts_are_cut_from_the_left(model, tokenizer, monkeypatch):
    widths = []
    generate = model.generate
    monkeypatch.setattr(
        model, "generate", lambda **kw: (widths.append(kw["input_ids"].shape[1]), generate(**kw))[1]
    )
    long_prompt = " ".join(SENTENCES[:5] * 3)
    assert len(tokenizer.encode(long_prompt)) > CONTEXT_LIMIT
    (out,) = generate_batch(model, tokenizer, [long_prompt], max_new_tokens=8, stop=[], batch_size=1, device="cpu",
                            reuse_prefix=False)
    assert widths == [CONTEXT_LIMIT - 8] and isinstance(out, str)
    # keepmix's own loop cuts the same tokens (it generates the same text)
    assert generate_batch(model, tokenizer, [long_prompt], max_new_tokens=8, stop=[], batch_size=1,
                          device="cpu") == [out]


def test_cut_at_stop_takes_the_earliest_sequence():
    assert cut_at_stop("SELECT 1;\n\nNext", [";", "\n\n"]) == "SELECT 1"
    assert cut_at_stop("a\n\nb;c", [";", "\n\n"]) == "a"
    assert cut_at_stop("no stop here", ["\n"]) == "no stop here"


def test_normalization_and_exact_match():
    assert normalize("  The   answer\n is\t4 ") == "The answer is 4"
    assert normalize(" Four ", lowercase=True) == "four"
    assert exact_match("  four\n", "four")
    assert not exact_match("Four", "four")
    assert exact_match("Four", "four", lowercase=True)
    assert extract("so the answer is 42, not 7", r"answer is (\d+)") == "42"
    assert extract("42 and 7", r"\d+") == "42"  # no group: the whole first match
    assert exact_match("reasoning... #### 42", "42", regex=r"####\s*(\S+)")
    assert not exact_match("no marker 42", "42", regex=r"####\s*(\S+)")  # no match means wrong


def test_score_generation_counts_exact_matches(model, tokenizer, unstopped):
    # Right answers are the model's own outputs (differently spaced/cased); wrong ones are not.
    items = [
        GenItem(PROMPTS[0], "  " + unstopped[0].upper() + " "),
        GenItem(PROMPTS[1], unstopped[1]),
        GenItem(PROMPTS[2], "something else"),
        GenItem(PROMPTS[3], unstopped[3] + " extra"),
    ]
    common = dict(max_new_tokens=10, stop=[], batch_size=3, device="cpu")
    assert score_generation(model, tokenizer, items, lowercase=True, **common) == {"exact_match": 0.5, "n": 4.0}
    assert score_generation(model, tokenizer, items, **common)["exact_match"] == 0.25
