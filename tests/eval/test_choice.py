"""Multiple-choice scoring equals a brute-force, one-forward-per-token reference (harness semantics)."""

import numpy as np
import pytest
import torch
import transformers

from keepmix.errors import KeepmixError
from keepmix.eval.choice import MCItem, choice_loglikelihoods, encode_pair, mc_metrics, score_multiple_choice
from tests.conftest import make_bpe_tokenizer

SENTENCES = [
    "The cat sat on the mat.",
    "the cat ate the rat and the mat is red",
    "Question: what is red? Answer: yes",
    "Answer: no. Answer: maybe",
    "Paris is the capital of France; Rome is the capital of Italy.",
] * 4
CONTEXT_LIMIT = 64


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer(SENTENCES, 400, specials=("<pad>", "<eos>"))


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


ITEMS = [
    MCItem("The cat sat on the", ("mat", "rat", "capital of France"), 0),
    MCItem("Answer: ", ("yes", "no", "maybe"), 2),  # trailing space moves into the continuation
    MCItem("", ("Paris", "Rome is the capital"), 1),  # empty context: EOS stands in
    MCItem("Question: what is red?", ("the mat", "café crème", "ñ"), 1),  # multi-byte characters
    MCItem("the ma", ("t is red", "ts and cats"), 0),  # a token straddles the boundary: harness rule decides
    MCItem("Paris is the capital of", ("France", "Italy", "the cat"), 0),
    MCItem(" ".join(["the cat sat on the mat"] * 12), ("and the rat", "no"), 1),  # longer than the context
    MCItem("Rome is", ("the capital of Italy", "red", "a cat on a mat"), 0),
]


def brute_force_loglikelihood(model, context_tokens, continuation_tokens):
    """Sum over continuation tokens of log p(token | all tokens before it): one forward per token.

    Like the harness, a sequence longer than the context keeps its last CONTEXT_LIMIT + 1 tokens.
    """
    tokens = (context_tokens + continuation_tokens)[-(CONTEXT_LIMIT + 1) :]
    total = 0.0
    for k in range(len(tokens) - len(continuation_tokens), len(tokens)):
        prefix = tokens[:k]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
        total += torch.log_softmax(logits.double(), -1)[tokens[k]].item()
    return total


def reference_split(tokenizer, context, continuation):
    """lm-evaluation-harness's boundary rule, written out independently for the reference."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if context == "":
        return [tokenizer.eos_token_id], encode(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole, ctx = encode(stripped + continuation), encode(stripped)
    return ctx, whole[len(ctx) :]


def test_boundary_follows_the_harness_rule(tokenizer):
    names = tokenizer.convert_ids_to_tokens
    # The trailing space of the context is scored as part of the answer, not the question.
    ctx, cont = encode_pair(tokenizer, "Answer: ", " yes")
    assert names(ctx)[-1] == ":" and names(cont)[0] == "Ġ"
    assert names(tokenizer.encode("Answer: ", add_special_tokens=False))[-1] == "Ġ"  # the naive split differs
    # "the ma" + "t is red": the joined text tokenizes as "Ġmat", so the continuation is what follows the
    # context's token count in the joined encoding.
    ctx, cont = encode_pair(tokenizer, "the ma", "t is red")
    whole = tokenizer.encode("the mat is red", add_special_tokens=False)
    assert cont == whole[len(ctx) :]
    assert cont != tokenizer.encode("t is red", add_special_tokens=False)
    assert encode_pair(tokenizer, "", " Paris")[0] == [tokenizer.eos_token_id]


# Item 4 is meant to join its choices without a delimiter, as a task with target_delimiter "" would.
SPACED = [it for k, it in enumerate(ITEMS) if k != 4]
JOINED = [ITEMS[4]]


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """Brute-force log-likelihoods of every choice, per item, for both delimiters."""
    return {
        delim: [
            [brute_force_loglikelihood(model, *reference_split(tokenizer, it.context, delim + c)) for c in it.choices]
            for it in items
        ]
        for delim, items in ((" ", SPACED), ("", JOINED))
    }


@pytest.mark.parametrize("batch_size", [1, 5])
def test_scores_equal_brute_force_reference(model, tokenizer, reference, batch_size):
    for delim, items in ((" ", SPACED), ("", JOINED)):
        got = choice_loglikelihoods(
            model, tokenizer, items, batch_size=batch_size, device="cpu", target_delimiter=delim
        )
        for item, got_lls, ref_lls in zip(items, got, reference[delim], strict=True):
            assert got_lls == pytest.approx(ref_lls, abs=2e-4), item.context[:20]

    # The metrics follow the harness's definitions: argmax of lls, of lls / chars, of lls / bytes.
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for item, lls in zip(SPACED, reference[" "], strict=True):
        lls = np.array(lls)
        hits["acc"] += np.argmax(lls) == item.gold
        hits["acc_norm"] += np.argmax(lls / [len(c) for c in item.choices]) == item.gold
        hits["acc_bytes"] += np.argmax(lls / [len(c.encode()) for c in item.choices]) == item.gold
    metrics = score_multiple_choice(model, tokenizer, SPACED, batch_size=batch_size, device="cpu")
    assert metrics["n"] == len(SPACED)
    for name, count in hits.items():
        assert metrics[name] == pytest.approx(count / len(SPACED))


def test_metrics_use_characters_and_bytes():
    # Choice lengths: 1 char/1 byte, 4 chars/4 bytes, 2 chars/4 bytes.
    item = MCItem("q", ("a", "bbbb", "éé"), 0)
    lls = [[-1.5, -4.8, -4.4]]
    # acc: -1.5 is largest -> 0. per char: -1.5, -1.2, -2.2 -> 1. per byte: -1.5, -1.2, -1.1 -> 2.
    assert mc_metrics(lls, [item]) == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0, "n": 1.0}
    for gold, expected in ((1, (0.0, 1.0, 0.0)), (2, (0.0, 0.0, 1.0))):
        m = mc_metrics(lls, [MCItem("q", item.choices, gold)])
        assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == expected


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_only_continuation_logits_are_computed(model, tokenizer, reuse_prefix):
    """A long shared context with short choices: the LM head sees only the scored positions (and, with the
    context run once for both choices, that pass's last position)."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        item = MCItem(" ".join(["the cat sat on the mat"] * 4), ("yes", "no"), 0)
        choice_loglikelihoods(model, tokenizer, [item], batch_size=2, device="cpu", reuse_prefix=reuse_prefix)
    finally:
        handle.remove()
    width = len(tokenizer.encode(item.context, add_special_tokens=False))
    if reuse_prefix:
        assert seen[0][:2] == (1, 1)  # the shared context, once
        seen = seen[1:]
    assert len(seen) == 1 and seen[0][0] == 2
    assert seen[0][1] <= 3 < width  # a few positions, not the whole padded width


def test_invalid_items_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        MCItem("q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="non-empty"):
        MCItem("q", ("a", ""), 0)


def test_a_choice_longer_than_the_context_is_an_error(model, tokenizer):
    item = MCItem("q", ("the cat sat " * 40, "no"), 1)
    with pytest.raises(KeepmixError, match="more than the model's context"):
        choice_loglikelihoods(model, tokenizer, [item], batch_size=2, device="cpu")
