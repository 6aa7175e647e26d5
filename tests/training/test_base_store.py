"""BaseHiddenStore: a file is read only by a computation that would have produced the same bits."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from keepmix.training.base_store import BaseHiddenStore, rows_key
from keepmix.training.forward import FrozenBase


def _model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


ROWS = torch.arange(24).reshape(2, 12) % 64, torch.arange(12).repeat(2, 1)
KEY, CPU = rows_key(*ROWS), torch.device("cpu")


def test_a_second_base_reads_what_the_first_wrote(tmp_path):
    first = FrozenBase(_model(), as_is=True, store=tmp_path)
    computed = first.hidden(*ROWS, remember=True)
    assert first.store.writes == 1 and first.store.hits == 0

    second = FrozenBase(_model(), as_is=True, store=tmp_path)
    second.trunk.forward = None  # the trunk must not run: the states come from the file
    assert torch.equal(second.hidden(*ROWS, remember=True), computed)
    assert second.store.hits == 1
    training = FrozenBase(_model(), as_is=True, store=tmp_path)
    training.hidden(*ROWS, remember=False)  # training rows: neither read nor written
    assert training.store.hits == training.store.writes == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_other_weights_rows_or_threads_miss(tmp_path):
    store = BaseHiddenStore(tmp_path, _model().model)
    store.save(KEY, torch.ones(2, 12, 16))
    assert store.load(KEY, CPU) is not None

    nudged = _model()
    with torch.no_grad():
        weight = nudged.model.layers[0].mlp.up_proj.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one ulp
    assert BaseHiddenStore(tmp_path, nudged.model).load(KEY, CPU) is None
    assert BaseHiddenStore(tmp_path, _model(seed=1).model).load(KEY, CPU) is None
    assert store.load(rows_key(ROWS[0], ROWS[1].flip(1)), CPU) is None  # the same tokens at other positions
    assert store.load(rows_key(ROWS[0][:1], ROWS[1][:1]), CPU) is None

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert store.load(KEY, CPU) is None  # another summation order: another key
    finally:
        torch.set_num_threads(threads)
    assert store.load(KEY, CPU) is not None


def test_a_base_run_under_bf16_autocast_is_kept_apart_from_a_float32_one(tmp_path):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 run's held-out eval
        in_bf16 = FrozenBase(_model(), as_is=True, store=tmp_path).hidden(*ROWS, remember=True)
    in_fp32 = FrozenBase(_model(), as_is=True, store=tmp_path)
    computed = in_fp32.hidden(*ROWS, remember=True)
    assert in_fp32.store.hits == 0 and in_fp32.store.writes == 1  # the bf16 file was not read
    assert not torch.equal(computed.float(), in_bf16.float())
    assert torch.equal(computed, in_fp32.trunk(input_ids=ROWS[0], position_ids=ROWS[1]).last_hidden_state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = FrozenBase(_model(), as_is=True, store=tmp_path)
        assert torch.equal(again.hidden(*ROWS, remember=True), in_bf16) and again.store.hits == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_an_unreadable_file_is_computed_again(tmp_path):
    base = FrozenBase(_model(), as_is=True, store=tmp_path)
    expected = base.hidden(*ROWS)  # not remembered: nothing written
    assert not list(tmp_path.glob("*.safetensors"))
    base.hidden(*ROWS, remember=True)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # a write cut short elsewhere

    again = FrozenBase(_model(), as_is=True, store=tmp_path)
    assert torch.equal(again.hidden(*ROWS, remember=True), expected)
    assert again.store.hits == 0 and again.store.writes == 1  # the broken file is replaced
    assert torch.equal(FrozenBase(_model(), as_is=True, store=tmp_path).hidden(*ROWS, remember=True), expected)
