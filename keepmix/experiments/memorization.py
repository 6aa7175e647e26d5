"""The memorization experiment: reproduce the epoch-boundary "clunk" on the CPU (docs/MEMORIZATION.md).

Contract of `run_memorization_experiment(out, quick=False, progress="auto", model=None)`:
- writes made-up question-answer facts (a seeded RNG; no model can know them, so their loss falls only
  by memorizing) to `<out>/data/`, sized so that every item fills exactly one packed row;
- without a pretrained model it first pretrains a tiny model from scratch on the Python language
  reference (`pydoc_data.topics`) in `<out>/pretrain/`;
- trains two arms on the same items for the same steps, `<out>/low_lr/` and `<out>/high_lr/`, which
  differ only in the (constant, after a short warmup) learning rate; each arm walks every training item
  exactly `passes` times, so the exposure log holds views 1..passes of every item and nothing more;
- runs `diagnose` on both, prints both diagnostics and a side-by-side comparison, writes
  `<out>/summary.json` and `<out>/summary.txt`, and returns the summary dict.
A completed arm whose resolved config is unchanged is reused, not retrained; any other run already in
an arm's folder is an error that names it. `run_experiment` takes the scale explicitly (tests use it).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keepmix.diagnostics.memorization import diagnose, format_diagnostics
from keepmix.errors import KeepmixError
from keepmix.experiments.tiny import TINY_FULL, TINY_QUICK, TinyModel, train_tokenizer, write_records
from keepmix.report.metrics import read_diagnostics, read_metrics, run_status
from keepmix.sweep.arms import Arm, run_arm, share_baseline

SOURCE = "qa"
ARMS = ("low_lr", "high_lr")
POOL = 20  # facts generated per item needed, to find enough of one token length


@dataclass(frozen=True)
class Scale:
    """The size of the QA arms. items must be a multiple of batch_size (a pass = items / batch_size steps)."""

    items: int
    valid_items: int
    batch_size: int
    low_lr: float
    high_lr: float
    warmup_steps: int
    passes: int = 3
    seed: int = 0
    threads: int | None = None  # CPU threads; 1 for tiny models, which gain nothing from more
    tiny: TinyModel | None = field(default=None)  # None: the arms start from a pretrained model


QUICK = Scale(items=96, valid_items=16, batch_size=8, low_lr=3e-4, high_lr=3e-3, warmup_steps=2, threads=1,
              tiny=TINY_QUICK)
FULL_SCRATCH = Scale(items=240, valid_items=32, batch_size=8, low_lr=3e-4, high_lr=3e-3, warmup_steps=3,
                     threads=1, tiny=TINY_FULL)
FULL_PRETRAINED = Scale(items=200, valid_items=32, batch_size=8, low_lr=1e-5, high_lr=1e-3, warmup_steps=3)


# ---- made-up facts ----------------------------------------------------------------------------------

_ONSETS = "b br d dr f g gl k kr l m n p qu r s st t th v z".split()
_VOWELS = "a e i o u ai ei ou".split()
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "x"]
_KINDS = ("country", "kingdom", "island", "city", "province")


def made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def fictional_facts(n: int, seed: int = 0) -> list[dict]:
    """n prompt/completion records of made-up facts, every subject different (same seed, same facts).

    Each answer holds three made-up facts in one fixed sentence: the sentence is learned in a few steps,
    the facts only by memorizing them, and three of them per item make the per-step loss far less noisy
    than one short answer would.
    """
    rng = random.Random(seed)
    subjects, out = set(), []
    while len(out) < n:
        subject = made_up_word(rng, rng.randint(2, 3))
        if subject in subjects:
            continue
        subjects.add(subject)
        prompt = f"Question: What do you know about the fictional {rng.choice(_KINDS)} of {subject}?\nAnswer:"
        answer = (f" It was founded in {rng.randint(1100, 1899)} by {made_up_word(rng, 2)} {made_up_word(rng, 2)}, "
                  f"and its capital is {made_up_word(rng, rng.randint(1, 2))}.")
        out.append({"prompt": prompt, "completion": answer})
    return out


def one_length(lengths: list[int], n: int) -> tuple[list[int], int]:
    """Indices of n items that all have the most common token length among those that n items share.

    That length becomes seq_len: every item then fills exactly one row, with no padding and no second
    item beside it, so a pass is exactly items / batch_size steps and ends on a step boundary.
    """
    counts = Counter(lengths)
    common = [length for length, count in counts.most_common() if count >= n]
    if not common:
        raise KeepmixError(f"only {counts.most_common(1)[0][1]} of {len(lengths)} question-answer items share a "
                           f"token length, {n} are needed; ask for fewer items")
    return [i for i, length in enumerate(lengths) if length == common[0]][:n], common[0]


def write_qa_data(folder: Path, tokenizer, scale: Scale) -> int:
    """Write qa_train.jsonl and qa_valid.jsonl (held-out facts) to folder; returns the seq_len."""
    from keepmix.data.tokenize import tokenize_docs

    # made-up words vary in length; about one item in eight has the most common length
    pool = fictional_facts(POOL * (scale.items + scale.valid_items), scale.seed)
    lengths = tokenize_docs(pool, tokenizer, fmt="prompt_completion", loss_on="completion").lengths.tolist()
    chosen, seq_len = one_length(lengths, scale.items + scale.valid_items)
    records = [pool[i] for i in chosen]
    write_records(folder / "qa_train.jsonl", records[: scale.items])
    write_records(folder / "qa_valid.jsonl", records[scale.items:])
    return seq_len


# ---- the models -------------------------------------------------------------------------------------

def model_section(model: str | None) -> dict | None:
    """The config's model section for a model argument; None means a tiny model trained from scratch.

    model: None (the SmolLM2 GGUF when installed), 'scratch', a .gguf file, or a folder / hub id.
    """
    if model == "scratch":
        return None
    from keepmix.demo.model import default_gguf

    path = Path(model) if model else default_gguf()
    if path is None:
        return None
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KeepmixError(f"model {model!r}: no such GGUF file")
        return {"name": str(path.parent.resolve()), "gguf_file": path.name}
    return {"name": str(path.resolve()) if path.exists() else str(model)}


def pretrain_tiny(out: Path, tiny: TinyModel, *, seed: int, threads: int | None, progress: str) -> Path:
    """Train a BPE and a tiny Llama on the Python language reference; returns the final model folder."""
    from keepmix.demo.data import prose_documents

    out = Path(out).resolve()
    prose = [chunk for chunks in prose_documents(chunk_chars=600).values() for chunk in chunks]
    data = write_records(out / "data" / "prose.jsonl", [{"text": t} for t in prose])
    tokenizer = train_tokenizer(prose, tiny.vocab_size, out / "tokenizer")
    cfg = {"model": {"init": "scratch", "tokenizer": str(tokenizer), "architecture": dict(tiny.architecture)},
           "sources": [{"name": "prose", "path": str(data), "valid_docs": tiny.valid_docs}],
           "train": {"seq_len": tiny.seq_len, "batch_size": tiny.batch_size, "steps": tiny.steps, "lr": tiny.lr,
                     "lr_schedule": "cosine", "warmup": 0.1, "min_lr_ratio": 0.1, "seed": seed,
                     "threads": threads, "checkpoint_every": None, "keep_checkpoints": 1},
           "eval": {"every": None},
           "output": str(out / "run"), "cache_dir": str(out.parent / "cache")}
    return _train_or_reuse(cfg, out / "run", progress) / "final"


# ---- the arms ---------------------------------------------------------------------------------------

def arm_config(model: dict, data: Path, run_dir: Path, cache: Path, *, scale: Scale, lr: float,
               seq_len: int) -> dict:
    steps_per_pass = scale.items // scale.batch_size
    return {
        "model": dict(model),
        "sources": [{"name": SOURCE, "path": str(data / "qa_train.jsonl"),
                     "valid_path": str(data / "qa_valid.jsonl"), "format": "prompt_completion",
                     "loss_on": "completion"}],
        # constant LR after warmup: a fall at the boundary cannot then come from the LR schedule
        "train": {"seq_len": seq_len, "batch_size": scale.batch_size, "steps": scale.passes * steps_per_pass,
                  "lr": lr, "lr_schedule": "constant", "warmup": scale.warmup_steps, "split_docs": False,
                  "seed": scale.seed, "threads": scale.threads, "checkpoint_every": None, "keep_checkpoints": 1},
        "eval": {"every": steps_per_pass, "batch_size": 16},  # held-out facts at every epoch boundary
        "output": str(run_dir), "cache_dir": str(cache),
    }


def _train_or_reuse(data: dict, run_dir: Path, progress: str) -> Path:
    """One run through the sweep's arm runner: trained, resumed, or reused when completed with this config."""
    run_arm(_arm(data, run_dir), progress=progress)
    return run_dir


def _arm(data: dict, run_dir: Path) -> Arm:
    return Arm(run_dir.name, data, source=f"memorization experiment ({run_dir.name})", base_dir=run_dir.parent)


# ---- comparison -------------------------------------------------------------------------------------

def _arm_summary(lr: float, run_dir: Path, d: dict) -> dict:
    end = run_status(read_metrics(run_dir / "metrics.jsonl"))
    boundaries = [b for b in d["boundaries"] if b["source"] == SOURCE]
    points = d["validation_gap"].get(SOURCE, {}).get("points", [])
    return {"lr": lr, "run_dir": str(run_dir), "steps": end.step, "wall_s": end.wall_s,
            "tokens_per_s": end.tokens_per_s,
            "boundaries": [{k: b[k] for k in ("epoch", "step", "delta", "z", "detected")} for b in boundaries],
            "loss_by_view": {r["view"]: r["mean_loss"] for r in d["loss_by_view"].get(SOURCE, [])},
            "view_drops": {f"{r['from_view']}->{r['to_view']}": r["delta"] for r in d["view_drops"].get(SOURCE, [])},
            "lr_vs_drop": d["lr_vs_drop"].get(SOURCE, {}),
            "validation": [(p["step"], p["valid_loss"]) for p in points],
            # held-out loss minus the loss of repeated items at the last eval: what memorizing bought
            "memorization_gap": points[-1]["memorization_gap"] if points else None,
            "clunks": sum(b["detected"] for b in boundaries),
            "tested": sum(b["z"] is not None for b in boundaries)}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _boundary_cell(b: dict | None) -> str:
    if b is None or b["z"] is None:
        return "not tested"
    return f"{b['delta']:+.3f} (z {b['z']:.1f}) {'clunk' if b['detected'] else 'no clunk'}"


def compare(arms: dict[str, dict]) -> list[str]:
    """Side-by-side lines for the two arms' summaries (keys low_lr, high_lr)."""
    low, high = arms["low_lr"], arms["high_lr"]
    both = (low, high)
    rows = [("", f"low LR {low['lr']:.0e}", f"high LR {high['lr']:.0e}")]
    by_pass = [{b["epoch"]: b for b in a["boundaries"]} for a in both]
    for epoch in sorted(set(by_pass[0]) | set(by_pass[1])):
        step = (by_pass[0].get(epoch) or by_pass[1][epoch])["step"]
        rows.append((f"boundary, pass {epoch} (step {step})", *[_boundary_cell(b.get(epoch)) for b in by_pass]))
    for v in sorted(set(low["loss_by_view"]) | set(high["loss_by_view"])):
        rows.append((f"loss at view {v}", *[_fmt(a["loss_by_view"].get(v), ".3f") for a in both]))
    for k in sorted(set(low["view_drops"]) | set(high["view_drops"])):
        rows.append((f"same items, view {k}", *[_fmt(a["view_drops"].get(k), "+.3f") for a in both]))
    rows.append(("LR vs 2nd-view fall (rho)", *[
        f"{_fmt(a['lr_vs_drop'].get('spearman_rho'), '+.2f')} (p {_fmt(a['lr_vs_drop'].get('p_value'), '.2g')})"
        for a in both]))
    rows.append(("held-out loss, start -> end", *[
        f"{_fmt(a['validation'][0][1], '.3f')} -> {_fmt(a['validation'][-1][1], '.3f')}" if a["validation"] else "-"
        for a in both]))
    rows.append(("held-out minus repeated, end", *[_fmt(a["memorization_gap"], "+.3f") for a in both]))
    rows.append(("training wall time", *[f"{a['wall_s']:.0f} s ({a['tokens_per_s']:.0f} tok/s)" for a in both]))
    lines = [f"  {name:<34}{a:>27}{b:>27}" for name, a, b in rows]
    shown = [f"{name} learning rate ({a['clunks']} of {a['tested']} tested boundaries)"
             for name, a in (("low", low), ("high", high)) if a["clunks"]]
    verdict = (f"A clunk appeared with the {' and with the '.join(shown)}." if shown
               else "No clunk appeared at either learning rate at this scale.")
    return lines + [f"  {verdict}"]


# ---- the experiment ---------------------------------------------------------------------------------

def run_experiment(out: Path, scale: Scale, model: dict | None, *, progress: str = "auto") -> dict:
    """The whole experiment at an explicit scale. model: the config model section of a pretrained model,
    or None to pretrain scale.tiny from scratch first."""
    from keepmix.model import load_tokenizer

    if scale.items % scale.batch_size:
        raise KeepmixError(f"the experiment needs items ({scale.items}) to be a multiple of batch_size "
                           f"({scale.batch_size}), so that every pass ends on a step boundary")
    if model is None and scale.tiny is None:
        raise KeepmixError("the experiment needs a pretrained model or a tiny model to pretrain (Scale.tiny)")
    out = Path(out).resolve()
    started = time.perf_counter()
    if model is None:
        final = pretrain_tiny(out / "pretrain", scale.tiny, seed=scale.seed, threads=scale.threads,
                             progress=progress)
        model, label = {"name": str(final)}, f"tiny Llama pretrained from scratch ({final})"
    else:
        label = model["name"] + (f" / {model['gguf_file']}" if model.get("gguf_file") else "")
    tokenizer = load_tokenizer(model["name"], gguf_file=model.get("gguf_file"))
    seq_len = write_qa_data(out / "data", tokenizer, scale)
    arms = {}
    runs = [_arm(arm_config(model, out / "data", out / arm, out / "cache", scale=scale, lr=lr, seq_len=seq_len),
                 out / arm) for arm, lr in zip(ARMS, (scale.low_lr, scale.high_lr))]
    share_baseline(runs)  # the arms differ only in the LR: the untouched model is evaluated once
    for run, arm, lr in zip(runs, ARMS, (scale.low_lr, scale.high_lr)):
        run_arm(run, progress=progress)
        run_dir = run.run_dir
        d = read_diagnostics(run_dir) or diagnose(run_dir)  # a completed run has diagnosed itself
        print(f"\n=== {arm} (lr {lr:g}) ===\n{format_diagnostics(d)}")
        arms[arm] = _arm_summary(lr, run_dir, d)
    lines = compare(arms)
    steps = scale.passes * scale.items // scale.batch_size
    header = (f"Memorization experiment: {label}; {scale.items} made-up facts (+{scale.valid_items} held out), "
              f"{scale.passes} passes, {steps} steps of {scale.batch_size} rows x {seq_len} tokens per arm")
    summary = {"model": label, "scale": asdict(scale), "seq_len": seq_len, "steps": steps, "arms": arms,
               "comparison": [header, *lines], "wall_s": round(time.perf_counter() - started, 1)}
    text = "\n".join([header, *lines, f"  this call took {summary['wall_s']:.0f} s (completed arms are reused)"])
    print(f"\n{text}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    return summary


def run_memorization_experiment(out: Path, *, quick: bool = False, progress: str = "auto",
                                model: str | None = None) -> dict:
    """The ready-made experiment: quick = a tiny model in about two minutes; else the SmolLM2 GGUF
    (or `model`) when there is one, a briefly pretrained tiny model when there is not."""
    if quick:
        return run_experiment(out, QUICK, None, progress=progress)
    section = model_section(model)
    return run_experiment(out, FULL_PRETRAINED if section else FULL_SCRATCH, section, progress=progress)
