"""The knowledge experiment: can continued pre-training put new facts into a model, and how does it combine
with retrieval? (docs/EXPERIMENTS.md, "Knowledge: new facts, with and without retrieval")

Contract of `run_knowledge_experiment(out, quick=False, progress="auto", model=None, seed=0)`:
- writes made-up facts (a seeded RNG: "The capital of <made-up place> is <made-up city>.", so no model can
  know them) to `<out>/data/`: `facts.jsonl` (one document per fact, with its id), `facts_k.jsonl` (each
  fact in k wordings: its document and k − 1 templated paraphrases, `keepmix.data.knowledge`),
  `questions.jsonl` (one held-out multiple-choice question per fact, in a wording no document uses, the
  other choices being other facts' cities, and the fact's id as `gold_doc`), `raft.jsonl` (RAFT-style rows
  on separate practice facts: question + BM25-retrieved documents with distractors -> answer), and the
  general text (the Python language reference, `pydoc_data.topics`);
- without a pretrained model (quick, or no SmolLM2 installed) it first pretrains a tiny model on the
  general text (`keepmix.experiments.memorization.pretrain_tiny`);
- trains three arms through the sweep's arm runner (keepmix.sweep.arms), same steps, rows and LR, each
  with the same kept share of general text: `cpt_x1` (the fact documents), `cpt_xk` (the k wordings),
  `raft` (the k wordings and the RAFT rows, half each). The base model is the shared step-0 eval. Every
  eval scores the questions closed-book and open-book (an `open_book` task retrieving from the `facts`
  source) and the general text's held-out loss and token accuracy;
- prints and writes `<out>/knowledge.md`, `<out>/knowledge.json` and `<out>/knowledge.png`: accuracy
  closed / open per arm (base = the untouched model), recall@k, the general text's retention, and a
  reading written from the numbers. Completed arms whose config is unchanged are reused.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from keepmix.data.knowledge import raft_examples, templated_paraphrases
from keepmix.errors import KeepmixError
from keepmix.eval.retrieval import Corpus
from keepmix.experiments.memorization import made_up_word, model_section, pretrain_tiny
from keepmix.experiments.tiny import TINY_FULL, TINY_QUICK, TinyModel, write_records
from keepmix.report.metrics import evals, read_metrics, run_status
from keepmix.sweep.arms import Arm, check_arms, run_arm, share_baseline

ARMS = ("cpt_x1", "cpt_xk", "raft")
TASK = "facts"
QUESTION = "Question: What is the capital of {subject}?\nAnswer:"
DOCUMENT = "The capital of {subject} is {capital}."
PARAPHRASES = [
    "{capital} is the capital of {subject}.",
    "{subject} has its capital in {capital}.",
    "The seat of government of {subject} is in {capital}.",
    "In {subject}, the capital city is {capital}.",
    "{subject}'s capital city is called {capital}.",
    "People in {subject} call {capital} their capital.",
    "Travellers to {subject} usually arrive in its capital, {capital}.",
    "The largest city and capital of {subject} is {capital}.",
    "{capital}, the capital, lies at the heart of {subject}.",
    "Maps of {subject} mark {capital} as the capital.",
]
TEMPLATE = "{documents}\n{question}"


@dataclass(frozen=True)
class Settings:
    facts: int  # facts asked about (their documents are trained on; their questions never)
    practice: int  # other facts, whose questions the RAFT rows practise on
    wordings: int  # k: each fact in k wordings in the x k arms (its document + k - 1 paraphrases)
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    fact_share: float  # share of the knowledge sources; general text has the rest
    k: int = 2  # documents retrieved per question
    choices: int = 4
    seed: int = 0
    threads: int | None = None
    valid_docs: int = 32  # held-out general documents (retention)
    tiny: TinyModel | None = None  # None: a pretrained model


QUICK = Settings(facts=48, practice=200, wordings=5, steps=300, batch_size=8, seq_len=96, lr=3e-3, fact_share=0.5,
                 threads=1, tiny=replace(TINY_QUICK, steps=300))
FULL_SCRATCH = Settings(facts=100, practice=100, wordings=10, steps=240, batch_size=8, seq_len=128, lr=2e-3,
                        fact_share=0.5, k=3, threads=1, tiny=TINY_FULL)
# SmolLM2-135M trains at ~180 tokens/s on the 2-core CPU (measured in the replay sweep): 3 arms x 30 steps x
# 8 x 96 tokens is ~6 minutes of training, the 100 questions x 4 choices x 2 prompts per eval a few more.
FULL_PRETRAINED = Settings(facts=100, practice=200, wordings=10, steps=30, batch_size=8, seq_len=96, lr=1e-4,
                           fact_share=0.5, k=3)


# ---- the data ---------------------------------------------------------------------------------------

def made_up_facts(n: int, seed: int) -> list[dict]:
    """n facts {id, subject, capital, text} with distinct made-up places and cities (same seed, same facts)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    facts = []
    while len(facts) < n:
        subject, capital = made_up_word(rng, rng.randint(2, 3)), made_up_word(rng, 2)
        if subject in seen or capital in seen:
            continue
        seen.update((subject, capital))
        facts.append({"id": f"fact-{len(facts)}", "subject": subject, "capital": capital,
                      "text": DOCUMENT.format(subject=subject, capital=capital)})
    return facts


def questions_for(facts: list[dict], choices: int, seed: int) -> list[dict]:
    """One multiple-choice question per fact; the wrong choices are other facts' cities."""
    rng = random.Random(f"questions:{seed}")
    out = []
    for i, fact in enumerate(facts):
        others = rng.sample([f["capital"] for j, f in enumerate(facts) if j != i], choices - 1)
        gold = rng.randrange(choices)
        options = others[:gold] + [fact["capital"]] + others[gold:]
        out.append({"question": QUESTION.format(subject=fact["subject"]), "choices": options,
                    "gold": gold, "answer": fact["capital"], "gold_doc": fact["id"]})
    return out


def _write(path: Path, rows: list[dict]) -> str:
    return str(write_records(path, rows))


def write_data(folder: Path, s: Settings, prose: str | None) -> dict[str, str]:
    """The experiment's files (see the module doc); `prose`: the general text's file, else written here."""
    from keepmix.demo.data import prose_documents

    facts = made_up_facts(s.facts + s.practice, s.seed)
    asked, practice = facts[: s.facts], facts[s.facts:]
    rewrites = templated_paraphrases(asked, PARAPHRASES, s.wordings - 1, s.seed)
    wordings = [{"text": t, "id": f["id"]} for f, rs in zip(asked, rewrites) for t in [f["text"], *rs]]
    corpus = Corpus(tuple(f["id"] for f in practice), tuple(f["text"] for f in practice))
    raft = raft_examples(questions_for(practice, s.choices, s.seed), corpus, k=s.k, p_gold=0.8, seed=s.seed,
                         template=TEMPLATE)
    if prose is None:
        prose = _write(folder / "prose.jsonl", [{"text": t} for chunks in prose_documents(chunk_chars=600).values()
                                                for t in chunks])
    return {"prose": prose,
            "facts": _write(folder / "facts.jsonl", [{"id": f["id"], "text": f["text"]} for f in asked]),
            "facts_k": _write(folder / "facts_k.jsonl", wordings),
            "questions": _write(folder / "questions.jsonl", questions_for(asked, s.choices, s.seed)),
            "raft": _write(folder / "raft.jsonl", raft)}


# ---- the arms ---------------------------------------------------------------------------------------

def arm_weights(arm: str, share: float) -> dict[str, float]:
    knowledge = {"cpt_x1": {"facts": share}, "cpt_xk": {"facts_k": share},
                 "raft": {"facts_k": share / 2, "raft": share / 2}}[arm]
    return {"prose": 1 - share, "facts": 0.0, "facts_k": 0.0, "raft": 0.0, **knowledge}


def arm_config(arm: str, model: dict, files: dict[str, str], out: Path, s: Settings) -> dict:
    """One arm's run config: every arm has the same sources (so one baseline serves all), their weights differ."""
    return {
        "model": dict(model),
        "sources": [{"name": "prose", "path": files["prose"], "valid_docs": s.valid_docs},
                    {"name": "facts", "path": files["facts"], "valid_docs": 0},
                    {"name": "facts_k", "path": files["facts_k"], "valid_docs": 0},
                    {"name": "raft", "path": files["raft"], "format": "prompt_completion", "loss_on": "completion",
                     "valid_docs": 0}],
        "mixture": {"schedule": [{"at": 0.0, "weights": arm_weights(arm, s.fact_share)}]},
        "train": {"seq_len": s.seq_len, "batch_size": s.batch_size, "steps": s.steps, "lr": s.lr,
                  "lr_schedule": "cosine", "warmup": 0.1, "min_lr_ratio": 0.1, "seed": s.seed, "threads": s.threads,
                  "checkpoint_every": None, "keep_checkpoints": 1},
        "eval": {"every": s.steps, "batch_size": 16, "kl_to_base": False,
                 "tasks": [{"name": TASK, "kind": "open_book", "scoring": "multiple_choice",
                            "path": files["questions"], "corpus": "facts", "k": s.k, "template": TEMPLATE}]},
        "output": str(out / arm), "cache_dir": str(out / "cache"),
    }


# ---- the table and its reading ----------------------------------------------------------------------

def row_of(m: dict[str, float], k: int, base: dict[str, float] | None = None) -> dict:
    t = f"task/{TASK}"
    row = {"closed": m[f"{t}/closed/acc"], "open": m[f"{t}/open/acc"], "recall": m.get(f"{t}/recall@{k}"),
           "prose_token_acc": m["valid/prose/token_acc"], "prose_loss": m["valid/prose/loss"]}
    if base is not None:
        row["prose_delta"] = row["prose_token_acc"] - base["valid/prose/token_acc"]
    return row


NAMES = {"base": "base (untouched)", "cpt_x1": "CPT on the facts x1", "cpt_xk": "CPT on the facts x k wordings",
         "raft": "CPT x k + RAFT rows"}


def markdown(rows: dict[str, dict], s: Settings, label: str) -> str:
    lines = [f"Knowledge experiment: {label}; {s.facts} made-up facts (+{s.practice} RAFT practice facts), "
             f"k = {s.wordings} wordings, {s.steps} steps of {s.batch_size} x {s.seq_len} tokens per arm, "
             f"{1 - s.fact_share:.0%} general text kept; {s.choices} choices (chance {1 / s.choices:.0%}), "
             f"top-{s.k} BM25.", "",
             "| arm | closed-book acc | open-book acc (retrieval) | recall@k | general token acc (change) | "
             "general loss |", "|---|---|---|---|---|---|"]
    for arm, r in rows.items():
        delta = "" if "prose_delta" not in r else f" ({r['prose_delta'] * 100:+.1f} pts)"
        recall = "-" if r["recall"] is None else f"{r['recall']:.0%}"
        lines.append(f"| {NAMES[arm].replace('x k', f'x{s.wordings}')} | {r['closed']:.1%} | {r['open']:.1%} | "
                     f"{recall} | {r['prose_token_acc']:.1%}{delta} | {r['prose_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def _cmp(a: float, b: float, n: int) -> str:
    """'above' / 'below' / 'level with' at the resolution of one question in n."""
    if abs(a - b) < 1 / n - 1e-9:
        return "level with"
    return "above" if a > b else "below"


def reading(rows: dict[str, dict], s: Settings) -> list[str]:
    """Sentences derived from the numbers alone."""
    b, x1, xk, raft = (rows[a] for a in ("base", *ARMS))
    chance, n = 1 / s.choices, s.facts
    out = [f"The untouched model answers {b['closed']:.0%} closed-book ({_cmp(b['closed'], chance, n)} chance, "
           f"{chance:.0%}) and {b['open']:.0%} with the retrieved documents in front of the question "
           f"(recall@{s.k} {b['recall']:.0%})."]
    out.append(f"Continued pre-training on the fact documents moved closed-book accuracy to {x1['closed']:.0%} "
               f"(x1) and {xk['closed']:.0%} (x{s.wordings}); x{s.wordings} is {_cmp(xk['closed'], x1['closed'], n)} "
               f"x1 (Ovadia et al. 2024: 0.504 -> 0.588 with 10 paraphrases).")
    best_closed = max(x1["closed"], xk["closed"])
    out.append(f"Retrieval alone ({b['open']:.0%}) is {_cmp(b['open'], best_closed, n)} the best closed-book arm "
               f"({best_closed:.0%}) (Ovadia et al.: fine-tuning alone trails RAG on new facts); with retrieval the "
               f"trained arms reach {x1['open']:.0%} (x1), {xk['open']:.0%} (x{s.wordings}) and {raft['open']:.0%} "
               f"(RAFT), the RAFT arm {_cmp(raft['open'], xk['open'], n)} the same data without RAFT rows.")
    worst = min(ARMS, key=lambda a: rows[a]["prose_delta"])
    deltas = ", ".join(f"{rows[a]['prose_delta'] * 100:+.1f}" for a in ARMS)
    fall = (f"the largest fall is {worst}'s ({rows[worst]['prose_delta'] * 100:+.1f})"
            if rows[worst]["prose_delta"] < 0 else "none fell")
    out.append(f"General text: token accuracy changed by {deltas} points (x1, x{s.wordings}, RAFT) with "
               f"{1 - s.fact_share:.0%} of every step kept for it; {fall}.")
    return out


def plot(rows: dict[str, dict], s: Settings, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    names = list(rows)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [rows[a]["closed"] for a in names], 0.4, label="closed-book")
    ax.bar([x + 0.2 for x in xs], [rows[a]["open"] for a in names], 0.4, label=f"open-book (top-{s.k} BM25)")
    ax.axhline(1 / s.choices, color="grey", linestyle=":", label="chance")
    label = {a: a.replace("_xk", f"_x{s.wordings}") for a in names}
    ax.set_xticks(list(xs), [label[a] for a in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy on held-out questions")
    ax.legend(fontsize=8)
    bx.bar([label[a] for a in ARMS], [rows[a]["prose_delta"] * 100 for a in ARMS], color="tab:green")
    bx.axhline(0, color="black", linewidth=0.8)
    bx.set_ylabel("general token acc change (pts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ---- the experiment ---------------------------------------------------------------------------------

def run_experiment(out: Path, s: Settings, model: dict | None, *, progress: str = "auto") -> dict:
    """The whole experiment at explicit settings; model: a config model section, or None (pretrain s.tiny)."""
    if model is None and s.tiny is None:
        raise KeepmixError("the knowledge experiment needs a pretrained model or a tiny model to pretrain")
    if not 1 <= s.wordings - 1 <= len(PARAPHRASES):
        raise KeepmixError(f"wordings must lie in 2..{len(PARAPHRASES) + 1}, got {s.wordings}")
    out = Path(out).resolve()
    started = time.perf_counter()
    prose = None
    if model is None:
        final = pretrain_tiny(out / "pretrain", s.tiny, seed=s.seed, threads=s.threads, progress=progress)
        model, label = {"name": str(final)}, "a tiny Llama pretrained from scratch on the Python reference"
        prose = str(out / "pretrain" / "data" / "prose.jsonl")  # its held-out split is the pretraining's too
    else:
        label = model["name"] + (f" / {model['gguf_file']}" if model.get("gguf_file") else "")
    files = write_data(out / "data", s, prose)
    arms = [Arm(a, arm_config(a, model, files, out, s), source=f"knowledge experiment ({a})", base_dir=out)
            for a in ARMS]
    check_arms(arms)
    share_baseline(arms)  # the same sources and tasks: the untouched model is evaluated once
    for arm in arms:
        print(f"knowledge experiment: arm {arm.name}", flush=True)
        run_arm(arm, progress=progress, keep_checkpoints=False)
    base = evals(read_metrics(out / ARMS[0] / "metrics.jsonl"))[0]["metrics"]
    rows = {"base": row_of(base, s.k)}
    walls = {}
    for arm in arms:
        records = read_metrics(arm.run_dir / "metrics.jsonl")
        rows[arm.name] = row_of(evals(records)[-1]["metrics"], s.k, base)
        walls[arm.name] = run_status(records).wall_s
    rows["base"]["prose_delta"] = 0.0
    text = markdown(rows, s, label)
    lines = reading(rows, s)
    summary = {"model": label, "settings": {k: v for k, v in asdict(s).items() if k != "tiny"}, "rows": rows,
               "reading": lines, "arm_wall_s": walls, "total_s": round(time.perf_counter() - started, 1)}
    plot(rows, s, out / "knowledge.png")
    (out / "knowledge.md").write_text(text + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    (out / "knowledge.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print("\n" + text + "\n" + "\n".join(lines) + f"\n(this call took {summary['total_s']:.0f} s; "
          f"written: {out / 'knowledge.md'}, knowledge.json, knowledge.png)", flush=True)
    return summary


def run_knowledge_experiment(out: Path, *, quick: bool = False, progress: str = "auto", model: str | None = None,
                             seed: int = 0) -> dict:
    """quick = a tiny model in about three minutes; else the SmolLM2 GGUF (or `model`) when there is one,
    a tiny model pretrained for longer when there is not."""
    if quick:
        return run_experiment(out, replace(QUICK, seed=seed), None, progress=progress)
    section = model_section(model)
    if section is not None and section.get("gguf_file"):
        from keepmix.demo.model import convert_gguf

        gguf = Path(section["name"]) / section["gguf_file"]
        section = {"name": str(convert_gguf(gguf, Path(out).resolve() / "model"))}
    settings = FULL_PRETRAINED if section else FULL_SCRATCH
    return run_experiment(out, replace(settings, seed=seed), section, progress=progress)
