"""The HTML report: content, self-containment, crashed and compared runs, and rendering in Chromium."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from keepmix.errors import KeepmixError
from keepmix.report import metrics as m
from keepmix.report.html import render_report, verdict_line

FIXTURES = Path(__file__).parent / "fixtures"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Copies of the recorded runs with their reports rendered once for the whole module."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("replay", "no_replay", "crashed"):
        shutil.copytree(FIXTURES / name, root / name)
    return {
        "root": root,
        "single": render_report([root / "replay"]),
        "crashed": render_report([root / "crashed"]),
        "compare": render_report([root / "replay", root / "no_replay"]),
    }


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_single_run_report_is_written_next_to_the_run(runs):
    out = runs["single"]
    assert out == runs["root"] / "replay" / "report.html"
    page = out.read_text()
    assert (runs["root"] / "replay" / "plots" / "loss.png").is_file()
    pngs = images(page)
    assert len(pngs) == 7
    assert all(png.startswith(b"\x89PNG") and len(png) > 10_000 for png in pngs)
    assert (runs["root"] / "replay" / "plots" / "mixture.png").read_bytes() in pngs
    for text in ("HuggingFaceTB/SmolLM2-135M", "prompt_completion", "sql.jsonl", "cosine", "sql_exec (sql_execution)",
                 "Retention at the last eval (step 160)", ">completed<", "655,360", "5m 57s",
                 "sql: loss on a document&#x27;s 2nd view"):
        assert text in page, text
    # The resumed run's one torn line is reported, not hidden.
    assert "1 unreadable line(s) of metrics.jsonl skipped (line 140)" in page


def test_report_makes_no_external_request(runs):
    for key in ("single", "compare", "crashed"):
        page = runs[key].read_text()
        refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
        assert refs and all(ref.startswith("data:") for ref in refs), [r[:40] for r in refs if not r.startswith("data:")]
        assert "<script" not in page and "<link" not in page


def test_retention_table_highlights_flagged_rows(runs):
    page = runs["compare"].read_text()
    # A row is highlighted when any run forgot the metric; here only no_replay did.
    flagged = re.findall(r'<tr class="flagged"><td>([^<]+)</td>', page)
    assert flagged == ["task/general_mc/accuracy", "valid/general/loss", "valid/general/ppl"]
    assert page.count('<span class="v-forgot">FORGOT</span>') == 3
    assert "Forgot: task/general_mc/accuracy -0.0361, valid/general/loss +0.12 (past tolerance)" in page
    assert "Forgot: nothing. Kept 1 within tolerance." in page
    assert "<td>2% of baseline</td>" in page and "<td>0.02</td>" in page


def test_crashed_run_says_it_has_no_end_record(runs):
    page = runs["crashed"].read_text()
    assert ">no end record<" in page
    assert "no end record: the run crashed, was killed, or is still running; the last recorded step is 130 of 160" in page
    torn = len((FIXTURES / "crashed" / "metrics.jsonl").read_text().splitlines())
    assert f"1 unreadable line(s) of metrics.jsonl skipped (line {torn})" in page
    assert "Retention at the last eval (step 120)" in page
    assert len(images(page)) == 6  # no diagnostics.json in this run


def test_compare_overlays_runs_and_puts_tables_side_by_side(runs):
    out = runs["compare"]
    assert out == runs["root"] / "replay" / "compare.html"
    page = out.read_text()
    assert "keepmix comparison: replay vs no_replay" in page
    assert "<th>replay<br>delta</th>" in page and "<th>no_replay<br>delta</th>" in page
    # Both arms start from the same model, so one baseline column serves both.
    assert page.count("baseline</th>") == 1
    assert page.count('<div class="col"><h3>replay</h3>') == 3  # verdict line, memorization, config
    assert len(images(page)) == 7
    assert not (runs["root"] / "no_replay" / "compare.html").exists()


def test_compare_to_a_chosen_file(tmp_path):
    lines = (FIXTURES / "crashed" / "metrics.jsonl").read_text().splitlines()
    for name, keep in (("early", 12), ("later", 30)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines[:keep]) + "\n")
    out = render_report([tmp_path / "early", tmp_path / "later"], tmp_path / "arms.html")
    assert out == tmp_path / "arms.html"
    page = out.read_text()
    assert "early: no end record" in page and "later: no end record" in page
    # No eval after the baseline: no retention plot; the tasks plot shows the baseline's scores.
    assert len(images(page)) == 5
    assert "No eval after the baseline yet" in page


def test_a_run_that_only_started_still_gets_a_report(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "start", "time": 0, "total_steps": 10, "sources": ["a"]}\n')
    page = render_report([run]).read_text()
    assert "No training or eval records yet: nothing to plot." in page
    assert "No config.yaml in" in page and ">no end record<" in page


def test_verdict_line_without_evals():
    assert verdict_line({}) == "No eval after the baseline yet: nothing to compare with it."
    _, table = m.last_retention(m.read_metrics(FIXTURES / "replay" / "metrics.jsonl"))
    assert verdict_line(table).endswith("Forgot: nothing. Kept 1 within tolerance.")


def test_bad_inputs_are_sentences(tmp_path):
    with pytest.raises(KeepmixError, match="no run directory given"):
        render_report([])
    with pytest.raises(KeepmixError, match="missing: no such folder; expected a run directory"):
        render_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeepmixError, match="empty: not a keepmix run \\(no metrics.jsonl in it\\)"):
        render_report([tmp_path / "empty"])
    (tmp_path / "empty" / "metrics.jsonl").write_text("not json\n12\n")
    with pytest.raises(KeepmixError, match="metrics.jsonl: no readable records \\(2 line"):
        render_report([tmp_path / "empty"])


PROBE = """<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<script>
window.__problems = [];
window.addEventListener('error', e => window.__problems.push('error: ' + (e.message || (e.target && e.target.tagName))), true);
document.addEventListener('securitypolicyviolation', e => window.__problems.push('blocked: ' + e.blockedURI));
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({images: imgs.length, widths: imgs.map(i => i.complete ? i.naturalWidth : 0),
                                    height: document.body.scrollHeight, problems: window.__problems});
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_dir}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
@pytest.mark.parametrize("key", ["single", "compare"])
def test_report_renders_in_chromium_with_every_image_loaded(runs, key, tmp_path):
    page = runs[key].read_text()
    # The probe is added to a copy: the report itself carries no script.
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    result = chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), user_dir=tmp_path / "profile")
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no probe output; chromium said: {result.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe["problems"] == []
    assert probe["images"] == len(images(page)) == 7
    assert all(width >= 500 for width in probe["widths"]), probe["widths"]
    assert probe["height"] > 3000


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_screenshot_is_not_blank(runs, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1600", runs["single"].as_uri(), user_dir=tmp_path / "profile")
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 200
