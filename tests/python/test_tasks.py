"""eval/tasks.py on the real State of the Union texts with a whitespace token count (no model)."""
import re

import pytest

import tasks


def words(text):
    return len(text.split())


@pytest.fixture(scope="module")
def built(sotu_dir):
    """Nine tasks of each kind at 1,500 "tokens", one per depth."""
    return {kind: tasks.build_tasks(kind, words, 1500, 9, seed=7, directory=sotu_dir)
            for kind in tasks.KINDS}


def haystack_of(prompt):
    """The context between the instruction paragraph and the question paragraph."""
    return prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_same_seed_gives_the_same_tasks_and_another_seed_others(kind, sotu_dir):
    first = tasks.build_tasks(kind, words, 800, 3, seed=11, directory=sotu_dir)
    again = tasks.build_tasks(kind, words, 800, 3, seed=11, directory=sotu_dir)
    other = tasks.build_tasks(kind, words, 800, 3, seed=12, directory=sotu_dir)
    assert first == again
    assert [t["prompt"] for t in first] != [t["prompt"] for t in other]


def test_a_task_does_not_depend_on_how_many_are_built(sotu_dir):
    few = tasks.build_tasks("passkey", words, 800, 2, seed=3, directory=sotu_dir)
    many = tasks.build_tasks("passkey", words, 800, 5, seed=3, directory=sotu_dir)
    assert many[:2] == few


@pytest.mark.parametrize("kind", tasks.KINDS)
@pytest.mark.parametrize("target", [250, 1500, 6000])
def test_prompt_length_is_within_two_percent_of_the_target(kind, target, sotu_dir):
    for task in tasks.build_tasks(kind, words, target, 4, seed=1, directory=sotu_dir):
        assert task["length_tokens"] == words(task["prompt"])
        assert abs(task["length_tokens"] - target) <= 0.02 * target, task["id"]


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_every_task_has_the_documented_fields(kind, built):
    for task in built[kind]:
        assert {"id", "kind", "prompt", "answers", "length_tokens", "depth"} <= task.keys()
        assert task["kind"] == kind
        assert task["answers"] and all(isinstance(a, str) for a in task["answers"])
    assert [t["depth"] for t in built[kind]] == list(tasks.DEPTHS)
    assert len({t["id"] for t in built[kind]}) == 9


def test_passkey_appears_exactly_once_at_its_depth(built):
    for task in built["passkey"]:
        key = task["answers"][0]
        assert re.fullmatch(r"\d{5}", key)
        assert task["prompt"].count(task["needle"]) == 1
        assert len(re.findall(rf"(?<!\d){key}(?!\d)", task["prompt"])) == 2  # the needle's two
        haystack = haystack_of(task["prompt"])
        before = words(haystack[:haystack.index(task["needle"])])
        depth = before / (words(haystack) - words(task["needle"]))
        assert abs(depth - task["depth"]) < 0.05, (task["id"], depth)
        assert task["prompt"].rstrip().endswith("Reply with the number only.")


def test_multikey_plants_three_distinct_labelled_keys_and_asks_for_one(built):
    for task in built["multikey"]:
        assert len(set(task["labels"])) == 3 and len(set(task["keys"])) == 3
        haystack = haystack_of(task["prompt"])
        for label, key, needle in zip(task["labels"], task["keys"], task["needles"]):
            assert haystack.count(needle) == 1
            assert f"the {label} door is {key}." in needle
        assert task["answers"] == [task["keys"][0]]
        assert f"the {task['asked_label']} door?" in task["question"]
        assert task["asked_label"] == task["labels"][0]
        # Every other key belongs to another door and no other door is asked for.
        assert task["prompt"].count(f"for the {task['asked_label']} door") == 3
        depths = sorted(task["key_depths"])
        assert task["key_depths"][0] == task["depth"]
        assert all(b - a > 0.15 for a, b in zip(depths, depths[1:]))
        positions = [haystack.index(n) for n in task["needles"]]
        assert sorted(range(3), key=positions.__getitem__) == \
            sorted(range(3), key=task["key_depths"].__getitem__)


def excerpts_by_year(prompt):
    found = re.findall(r"Address of (\d{4}):\n(.*?)(?=\n\nAddress of \d{4}:\n|\n\nWhich year)",
                       prompt, flags=re.S)
    return {int(year): text for year, text in found}


def test_year_quote_is_verbatim_in_the_answer_years_excerpt_only(built, sotu_dir):
    texts = {}
    for path in sotu_dir.glob("*.txt"):
        texts.setdefault(int(path.name[:4]), []).append(" ".join(path.read_text().split()))
    for task in built["year"]:
        year = int(task["answers"][0])
        excerpts = excerpts_by_year(task["prompt"])
        assert sorted(excerpts) == sorted(task["years"]) and len(excerpts) == len(task["years"])
        assert task["quote"] in excerpts[year]
        assert not any(task["quote"] in text for y, text in excerpts.items() if y != year)
        assert any(task["quote"] in text for text in texts[year])  # really from that address
        assert not re.search(r"\d", task["quote"])
        assert f'"{task["quote"]}"' in task["question"]


def test_year_answer_excerpt_sits_at_the_tasks_depth(built):
    for task in built["year"]:
        years = task["years"]
        slot = years.index(int(task["answers"][0]))
        assert slot == min(len(years) - 1, int(task["depth"] * len(years)))


def test_build_tasks_rejects_unknown_kinds_and_tiny_targets(sotu_dir):
    with pytest.raises(ValueError, match="kind"):
        tasks.build_tasks("needle", words, 1000, 1, directory=sotu_dir)
    with pytest.raises(ValueError, match="target_tokens"):
        tasks.build_tasks("passkey", words, 50, 1, directory=sotu_dir)


def test_a_missing_data_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        tasks.load_addresses(tmp_path / "nowhere")


def test_sentences_split_after_stops_but_not_after_abbreviations():
    text = ('Mr. Speaker, the year was good. Gen. Grant agreed! Did J. Q. Adams? "Yes." '
            "And so on")
    assert tasks.split_sentences(text) == [
        "Mr. Speaker, the year was good.", "Gen. Grant agreed!", "Did J. Q. Adams?", '"Yes."',
        "And so on"]


def test_score_wants_the_answer_as_a_whole_token():
    task = {"answers": ["40213"]}
    assert tasks.score(task, "The pass key is 40213.") == 1.0
    assert tasks.score(task, "40213") == 1.0
    assert tasks.score(task, "402135") == 0.0
    assert tasks.score(task, "140213") == 0.0
    assert tasks.score(task, "4021") == 0.0
    assert tasks.score(task, "") == 0.0
    assert tasks.score({"answers": ["1862", "1863"]}, "It was 1863, I think") == 1.0


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": text.split() + (["<bos>"] if add_special_tokens else [])}


class BaseTokenizer(ChatTokenizer):
    chat_template = None


def test_format_prompt_uses_the_chat_template_or_ends_in_answer():
    task = {"prompt": "Context. What is the pass key?"}
    assert tasks.format_prompt(ChatTokenizer(), task) == \
        "<user>Context. What is the pass key?</user><assistant>"
    assert tasks.format_prompt(BaseTokenizer(), task) == \
        "Context. What is the pass key?\nAnswer:"
    # Special tokens come from the template, or from the tokenizer for completion style.
    assert "<bos>" not in tasks.encode_prompt(ChatTokenizer(), task)
    assert "<bos>" in tasks.encode_prompt(BaseTokenizer(), task)


def test_token_counters_size_the_formatted_prompt(sotu_dir):
    tokenizer = ChatTokenizer()
    count, prompt_count = tasks.token_counters(tokenizer)
    assert count("a b c") == 3
    built = tasks.build_tasks("passkey", count, 1000, 2, directory=sotu_dir,
                              prompt_count=prompt_count)
    for task in built:
        formatted = tasks.encode_prompt(tokenizer, task)
        assert formatted[0].startswith("<user>") and formatted[-1].endswith("<assistant>")
        assert len(formatted) == task["length_tokens"]
        assert abs(len(formatted) - 1000) <= 20
