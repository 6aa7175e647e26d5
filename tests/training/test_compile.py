"""train.compile: the repeated decoder block compiled once for every layer, evals run eagerly, and the
compiled run trains like the eager one."""

import pytest
import torch
import transformers

import keepmix
from keepmix.training.compiled import repeated_blocks
from tests.conftest import TINY_LLAMA, train_records


def test_repeated_blocks_are_the_decoder_layers():
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, **arch))
    assert repeated_blocks(model) is model.model.layers
    assert repeated_blocks(torch.nn.Linear(2, 2)) is None


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_with_one_graph_for_all_layers(make_run, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold cache: a real compile
    settings = {"train": {"steps": 6, "checkpoint_every": None}, "eval": {"every": 3}}
    eager = keepmix.train(make_run("eager", **settings), progress="quiet")
    counters.clear()
    torch._dynamo.reset()
    blocks = keepmix.train(make_run("blocks", train={**settings["train"], "compile": "blocks"},
                                    eval=settings["eval"]), progress="quiet")
    # the tiny Llama has 2 decoder layers: both ran through one compiled graph (its forward; its
    # backward is compiled with it), and no eval, nor the final one, compiled anything
    assert TINY_LLAMA["num_hidden_layers"] >= 2
    assert counters["stats"]["unique_graphs"] == 1
    losses = [r["loss"] for r in train_records(eager.run_dir)]
    compiled = [r["loss"] for r in train_records(blocks.run_dir)]
    assert compiled == pytest.approx(losses, rel=1e-4)
    evals = train_records(eager.run_dir, "eval")
    for a, b in zip(evals, train_records(blocks.run_dir, "eval"), strict=True):
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    # the state dict is the model's own (no compiled-wrapper prefixes): the final model loads as usual
    model = transformers.AutoModelForCausalLM.from_pretrained(blocks.final_dir)
    assert not any("_orig_mod" in k for k in model.state_dict())


@pytest.mark.slow
def test_compiled_blocks_under_bf16_autocast_train_like_eager_bf16(make_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    train = {"steps": 4, "checkpoint_every": None, "precision": "bf16"}
    eager = keepmix.train(make_run("eager-bf16", train=train, eval={"every": None}), progress="quiet")
    torch._dynamo.reset()
    blocks = keepmix.train(make_run("blocks-bf16", train={**train, "compile": "blocks"}, eval={"every": None}),
                           progress="quiet")
    losses = [r["loss"] for r in train_records(eager.run_dir)]
    # bf16 products summed in another order by the fused kernels: bf16's tolerance, not float32's
    assert [r["loss"] for r in train_records(blocks.run_dir)] == pytest.approx(losses, rel=1e-2)
    assert train_records(blocks.run_dir, "start")[0]["precision"] == "bf16"
