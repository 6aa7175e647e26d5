"""Loss masks mark exactly the tokens each format trains on; the cache avoids re-tokenizing."""

from __future__ import annotations

from keepmix.data import tokenize as tk


def targets(docs: tk.TokenDocs, tokenizer, i: int = 0) -> str:
    ids, mask = docs.doc(i)
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_prompt_completion_masks_the_prompt(tokenizer):
    doc = {"prompt": "Q: 12 + 30 =", "completion": " four two"}
    docs = tk.tokenize_docs([doc], tokenizer, fmt="prompt_completion", loss_on="completion")
    ids, mask = docs.doc(0)
    prompt_len = len(tokenizer("Q: 12 + 30 =", add_special_tokens=True)["input_ids"])
    assert not mask[:prompt_len].any() and mask[prompt_len:].all()
    assert targets(docs, tokenizer) == " four two<eos>"
    assert ids[-1] == tokenizer.eos_token_id
    everything = tk.tokenize_docs([doc], tokenizer, fmt="prompt_completion", loss_on="all")
    assert everything.loss_mask.all()


def test_chat_masks_everything_but_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "alpha beta"},
        {"role": "assistant", "content": "gamma"},
        {"role": "user", "content": "delta"},
        {"role": "assistant", "content": "omega river"},
    ]
    docs = tk.tokenize_docs([{"messages": messages}], tokenizer, fmt="chat", loss_on="completion")
    # The template renders "<|assistant|>{content}<|end|>\n" per turn: the assistant's content, its end
    # marker and newline are targets; the role headers and every other turn are not.
    assert targets(docs, tokenizer) == "gamma<|end|>\nomega river<|end|>\n<eos>"
    ids, _ = docs.doc(0)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == rendered + "<eos>"


def test_text_trains_on_all_tokens_and_ends_with_eos(tokenizer):
    docs = tk.tokenize_docs([{"text": "alpha beta"}, {"text": "gamma"}], tokenizer, fmt="text", loss_on="all")
    assert len(docs) == 2 and docs.loss_mask.all()
    assert all(docs.doc(i)[0][-1] == tokenizer.eos_token_id for i in range(2))


def test_cache_hit_on_second_run_and_miss_on_change(tokenizer, tmp_path, monkeypatch):
    docs = [{"text": "alpha beta gamma"}] * 3
    first, hit = tk.cached_tokenize(docs, tokenizer, fmt="text", loss_on="all", key="k1", cache_dir=tmp_path)
    assert not hit
    calls = []
    monkeypatch.setattr(tk, "tokenize_docs", lambda *a, **k: calls.append(1))
    second, hit = tk.cached_tokenize(docs, tokenizer, fmt="text", loss_on="all", key="k1", cache_dir=tmp_path)
    assert hit and not calls
    assert (second.tokens == first.tokens).all() and (second.offsets == first.offsets).all()
    monkeypatch.undo()
    _, hit = tk.cached_tokenize(docs, tokenizer, fmt="text", loss_on="all", key="k2", cache_dir=tmp_path)
    assert not hit  # other content
    tokenizer.add_tokens(["<new>"])
    _, hit = tk.cached_tokenize(docs, tokenizer, fmt="text", loss_on="all", key="k1", cache_dir=tmp_path)
    assert not hit  # another tokenizer
