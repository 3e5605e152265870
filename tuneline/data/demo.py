"""The demo dataset the project writes itself: small checkable tasks a ~4M-parameter model can learn.

Families (all short answers, checkable by :func:`check_answer`):

- ``addition``: sum of two numbers 0-6 ("What is 4 plus 3?" -> "7")
- ``compare``: the larger of two numbers 1-12 ("Which is bigger: 11 or 7?" -> "11")
- ``next_item``: the item after one in a closed sequence: weekdays, months, letters, numbers 1-30
- ``repeat_word``: an animal word repeated 2-5 times ("Say cat three times." -> "cat cat cat")
- ``count_words``: how many words a short list holds (2-6)
- ``sort_numbers``: 3-4 numbers 1-9 in increasing order ("2, 7, 9")
- ``word_reverse``: 3-4 words in reverse order; held back by default as future "drifted" traffic

Every family has several instruction phrasings, some with the data in ``input`` (alpaca style).
Everything is drawn from ``random.Random`` streams keyed by the seed, so the same seed writes
byte-identical files. Prompts are unique within and across ``sft.jsonl``, ``preference.jsonl`` and
``drift.jsonl`` (normalized: case, spaces and punctuation ignored), so hash-based splits cannot leak.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

from tuneline.params import DemoDataParams
from tuneline.records import sha256_file, write_jsonl

TASK_FAMILIES = (
    "addition",
    "compare",
    "next_item",
    "repeat_word",
    "count_words",
    "sort_numbers",
    "word_reverse",
)
NUMERIC_TASKS = frozenset({"addition", "compare", "count_words"})
MAX_ATTEMPTS = 2000  # draws per row before a family is declared too small for the requested count

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
ANIMALS = ("cat", "dog", "bird", "fish", "cow", "horse", "duck", "fox", "bear", "frog", "goat", "mouse")
THINGS = ("tree", "book", "cup", "ball", "hat", "door", "car", "boat", "lamp", "chair", "box", "bell")
FOODS = ("apple", "bread", "milk", "cake", "rice", "pear", "egg", "soup", "plum", "corn")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
NATURE = ("sun", "moon", "star", "river", "hill", "rain", "snow", "wind", "sea", "road")
WORDS = ANIMALS + THINGS + FOODS + COLORS + NATURE
REPEAT_WORDS = ANIMALS  # words to repeat: a small closed set a tiny model learns to copy
REVERSE_WORDS = ANIMALS + COLORS  # words of the drift family

# Ranges sized for a ~4M-parameter model trained for a few hundred steps on 2 CPU cores: it learns
# closed sets and short copies from in-context tokens it has seen often, not open-ended copying.
ADD_MAX = 6  # addition operands are 0..ADD_MAX
COMPARE_MAX = 12  # compare draws two distinct numbers from 1..COMPARE_MAX
COUNT_MAX = 30  # next_item numbers run 1..COUNT_MAX
SORT_MAX = 9  # sort_numbers draws 3-4 distinct numbers from 1..SORT_MAX
NOUNS = ANIMALS + THINGS + FOODS + NATURE
PLACES = ("park", "river", "market", "school", "garden", "farm", "hill", "shop", "beach", "library")
NAMES = ("Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Max")
ADJECTIVES = ("small", "big", "quiet", "happy", "old", "young", "warm", "cold", "bright", "slow", "fast")

Example = tuple[str, str, str, list[str]]  # instruction, input, expected answer, plausible wrong answers


# ---------------------------------------------------------------------------
# helpers


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - alpaca field name
    """The user turn of an alpaca row: the instruction, then a blank line and the input if any."""
    return f"{instruction}\n\n{input}" if input else instruction


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(_words(text))


def _first_number(text: str) -> int | None:
    for word in _words(text):
        if word.isdigit():
            return int(word)
        if word in NUMBER_WORDS:
            return NUMBER_WORDS.index(word)
    return None


def _numbers(text: str) -> list[int]:
    return [int(w) for w in _words(text) if w.isdigit()]


_LEAD_INS = ("the answer is", "answer", "it is", "its", "that is", "sure")


def _strip_lead_in(words: list[str]) -> list[str]:
    for lead in _LEAD_INS:
        lw = lead.split()
        if words[: len(lw)] == lw and len(words) > len(lw):
            return words[len(lw):]
    return words


def check_answer(task: str, prompt: str, expected: str, response: str) -> bool:
    """Whether ``response`` answers a ``task`` prompt whose correct answer is ``expected``.

    Case, punctuation and spacing are ignored. Numeric tasks compare the first number in the
    response (digits or a number word up to twenty); list tasks compare the whole word or number
    sequence, so an answer that goes on past the expected one is wrong.
    """
    if task not in TASK_FAMILIES:
        raise ValueError(f"unknown task family {task!r} (known: {', '.join(TASK_FAMILIES)})")
    if task in NUMERIC_TASKS:
        want = _first_number(expected)
        return want is not None and _first_number(response) == want
    if task == "sort_numbers":
        want_numbers = _numbers(expected)
        return bool(want_numbers) and _numbers(response) == want_numbers
    want_words = _words(expected)
    got = _words(response)
    return bool(want_words) and (got == want_words or _strip_lead_in(got) == want_words)


# ---------------------------------------------------------------------------
# task families: each draws one example from an rng


def _count_word(rng: random.Random, n: int) -> str:
    return NUMBER_WORDS[n] if rng.random() < 0.5 else str(n)


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
    total = a + b
    templates = [
        (f"What is {a} plus {b}?", ""),
        (f"What is {a} + {b}?", ""),
        (f"Add {a} and {b}.", ""),
        (f"Compute the sum of {a} and {b}.", ""),
        ("Add these two numbers.", f"{a} and {b}"),
        ("Find the sum.", f"{a} + {b}"),
        (f"How much is {a} plus {b}?", ""),
        (f"Calculate {a} + {b}.", ""),
        (f"If you have {a} apples and get {b} more, how many apples do you have?", ""),
        (f"What do you get when you add {a} and {b}?", ""),
        (f"{a} plus {b} equals what?", ""),
        ("Sum these numbers.", f"{a}, {b}"),
    ]
    instruction, inp = rng.choice(templates)
    wrong = [str(total + 1), str(max(a, b))] + ([str(total - 1)] if total > 0 else [])
    return instruction, inp, str(total), [w for w in wrong if w != str(total)]


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, COMPARE_MAX + 1), 2)
    templates = [
        (f"Which number is larger, {a} or {b}?", ""),
        (f"Which is bigger: {a} or {b}?", ""),
        ("Pick the greater number.", f"{a}, {b}"),
        (f"Tell me the larger of {a} and {b}.", ""),
        (f"Of the numbers {a} and {b}, which one is greater?", ""),
        ("Return the bigger number.", f"{a} and {b}"),
        ("Which of these two numbers is larger?", f"{a} or {b}"),
    ]
    instruction, inp = rng.choice(templates)
    return instruction, inp, str(max(a, b)), [str(min(a, b))]


def _next_item(rng: random.Random) -> Example:
    kind = rng.choice(("day", "month", "letter", "number"))
    if kind == "day":
        seq, cyclic = list(WEEKDAYS), True
    elif kind == "month":
        seq, cyclic = list(MONTHS), True
    elif kind == "letter":
        seq, cyclic = list(LETTERS), False
    else:
        seq, cyclic = [str(n) for n in range(1, COUNT_MAX + 1)], False
    n = len(seq)
    i = rng.randrange(n) if cyclic else rng.randrange(2, n - 2)
    cur, nxt = seq[i], seq[(i + 1) % n]
    prev, prev2, after2 = seq[(i - 1) % n], seq[(i - 2) % n], seq[(i + 2) % n]
    templates = [
        (f"What {kind} comes after {cur}?", ""),
        (f"Which {kind} follows {cur}?", ""),
        (f"Name the {kind} after {cur}.", ""),
        (f"What is the next {kind} after {cur}?", ""),
        (f"Continue the sequence with the next {kind}.", f"{prev2}, {prev}, {cur}"),
        ("What comes next?", f"{prev}, {cur}"),
        (f"Tell me which {kind} comes right after {cur}.", ""),
    ]
    instruction, inp = rng.choice(templates)
    return instruction, inp, nxt, [prev, after2]


def _repeat_word(rng: random.Random) -> Example:
    word, times = rng.choice(REPEAT_WORDS), rng.randint(2, 5)
    count = _count_word(rng, times)
    templates = [
        (f"Repeat the word {word} {count} times.", ""),
        (f"Say {word} {count} times.", ""),
        (f"Write the word {word} {count} times, separated by spaces.", ""),
        (f"Repeat this word {count} times.", word),
        (f"Print {word} exactly {count} times.", ""),
        ("Repeat the word below.", f"{word}, {count} times"),
    ]
    instruction, inp = rng.choice(templates)
    answer = " ".join([word] * times)
    return instruction, inp, answer, [" ".join([word] * (times - 1)), " ".join([word] * (times + 1))]


def _word_list(rng: random.Random, k: int) -> tuple[list[str], str]:
    words = rng.sample(WORDS, k)
    text = ", ".join(words) if rng.random() < 0.5 else " ".join(words)
    return words, text


def _count_words(rng: random.Random) -> Example:
    words, text = _word_list(rng, rng.randint(2, 6))
    templates = [
        ("How many words are in this list?", text),
        ("Count the words.", text),
        (f"How many words are there in: {text}?", ""),
        ("Tell me the number of words in the following list.", text),
        (f"Count how many words this list has: {text}.", ""),
        ("How many words do you see?", text),
    ]
    instruction, inp = rng.choice(templates)
    k = len(words)
    return instruction, inp, str(k), [str(k + 1), str(k - 1)]


def _sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, SORT_MAX + 1), rng.randint(3, 4))
    comma = ", ".join(map(str, numbers))
    spaced = " ".join(map(str, numbers))
    templates = [
        ("Sort these numbers from smallest to largest.", comma),
        (f"Put these numbers in increasing order: {comma}.", ""),
        ("Arrange in ascending order.", spaced),
        ("Order the numbers from low to high.", comma),
        (f"Sort {comma} from smallest to biggest.", ""),
        ("Write these numbers in order, smallest first.", spaced),
    ]
    instruction, inp = rng.choice(templates)
    ordered = sorted(numbers)
    answer = ", ".join(map(str, ordered))
    j = rng.randrange(len(ordered) - 1)
    swapped = ordered[:j] + [ordered[j + 1], ordered[j]] + ordered[j + 2:]
    wrong = [", ".join(map(str, sorted(numbers, reverse=True))), ", ".join(map(str, swapped))]
    if numbers != ordered:
        wrong.append(comma)
    return instruction, inp, answer, wrong


def _word_reverse(rng: random.Random) -> Example:
    words = rng.sample(REVERSE_WORDS, rng.randint(3, 4))
    text = " ".join(words)
    templates = [
        (f"Reverse the order of these words: {text}.", ""),
        ("Write these words in reverse order.", text),
        (f"Say these words backwards, last word first: {text}.", ""),
        ("Reverse the word order.", text),
        ("Put the words below in the opposite order.", text),
    ]
    instruction, inp = rng.choice(templates)
    reversed_words = words[::-1]
    j = rng.randrange(len(words) - 1)
    swapped = reversed_words[:j] + [reversed_words[j + 1], reversed_words[j]] + reversed_words[j + 2:]
    return instruction, inp, " ".join(reversed_words), [text, " ".join(swapped)]


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "addition": _addition,
    "compare": _compare,
    "next_item": _next_item,
    "repeat_word": _repeat_word,
    "count_words": _count_words,
    "sort_numbers": _sort_numbers,
    "word_reverse": _word_reverse,
}


def generate_example(task: str, rng: random.Random) -> Example:
    """One (instruction, input, answer, wrong answers) draw of ``task``."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task family {task!r} (known: {', '.join(TASK_FAMILIES)})")
    return GENERATORS[task](rng)


def training_families(params: DemoDataParams) -> list[str]:
    """The families written to sft/preference data: all but the drift family."""
    if params.drift_family not in TASK_FAMILIES:
        raise ValueError(f"drift_family {params.drift_family!r} is not one of {', '.join(TASK_FAMILIES)}")
    return [f for f in TASK_FAMILIES if f != params.drift_family]


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"tuneline-demo:{seed}:{stream}")


def _unique_examples(task: str, count: int, rng: random.Random, seen: set[str]) -> list[Example]:
    """``count`` examples of ``task`` whose normalized prompt is not in ``seen`` (which grows)."""
    out: list[Example] = []
    misses = 0
    while len(out) < count:
        example = generate_example(task, rng)
        key = normalize(alpaca_prompt(example[0], example[1]))
        if key in seen:
            misses += 1
            if misses > MAX_ATTEMPTS:
                raise ValueError(
                    f"task family {task!r} ran out of distinct prompts after {len(out)} of {count}; "
                    "ask for fewer examples"
                )
            continue
        misses = 0
        seen.add(key)
        out.append(example)
    return out


# ---------------------------------------------------------------------------
# corpus


def _sentence(rng: random.Random) -> str:
    topic = rng.randrange(12)
    if topic == 0:
        i = rng.randrange(7)
        return rng.choice([
            f"{WEEKDAYS[(i + 1) % 7]} comes after {WEEKDAYS[i]}.",
            f"The day after {WEEKDAYS[i]} is {WEEKDAYS[(i + 1) % 7]}.",
            f"The day before {WEEKDAYS[i]} is {WEEKDAYS[i - 1]}.",
            "The days of the week are " + ", ".join(WEEKDAYS[:-1]) + " and Sunday.",
            f"On {WEEKDAYS[i]} {rng.choice(NAMES)} went to the {rng.choice(PLACES)}.",
        ])
    if topic == 1:
        i = rng.randrange(12)
        return rng.choice([
            f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}.",
            f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % 12]}.",
            f"The month before {MONTHS[i]} is {MONTHS[i - 1]}.",
            f"In {MONTHS[i]} the {rng.choice(NATURE)} is {rng.choice(ADJECTIVES)}.",
            "The months of the year are " + ", ".join(MONTHS[:-1]) + " and December.",
        ])
    if topic == 2:
        i = rng.randrange(25)
        return rng.choice([
            f"The letter {LETTERS[i + 1]} comes after the letter {LETTERS[i]}.",
            f"After {LETTERS[i]} comes {LETTERS[i + 1]}.",
            "A run of letters: " + ", ".join(LETTERS[max(0, i - 2): i + 3]) + ".",
            f"The word {rng.choice(WORDS)} starts with a letter.",
        ])
    if topic in (3, 4):
        a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
        return rng.choice([
            f"{a} plus {b} is {a + b}.",
            f"{a} + {b} = {a + b}.",
            f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} makes {NUMBER_WORDS[a + b]}.",
            f"If you add {a} and {b} you get {a + b}.",
            f"{rng.choice(NAMES)} had {a} {rng.choice(FOODS)}s and got {b} more, so now there are {a + b}.",
            f"The sum of {a} and {b} is {a + b}.",
        ])
    if topic == 5:
        a, b = rng.sample(range(1, COMPARE_MAX + 1), 2)
        hi, lo = max(a, b), min(a, b)
        return rng.choice([
            f"{hi} is larger than {lo}.",
            f"{lo} is smaller than {hi}.",
            f"Between {a} and {b}, the bigger number is {hi}.",
            f"{hi} is greater than {lo}, and {lo} is less than {hi}.",
        ])
    if topic == 6:
        n = rng.randint(1, COUNT_MAX)
        return rng.choice([
            f"After {n} comes {n + 1}.",
            f"We count {n}, {n + 1}, {n + 2}, {n + 3}.",
            f"The number after {n} is {n + 1}, and the number before it is {n - 1}.",
            "One, two, three, four, five, six, seven, eight, nine, ten.",
        ])
    if topic == 7:
        numbers = rng.sample(range(1, SORT_MAX + 1), rng.randint(3, 4))
        ordered = sorted(numbers)
        return rng.choice([
            f"In order from smallest to largest, {', '.join(map(str, numbers))} become {', '.join(map(str, ordered))}.",
            f"The numbers {', '.join(map(str, ordered))} are sorted from low to high.",
            f"{ordered[0]} is the smallest of {', '.join(map(str, numbers))}.",
        ])
    if topic == 8:
        words = rng.sample(WORDS, rng.randint(2, 6))
        return rng.choice([
            f"The list {', '.join(words)} has {len(words)} words.",
            f"There are {NUMBER_WORDS[len(words)]} words here: {' '.join(words)}.",
            f"{rng.choice(NAMES)} wrote {len(words)} words: {', '.join(words)}.",
        ])
    if topic == 9:
        word, times = rng.choice(REPEAT_WORDS), rng.randint(2, 5)
        return rng.choice([
            f"The bird sang {' '.join([word] * times)}, {NUMBER_WORDS[times]} times.",
            f"{rng.choice(NAMES)} said the word {word} {times} times: {' '.join([word] * times)}.",
            f"Say it again: {word}, {word}.",
        ])
    if topic == 10:
        name = rng.choice(NAMES)
        task = rng.choice([
            f"add {rng.randint(0, ADD_MAX)} and {rng.randint(0, ADD_MAX)}",
            "pick the bigger number",
            f"name the day after {rng.choice(WEEKDAYS)}",
            f"name the month after {rng.choice(MONTHS)}",
            "count the words in a list",
            "sort the numbers from smallest to largest",
            f"repeat the word {rng.choice(REPEAT_WORDS)}",
            "reverse the order of the cards",
            "write the letters in order",
        ])
        return rng.choice([
            f"The teacher asked {name} to {task}.",
            f"{name} was able to {task} without help.",
            f"Can you {task}? Yes, I can.",
            f"First {name} had to {task}, and then the class went home.",
        ])
    adjective, animal, color = rng.choice(ADJECTIVES), rng.choice(ANIMALS), rng.choice(COLORS)
    return rng.choice([
        f"The {adjective} {animal} sat by the {rng.choice(THINGS)}.",
        f"{rng.choice(NAMES)} has a {color} {rng.choice(THINGS)} and a {adjective} {animal}.",
        f"A {color} {animal} ran to the {rng.choice(PLACES)} near the {rng.choice(NATURE)}.",
        f"We saw a {rng.choice(NOUNS)}, a {rng.choice(NOUNS)} and a {rng.choice(NOUNS)}.",
        f"The {animal} walked backwards, then forward again.",
    ])


def _join(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def _scene_words(rng: random.Random) -> list[str]:
    """A short story whose sentences refer back to the same words: in-context copying and counting."""
    a, b = rng.sample(NAMES, 2)
    items = rng.sample(WORDS, rng.randint(2, 6))
    word, times = rng.choice(REPEAT_WORDS), rng.randint(2, 5)
    animal, color, place = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES)
    pool = [
        f"{a} has a {color} {animal}.",
        f"The {color} {animal} of {a} went to the {place}.",
        f"At the {place} {a} saw {NUMBER_WORDS[len(items)]} things: {_join(items)}.",
        f"{a} said {', '.join(items)}. Then {b} said the same words: {', '.join(items)}.",
        f"{a} wrote {' '.join(items)}, and {b} wrote {' '.join(items)} too.",
        f"The list {', '.join(items)} has {len(items)} words.",
        f"How many words are in {' '.join(items)}? There are {len(items)}.",
        f"{b} counted the words {', '.join(items)} and got {len(items)}.",
        f"{a} called the {animal} {NUMBER_WORDS[times]} times: {' '.join([animal] * times)}.",
        f"The word {word} said {times} times is {' '.join([word] * times)}.",
        f"{b} had to repeat {word} {NUMBER_WORDS[times]} times, so {b} said {' '.join([word] * times)}.",
        f"The first word was {items[0]} and the last word was {items[-1]}.",
    ]
    return rng.sample(pool, rng.randint(3, 6))


def _scene_numbers(rng: random.Random) -> list[str]:
    """Numbers that recur inside the paragraph: sums, comparisons, order, counting on."""
    a, b = rng.sample(NAMES, 2)
    x, y = rng.sample(range(1, COMPARE_MAX + 1), 2)
    p, q = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
    numbers = rng.sample(range(1, SORT_MAX + 1), rng.randint(3, 4))
    listed, ordered = ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))
    n, food = rng.randint(1, COUNT_MAX), rng.choice(FOODS)
    pool = [
        f"{a} has {x} points and {b} has {y} points. The bigger number is {max(x, y)}, so {a if x > y else b} wins.",
        f"Which is larger, {x} or {y}? It is {max(x, y)}, because {max(x, y)} is greater than {min(x, y)}.",
        f"Of {x} and {y}, the smaller one is {min(x, y)} and the larger one is {max(x, y)}.",
        f"{a} had {p} {food}s and got {q} more, so {a} has {p + q} now.",
        f"{p} plus {q} is {p + q}, and {q} plus {p} is {p + q} too.",
        f"What is {p} + {q}? It is {p + q}.",
        f"{b} wrote the numbers {listed}. Sorted from smallest to largest they are {ordered}.",
        f"In increasing order, {listed} becomes {ordered}.",
        f"{a} counted on from {n}: {n}, {n + 1}, {n + 2}, {n + 3}. The number after {n} is {n + 1}.",
        f"After {n} comes {n + 1}, and after {n + 1} comes {n + 2}.",
    ]
    return rng.sample(pool, rng.randint(3, 6))


def _scene_calendar(rng: random.Random) -> list[str]:
    """Days, months and letters in order, anchored on one item per paragraph."""
    d, m, i = rng.randrange(7), rng.randrange(12), rng.randrange(1, 24)
    name = rng.choice(NAMES)
    day, nday, pday = WEEKDAYS[d], WEEKDAYS[(d + 1) % 7], WEEKDAYS[d - 1]
    month, nmonth = MONTHS[m], MONTHS[(m + 1) % 12]
    pool = [
        f"Today is {day}. Tomorrow is {nday}, and yesterday was {pday}.",
        f"{name} goes to the {rng.choice(PLACES)} on {day}. The day after {day} is {nday}.",
        f"After {day} comes {nday}.",
        f"It is {month} now. Next month is {nmonth}.",
        f"The month after {month} is {nmonth}, and the month before {month} is {MONTHS[m - 1]}.",
        f"In {month} {name} saw the {rng.choice(NATURE)}. After {month} comes {nmonth}.",
        f"The letters {LETTERS[i - 1]}, {LETTERS[i]}, {LETTERS[i + 1]} are in order. After {LETTERS[i]} comes {LETTERS[i + 1]}.",
        f"The letter after {LETTERS[i]} is {LETTERS[i + 1]}.",
        "The days of the week are " + _join(list(WEEKDAYS)) + ".",
        "The months of the year are " + _join(list(MONTHS)) + ".",
    ]
    return rng.sample(pool, rng.randint(3, 5))


def _paragraph(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        sentences = _scene_words(rng)
    elif kind < 0.6:
        sentences = _scene_numbers(rng)
    elif kind < 0.8:
        sentences = _scene_calendar(rng)
    else:
        sentences = [_sentence(rng) for _ in range(rng.randint(3, 6))]
    return " ".join(sentences)


def generate_corpus(params: DemoDataParams) -> list[str]:
    """``corpus_paragraphs`` paragraphs of simple English covering the tasks' vocabulary.

    Most paragraphs are small scenes whose sentences reuse the same words and numbers (copying,
    counting, comparing, ordering in context), so pretraining grows the in-context skills the tasks
    need; the rest are loose sentences about the same topics. Nothing reverses word order: that
    stays the drift family's novelty.
    """
    rng = _rng(params.seed, "corpus")
    return [_paragraph(rng) for _ in range(params.corpus_paragraphs)]


# ---------------------------------------------------------------------------
# files


def build_rows(params: DemoDataParams) -> dict[str, list[dict[str, Any]]]:
    """The rows of sft, preference and drift (no files written)."""
    families = training_families(params)
    seen: set[str] = set()

    sft: list[dict[str, Any]] = []
    for family in families:
        for instruction, inp, answer, _ in _unique_examples(
            family, params.examples_per_task, _rng(params.seed, f"sft:{family}"), seen
        ):
            sft.append({"instruction": instruction, "input": inp, "output": answer, "task": family})

    preference: list[dict[str, Any]] = []
    per_family = {f: params.preference_pairs // len(families) + (i < params.preference_pairs % len(families))
                  for i, f in enumerate(families)}
    drawn = {
        f: _unique_examples(f, per_family[f], _rng(params.seed, f"preference:{f}"), seen) for f in families
    }
    choice_rng = _rng(params.seed, "preference:rejected")
    for i in range(max(per_family.values(), default=0)):
        for family in families:  # interleave families
            if i >= per_family[family]:
                continue
            instruction, inp, answer, wrong = drawn[family][i]
            prompt = alpaca_prompt(instruction, inp)
            rejected = choice_rng.choice(wrong)
            if rejected == answer or check_answer(family, prompt, answer, rejected):
                raise AssertionError(f"{family}: rejected answer {rejected!r} passes the checker")
            if not check_answer(family, prompt, answer, answer):
                raise AssertionError(f"{family}: expected answer {answer!r} fails the checker")
            preference.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "task": family})

    drift = [
        {"instruction": instruction, "input": inp, "output": answer, "task": params.drift_family}
        for instruction, inp, answer, _ in _unique_examples(
            params.drift_family, params.drift_examples, _rng(params.seed, f"drift:{params.drift_family}"), seen
        )
    ]
    return {"sft": sft, "preference": preference, "drift": drift}


def write_demo_data(params: DemoDataParams, out_dir: str | Path) -> dict[str, Any]:
    """Write sft.jsonl, preference.jsonl, corpus.txt and drift.jsonl under ``out_dir``; return the manifest.

    The same params write byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(params)
    counts = {
        "sft.jsonl": write_jsonl(out / "sft.jsonl", rows["sft"]),
        "preference.jsonl": write_jsonl(out / "preference.jsonl", rows["preference"]),
        "drift.jsonl": write_jsonl(out / "drift.jsonl", rows["drift"]),
    }
    paragraphs = generate_corpus(params)
    corpus_path = out / "corpus.txt"
    tmp = corpus_path.with_suffix(".txt.tmp")
    tmp.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    tmp.replace(corpus_path)
    counts["corpus.txt"] = len(paragraphs)

    files = {
        name: {"path": str(out / name), "rows": counts[name], "sha256": sha256_file(out / name)}
        for name in ("sft.jsonl", "preference.jsonl", "corpus.txt", "drift.jsonl")
    }
    return {"files": files, "families": training_families(params), "drift_family": params.drift_family}


def read_corpus(path: str | Path) -> list[str]:
    """Paragraphs of a corpus file (separated by blank lines)."""
    text = Path(path).read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
