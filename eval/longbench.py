"""LongBench-format files and LongBench's QA F1 score.

A LongBench file is JSON lines, one sample per line: "input" (the question), "context" (the long
text), "answers" (a list of acceptable answers), optionally "length" (the context's length in
words) and "_id". qa_f1() is LongBench's qa_f1_score: the token-level F1 between the normalized
prediction and each normalized ground truth, the best over the ground truths.
"""
import json
import os
import re
import string
from collections import Counter

__all__ = ["LongBenchFormatError", "normalize_answer", "token_f1", "qa_f1", "read_jsonl",
           "build_prompt"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class LongBenchFormatError(ValueError):
    """A line of a LongBench file that is not a sample; the message names the file and line."""


def normalize_answer(text):
    """Lower case, punctuation dropped, the articles a/an/the dropped, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens, truth_tokens):
    """F1 of two token lists, counting each token as often as both contain it."""
    common = Counter(prediction_tokens) & Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction, answers):
    """Best token F1 of prediction (normalized) against any of answers (normalized); 0.0 for an
    empty prediction or no answers. A single answer may be passed as a string."""
    if isinstance(answers, str):
        answers = [answers]
    prediction_tokens = normalize_answer(prediction).split()
    return max((token_f1(prediction_tokens, normalize_answer(answer).split())
                for answer in answers), default=0.0)


def _sample(record, where):
    if not isinstance(record, dict):
        raise LongBenchFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("input", "context"):
        if not isinstance(record.get(field), str):
            raise LongBenchFormatError(f"{where}: field {field!r} must be a string, got "
                                       f"{type(record.get(field)).__name__}")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(answer, str) for answer in answers):
        raise LongBenchFormatError(f"{where}: field 'answers' must be a non-empty list of "
                                   f"strings, got {answers!r:.80}")
    if "length" in record and not isinstance(record["length"], int):
        raise LongBenchFormatError(f"{where}: field 'length' must be an integer, got "
                                   f"{record['length']!r:.40}")
    return record


def read_jsonl(path):
    """The samples of a LongBench-format file, in order (blank lines skipped). Each keeps all of
    its fields; "_id" defaults to "<file name>:<line>". Raises LongBenchFormatError naming the file
    and line of the first line that is not valid JSON or lacks input/context/answers."""
    samples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise LongBenchFormatError(f"{where}: not valid JSON ({error.msg} at column "
                                           f"{error.colno})") from None
            sample = _sample(record, where)
            sample.setdefault("_id", f"{os.path.basename(path)}:{number}")
            samples.append(sample)
    return samples


_QA_TEMPLATE = (
    "Read the passage below and answer the question that follows it. Give only the answer, as "
    "briefly as you can, with no explanation.\n\n"
    "Passage:\n{context}\n\n"
    "Now answer the question from the passage. Give only the answer, as briefly as you can.\n\n"
    "Question: {input}\n")


def build_prompt(sample):
    """The user's message for a QA sample: the passage first, then the question. Format it for a
    model with tasks.format_prompt (chat template, or "Answer:" for a base model)."""
    return _QA_TEMPLATE.format(context=sample["context"].strip(), input=sample["input"].strip())
