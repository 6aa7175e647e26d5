"""The `keepmix` command: parse, load the config, call the Python API. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from keepmix.errors import KeepmixError


def _overrides(pairs: list[str]) -> dict:
    from keepmix.yamlfile import parse_override

    return dict(parse_override(pair) for pair in pairs or [])


def _progress(args) -> str:
    return "quiet" if getattr(args, "quiet", False) else "auto"


def cmd_train(args) -> None:
    from keepmix.config import load_config
    from keepmix.training.loop import train

    cfg = load_config(args.config, _overrides(args.set))
    args.crash_dir = Path(cfg.resolve_local(cfg.output))  # where an unexpected error's traceback goes
    result = train(cfg, resume=args.resume, progress=_progress(args), stop_at=args.stop_at)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one process reports
    _print_retention(result)
    from keepmix.report.metrics import read_diagnostics

    diagnostics = read_diagnostics(result.run_dir) or {}
    for line in diagnostics.get("summary", []):
        print(f"memorization: {line}")
    for line in diagnostics.get("guard", []):
        print(f"guard: {line.removeprefix('Retention guard: ')}")
    print(f"run directory: {result.run_dir}\nfinal model:   {result.final_dir or '(stopped early: resume with --resume)'}")
    if not args.no_report:
        _report([result.run_dir])


def _print_retention(result) -> None:
    from rich.console import Console

    from keepmix.eval.retention import drift_line, format_retention_table

    if result.retention:
        console = Console()
        console.print(format_retention_table(result.retention))
        if drift_line(result.metrics):
            console.print(drift_line(result.metrics), markup=False)
        end = [line for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "end"' in line]
        if end:
            import json

            summary = json.loads(end[-1]).get("summary")
            if summary:
                console.print(summary, markup=False)


def _report(run_dirs: list[Path]) -> None:
    from keepmix.report.html import render_report

    path = render_report([Path(r) for r in run_dirs])
    print(f"report:        {path}")


def _writable_file(path: Path, flag: str) -> Path:
    """Checked before the work that produces it: a results file that cannot be written fails now."""
    if path.is_dir():
        raise KeepmixError(f"{flag} {path}: is a folder; expected a file name (e.g. {path / 'eval.json'})")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise KeepmixError(f"{flag} {path}: {parent} is a file, so no folder can be made there")
    return path


def cmd_eval(args) -> None:
    from keepmix.eval.runner import evaluate, print_comparison

    out = _writable_file(Path(args.out), "--out") if args.out else None
    results = evaluate(args.config, models=args.model or ["base"], overrides=_overrides(args.set))
    print_comparison(results)
    if out:
        import json

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"written: {out}")


def cmd_report(args) -> None:
    _report(args.run_dirs)


def cmd_diagnose(args) -> None:
    from keepmix.diagnostics.exposures import has_exposures
    from keepmix.diagnostics.memorization import diagnose, format_diagnostics
    from keepmix.report.metrics import read_run

    read_run(args.run_dir)
    if not has_exposures(args.run_dir):
        raise KeepmixError(f"{args.run_dir}: the run has no exposure log yet (exposures/ is missing or empty; "
                           f"it is written at each checkpoint); nothing to diagnose")
    print(format_diagnostics(diagnose(Path(args.run_dir))))


def cmd_demo(args) -> None:
    from keepmix.demo.run import run_demo

    run_demo(out=Path(args.out), model=args.model, steps=args.steps, quick=args.quick, device=args.device,
             precision=args.precision, progress=_progress(args))


def cmd_experiment(args) -> None:
    from keepmix.experiments.memorization import run_memorization_experiment

    run_memorization_experiment(out=Path(args.out), quick=args.quick, progress=_progress(args))


def cmd_anchors(args) -> None:
    from keepmix.experiments.anchors import run_anchors_experiment

    run_anchors_experiment(out=Path(args.out), quick=args.quick, beta=args.beta, progress=_progress(args),
                           model=args.model)


def cmd_replay(args) -> None:
    from keepmix.experiments.replay import run_replay_experiment

    run_replay_experiment(out=Path(args.out), quick=args.quick, seeds=args.seeds, seed=args.seed,
                          shares=args.shares, progress=_progress(args))


def cmd_anneal(args) -> None:
    from keepmix.experiments.anneal import run_anneal_experiment

    run_anneal_experiment(out=Path(args.out), quick=args.quick, seed=args.seed, task_share=args.task_share,
                          progress=_progress(args))


def cmd_knowledge(args) -> None:
    from keepmix.experiments.knowledge import run_knowledge_experiment

    run_knowledge_experiment(out=Path(args.out), quick=args.quick, progress=_progress(args), model=args.model,
                             seed=args.seed)


def cmd_paraphrase(args) -> None:
    from keepmix.data.knowledge import paraphrase_file

    paraphrase_file(args.input, Path(args.output), args.k, templates=args.templates, model=args.model,
                    text_field=args.text_field, seed=args.seed, device=args.device)


def cmd_raft(args) -> None:
    from keepmix.data.knowledge import raft_file

    raft_file(args.questions, args.corpus, Path(args.output), k=args.k, p_gold=args.p_gold, seed=args.seed,
              template=args.template)


def cmd_sweep(args) -> None:
    from keepmix.sweep.run import run_sweep

    if args.list:
        from keepmix.sweep.spec import load_sweep

        sweep = load_sweep(args.sweep, output=args.output)
        for i, arm in enumerate(sweep.arms):
            print(f"{i}\t{arm.name}\t{arm.run_dir}")
        return
    run_sweep(args.sweep, parallel=args.parallel, arm=args.arm, collect=args.collect, verify=args.verify,
              progress=_progress(args), output=args.output, reports=not args.no_report)


def cmd_merge(args) -> None:
    from keepmix.sweep.merge import merge_run, parse_alphas

    write = parse_alphas(args.write)[0] if args.write is not None else None
    merge_run(args.run_dir, parse_alphas(args.alpha), write=write)
    if not args.no_report:
        _report([args.run_dir])


def build_parser() -> argparse.ArgumentParser:
    from keepmix import __version__

    p = argparse.ArgumentParser(prog="keepmix", description="Continued pre-training on a curated data mixture.")
    p.add_argument("--version", action="version", version=f"keepmix {__version__}")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a YAML config")
    t.add_argument("config", help="run YAML file")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--stop-at", type=_step, metavar="STEP", help="stop after this step with a checkpoint")
    t.add_argument("--quiet", action="store_true", help="plain log lines only (also when not a terminal)")
    t.add_argument("--no-report", action="store_true", help="skip plots and report.html at the end")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="run a config's evals on one or more models, side by side")
    e.add_argument("config", help="run YAML file (its sources' held-out docs and eval.tasks)")
    e.add_argument("--model", action="append",
                   help="model folder, RUN/checkpoints/step-N, or hub id; 'base' = the config's model (repeatable)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    e.add_argument("--out", help="also write the results as JSON here")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="render plots and report.html (two or more runs: overlaid)")
    r.add_argument("run_dirs", nargs="+", type=Path)
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("diagnose", help="memorization diagnostics of a run (loss by view, clunks)")
    d.add_argument("run_dir", type=Path)
    d.set_defaults(func=cmd_diagnose)

    m = sub.add_parser("demo", help="offline CPU demo: fine-tune-only vs keepmix on a real pretrained model")
    m.add_argument("--out", default="demo_runs", help="where the demo writes its data and runs")
    m.add_argument("--model", default=None, help="causal LM id or folder (default: SmolLM2-135M-Instruct GGUF)")
    m.add_argument("--steps", type=int, default=None, help="optimizer steps per arm")
    m.add_argument("--quick", action="store_true", help="a first look in about 3 minutes")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="train.precision of both arms (bf16: autocast, fast on CPUs with AMX; default auto)")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_demo)

    w = sub.add_parser("sweep", help="run a sweep of arms (grid / random mixtures / branches) and answer it")
    w.add_argument("sweep", help="sweep YAML file (docs/SWEEP.md)")
    w.add_argument("--parallel", type=int, default=1, metavar="N", help="arms at once (one GPU each, or CPU processes)")
    w.add_argument("--arm", metavar="NAME|INDEX", help="run only this arm (a cluster job); 'prefix' = the branch prefix")
    w.add_argument("--collect", action="store_true", help="train nothing: collect the arms and write the answer")
    w.add_argument("--verify", action="store_true", help="train the recommended mixture; predicted vs measured")
    w.add_argument("--list", action="store_true", help="print the arms (index, name, folder) and stop")
    w.add_argument("--output", help="the sweep's folder (default: the file's output:)")
    w.add_argument("--no-report", action="store_true", help="skip each arm's plots and report.html")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=cmd_sweep)

    g = sub.add_parser("merge", help="interpolate a run back toward its base model (θ0 + α(θ − θ0)), evaluated")
    g.add_argument("run_dir", type=Path)
    g.add_argument("--alpha", default="0,0.25,0.5,0.75,1", help="comma-separated α values")
    g.add_argument("--write", metavar="ALPHA", help="save the model at this α as a Hugging Face folder")
    g.add_argument("--no-report", action="store_true", help="do not re-render the run's report.html")
    g.set_defaults(func=cmd_merge)

    dt = sub.add_parser("data", help="make training data: paraphrased knowledge documents, RAFT-style examples")
    ds = dt.add_subparsers(dest="data", required=True)
    par = ds.add_parser("paraphrase", help="k rewrites of each document (templates, or written by a model; cached)")
    par.add_argument("input", help="JSONL records to paraphrase")
    par.add_argument("output", help="JSONL file to write: {text, id, paraphrase}")
    par.add_argument("--k", type=int, default=5, help="rewrites per document")
    par.add_argument("--templates", help="file of templates, one a line, over the records' fields ({text}, ...)")
    par.add_argument("--model", help="causal LM id or folder that writes the rewrites instead")
    par.add_argument("--text-field", default="text")
    par.add_argument("--seed", type=int, default=0)
    par.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    par.set_defaults(func=cmd_paraphrase)
    raft = ds.add_parser("raft", help="RAFT-style rows: question + retrieved documents (with distractors) -> answer")
    raft.add_argument("questions", help="JSONL with question, answer, gold_doc")
    raft.add_argument("corpus", help="corpus file (JSONL with id and text, or text paragraphs)")
    raft.add_argument("output", help="JSONL file to write: {prompt, completion}")
    raft.add_argument("--k", type=int, default=3, help="documents per example")
    raft.add_argument("--p-gold", type=float, default=0.8, help="share of examples that keep their gold document")
    raft.add_argument("--seed", type=int, default=0)
    raft.add_argument("--template", default="{documents}\n\n{question}", help="prompt with {documents} and {question}")
    raft.set_defaults(func=cmd_raft)

    x = sub.add_parser("experiment", help="ready-made experiments")
    xs = x.add_subparsers(dest="experiment", required=True)
    mem = xs.add_parser("memorization", help="reproduce the epoch-boundary 'clunk' at two learning rates")
    mem.add_argument("--out", default="experiment_runs/memorization")
    mem.add_argument("--quick", action="store_true")
    mem.add_argument("--quiet", action="store_true")
    mem.set_defaults(func=cmd_experiment)
    anc = xs.add_parser("anchors", help="what KL to the base and self-rehearsal buy against forgetting (demo setup)")
    anc.add_argument("--out", default="experiment_runs/anchors")
    anc.add_argument("--quick", action="store_true")
    anc.add_argument("--beta", type=float, default=1.0, help="kl_to_base of prose and code in the KL arm")
    anc.add_argument("--model", default=None, help="causal LM id or folder (default: SmolLM2-135M-Instruct GGUF)")
    anc.add_argument("--quiet", action="store_true")
    anc.set_defaults(func=cmd_anchors)
    rep = xs.add_parser("replay", help="forgetting of domain A against the share of A replayed while training on B")
    rep.add_argument("--out", default="experiment_runs/replay")
    rep.add_argument("--quick", action="store_true", help="a smaller model, 4 shares x 3 seeds, under 3 minutes")
    rep.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds per share (default 3)")
    rep.add_argument("--seed", type=int, default=0, help="the first seed")
    rep.add_argument("--shares", type=_shares, default=None, metavar="R,R,...",
                     help="replay shares in [0, 1) (default 0,0.01,0.05,0.1,0.25,0.5; quick 0,0.05,0.25,0.5)")
    rep.add_argument("--quiet", action="store_true")
    rep.set_defaults(func=cmd_replay)
    ann = xs.add_parser("anneal", help="from one checkpoint: anneal on general data, general + task, or the task alone")
    ann.add_argument("--out", default="experiment_runs/anneal")
    ann.add_argument("--quick", action="store_true", help="a smaller model and fewer steps, under 3 minutes")
    ann.add_argument("--seed", type=int, default=0)
    ann.add_argument("--task-share", type=float, default=None, help="task share of the mix arm's rows (default 0.3)")
    ann.add_argument("--quiet", action="store_true")
    ann.set_defaults(func=cmd_anneal)
    kno = xs.add_parser("knowledge", help="new facts: continued pre-training (x1, x k paraphrases, RAFT) vs retrieval")
    kno.add_argument("--out", default="experiment_runs/knowledge")
    kno.add_argument("--quick", action="store_true", help="a tiny model, in about 3 minutes")
    kno.add_argument("--model", default=None, help="causal LM id or folder (default: SmolLM2-135M-Instruct GGUF, "
                     "else a tiny model)")
    kno.add_argument("--seed", type=int, default=0, help="seeds the made-up facts, the data order and the model")
    kno.add_argument("--quiet", action="store_true")
    kno.set_defaults(func=cmd_knowledge)
    return p


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole step number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a step of 1 or more, got {value}")
    return value


def _shares(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares such as 0,0.05,0.5, got {text!r}") from None


def _report_bug(args, err: BaseException) -> None:
    """The last line of defence: one paragraph, the traceback in a file (or printed with --debug)."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(err))
    rank = os.environ.get("RANK")
    name = f"keepmix-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{f'-rank{rank}' if rank else ''}.txt"
    folder = getattr(args, "crash_dir", None)
    folder = folder if folder is not None and folder.is_dir() else Path(tempfile.gettempdir())
    try:
        (folder / name).write_text(f"keepmix {' '.join(sys.argv[1:])}\n\n{text}")
        where = f"the full traceback is in {folder / name}"
    except OSError:
        where = "the traceback could not be written to a file; rerun with --debug to print it"
    print(f"keepmix: error: an unexpected {type(err).__name__} stopped keepmix ({err}). This is a bug in "
          f"keepmix, not in your input: {where}. Please report it with that file; rerun with --debug to "
          f"print the traceback here.", file=sys.stderr)
    if getattr(args, "debug", False):
        print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeepmixError as err:
        print(f"keepmix: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keepmix: stopped; resume with --resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - never a raw traceback for the user; see _report_bug
        _report_bug(args, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
