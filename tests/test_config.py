"""Config errors list every problem at once, each with its key path."""

from __future__ import annotations

import pytest
import yaml

from keepmix.config import load_config, parse_config
from keepmix.errors import ConfigError


def base(tmp_path) -> dict:
    (tmp_path / "general.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "sql.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    return {
        "model": {"name": "HuggingFaceTB/SmolLM2-135M"},
        "sources": [{"name": "general", "path": "general.jsonl"},
                    {"name": "sql", "path": "sql.jsonl", "format": "prompt_completion", "loss_on": "completion"}],
        "mixture": {"schedule": [{"at": 0.0, "weights": {"general": 0.7, "sql": 0.3}},
                                 {"at": 1.0, "weights": {"general": 0.2, "sql": 0.8}}]},
    }


def problems(tmp_path, data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="run.yaml", base_dir=tmp_path)
    return info.value.problems


def test_valid_config_resolves_paths(tmp_path):
    cfg = parse_config(base(tmp_path), base_dir=tmp_path)
    assert cfg.resolve(cfg.sources[0].path) == str(tmp_path / "general.jsonl")
    assert cfg.resolve(cfg.model.name) == "HuggingFaceTB/SmolLM2-135M"  # a hub id stays an id


def test_every_problem_is_listed_with_its_key(tmp_path):
    data = base(tmp_path)
    data["mixture"]["schedule"][1]["weights"] = {"general": -0.2, "sqll": 0.8}
    data["mixture"]["schedule"][0]["at"] = 1.5
    data["mixture"]["floor"] = 0.6
    data["sources"].append({"name": "code", "path": "missing.jsonl"})
    found = problems(tmp_path, data)
    assert "mixture.schedule[1].weights.sqll: no source named 'sqll' (sources: general, sql, code)" in found
    assert "mixture.schedule[1].weights.general: weight must be >= 0 (got -0.2)" in found
    assert "mixture.schedule[0].at: must lie in [0, 1] (got 1.5)" in found
    assert any(p.startswith("mixture.floor: floors sum to 1.800") for p in found)
    assert any(p.startswith("sources[2].path: file not found:") and p.endswith("missing.jsonl") for p in found)
    assert len(found) == 5


def test_unknown_keys_and_wrong_types(tmp_path):
    data = base(tmp_path)
    data["train"] = {"stpes": 10, "lr": "fast", "batch_size": 0}
    data["sources"][0]["formatt"] = "text"
    found = problems(tmp_path, data)
    assert any(p.startswith("train.stpes: unknown key") for p in found)
    assert any(p.startswith("sources[0].formatt: unknown key") for p in found)
    assert any(p.startswith("train.lr: ") and "'fast'" in p for p in found)
    assert any(p.startswith("train.batch_size: ") and "greater than 0" in p for p in found)


def test_schedule_points_must_increase(tmp_path):
    data = base(tmp_path)
    data["mixture"]["schedule"][1]["at"] = 0.0
    assert problems(tmp_path, data) == [
        "mixture.schedule[1].at: points must be strictly increasing (got 0.0 after 0.0)"]


def test_error_message_names_the_file_and_lists_problems(tmp_path):
    data = base(tmp_path)
    data["mixture"]["schedule"][1]["weights"]["sqll"] = 1
    data["train"] = {"micro_batch_size": 3, "batch_size": 8}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: 2 problems in the config:")
    assert "  - mixture.schedule[1].weights.sqll: no source named 'sqll'" in text
    assert "  - train.micro_batch_size: must divide train.batch_size (8); got 3" in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: x\nsources: [\n  {name: a\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: 1 problem in the config:\n  - \(top level\)|run\.yaml:\d+"):
        load_config(path)


def test_overrides_apply_dotted_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path)))
    cfg = load_config(path, {"train.steps": 7, "mixture.floor": 0.1})
    assert cfg.train.steps == 7 and cfg.mixture.floor == 0.1


def test_every_shipped_example_config_parses():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml"))
    assert configs
    from keepmix.sweep.spec import load_sweep

    for path in configs:
        if path.name.endswith("sweep.yaml"):
            load_sweep(path)  # a sweep file: every arm's config validated
        else:
            load_config(path)  # hub ids stay ids; local files must exist
