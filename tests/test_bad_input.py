"""Bad input, as a new user would give it: every case ends as one `keepmix: error: ...` sentence that names
the file, line or key, with no traceback, and — where a run folder exists — every file in it byte-identical
afterwards. Cases run the real CLI in-process (`keepmix.cli.main`) on a tiny model and data made here."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

import keepmix
from keepmix.cli import main
from tests.conftest import deep_update, prose_docs, qa_docs, tiny_run_config, write_jsonl


# ---- the world each case starts from ------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer_dir):
    """Data, a token cache and a run stopped at step 6 (checkpoint step-6): the template every case copies."""
    root = tmp_path_factory.mktemp("bad_input")
    write_jsonl(root / "general.jsonl", prose_docs(120))
    write_jsonl(root / "qa.jsonl", qa_docs(120))
    write_jsonl(root / "mc.jsonl", [{"context": "Q: 1 + 1 =", "choices": [" two", " three"], "gold": 0}] * 4)
    template = root / "template"
    template.mkdir()
    cfg = base_config(root, tokenizer_dir, template / "out")
    (template / "run.yaml").write_text(yaml.safe_dump(cfg))
    keepmix.train(template / "run.yaml", progress="quiet", stop_at=6)
    return root, tokenizer_dir


def base_config(root: Path, tokenizer_dir: Path, out: Path) -> dict:
    return tiny_run_config(tokenizer_dir, data=str(root), output=str(out), cache_dir=str(root / "cache"))


class Case:
    """One case's folder: helpers to write configs and data, and to copy the trained template run."""

    def __init__(self, folder: Path, root: Path, tokenizer_dir: Path):
        self.folder, self.root, self.tokenizer_dir = folder, root, tokenizer_dir
        self.out = folder / "out"
        self.config_path = folder / "run.yaml"

    def config(self, **updates) -> str:
        cfg = deep_update(base_config(self.root, self.tokenizer_dir, self.out), updates)
        self.config_path.write_text(yaml.safe_dump(cfg))
        return str(self.config_path)

    def config_with(self, edit: Callable[[dict], None]) -> str:
        cfg = base_config(self.root, self.tokenizer_dir, self.out)
        edit(cfg)
        self.config_path.write_text(yaml.safe_dump(cfg))
        return str(self.config_path)

    def text(self, name: str, text: str | bytes) -> str:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def jsonl(self, name: str, rows: list) -> str:
        return self.text(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def source(self, path: str, **fields) -> str:
        """The base config with the first source read from `path`."""
        return self.config_with(lambda c: c["sources"][0].update(path=path, **fields))

    def trained(self) -> str:
        """A copy of the run stopped at step 6, and its config pointing at the copy."""
        shutil.copytree(self.root / "template" / "out", self.out)
        return self.config()

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoints" / "step-00000006"


@dataclass
class Bad:
    id: str
    argv: Callable[[Case], list[str]]
    message: str  # regex the error must match: the place and what was expected
    code: int = 2


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scramble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


def train(c: Case, path: str, *extra: str) -> list[str]:
    return ["train", path, "--quiet", "--no-report", *extra]


def resume_after(damage: Callable[[Case], None]) -> Callable[[Case], list[str]]:
    def argv(c: Case) -> list[str]:
        path = c.trained()
        damage(c)
        return train(c, path, "--resume")
    return argv


MC_TASK = {"name": "mc", "kind": "multiple_choice", "path": "tasks.jsonl"}

CONFIG_CASES = [
    Bad("config-missing", lambda c: train(c, str(c.folder / "nope.yaml")), r"nope\.yaml: 1 problem.*file not found"),
    Bad("config-is-folder", lambda c: train(c, str(c.folder)), r"is a folder; expected a YAML config file"),
    Bad("config-not-utf8", lambda c: train(c, c.text("run.yaml", b"model:\n  name: caf\xe9\n")),
        r"run\.yaml: .*not UTF-8 text \(byte 0xe9 at offset 18\)"),
    Bad("config-bad-yaml", lambda c: train(c, c.text("run.yaml", "model:\n  name: [x\nsources: 1\n")),
        r"run\.yaml:\d+: 1 problem.*not valid YAML"),
    Bad("config-duplicate-top-key", lambda c: train(c, c.text("run.yaml", "train:\n  steps: 3\neval:\n  every: 1\n"
                                                                          "train:\n  lr: 0.1\n")),
        r"run\.yaml:5: .*duplicate key 'train' \(first given on line 1\)"),
    Bad("config-duplicate-nested-key", lambda c: train(c, c.text("run.yaml", "train:\n  steps: 3\n  steps: 4\n")),
        r"run\.yaml:3: .*duplicate key 'steps' \(first given on line 2\)"),
    Bad("config-empty", lambda c: train(c, c.text("run.yaml", "")), r"the file is empty; expected the keys"),
    Bad("config-top-level-list", lambda c: train(c, c.text("run.yaml", "- model\n- sources\n")),
        r"\(top level\): expected a mapping of keys, got list"),
    Bad("config-unknown-top-key", lambda c: train(c, c.config(trian={"steps": 3})), r"trian: unknown key"),
    Bad("config-unknown-nested-key", lambda c: train(c, c.config(train={"stpes": 3})), r"train\.stpes: unknown key"),
    Bad("config-steps-not-int", lambda c: train(c, c.config(train={"steps": "ten"})),
        r"train\.steps: .*integer.*\(got 'ten'\)"),
    Bad("config-negative-lr", lambda c: train(c, c.config(train={"lr": -1e-3})), r"train\.lr: .*greater than 0"),
    Bad("config-beta-above-one", lambda c: train(c, c.config(train={"betas": [1.2, 0.95]})),
        r"train\.betas\[0\]: .*less than 1 \(got 1\.2\)"),
    Bad("config-negative-beta", lambda c: train(c, c.config(train={"betas": [0.9, -0.1]})),
        r"train\.betas\[1\]: .*greater than or equal to 0"),
    Bad("config-three-betas", lambda c: train(c, c.config(train={"betas": [0.9, 0.95, 0.99]})), r"train\.betas: "),
    Bad("config-schedule-unknown-source", lambda c: train(c, c.config_with(
        lambda d: d["mixture"]["schedule"][0]["weights"].update(sqll=0.5))),
        r"mixture\.schedule\[0\]\.weights\.sqll: no source named 'sqll' \(sources: general, qa\)"),
    Bad("config-schedule-at-out-of-range", lambda c: train(c, c.config_with(
        lambda d: d["mixture"]["schedule"][1].update(at=1.5))), r"mixture\.schedule\[1\]\.at: must lie in \[0, 1\]"),
    Bad("config-floors-too-high", lambda c: train(c, c.config(mixture={"floor": 0.6})),
        r"mixture\.floor: floors sum to 1\.200"),
    Bad("config-micro-batch-not-dividing", lambda c: train(c, c.config(train={"micro_batch_size": 3})),
        r"train\.micro_batch_size: must divide train\.batch_size \(4\)"),
    Bad("config-warmup-beyond-steps", lambda c: train(c, c.config(train={"warmup": 50})),
        r"train\.warmup: 50 warmup steps exceed train\.steps \(12\)"),
    Bad("config-source-file-missing", lambda c: train(c, c.source(str(c.folder / "gone.jsonl"))),
        r"sources\[0\]\.path: file not found: .*gone\.jsonl"),
    Bad("config-model-folder-missing", lambda c: train(c, c.config(model={"init": "pretrained",
                                                                           "name": "./no-such-model"})),
        r"model\.name: folder not found: .*no-such-model"),
    Bad("config-unknown-model-type", lambda c: train(c, c.config(model={"architecture": {"model_type": "lama"}})),
        r"model\.architecture\.model_type: 'lama' is not a model type transformers knows"),
    Bad("config-heads-not-dividing-hidden", lambda c: train(c, c.config(model={"architecture": {"hidden_size": 30}})),
        r"model\.architecture: transformers refuses it for 'llama': The hidden size \(30\) is not a multiple"),
    Bad("config-kv-heads-not-dividing", lambda c: train(c, c.config(model={"architecture": {"num_key_value_heads": 3}})),
        r"model\.architecture\.num_key_value_heads: 3 does not divide num_attention_heads 4"),
    Bad("config-no-layers", lambda c: train(c, c.config(model={"architecture": {"num_hidden_layers": 0}})),
        r"model\.architecture\.num_hidden_layers: must be a positive integer \(got 0\)"),
    Bad("config-output-is-a-file", lambda c: (c.text("out", "x"), train(c, c.config()))[1],
        r"output: .*out is a file; expected a folder"),
    Bad("config-cache-is-a-file", lambda c: train(c, c.config(cache_dir=c.text("cache", "x"))),
        r"cache_dir: .*cache is a file; expected a folder"),
    Bad("config-duplicate-source-name", lambda c: train(c, c.config_with(
        lambda d: d["sources"][1].update(name="general"))), r"sources\[1\]\.name: duplicate source name 'general'"),
    Bad("config-duplicate-task-name", lambda c: (c.jsonl("tasks.jsonl", [{}]),
                                                 train(c, c.config(eval={"tasks": [MC_TASK, MC_TASK]})))[1],
        r"eval\.tasks: duplicate task name 'mc'"),
    Bad("config-task-file-missing", lambda c: train(c, c.config(eval={"tasks": [MC_TASK]})),
        r"eval\.tasks\[0\]\.path: file not found: .*tasks\.jsonl"),
    Bad("config-unknown-task-kind", lambda c: train(c, c.config(eval={"tasks": [{**MC_TASK, "kind": "quiz"}]})),
        r"eval\.tasks\[0\]\.kind: 'quiz' is not a task kind; expected one of 'multiple_choice', 'generation', 'sql_execution'"),
    Bad("config-baseline-from-missing", lambda c: train(c, c.config(eval={"baseline_from": "elsewhere"})),
        r"eval\.baseline_from: no run at .*elsewhere"),
    Bad("config-completion-loss-on-text", lambda c: train(c, c.config_with(
        lambda d: d["sources"][0].update(loss_on="completion"))),
        r"sources\[0\]\.loss_on: 'completion' needs format chat or prompt_completion"),
    Bad("config-valid-fraction-one", lambda c: train(c, c.config_with(lambda d: d["sources"][0].update(valid_docs=1.0))),
        r"sources\[0\]\.valid_docs: a fraction must be < 1"),
    Bad("config-unknown-format", lambda c: train(c, c.config_with(lambda d: d["sources"][0].update(format="txt"))),
        r"sources\[0\]\.format: .*'text', 'chat' or 'prompt_completion'"),
    Bad("config-no-sources", lambda c: train(c, c.config_with(lambda d: d.update(sources=[]))),
        r"sources: .*at least 1 item"),
    Bad("config-lora-rank-zero", lambda c: train(c, c.config(model={"lora": {"r": 0}})),
        r"model\.lora\.r: .*greater than 0"),
    Bad("config-negative-kl-to-base", lambda c: train(c, c.config_with(lambda d: d["sources"][0].update(kl_to_base=-1))),
        r"sources\[0\]\.kl_to_base: .*greater than or equal to 0"),
    Bad("config-kl-to-base-with-fsdp", lambda c: train(c, c.config_with(
        lambda d: (d["sources"][0].update(kl_to_base=1.0), d["train"].update(fsdp=True)))),
        r"sources\[0\]\.kl_to_base: not supported with train\.fsdp"),
    Bad("config-l2-with-fsdp", lambda c: train(c, c.config(train={"l2_to_base": 0.1, "fsdp": True})),
        r"train\.l2_to_base: not supported with train\.fsdp"),
    Bad("config-compile-blocks-with-fsdp", lambda c: train(c, c.config(train={"compile": "blocks", "fsdp": True})),
        r"train\.compile: blocks is not supported with train\.fsdp"),
    Bad("config-compile-unknown", lambda c: train(c, c.config(train={"compile": "layers"})),
        r"train\.compile.*(blocks|model)"),
    Bad("config-source-without-path-or-generate", lambda c: train(c, c.config_with(lambda d: d["sources"][0].pop("path"))),
        r"sources\[0\]: give either path \(data to read\) or generate \(self-rehearsal\), one of them"),
    Bad("config-source-with-path-and-generate", lambda c: train(c, c.config_with(
        lambda d: d["sources"][0].update(generate={"n_docs": 8}))), r"sources\[0\]: give either path .*not both"),
    Bad("config-generate-unknown-prompts", lambda c: train(c, c.config_with(lambda d: (
        d["sources"][0].pop("path"), d["sources"][0].update(generate={"n_docs": 20, "prompts": "codee"})))),
        r"sources\[0\]\.generate\.prompts: 'codee' is neither a source name \(general, qa\) nor a file"),
    Bad("config-generate-holds-out-everything", lambda c: train(c, c.config_with(lambda d: (
        d["sources"][0].pop("path"), d["sources"][0].update(generate={"n_docs": 10}, valid_docs=10)))),
        r"sources\[0\]\.valid_docs: 10 held out of 10 generated documents"),
    Bad("config-generate-completion-loss", lambda c: train(c, c.config_with(lambda d: (
        d["sources"][1].pop("path"), d["sources"][1].update(generate={"n_docs": 20})))),
        r"sources\[1\]\.format: a generated source holds plain text"),
    Bad("config-generate-bad-top-p", lambda c: train(c, c.config_with(lambda d: (
        d["sources"][0].pop("path"), d["sources"][0].update(generate={"n_docs": 20, "top_p": 1.5})))),
        r"sources\[0\]\.generate\.top_p: .*less than or equal to 1"),
    Bad("config-scratch-without-architecture", lambda c: train(c, c.config_with(
        lambda d: d["model"].pop("architecture"))), r"model: init: scratch needs architecture with a model_type"),
]

CLI_CASES = [
    Bad("set-without-equals", lambda c: train(c, c.config(), "--set", "train.steps"),
        r"--set 'train\.steps': expected key=value"),
    Bad("set-unparsable-value", lambda c: train(c, c.config(), "--set", "train.steps=[1"),
        r"--set train\.steps: the value '\[1' is not valid YAML"),
    Bad("set-through-a-scalar", lambda c: train(c, c.config(), "--set", "train.steps.x=3"),
        r"--set train\.steps\.x: train\.steps is 12, not a mapping"),
    Bad("set-empty-key-part", lambda c: train(c, c.config(), "--set", "train..steps=3"),
        r"--set 'train\.\.steps=3': expected a dotted key"),
    Bad("set-impossible-value", lambda c: train(c, c.config(), "--set", "train.steps=-1"),
        r"train\.steps: .*greater than 0 \(got -1\)"),
    Bad("set-unknown-key", lambda c: train(c, c.config(), "--set", "train.bogus=1"), r"train\.bogus: unknown key"),
    Bad("stop-at-zero", lambda c: train(c, c.config(), "--stop-at", "0"), r"--stop-at: expected a step of 1 or more"),
    Bad("stop-at-negative", lambda c: train(c, c.config(), "--stop-at", "-3"),
        r"--stop-at: expected a step of 1 or more, got -3"),
    Bad("stop-at-not-a-number", lambda c: train(c, c.config(), "--stop-at", "six"),
        r"--stop-at: expected a whole step number, got 'six'"),
    Bad("stop-at-beyond-steps", lambda c: train(c, c.config(), "--stop-at", "99"),
        r"--stop-at 99: expected a step from 1 to train\.steps \(12\)"),
    Bad("eval-out-is-a-folder", lambda c: ["eval", c.config(), "--out", str(c.folder)],
        r"--out .*: is a folder; expected a file name"),
    Bad("eval-out-under-a-file", lambda c: ["eval", c.config(), "--out", str(Path(c.text("f", "x")) / "r.json")],
        r"--out .*r\.json: .*/f is a file, so no folder can be made there"),
    Bad("eval-model-folder-missing", lambda c: ["eval", c.config(), "--model", str(c.folder / "no" / "model")],
        r"--model .*no/model: folder not found"),
    Bad("eval-model-is-a-run", lambda c: (c.trained(), ["eval", c.config(), "--model", str(c.out)])[1],
        r"--model .*out: is a run directory, not a model; use its final/ folder"),
    Bad("report-missing-folder", lambda c: ["report", str(c.folder / "nothing")], r"nothing: no such folder"),
    Bad("report-on-a-file", lambda c: ["report", c.text("f.txt", "x")], r"f\.txt: is a file; expected a run directory"),
    Bad("report-not-a-run", lambda c: ["report", str(c.folder)], r"not a keepmix run \(no metrics\.jsonl in it\)"),
    Bad("report-unreadable-metrics", lambda c: (c.text("metrics.jsonl", "\x00\x01garbage\n{oops\n"),
                                                ["report", str(c.folder)])[1],
        r"metrics\.jsonl: no readable records \(2 line"),
    Bad("diagnose-missing-folder", lambda c: ["diagnose", str(c.folder / "nothing")], r"nothing: no such folder"),
    Bad("diagnose-not-a-run", lambda c: ["diagnose", str(c.folder)], r"not a keepmix run"),
    Bad("diagnose-no-exposures", lambda c: (c.trained(), shutil.rmtree(c.out / "exposures"),
                                            ["diagnose", str(c.out)])[2],
        r"out: the run has no exposure log yet \(exposures/ is missing or empty"),
]


def _docs(n: int = 120) -> list[dict]:
    return prose_docs(n)


DATA_CASES = [
    Bad("data-malformed-json", lambda c: train(c, c.source(c.jsonl("d.jsonl", [*_docs(2), "{not json", *_docs(5)]))),
        r"sources\[0\] \(general\): .*d\.jsonl:3: malformed row .*set on_bad_row: skip"),
    Bad("data-missing-field", lambda c: train(c, c.source(c.jsonl("d.jsonl", [*_docs(3), {"body": "x"}]))),
        r"d\.jsonl:4: missing field 'text' \(fields: body\)"),
    Bad("data-field-wrong-type", lambda c: train(c, c.source(c.jsonl("d.jsonl", [{"text": 3}, *_docs(3)]))),
        r"d\.jsonl:1: field 'text' must be a string, got int"),
    Bad("data-not-an-object", lambda c: train(c, c.source(c.jsonl("d.jsonl", [*_docs(3), "[1, 2]"]))),
        r"d\.jsonl:4: malformed row \(expected a JSON object, got list\)"),
    Bad("data-all-rows-skipped", lambda c: train(c, c.source(c.jsonl("d.jsonl", ["{x", "{y"]), on_bad_row="skip")),
        r"d\.jsonl: every row was skipped as malformed.*2 bad rows skipped: .*d\.jsonl:1"),
    Bad("data-valid-docs-beyond-source", lambda c: train(c, c.config_with(lambda d: d["sources"][0].update(valid_docs=500))),
        r"sources\[0\] \(general\): .*valid_docs is 500 but the source has 120 usable documents"),
    Bad("data-valid-docs-equal-to-source", lambda c: train(c, c.source(c.jsonl("d.jsonl", _docs(10)), valid_docs=10)),
        r"valid_docs is 10 but the source has 10 usable documents"),
    Bad("data-all-documents-empty", lambda c: train(c, c.source(c.jsonl("d.jsonl", [{"text": " "}] * 20))),
        r"d\.jsonl: every one of its 20 documents is empty"),
    Bad("data-empty-file", lambda c: train(c, c.source(c.text("d.jsonl", "\n\n"))), r"d\.jsonl: holds no records"),
    Bad("data-unknown-chat-role", lambda c: train(c, c.source(c.jsonl("chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]), format="chat")),
        r"chat\.jsonl:2: messages\[1\] has the role 'bot'; expected one of system, user, assistant, tool"),
    Bad("data-chat-not-a-list", lambda c: train(c, c.source(c.jsonl("chat.jsonl", [{"messages": "hi"}]), format="chat")),
        r"chat\.jsonl:1: field 'messages' must be a non-empty list"),
    Bad("data-chat-message-without-content", lambda c: train(c, c.source(c.jsonl("chat.jsonl", [
        {"messages": [{"role": "user"}]}]), format="chat")),
        r"chat\.jsonl:1: messages\[0\] must be an object with string 'role' and 'content'"),
    Bad("data-quality-not-a-number", lambda c: train(c, c.source(c.jsonl("q.jsonl", [{"text": "a b", "q": "high"}] * 3),
                                                                 quality_field="q")),
        r"q\.jsonl:1: quality field 'q' must be a number, got 'high'"),
    Bad("data-json-not-a-list-of-objects", lambda c: train(c, c.source(c.text("d.json", "[1, 2, 3]"))),
        r"d\.json: expected a JSON list of objects"),
    Bad("data-json-invalid", lambda c: train(c, c.source(c.text("d.json", "[{"))), r"d\.json: not valid JSON"),
    Bad("data-text-folder-without-text", lambda c: train(c, c.source((c.text("docs/a.bin", "x"), str(c.folder / "docs"))[1])),
        r"docs: no text files"),
    Bad("data-prompt-field-missing", lambda c: train(c, c.config_with(
        lambda d: d["sources"][1].update(path=c.jsonl("qa.jsonl", [{"question": "q", "completion": "a"}] * 3)))),
        r"sources\[1\] \(qa\): .*qa\.jsonl:1: missing field 'prompt'"),
    Bad("data-two-sources-bad", lambda c: train(c, c.config_with(lambda d: (
        d["sources"][0].update(path=c.jsonl("a.jsonl", ["{bad"])),
        d["sources"][1].update(path=c.jsonl("b.jsonl", [{"prompt": 1, "completion": "x"}]))))),
        r"2 problems in the data:\n  - sources\[0\] \(general\): .*a\.jsonl:1.*\n  - sources\[1\] \(qa\): .*b\.jsonl:1"),
]


def _task(c: Case, rows: list, **task) -> str:
    c.jsonl("tasks.jsonl", rows)
    return c.config(eval={"tasks": [{**MC_TASK, **task}]})


GOOD_MC = {"context": "Q: 1 + 1 =", "choices": [" two", " three"], "gold": 0}
GOOD_Q = {"question": "Q: 1 + 1 =", "answer": "two"}
OPEN_BOOK = {"kind": "open_book", "corpus": "general"}
TASK_CASES = [
    Bad("task-gold-out-of-range", lambda c: train(c, _task(c, [GOOD_MC, {**GOOD_MC, "gold": 5}])),
        r"eval\.tasks\[0\] \(mc\): .*tasks\.jsonl: item 1: field 'gold' is 5, out of range for 2 choices"),
    Bad("task-missing-field", lambda c: train(c, _task(c, [{"question": "x", "choices": ["a", "b"], "gold": 0}])),
        r"tasks\.jsonl: item 0: missing field 'context' \(fields: question, choices, gold\)"),
    Bad("task-one-choice", lambda c: train(c, _task(c, [{**GOOD_MC, "choices": [" two"]}])),
        r"item 0: field 'choices' must list at least 2 non-empty strings"),
    Bad("task-empty-file", lambda c: train(c, _task(c, [])), r"eval\.tasks\[0\] \(mc\): .*tasks\.jsonl holds no items"),
    Bad("task-malformed-line", lambda c: train(c, _task(c, [GOOD_MC, "{oops"])),
        r"tasks\.jsonl:2: malformed row .*; expected one JSON object per line"),
    Bad("task-sql-database-missing", lambda c: (c.jsonl("tasks.jsonl", [{"prompt": "p", "sql": "select 1"}]), train(
        c, c.config(eval={"tasks": [{"name": "s", "kind": "sql_execution", "path": "tasks.jsonl",
                                     "database": "shop.sqlite"}]})))[1],
        r"eval\.tasks\[0\]\.database: file not found: .*shop\.sqlite"),
    Bad("task-generation-answer-wrong-type", lambda c: train(c, _task(c, [{"prompt": "p", "answer": [1]}],
                                                                     kind="generation")),
        r"tasks\.jsonl: item 0: field 'answer' must be a string \(or an integer\), got list"),
    Bad("task-bad-regex", lambda c: train(c, _task(c, [], kind="generation", regex="(")),
        r"eval\.tasks\[0\]\.regex: not a valid regular expression"),
    Bad("eval-command-task-invalid", lambda c: ["eval", _task(c, [{**GOOD_MC, "gold": -1}])],
        r"item 0: field 'gold' is -1, out of range"),
    Bad("task-open-book-unknown-corpus", lambda c: train(c, _task(c, [GOOD_Q], **{**OPEN_BOOK, "corpus": "generall"})),
        r"eval\.tasks\[0\]\.corpus: 'generall' is neither a source name \(general, qa\) nor a file \(.*generall not found\)"),
    Bad("task-open-book-k-zero", lambda c: train(c, _task(c, [GOOD_Q], **OPEN_BOOK, k=0)),
        r"eval\.tasks\[0\]\.k: Input should be greater than 0 \(got 0\)"),
    Bad("task-open-book-template-placeholder", lambda c: train(c, _task(c, [GOOD_Q], **OPEN_BOOK,
                                                                        template="Context: {docs}\n{question}")),
        r"eval\.tasks\[0\]\.template: the template needs the placeholder\(s\) \{documents\}"),
    Bad("task-open-book-key-of-other-scoring", lambda c: train(c, _task(c, [GOOD_Q], **OPEN_BOOK, regex="x",
                                                                        scoring="multiple_choice")),
        r"eval\.tasks\[0\]: regex: not used with scoring: multiple_choice"),
    Bad("task-open-book-unknown-gold-doc", lambda c: train(c, _task(c, [{**GOOD_Q, "gold_doc": 500}], **OPEN_BOOK)),
        r"eval\.tasks\[0\] \(mc\): .*tasks\.jsonl: item 0: field 'gold_doc' names '500', not a document id of "
        r"the corpus \(120 documents\)"),
]

RUN_CASES = [  # each touches an existing run folder, which must stay byte-identical
    Bad("run-train-again-without-resume", lambda c: train(c, c.trained()),
        r"out already holds a run; continue it with --resume.*\(nothing was changed\)"),
    Bad("run-resume-with-changed-config", lambda c: (c.trained(), train(c, c.config(train={"lr": 1e-3}), "--resume"))[1],
        r"cannot resume .*step-00000006: the config changed in keys that break an exact resume: train\.lr"),
    Bad("run-resume-truncated-weights", resume_after(lambda c: _truncate(c.ckpt / "weights.safetensors")),
        r"cannot resume .*out: it holds a run but no intact checkpoint .*step-00000006: weights\.safetensors has "
        r"\d+ bytes, the manifest says \d+ \(truncated or overwritten\).*nothing was changed"),
    Bad("run-resume-missing-optimizer", resume_after(lambda c: (c.ckpt / "optimizer.pt").unlink()),
        r"no intact checkpoint .*step-00000006: optimizer\.pt is missing"),
    Bad("run-resume-corrupt-state", resume_after(lambda c: (c.ckpt / "state.json").write_text('{"step": 6, "sam')),
        r"step-00000006: state\.json has \d+ bytes, the manifest says"),
    Bad("run-resume-scrambled-weights", resume_after(lambda c: _scramble(c.ckpt / "weights.safetensors")),
        r"step-00000006: weights\.safetensors does not match its checksum \(its bytes were altered\)"),
    Bad("run-resume-scrambled-optimizer", resume_after(lambda c: _scramble(c.ckpt / "optimizer.pt")),
        r"step-00000006: optimizer\.pt does not match its checksum"),
    Bad("run-resume-missing-manifest", resume_after(lambda c: (c.ckpt / "manifest.json").unlink()),
        r"step-00000006: manifest\.json is missing"),
    Bad("run-resume-garbled-manifest", resume_after(lambda c: (c.ckpt / "manifest.json").write_text("{files")),
        r"step-00000006: manifest\.json is unreadable"),
    Bad("run-resume-checkpoints-deleted", resume_after(lambda c: shutil.rmtree(c.out / "checkpoints")),
        r"cannot resume .*out: it holds a run but checkpoints/ is missing; nothing was changed"),
    Bad("run-resume-only-a-staging-folder", resume_after(
        lambda c: c.ckpt.rename(c.out / "checkpoints" / ".staging-step-00000006")),
        r"cannot resume .*out: it holds a run but no intact checkpoint in .*checkpoints; nothing was changed"),
    Bad("run-resume-stop-at-before-checkpoint", lambda c: train(c, c.trained(), "--resume", "--stop-at", "3"),
        r"--stop-at 3: the run resumes at step 6; expected a step after it"),
    Bad("run-output-is-a-file-inside-run", lambda c: (c.trained(), train(c, c.config(output=str(c.out / "config.yaml"))))[1],
        r"output: .*config\.yaml is a file"),
]



def sweep(c: Case, spec: dict, *extra: str, run: str | None = None) -> list[str]:
    """`keepmix sweep` on a sweep file over the case's run config, its arms in the case's out/ folder."""
    path = c.text("sweep.yaml", yaml.safe_dump({"run": run or c.config(), "output": "out", **spec}))
    return ["sweep", path, "--quiet", *extra]


SWEEP_CASES = [
    Bad("sweep-empty-grid", lambda c: sweep(c, {"grid": {}}), r"sweep\.yaml: 1 problem in the config:.*- grid: the grid is empty"),
    Bad("sweep-no-arms", lambda c: sweep(c, {}), r"grid: the sweep has no arms"),
    Bad("sweep-unknown-key-in-an-arm", lambda c: sweep(c, {"arms": {"a": {"train.lrr": 1e-3}, "b": {}}}),
        r"arm a: train\.lrr: unknown key"),
    Bad("sweep-bad-value-in-a-grid-arm", lambda c: sweep(c, {"grid": {"train.lr": [1e-3, -1.0]}}),
        r"arm lr=-1: train\.lr: Input should be greater than 0"),
    Bad("sweep-key-path-names-no-source", lambda c: sweep(c, {"grid": {"sources[sql].floor": [0.1]}}),
        r"key path sources\[sql\]\.floor: sources has no item named 'sql' \(names: general, qa\)"),
    Bad("sweep-branch-beyond-the-run", lambda c: sweep(c, {"grid": {"train.lr": [1e-3]}, "branch": {"at": 12}}),
        r"branch\.at: step 12 is beyond the run: train\.steps is 12"),
    Bad("sweep-unknown-top-level-key", lambda c: sweep(c, {"gird": {"train.lr": [1e-3]}}), r"gird: unknown key"),
    Bad("sweep-no-such-arm", lambda c: sweep(c, {"grid": {"train.lr": [1e-3]}}, "--arm", "7"),
        r"--arm 7: no such arm"),
    Bad("sweep-collect-over-a-folder-that-is-no-run", lambda c: (c.text("mine/notes.txt", "x"), sweep(
        c, {"arms": {"mine": {"train.lr": 1e-3}}}, "--collect", "--output", str(c.folder)))[1],
        r"arm mine: .*mine holds files but no keepmix run \(no config\.yaml\); nothing was changed"),
    Bad("sweep-collect-with-nothing-run", lambda c: sweep(c, {"arms": {"mine": {"train.lr": 1e-3}}}, "--collect"),
        r"no completed arm of .*sweep\.yaml in .*out .*; nothing to collect"),
    Bad("sweep-collect-over-another-config", lambda c: (c.trained(), sweep(
        c, {"arms": {"out": {"train.lr": 1e-3}}}, "--collect", "--output", str(c.folder)))[1],
        r"arm out: .*out holds a run of another config \(.*train\.lr differ\); it is not this arm's"),
    Bad("merge-not-a-run", lambda c: ["merge", str(c.folder)], r"not a keepmix run directory"),
    Bad("merge-run-without-final", lambda c: (c.trained(), ["merge", str(c.out)])[1],
        r"has no final/ model yet"),
    Bad("merge-bad-alpha", lambda c: (c.trained(), ["merge", str(c.out), "--alpha", "0,half"])[1],
        r"--alpha '0,half': expected numbers separated by commas"),
    Bad("train-init-from-a-missing-step", lambda c: train(c, c.config(train={"init_from": {
        "run": str(c.root / "template" / "out"), "step": 5}})),
        r"train\.init_from\.step: .* no complete checkpoint at step 5 \(complete checkpoints: 6\)"),
]

ALL = CONFIG_CASES + CLI_CASES + DATA_CASES + TASK_CASES + RUN_CASES + SWEEP_CASES


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_there_are_enough_cases():
    assert len(ALL) >= 60 and len({c.id for c in ALL}) == len(ALL)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_is_one_clear_sentence(case: Bad, shared, tmp_path, capsys, monkeypatch):
    root, tokenizer_dir = shared
    monkeypatch.chdir(tmp_path)
    c = Case(tmp_path, root, tokenizer_dir)
    argv = case.argv(c)
    existed = c.out.exists()
    before = _snapshot(tmp_path)
    code, output = run_cli(argv, capsys)
    assert code == case.code, output
    assert "Traceback" not in output and "This is a bug" not in output, output
    assert "error: " in output, output
    assert re.search(case.message, output, re.S), f"expected /{case.message}/ in:\n{output}"
    after = _snapshot(tmp_path)
    if existed:  # an existing run folder: every file byte-identical, nothing added
        assert after == before
    else:  # a new run that was refused wrote no run folder at all
        assert not c.out.is_dir(), sorted(after)
        assert {k: v for k, v in after.items() if k in before} == before
