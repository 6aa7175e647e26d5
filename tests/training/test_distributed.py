"""Two processes (gloo, CPU) see exactly the data one process sees, and resume exactly.

These launch `torchrun --nproc_per_node 2 -m keepmix train run.yaml`: the README's multi-GPU command
with the device count changed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keepmix.diagnostics.exposures import read_exposures
from tests.conftest import train_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RUN = {"train": {"steps": 10, "batch_size": 4, "checkpoint_every": 4}, "eval": {"every": 5}}


def launch(config: Path, processes: int, *args: str, wait: bool = True):
    if processes == 1:
        cmd = [sys.executable, "-m", "keepmix", "train", str(config), "--quiet", "--no-report", *args]
    else:
        # --standalone: torchrun picks a free port itself, so tests running side by side never collide
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "keepmix", "train", str(config), "--quiet", "--no-report", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    return proc


def exposures(run_dir: Path) -> list[tuple]:
    t = read_exposures(run_dir)
    cols = [t.column(c).to_pylist() for c in ("step", "source", "doc_id", "view")]
    return list(zip(*cols))


def test_two_processes_equal_one(make_run):
    one, two = make_run("one", **RUN), make_run("two", **RUN)
    launch(one, 1)
    launch(two, 2)
    a, b = one.parent / "out", two.parent / "out"
    # the same documents in the same global order, step by step
    assert exposures(a) == exposures(b)
    la = [r["loss"] for r in train_records(a)]
    lb = [r["loss"] for r in train_records(b)]
    assert len(la) == len(lb) == 10
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-5)
    assert [r["realized"] for r in train_records(a)] == [r["realized"] for r in train_records(b)]
    ea, eb = train_records(a, "eval"), train_records(b, "eval")
    for x, y in zip(ea, eb):
        assert y["metrics"] == pytest.approx(x["metrics"], rel=1e-4)
    assert train_records(b, "start")[0]["world_size"] == 2
    # no document twice within one pass of its source, across both processes: in global order, the
    # segments of a document (a long one continues in its source's next row) form one unbroken run
    finished = set()
    last = {}
    for step, source, doc, view in exposures(b):
        key = (source, view)
        if last.get(key) != doc:
            assert (source, view, doc) not in finished, (step, source, doc, view)
            if key in last:
                finished.add((source, view, last[key]))
            last[key] = doc


def test_two_process_run_killed_and_resumed_equals_uninterrupted(make_run):
    cfg = {"train": {"steps": 16, "batch_size": 4, "checkpoint_every": 3}, "eval": {"every": 8}}
    whole, killed = make_run("whole", **cfg), make_run("killed", **cfg)
    launch(whole, 2)
    proc = launch(killed, 2, wait=False)
    metrics = killed.parent / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed:\n" + proc.stdout.read())
        if metrics.exists() and '"step": 7,' in metrics.read_text():
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    launch(killed, 2, "--resume")
    a, b = whole.parent / "out", killed.parent / "out"
    assert [r["loss"] for r in train_records(b)] == [r["loss"] for r in train_records(a)]
    assert exposures(a) == exposures(b)
    assert train_records(b, "start")[-1]["resumed_from"] is not None


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted((run_dir / "final").glob("*.safetensors")) for k, v in load_file(f).items()}


def test_fsdp_equals_one_process_and_resumes_exactly(make_run):
    """Sharded weights and optimizer state (train.fsdp) change where the numbers live, not the numbers."""
    import torch

    fsdp = {"train": {**RUN["train"], "fsdp": True}, "eval": RUN["eval"]}
    one, whole, halves = make_run("one", **RUN), make_run("fsdp", **fsdp), make_run("halves", **fsdp)
    launch(one, 1)
    launch(whole, 2)
    launch(halves, 2, "--stop-at", "4")
    launch(halves, 2, "--resume")
    a, b, c = (p.parent / "out" for p in (one, whole, halves))
    assert exposures(a) == exposures(b) == exposures(c)
    la, lb, lc = ([r["loss"] for r in train_records(x)] for x in (a, b, c))
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-5)
    assert lc == lb  # the sharded checkpoint restores every bit
    for x, y in zip(train_records(a, "eval"), train_records(b, "eval")):
        assert y["metrics"] == pytest.approx(x["metrics"], rel=1e-4, abs=1e-7)
    # each process wrote its own shard; no whole-model copy in the checkpoint
    ckpt = b / "checkpoints" / "step-00000010"
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2
    assert not (ckpt / "weights.safetensors").exists() and not (ckpt / "optimizer.pt").exists()
    # final/ holds the whole model, gathered from the shards
    wa, wb, wc = final_weights(a), final_weights(b), final_weights(c)
    assert set(wa) == set(wb) == set(wc)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
        assert torch.equal(wc[k], wb[k])


def test_fsdp_with_lora_tied_embeddings_checkpointing_and_tasks(make_run):
    """LoRA under FSDP with gradient checkpointing, a model whose head shares the embedding, and task evals
    that need every process."""
    from transformers import AutoModelForCausalLM

    examples = ROOT / "examples" / "tasks"
    tasks = [{"name": "mc", "kind": "multiple_choice", "path": str(examples / "general_choice.jsonl"), "limit": 6},
             {"name": "sql", "kind": "sql_execution", "path": str(examples / "shop_sql.jsonl"),
              "database": str(examples / "shop.sqlite"), "max_new_tokens": 6, "limit": 3}]
    cfg = {"model": {"architecture": {"tie_word_embeddings": True},
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "merge": True}},
           "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 4}, "eval": {"every": 2, "tasks": tasks}}
    one = make_run("one", **cfg)
    # the sharded run also recomputes activations in backward (gradient checkpointing): same numbers
    two = make_run("two", **{**cfg, "model": {**cfg["model"], "gradient_checkpointing": True},
                             "train": {**cfg["train"], "fsdp": True}})
    launch(one, 1)
    launch(two, 2)
    a, b = one.parent / "out", two.parent / "out"
    for x, y in zip(train_records(a, "eval"), train_records(b, "eval"), strict=True):
        assert {"task/mc/acc", "task/sql/acc", "valid/qa/kl_to_base"} <= set(y["metrics"])
        # kl_to_base is a small difference of log-probabilities (about 1e-6 here): float noise is absolute
        assert y["metrics"] == pytest.approx(x["metrics"], rel=1e-4, abs=1e-7)
    assert [r["loss"] for r in train_records(b)] == pytest.approx([r["loss"] for r in train_records(a)], rel=1e-4)
    assert (b / "checkpoints" / "step-00000004" / "sharded").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(b / "final")  # the adapter merged into a whole model
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    reference = AutoModelForCausalLM.from_pretrained(a / "final")
    for (name, p), q in zip(merged.named_parameters(), reference.parameters(), strict=True):
        assert p.shape == q.shape and (p - q).abs().max() < 1e-5, name


def test_kl_and_l2_to_base_under_two_processes_equal_one(make_run):
    """The KL term's base forward and the anchor's gradient are per process: DDP sees the same objective."""
    import yaml

    cfg = {"train": {**RUN["train"], "l2_to_base": 2.0}, "eval": RUN["eval"]}
    one, two = make_run("one", **cfg), make_run("two", **cfg)
    for config in (one, two):
        data = yaml.safe_load(config.read_text())
        data["sources"][0]["kl_to_base"] = 1.0
        config.write_text(yaml.safe_dump(data))
    launch(one, 1)
    launch(two, 2)
    a, b = (train_records(p.parent / "out") for p in (one, two))
    for key in ("loss", "kl_term", "l2_term", "objective"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-6), key
    assert any(r["kl_term"] > 0 for r in a) and a[-1]["l2_term"] > 0


def test_two_processes_take_the_guards_decisions_of_one(make_run, general_model):
    """The probe's sums are reduced over processes before the guard decides: both processes draw the same
    guarded plan, and it is the plan one process draws."""
    from tests.conftest import deep_update, forgetting_run

    guard = {"sources": ["general"], "every": 2, "probe_docs": 10, "max_share": 0.5, "gain": 0.25}
    cfg = deep_update(forgetting_run(general_model, guard), {"train": {"steps": 12, "batch_size": 4}})
    one, two = make_run("one", **cfg), make_run("two", **cfg)
    launch(one, 1)
    launch(two, 2)
    a, b = one.parent / "out", two.parent / "out"
    assert exposures(a) == exposures(b)  # the same rows from the same sources, step by step
    ga, gb = ([r["guarded"]["general"] for r in train_records(x)] for x in (a, b))
    assert gb == pytest.approx(ga, abs=1e-6) and max(ga) > 0
