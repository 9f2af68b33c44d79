"""eval/report.py computes the accuracy report's numbers from result rows as documented."""
import json

import report


def row(method, target, correct, capture, oracle, window=0.75, layer_values=None, **knobs):
    recall = None
    if method != "full":
        recall = dict(window_mass=window, capture=capture, oracle=oracle, resident=4,
                      middle_blocks=13, layers=layer_values or {
                          "0": dict(window_mass=window, capture=capture, oracle=oracle)})
    return dict(task=f"t-{target}", kind="passkey", length=target, target=target, depth=0.5,
                method=method, knobs=dict(report.DEFAULTS, **knobs), correct=correct,
                generated="", seconds=1.0, recall=recall, blocks_loaded_per_step=0.5,
                max_staleness_steps=1, model="m.gguf", device="cpu", dtype="float32",
                torch="t", transformers="x", gpu=None, command="c", profile="smoke",
                part="main", new_tokens=20)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ratio_is_mean_capture_over_mean_oracle_and_kvstar_plus_is_recognised(tmp_path):
    results = tmp_path / "r.jsonl"
    write_rows(results, [
        row("full", 2048, 1.0, 0, 0), row("full", 2048, 0.0, 0, 0),
        row("kvstar", 2048, 1.0, 0.4, 0.8), row("kvstar", 2048, 0.0, 0.6, 0.8),
        row("kvstar", 2048, 1.0, 0.7, 0.8, **report.IMPROVED),
        row("oracle", 2048, 1.0, 0.8, 0.8)])
    rows = report.load([results])
    assert [r["method"] for r in rows].count("kvstar+") == 1
    window, capture, oracle, ratio = report.recall_means(
        [r for r in rows if r["method"] == "kvstar"])
    assert (window, capture, oracle) == (0.75, 0.5, 0.8)
    assert abs(ratio - 0.625) < 1e-12
    assert report.accuracy([r for r in rows if r["method"] == "full"]) == 50.0


def test_written_report_holds_the_tables_and_the_missed_target(tmp_path):
    results = tmp_path / "r.jsonl"
    write_rows(results, [row("full", 4096, 1.0, 0, 0), row("kvstar", 4096, 0.0, 0.45, 0.9),
                         row("oracle", 4096, 1.0, 0.9, 0.9)])
    report.write([str(results)], tmp_path, name="OUT.md")
    text = (tmp_path / "OUT.md").read_text()
    assert "| kvstar | 0.0 | 0.0 |" in text           # accuracy table: 4096 column and "all"
    assert "0.750 / 0.450 / **0.500**" in text         # window / capture / ratio
    assert "capture / oracle 0.500 (target >= 0.95): missed" in text
    assert "accuracy 0% vs full attention's 100% (target: within 1 point): missed" in text
