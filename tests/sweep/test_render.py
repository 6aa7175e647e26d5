"""The sweep's rendered answer: the HTML page."""


def test_the_html_answer_has_tables_headings_and_the_plot(tmp_path):
    from keepmix.sweep.render import page

    plot = tmp_path / "p.png"
    plot.write_bytes(b"\x89PNG")
    text = "# keepmix sweep: s.yaml\n\n| arm | gain |\n|---|---|\n| a <b> | +1.0 |\n\n## Recommended\n\n```yaml\nx: 1\n```\n"
    out = page({}, text, plot)
    assert "<h1>keepmix sweep: s.yaml</h1><img" in out and "<th>arm</th>" in out
    assert "<td>a &lt;b&gt;</td>" in out and "<pre>x: 1</pre>" in out and "<h2>Recommended</h2>" in out
