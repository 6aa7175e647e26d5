"""The shared-prefix paths (keepmix.eval.prefix): greedy generation and multiple-choice scores equal the
plain paths' while the shared prefix runs once."""

import pytest
import torch
import transformers

import keepmix.eval.choice as choice
from keepmix.eval.choice import MCItem, choice_loglikelihoods
from keepmix.eval.generate import generate_batch
from keepmix.eval.prefix import MIN_SHARED, reuses_prefix, shared_prefix_length
from tests.conftest import make_bpe_tokenizer

SENTENCES = [
    "Table users(id, name, age). Table orders(id, user_id, total).",
    "The cat sat on the mat. A dog ran in the park!",
    "Question: how many users are older than 30? SQL: SELECT COUNT(*) FROM users WHERE age > 30;",
    "the quick brown fox jumps over the lazy dog",
] * 3
SCHEMA = "Table users(id, name, age). Table orders(id, user_id, total). Question: "
QUESTIONS = ["how many users?", "the cat sat on the mat", "which orders are over 10? SQL:", "a", "the lazy dog jumps"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer(SENTENCES, 300, specials=("<pad>", "<eos>"), full_alphabet=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


def shapes_of_forward_calls(model):
    """A list that fills with the input_ids shape of every forward pass, and the hook's handle."""
    shapes = []
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    return shapes, handle


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7, 8]]) == 5
    assert shared_prefix_length([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]) == 5  # one token is left to each row
    assert shared_prefix_length([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8]], keep=[3, 1]) == 4
    assert shared_prefix_length([[1, 2, 3, 9], [1, 2, 3, 8]]) == 0  # under MIN_SHARED: not worth a pass
    assert shared_prefix_length([[1, 2, 3, 4, 5], [2, 2, 3, 4, 5]]) == 0
    assert MIN_SHARED == 4


def test_generation_runs_the_schema_once_and_equals_model_generate(model, tokenizer):
    prompts = [SCHEMA + q for q in QUESTIONS]
    reference = generate_batch(model, tokenizer, prompts, max_new_tokens=12, stop=[], batch_size=5, device="cpu",
                               reuse_prefix=False)
    shapes, handle = shapes_of_forward_calls(model)
    try:
        got = generate_batch(model, tokenizer, prompts, max_new_tokens=12, stop=[], batch_size=5, device="cpu")
    finally:
        handle.remove()
    assert got == reference and all(reference)
    shared = len(tokenizer.encode(SCHEMA, add_special_tokens=False)) - 1  # "Question: " ends in a merged space
    assert shapes[0][0] == 1 and shapes[0][1] >= shared - 2  # the prefix: one row, once
    longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    assert shapes[1][0] == 5 and shapes[1][1] <= longest - shapes[0][1]  # the suffixes only
    assert all(s == (5, 1) for s in shapes[2:])  # then one token per row and step
    assert len(shapes) == 2 + 11


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_finished_rows_leave_the_batch_and_texts_stay_the_same(model, tokenizer, batch_size):
    prompts = [SCHEMA + q for q in QUESTIONS]
    unstopped = generate_batch(model, tokenizer, prompts, max_new_tokens=12, stop=[], batch_size=5, device="cpu",
                               reuse_prefix=False)
    # Stop sequences that end some rows early, at different steps, and EOS on one token of another row.
    stops = [unstopped[0][3:5], unstopped[2][6:8], "\n"]
    eos = tokenizer.encode(unstopped[4], add_special_tokens=False)[4]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, eos]
    try:
        reference = generate_batch(model, tokenizer, prompts, max_new_tokens=12, stop=stops, batch_size=batch_size,
                                   device="cpu", reuse_prefix=False)
        shapes, handle = shapes_of_forward_calls(model)
        try:
            got = generate_batch(model, tokenizer, prompts, max_new_tokens=12, stop=stops, batch_size=batch_size,
                                 device="cpu")
        finally:
            handle.remove()
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert got == reference
    assert got != unstopped  # the stops and the EOS really cut rows
    if batch_size == 5:
        rows = [s[0] for s in shapes if s[1] == 1]
        assert rows == sorted(rows, reverse=True) and rows[-1] < rows[0]  # done rows left the batch


def test_a_generation_config_that_changes_logits_goes_through_model_generate(model, tokenizer, monkeypatch):
    prompts = [SCHEMA + q for q in QUESTIONS[:2]]
    model.generation_config.repetition_penalty = 1.5
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: (calls.append(1), generate(**kw))[1])
    try:
        got = generate_batch(model, tokenizer, prompts, max_new_tokens=8, stop=[], batch_size=2, device="cpu")
    finally:
        model.generation_config.repetition_penalty = 1.0
    assert calls == [1] and all(got)


def test_models_with_a_sliding_window_take_the_plain_path(model):
    assert reuses_prefix(model)
    mistral = transformers.MistralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    assert not reuses_prefix(transformers.MistralForCausalLM(mistral))


MC_ITEMS = [
    MCItem(SCHEMA + "how many users?", ("SELECT COUNT(*) FROM users;", "the cat", "SELECT * FROM orders;", "dog"), 0),
    MCItem("The cat sat on the mat. A dog ran in the", ("park!", "mat.", "lazy fox jumps over"), 0),
    MCItem("", ("cat", "dog"), 1),  # an empty context: one BOS, nothing shared
    MCItem("the quick brown fox jumps over the", ("lazy dog",), 0),  # one choice: nothing to share
    MCItem("Question: how many users are older than 30? SQL:", ("SELECT COUNT(*) FROM users WHERE age > 30;",
                                                                 "SELECT name FROM users;"), 1),
]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_choices_share_their_context_with_the_same_loglikelihoods(model, tokenizer, batch_size, monkeypatch):
    reference = choice_loglikelihoods(model, tokenizer, MC_ITEMS, batch_size=batch_size, device="cpu",
                                      reuse_prefix=False)
    shared_rows = []
    score_shared = choice._score_shared
    monkeypatch.setattr(choice, "_score_shared", lambda m, batch, *a: (shared_rows.append(len(batch)),
                                                                       score_shared(m, batch, *a))[1])
    got = choice_loglikelihoods(model, tokenizer, MC_ITEMS, batch_size=batch_size, device="cpu")
    assert sum(shared_rows) == 4 + 3 + 2  # the items with a shared context, every choice of them
    for ref_item, got_item in zip(reference, got, strict=True):
        assert got_item == pytest.approx(ref_item, abs=1e-5)
    assert len({round(x, 3) for x in sum(reference, [])}) > 8  # real, different scores


def test_another_architecture_generates_the_same_texts(tokenizer):
    """Qwen2 (biases in q/k/v, its own RoPE settings) through both paths."""
    torch.manual_seed(1)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    qwen = transformers.Qwen2ForCausalLM(config).eval()
    assert reuses_prefix(qwen)
    prompts = [SCHEMA + q for q in QUESTIONS]
    reference = generate_batch(qwen, tokenizer, prompts, max_new_tokens=10, stop=["e"], batch_size=3,
                               device="cpu", reuse_prefix=False)
    assert generate_batch(qwen, tokenizer, prompts, max_new_tokens=10, stop=["e"], batch_size=3,
                          device="cpu") == reference
