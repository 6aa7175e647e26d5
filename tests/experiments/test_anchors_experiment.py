"""`keepmix experiment anchors`: four arms on the demo's setup, sized down to a tiny model."""

from __future__ import annotations

import json

import pytest

from keepmix.experiments.anchors import ARMS, correlation, run_anchors_experiment
from tests.conftest import train_records
from tests.demo.test_run import TINY, tiny_model_dir  # noqa: F401 - the fixture


def test_correlation_is_pearson_and_spearman():
    c = correlation([1.0, 2.0, 3.0, 4.0], [2.0, 4.1, 5.9, 100.0])
    assert c["pearson"] == pytest.approx(0.80, abs=0.01) and c["spearman"] == pytest.approx(1.0)
    assert correlation([1.0, 2.0], [1.0, 2.0])["pearson"] is None


@pytest.mark.slow
def test_four_arms_train_and_the_table_is_written(tiny_model_dir, tmp_path):  # noqa: F811
    summary = run_anchors_experiment(tmp_path, model=str(tiny_model_dir), progress="quiet", settings=TINY, beta=1.0)
    assert set(summary["rows"]) == set(ARMS)
    kl_arm = train_records(tmp_path / "keepmix_kl")
    assert any("kl" in r["sources"].get("prose", {}) for r in kl_arm) and all("kl_term" in r for r in kl_arm)
    self_arm = train_records(tmp_path / "keepmix_self")
    assert not any({"prose", "code"} & set(r["sources"]) for r in self_arm)  # never trained on the real data
    assert any("self" in r["sources"] for r in self_arm)
    for arm in ARMS:
        row = summary["rows"][arm]
        assert row["prose_kl"] is not None and row["prose_kl"] >= 0 and row["tokens_per_s"] > 0
    assert summary["kl_mid_vs_retention"]["n"] == 2 * len(ARMS)
    assert summary["info"]["generation"]["n_docs"] > 0
    assert "| keepmix_self |" in (tmp_path / "anchors.md").read_text()
    assert json.loads((tmp_path / "anchors.json").read_text())["beta"] == 1.0
    again = run_anchors_experiment(tmp_path, model=str(tiny_model_dir), progress="quiet", settings=TINY, beta=1.0)
    assert again["rows"] == summary["rows"]  # completed arms are reused
