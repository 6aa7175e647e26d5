"""Keeping what the base model knew: KL to the base, L2 to the base weights, self-rehearsal sources."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import keepmix
from tests.conftest import TINY_LLAMA, train_records
from tests.training.test_resume import assert_same_weights, final_weights, losses


def _with_source_keys(config: Path, index: int = 0, **keys) -> Path:
    import yaml

    data = yaml.safe_load(config.read_text())
    data["sources"][index].update(keys)
    config.write_text(yaml.safe_dump(data))
    return config


def _tiny_model(tokenizer_dir, seed=0):
    from keepmix.model import load_model

    return load_model(None, tokenizer=str(tokenizer_dir), init="scratch", architecture=dict(TINY_LLAMA), seed=seed)


def test_zero_beta_and_lambda_train_exactly_like_the_plain_path(make_run):
    plain = make_run("plain", eval={"kl_to_base": False})  # no base model anywhere: the path before KL existed
    zero = _with_source_keys(make_run("zero", train={"l2_to_base": 0.0}), kl_to_base=0.0)
    keepmix.train(plain, progress="quiet")
    keepmix.train(zero, progress="quiet")
    a, b = plain.parent / "out", zero.parent / "out"
    assert losses(a) == losses(b)
    assert_same_weights(final_weights(a), final_weights(b))
    for x, y in zip(train_records(a, "eval"), train_records(b, "eval"), strict=True):
        assert {k: v for k, v in y["metrics"].items() if not k.endswith("kl_to_base")} == x["metrics"]
        assert y["metrics"]["valid/general/kl_to_base"] >= 0
    assert train_records(b, "eval")[0]["metrics"]["valid/qa/kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert "kl_term" not in train_records(b)[0] and "l2_term" not in train_records(b)[0]


@pytest.fixture
def pretrained(make_run):
    """A tiny model first trained on `general` alone: the base model of a continued pre-training."""
    stage1 = make_run("stage1", mixture={"schedule": [{"at": 0.0, "weights": {"general": 1.0, "qa": 0.0}}],
                                         "floor": 0.0},
                      train={"steps": 120, "checkpoint_every": 120}, eval={"every": None})
    keepmix.train(stage1, progress="quiet")
    return stage1.parent / "out" / "final"


def _continued(make_run, name: str, base: Path, **updates):
    """Mostly qa at a high LR, general replayed at 5 %: general is forgotten (its loss rises ~1.8 nats)."""
    cfg = {"model": {"init": "pretrained", "name": str(base), "tokenizer": None, "architecture": None},
           "mixture": {"schedule": [{"at": 0.0, "weights": {"general": 0.05, "qa": 0.95}}], "floor": 0.05},
           "train": {"steps": 40, "checkpoint_every": 40, "lr": 1e-2}, "eval": {"every": 20}}
    for key, value in updates.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return make_run(name, **cfg)


def test_kl_on_the_replay_source_keeps_it_closer_to_the_base(make_run, pretrained):
    free = _continued(make_run, "free", pretrained)
    anchored = _with_source_keys(_continued(make_run, "anchored", pretrained), kl_to_base=2.0)  # keep general
    keepmix.train(free, progress="quiet")
    keepmix.train(anchored, progress="quiet")
    end_free = train_records(free.parent / "out", "eval")[-1]
    end_kl = train_records(anchored.parent / "out", "eval")[-1]
    kl_free, kl_anchored = (e["metrics"]["valid/general/kl_to_base"] for e in (end_free, end_kl))
    loss_free, loss_anchored = (e["retention"]["valid/general/loss"]["delta"] for e in (end_free, end_kl))
    assert loss_free > 0.5  # without the KL term general really is forgotten ...
    assert kl_anchored < 0.8 * kl_free, (kl_anchored, kl_free)  # ... with it, it drifts less
    assert loss_anchored < loss_free - 0.1, (loss_anchored, loss_free)  # and loses less
    # the objective's terms are logged and add up
    records = train_records(anchored.parent / "out")
    for rec in records:
        assert rec["objective"] == pytest.approx(rec["loss"] + rec["kl_term"] + rec["l2_term"])
    rec = next(r for r in records if "general" in r["sources"])  # a step with a general row (5 % of rows)
    assert rec["kl_term"] > 0 and rec["sources"]["general"]["kl"] > 0 and "kl" not in rec["sources"].get("qa", {})


def test_lora_base_is_the_model_with_its_adapter_disabled(tokenizer_dir):
    from keepmix.model import add_lora
    from keepmix.training.forward import FrozenBase

    model, _ = _tiny_model(tokenizer_dir)
    original = copy.deepcopy(model).eval()
    lora = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    base = FrozenBase(lora)
    assert base.copy is None  # no second copy of the weights
    ids = torch.randint(0, 200, (2, 12))
    pos = torch.arange(12).repeat(2, 1)
    want = original.model(input_ids=ids, position_ids=pos).last_hidden_state
    torch.testing.assert_close(base.hidden(ids, pos), want, rtol=0, atol=0)
    adapted = lora.get_base_model().model(input_ids=ids, position_ids=pos).last_hidden_state
    assert (adapted - want).abs().max() > 1e-3  # the adapter is back on outside the base's forward


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_anchor_adds_the_exact_gradient_of_its_penalty(tokenizer_dir, lora):
    from keepmix.model import add_lora
    from keepmix.training.anchor import WeightAnchor

    model, _ = _tiny_model(tokenizer_dir)
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor = WeightAnchor(model, lam=0.3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.ones_like(p)  # the loss's gradient, already there
    value = anchor.add_to_gradients()
    got = [p.grad.clone() for p in trained]
    # the penalty written out plainly, differentiated by autograd
    params = dict(model.named_parameters())
    if lora:
        penalty = 0
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                penalty = penalty + delta.pow(2).sum()
    else:
        penalty = sum((p - start[n]).pow(2).sum() for n, p in params.items() if p.requires_grad)
    penalty = 0.3 / 2 * penalty
    grads = torch.autograd.grad(penalty, trained)
    assert value == pytest.approx(float(penalty.detach()), rel=1e-5)
    for g, want in zip(got, grads, strict=True):
        torch.testing.assert_close(g, want + 1, rtol=1e-5, atol=1e-6)


def test_l2_to_base_keeps_the_weights_near_the_start_and_resumes_exactly(make_run):
    free, whole, parts = make_run("free"), make_run("whole", train={"l2_to_base": 5.0}), \
        make_run("parts", train={"l2_to_base": 5.0})
    for config in (free, whole):
        keepmix.train(config, progress="quiet")
    keepmix.train(parts, progress="quiet", stop_at=6)
    keepmix.train(parts, progress="quiet", resume=True)
    a, b, c = (x.parent / "out" for x in (free, whole, parts))
    start = _start_weights(free)
    dist = {k: sum((w - start[n]).pow(2).sum().item() for n, w in final_weights(run).items()) for k, run in
            (("free", a), ("anchored", b))}
    assert dist["anchored"] < 0.5 * dist["free"], dist
    assert losses(c) == losses(b)  # theta_0 after a resume is still the start, not the checkpoint
    assert_same_weights(final_weights(b), final_weights(c))
    rec = train_records(b)[-1]
    assert rec["l2_term"] > 0 and rec["objective"] == pytest.approx(rec["loss"] + rec["l2_term"])


def _start_weights(config: Path) -> dict[str, torch.Tensor]:
    """The weights a run of `config` starts from (init: scratch, seeded by train.seed)."""
    import yaml

    from keepmix.model import load_model

    m = yaml.safe_load(config.read_text())["model"]
    model, _ = load_model(None, tokenizer=m["tokenizer"], init="scratch", architecture=m["architecture"], seed=0)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_kl_training_resumes_bit_identical(make_run, pretrained):
    runs = [_with_source_keys(_continued(make_run, name, pretrained, train={"checkpoint_every": 10}), kl_to_base=1.0)
            for name in ("whole", "parts")]
    keepmix.train(runs[0], progress="quiet")
    keepmix.train(runs[1], progress="quiet", stop_at=10)
    keepmix.train(runs[1], progress="quiet", resume=True)
    a, b = (x.parent / "out" for x in runs)
    assert losses(a) == losses(b)
    assert [r["kl_term"] for r in train_records(a)] == [r["kl_term"] for r in train_records(b)]
    assert_same_weights(final_weights(a), final_weights(b))


def test_self_rehearsal_documents_are_deterministic_cached_and_trained_on(make_run):
    gen = {"n_docs": 12, "max_new_tokens": 12, "batch_size": 5, "temperature": 1.0}
    sources = [{"name": "self", "generate": gen, "valid_docs": 3},
               {"name": "qa", "path": "qa.jsonl", "format": "prompt_completion", "loss_on": "completion",
                "valid_docs": 10}]
    mixture = {"schedule": [{"at": 0.0, "weights": {"self": 0.5, "qa": 0.5}}], "floor": 0.1}
    first = make_run("first", sources=sources, mixture=mixture, train={"steps": 4, "checkpoint_every": 4})
    result = keepmix.train(first, progress="quiet")
    files = sorted((first.parent / "cache" / "generated").glob("self-*.jsonl"))
    assert len(files) == 1
    text = files[0].read_bytes()
    docs = [line for line in text.decode().splitlines() if line]
    assert len(docs) == 12 and len(set(docs)) > 1  # sampled, not one greedy text twelve times
    assert "valid/self/token_acc" in result.metrics and "valid/self/kl_to_base" in result.metrics
    assert any("self" in r["sources"] for r in train_records(first.parent / "out"))
    # the same model and settings: read back, not sampled again
    mtime = files[0].stat().st_mtime_ns
    second = make_run("first", sources=sources, mixture=mixture, train={"steps": 4, "checkpoint_every": 4},
                      output="out2")
    keepmix.train(second, progress="quiet")
    assert files[0].stat().st_mtime_ns == mtime
    # sampled again from scratch with the same seed: the very same bytes; another seed: other documents
    files[0].unlink()
    keepmix.train(make_run("first", sources=sources, mixture=mixture, output="out3",
                           train={"steps": 4, "checkpoint_every": 4}), progress="quiet")
    assert files[0].read_bytes() == text
    keepmix.train(make_run("first", sources=[{**sources[0], "generate": {**gen, "seed": 7}}, sources[1]],
                           mixture=mixture, output="out4", train={"steps": 4, "checkpoint_every": 4}), progress="quiet")
    others = sorted(set((first.parent / "cache" / "generated").glob("self-*.jsonl")) - {files[0]})
    assert len(others) == 1 and others[0].read_bytes() != text



def test_a_lora_run_writes_its_base_models_documents_and_eval_reads_them_back(make_run):
    """A fresh adapter adds exactly 0, so a LoRA run's documents are its base model's: a plain run's file
    serves it, it writes the same bytes itself, and keepmix eval of the base reads them instead of sampling."""
    from keepmix.config import load_config
    from keepmix.data.rehearsal import model_fingerprint
    from keepmix.eval.runner import evaluate
    from keepmix.model import load_configured

    gen = {"n_docs": 12, "max_new_tokens": 12, "batch_size": 5, "temperature": 1.0}
    sources = [{"name": "self", "generate": gen, "valid_docs": 3},
               {"name": "qa", "path": "qa.jsonl", "format": "prompt_completion", "loss_on": "completion",
                "valid_docs": 10}]
    run = {"sources": sources, "mixture": {"schedule": [{"at": 0.0, "weights": {"self": 0.5, "qa": 0.5}}],
                                           "floor": 0.1}, "train": {"steps": 4, "checkpoint_every": 4}}
    lora = {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}
    keepmix.train(make_run("same", **run), progress="quiet")
    folder = make_run("same", **run, model=lora, output="lora").parent
    files = sorted((folder / "cache" / "generated").glob("self-*.jsonl"))
    assert len(files) == 1
    text, mtime = files[0].read_bytes(), files[0].stat().st_mtime_ns
    keepmix.train(folder / "run.yaml", progress="quiet")  # the LoRA run reads the plain run's file
    assert files[0].stat().st_mtime_ns == mtime
    files[0].unlink()
    keepmix.train(make_run("same", **run, model=lora, output="lora2"), progress="quiet")
    assert sorted((folder / "cache" / "generated").glob("self-*.jsonl")) == files
    assert files[0].read_bytes() == text  # sampled by the LoRA model: the very same documents
    mtime = files[0].stat().st_mtime_ns
    evaluate(folder / "run.yaml", ["base"])
    assert sorted((folder / "cache" / "generated").glob("self-*.jsonl")) == files
    assert files[0].stat().st_mtime_ns == mtime
    # the fingerprint: a fresh adapter's model is its base; one that has learned something is another model
    cfg = load_config(folder / "run.yaml")
    adapted, plain = load_configured(cfg)[0], load_configured(cfg, lora=False)[0]
    assert model_fingerprint(adapted) == model_fingerprint(plain)
    with torch.no_grad():
        next(p for name, p in adapted.named_parameters() if "lora_B" in name).add_(1e-3)
    assert model_fingerprint(adapted) != model_fingerprint(plain)
