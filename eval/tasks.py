"""Long-context tasks with exact answers, built from the State of the Union addresses in
shared/data/sotu (one plain-text file per address, named YEAR_PRESIDENT_PARTY.txt).

Each task is a dict:
  id            "<kind>-<target_tokens>-<seed>-<index>"
  kind          "passkey", "multikey" or "year"
  prompt        the user's message: instruction, context, question (no chat markup; see format_prompt)
  answers       acceptable answer strings (score() accepts any of them)
  length_tokens the prompt's token count as built (by prompt_count, else tokenizer_count)
  depth         where the needed fact sits in the context, 0.1 ... 0.9
plus a few descriptive fields (question, and per kind the keys, labels or years planted).

build_tasks() sizes every prompt to target_tokens (within TOLERANCE) by the caller's token counter,
so the same tasks can be built for any tokenizer; token_counters(tokenizer) gives counters that
size the prompt as the model will see it, chat template included. Everything is drawn from a
random.Random seeded by (kind, target_tokens, seed, index): a task does not depend on n, and the
same arguments give the same tasks on every machine.
"""
import bisect
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["KINDS", "DEPTHS", "TOLERANCE", "Address", "sotu_dir", "load_addresses",
           "split_sentences", "build_tasks", "format_prompt", "encode_prompt",
           "token_counters", "score"]

KINDS = ("passkey", "multikey", "year")
DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TOLERANCE = 0.02  # the prompt's token count is within target_tokens * (1 +- TOLERANCE)

DOOR_LABELS = ("blue", "red", "green", "yellow", "white", "black", "orange", "purple", "silver",
               "golden")


@dataclass(frozen=True)
class Address:
    year: int
    president: str
    text: str


def sotu_dir():
    """$KVSTAR_SOTU_DIR, else <repo>/../shared/data/sotu (where CI lays shared/ beside the clone)."""
    if os.environ.get("KVSTAR_SOTU_DIR"):
        return Path(os.environ["KVSTAR_SOTU_DIR"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sotu"


@lru_cache(maxsize=4)
def load_addresses(directory=None):
    """Every address in the directory, in file-name order (so chronological). Raises
    FileNotFoundError naming the directory when it is missing or holds no addresses."""
    directory = Path(directory) if directory is not None else sotu_dir()
    paths = sorted(directory.glob("*.txt")) if directory.is_dir() else []
    addresses = []
    for path in paths:
        year, _, rest = path.stem.partition("_")
        if not year.isdigit():
            continue
        president = rest.rsplit("_", 1)[0].replace("_", " ").title()
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        addresses.append(Address(int(year), president, text))
    if not addresses:
        raise FileNotFoundError(f"no State of the Union addresses (YEAR_*.txt) in {directory}")
    return tuple(addresses)


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]*[A-Z])")
_ABBREVIATION_AT_END = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Gen|Gov|Hon|Jr|Sr|No|Nos|Messrs|Co|[A-Z])\.$")


def split_sentences(text):
    """Sentences of whitespace-normalized text: split after . ! ? (and any closing quote or
    bracket) before a capital, except after common abbreviations and initials (Mr., Gen., J.)."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        candidate = text[start:match.end()].strip()
        if not candidate or _ABBREVIATION_AT_END.search(candidate):
            continue
        sentences.append(candidate)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


@lru_cache(maxsize=4)
def _sentences_by_address(directory=None):
    return tuple(tuple(split_sentences(a.text)) for a in load_addresses(directory))


class _Fitter:
    """Chooses context sentences so that the whole prompt counts target_tokens within TOLERANCE:
    sentences are estimated by count(text), the rendered prompt measured by prompt_count(text).

    fit(pool, render): pool holds (tag, sentence) pairs in the order they should be taken;
    render(chosen) gets the chosen pairs in pool order and returns the prompt. A sentence that
    would overshoot is skipped and later, shorter ones are tried, so the text is only ever cut at
    sentence boundaries."""

    def __init__(self, count, prompt_count, target_tokens):
        self.count, self.prompt_count = count, prompt_count
        self.target = target_tokens
        self.low = target_tokens * (1 - TOLERANCE)
        self.high = target_tokens * (1 + TOLERANCE)

    def fit(self, pool, render):
        estimates = [self.count(sentence) for _, sentence in pool]
        overhead = self.prompt_count(render([]))
        tokens = None
        for _ in range(8):
            chosen = self._greedy(estimates, overhead)
            prompt = render([pool[i] for i in chosen])
            tokens = self.prompt_count(prompt)
            if self.low <= tokens <= self.high:
                return prompt, tokens
            # Joins and layout make the real count differ from the estimates' sum: recalibrate.
            overhead = tokens - sum(estimates[i] for i in chosen)
        raise ValueError(f"cannot fit a prompt to {self.target} tokens (+-{TOLERANCE:.0%}) from "
                         f"{len(pool)} sentences; the last try counted {tokens}")

    def _greedy(self, estimates, overhead):
        chosen, total = [], overhead
        for index, estimate in enumerate(estimates):
            if total + estimate <= self.target:
                chosen.append(index)
                total += estimate
                if total == self.target:
                    break
        if total >= self.low:
            return chosen
        # Short prompts of long sentences may leave a gap no remaining sentence fits: trade one
        # chosen sentence for an unchosen one that much longer, the latest chosen first.
        taken = set(chosen)
        unchosen = sorted((estimates[i], i) for i in range(len(estimates)) if i not in taken)
        for position in range(len(chosen) - 1, -1, -1):
            rest = total - estimates[chosen[position]]
            at = bisect.bisect_left(unchosen, (self.low - rest, -1))
            if at < len(unchosen) and rest + unchosen[at][0] <= self.high:
                chosen[position] = unchosen[at][1]
                return sorted(chosen)
        return chosen


def _is_prose(sentence):
    """False for fragments such as section numbers ("II.") or headings in capitals."""
    return len(sentence.split()) >= 3 and any(c.islower() for c in sentence)


def _haystack_pool(rng, count, target_tokens, directory):
    """Consecutive sentences from a random address and offset on (wrapping around the corpus),
    several times more than the target needs, so that short ones remain to close the gap."""
    by_address = _sentences_by_address(directory)
    address = rng.randrange(len(by_address))
    offset = rng.randrange(max(1, len(by_address[address]) - 20))
    pool, tokens, goal = [], 0, 2 * target_tokens + 3000
    while tokens < goal:
        for sentence in by_address[address][offset:]:
            if not _is_prose(sentence):
                continue
            pool.append((address, sentence))
            tokens += count(sentence)
            if tokens >= goal:
                break
        address, offset = (address + 1) % len(by_address), 0
    return pool


def _with_needles(chosen, count, needles):
    """Haystack text with each (depth, needle) inserted between sentences where about `depth` of
    the haystack's tokens precede it."""
    cumulative = [0]
    for _, sentence in chosen:
        cumulative.append(cumulative[-1] + count(sentence))
    sentences = [sentence for _, sentence in chosen]
    placed = []
    for depth, needle in needles:
        goal = depth * cumulative[-1]
        placed.append((min(range(len(cumulative)), key=lambda i: abs(cumulative[i] - goal)), needle))
    for position, needle in sorted(placed, key=lambda p: -p[0]):  # from the back: indices hold
        sentences.insert(position, needle)
    return " ".join(sentences)


def _distinct_keys(rng, how_many):
    keys = []
    while len(keys) < how_many:
        key = str(rng.randrange(10000, 100000))
        if key not in keys:
            keys.append(key)
    return keys


def _passkey_task(rng, count, prompt_count, target_tokens, depth, directory):
    key = _distinct_keys(rng, 1)[0]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key?"

    def render(chosen):
        haystack = _with_needles(chosen, count, [(depth, needle)])
        return ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
                "remember it; you will be asked for it.\n\n"
                f"{haystack}\n\n{question} Reply with the number only.")

    pool = _haystack_pool(rng, count, target_tokens, directory)
    prompt, tokens = _Fitter(count, prompt_count, target_tokens).fit(pool, render)
    return dict(prompt=prompt, answers=[key], length_tokens=tokens, question=question,
                needle=needle)


def _multikey_task(rng, count, prompt_count, target_tokens, depth, directory):
    labels = rng.sample(DOOR_LABELS, 3)
    keys = _distinct_keys(rng, 3)
    # The asked key sits at the task's depth, the two distractors at other depths, all 0.2 apart.
    depths = [depth]
    for candidate in rng.sample(DEPTHS, len(DEPTHS)):
        if all(abs(candidate - d) > 0.15 for d in depths):
            depths.append(candidate)
        if len(depths) == 3:
            break
    needles = [(d, f"The pass key for the {label} door is {key}. Remember it. {key} is the pass "
                   f"key for the {label} door.") for d, label, key in zip(depths, labels, keys)]
    question = f"What is the pass key for the {labels[0]} door?"

    def render(chosen):
        haystack = _with_needles(chosen, count, needles)
        return ("Several pass keys, each for a door of a different colour, are hidden inside a "
                "lot of irrelevant text. Find them and remember which door each one opens; you "
                "will be asked for one of them.\n\n"
                f"{haystack}\n\n{question} Reply with the number only.")

    pool = _haystack_pool(rng, count, target_tokens, directory)
    prompt, tokens = _Fitter(count, prompt_count, target_tokens).fit(pool, render)
    return dict(prompt=prompt, answers=[keys[0]], length_tokens=tokens, question=question,
                asked_label=labels[0], labels=labels, keys=keys, key_depths=depths,
                needles=[needle for _, needle in needles])


def _quotable(sentence):
    """Plain prose of moderate length that gives no number (so no year) away."""
    return (10 <= len(sentence.split()) <= 40 and not re.search(r"\d", sentence)
            and sentence[-1] in ".!?" and '"' not in sentence)


def _outward(center, length, share_before, rng):
    """Sentence indices of one address taken around center, each next one from before it with
    probability share_before, so center ends up at about that fraction of the excerpt."""
    before, after = list(range(center - 1, -1, -1)), list(range(center + 1, length))
    order = []
    while before or after:
        take_before = before and (not after or rng.random() < share_before)
        order.append(before.pop(0) if take_before else after.pop(0))
    return order


def _year_task(rng, count, prompt_count, target_tokens, depth, directory):
    addresses = load_addresses(directory)
    by_address = _sentences_by_address(directory)
    documents = max(2, min(30, target_tokens // 600))
    first_of_year = {}  # distinct years only, so a header names one address
    for index, address in enumerate(addresses):
        first_of_year.setdefault(address.year, index)
    picked = rng.sample(sorted(first_of_year.values()), documents)
    answer_slot = min(documents - 1, int(depth * documents))
    answer = picked[answer_slot]
    answer_year = addresses[answer].year

    sentences = by_address[answer]
    candidates = [i for i, s in enumerate(sentences) if _quotable(s)]
    rng.shuffle(candidates)
    others = [a.text for i, a in enumerate(addresses) if i != answer]
    # The first candidate that no other address contains (boilerplate recurs across years).
    quote_index = next((i for i in candidates if not any(sentences[i] in t for t in others)), None)
    if quote_index is None:
        raise ValueError(f"the {answer_year} address has no sentence to quote")
    quote = sentences[quote_index]

    # Every excerpt is consecutive sentences from a random offset; the answer's grows outwards
    # from the quote, which so sits at about the depth's remainder within its slot. Each excerpt
    # offers about three times its share, so short addresses leave room to the others.
    offer = 3 * target_tokens // documents + 500
    streams = []
    for slot, address in enumerate(picked):
        own = by_address[address]
        if address == answer:
            order = _outward(quote_index, len(own), depth * documents - answer_slot, rng)
        else:
            start = rng.randrange(max(1, len(own) - 40))
            order = range(start, len(own))
        stream, offered = [], 0
        for index in order:
            if offered >= offer:
                break
            if not _is_prose(own[index]):
                continue
            stream.append(((slot, index), own[index]))
            offered += count(own[index])
        streams.append(stream)
    # One sentence of each excerpt in turn, so that all grow together.
    pool = [stream[turn] for turn in range(max(map(len, streams)))
            for stream in streams if turn < len(stream)]
    question = f"Which year's address contains this sentence: \"{quote}\""

    def render(chosen):
        excerpts = [[] for _ in picked]
        excerpts[answer_slot].append((quote_index, quote))
        for (slot, index), sentence in chosen:
            excerpts[slot].append((index, sentence))
        context = "\n\n".join(
            f"Address of {addresses[address].year}:\n" + " ".join(s for _, s in sorted(excerpt))
            for address, excerpt in zip(picked, excerpts))
        return ("Below are excerpts from several State of the Union addresses, each introduced "
                "by the year it was delivered.\n\n"
                f"{context}\n\n{question} Reply with the year only.")

    prompt, tokens = _Fitter(count, prompt_count, target_tokens).fit(pool, render)
    return dict(prompt=prompt, answers=[str(answer_year)], length_tokens=tokens,
                question=question, quote=quote, years=[addresses[a].year for a in picked],
                answer_president=addresses[answer].president)


_BUILDERS = {"passkey": _passkey_task, "multikey": _multikey_task, "year": _year_task}


def _memoized(count):
    """Sentences are counted many times while fitting; remember the short texts' counts."""
    cache = {}

    def counted(text):
        if len(text) > 4000:
            return count(text)
        if text not in cache:
            cache[text] = count(text)
        return cache[text]
    return counted


def build_tasks(kind, tokenizer_count, target_tokens, n, seed=0, directory=None, depths=DEPTHS,
                prompt_count=None):
    """n tasks of one kind whose prompts count target_tokens within +-TOLERANCE.

    tokenizer_count(text) -> int counts the tokens of a piece of text; prompt_count(prompt) -> int
    those of a whole prompt as the model will see it (default tokenizer_count; see
    token_counters for a transformers tokenizer). Task i puts its fact at depths[i % len(depths)].
    directory: the sotu folder (default sotu_dir()). Raises ValueError for an unknown kind or a
    target too small to hold the task, FileNotFoundError when there are no texts."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if target_tokens < 200:
        raise ValueError(f"target_tokens must be at least 200, not {target_tokens}")
    count = _memoized(tokenizer_count)
    prompt_count = count if prompt_count is None else prompt_count
    tasks = []
    for index in range(n):
        depth = depths[index % len(depths)]
        rng = random.Random(f"{kind}:{target_tokens}:{seed}:{index}")
        fields = _BUILDERS[kind](rng, count, prompt_count, target_tokens, depth, directory)
        tasks.append(dict(id=f"{kind}-{target_tokens}-{seed}-{index}", kind=kind, depth=depth,
                          **fields))
    return tasks


def _has_chat_template(tokenizer):
    return bool(getattr(tokenizer, "chat_template", None))


def _format_text(tokenizer, prompt):
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return f"{prompt}\nAnswer:"


def format_prompt(tokenizer, task):
    """The text the model continues: the chat template with the assistant's turn opened when the
    tokenizer has one (instruct models), else completion style ending in "Answer:" (base models)."""
    return _format_text(tokenizer, task["prompt"])


def encode_prompt(tokenizer, task_or_prompt):
    """Token ids of the formatted prompt. A chat template writes its own special tokens; a
    completion-style prompt gets the tokenizer's usual ones (e.g. Gemma's <bos>)."""
    prompt = task_or_prompt["prompt"] if isinstance(task_or_prompt, dict) else task_or_prompt
    text = _format_text(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=not _has_chat_template(tokenizer))["input_ids"]


def token_counters(tokenizer):
    """(tokenizer_count, prompt_count) for build_tasks with a transformers tokenizer: the first
    counts a text's tokens, the second a whole prompt's once formatted (template included)."""
    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_count(prompt):
        return len(encode_prompt(tokenizer, prompt))
    return count, prompt_count


def score(task, generated_text):
    """1.0 if an acceptable answer appears in generated_text as a whole token (digits not part of
    a longer number, words not part of a longer word), else 0.0."""
    for answer in task["answers"]:
        pattern = r"(?<![0-9A-Za-z])" + re.escape(str(answer).strip()) + r"(?![0-9A-Za-z])"
        if re.search(pattern, generated_text):
            return 1.0
    return 0.0
