"""eval/longbench.py: LongBench's QA F1 on hand-made cases, the reader and the prompt."""
import json
from pathlib import Path

import pytest

import longbench

REPO = Path(__file__).resolve().parents[2]


def test_exact_match_scores_one():
    assert longbench.qa_f1("Abraham Lincoln", ["Abraham Lincoln"]) == 1.0


def test_partial_overlap_scores_the_token_f1():
    # 3 predicted tokens, 4 true ones, 2 shared (lincoln, gave):
    # precision 2/3, recall 2/4, F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7.
    score = longbench.qa_f1("Lincoln gave address", ["Lincoln gave his annual"])
    assert score == pytest.approx(4 / 7)


def test_repeated_tokens_count_only_as_often_as_both_have_them():
    # "war war war" vs "war of words": overlap 1, precision 1/3, recall 1/3 -> F1 1/3.
    assert longbench.qa_f1("war war war", ["war of words"]) == pytest.approx(1 / 3)


def test_articles_punctuation_and_case_are_ignored():
    assert longbench.qa_f1("The Union, an   Idea!", ["union idea"]) == 1.0
    assert longbench.normalize_answer("A Tale of the Two Cities.") == "tale of two cities"
    # Only whole articles go: "Theodore" and "anthem" keep their letters.
    assert longbench.normalize_answer("Theodore's anthem") == "theodores anthem"


def test_best_ground_truth_counts():
    assert longbench.qa_f1("1862", ["1863", "1862"]) == 1.0
    assert longbench.qa_f1("in 1862", ["1862", "the year 1862"]) == pytest.approx(2 / 3)


def test_empty_prediction_or_no_overlap_scores_zero():
    assert longbench.qa_f1("", ["Lincoln"]) == 0.0
    assert longbench.qa_f1("the", ["Lincoln"]) == 0.0  # nothing left after normalizing
    assert longbench.qa_f1("Grant", ["Lincoln"]) == 0.0
    assert longbench.qa_f1("Lincoln", []) == 0.0


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sample(**fields):
    record = {"input": "Who?", "context": "Lincoln spoke.", "answers": ["Lincoln"]}
    record.update(fields)
    return json.dumps(record)


def test_read_jsonl_returns_samples_in_order_with_ids(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [sample(_id="a", length=2), "", sample()])
    samples = longbench.read_jsonl(path)
    assert [s["_id"] for s in samples] == ["a", "qa.jsonl:3"]
    assert samples[0]["length"] == 2 and samples[1]["answers"] == ["Lincoln"]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"context": "x", "answers": ["y"]}), "'input'"),
    (json.dumps({"input": "q", "context": 3, "answers": ["y"]}), "'context'"),
    (json.dumps({"input": "q", "context": "x", "answers": "y"}), "'answers'"),
    (json.dumps({"input": "q", "context": "x", "answers": []}), "'answers'"),
    (json.dumps({"input": "q", "context": "x", "answers": ["y"], "length": "long"}), "'length'"),
])
def test_read_jsonl_names_the_bad_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "qa.jsonl", [sample(), sample(), bad, sample()])
    with pytest.raises(longbench.LongBenchFormatError, match=message) as raised:
        longbench.read_jsonl(path)
    assert f"{path}:3:" in str(raised.value)


def test_prompt_puts_the_passage_before_the_question():
    prompt = longbench.build_prompt({"context": "  Lincoln spoke in 1862. ",
                                     "input": "When did Lincoln speak?"})
    assert prompt.index("Lincoln spoke in 1862.") < prompt.index("When did Lincoln speak?")
    assert prompt.rstrip().endswith("Question: When did Lincoln speak?")


def test_the_shipped_sample_file_reads_and_its_answers_are_in_its_contexts():
    samples = longbench.read_jsonl(REPO / "examples" / "data" / "longbench_sample.jsonl")
    assert 3 <= len(samples) <= 5
    for record in samples:
        assert any(answer in record["context"] for answer in record["answers"]), record["_id"]
        assert len(record["context"].split()) < 2400
