"""Instruction following: the checks of IFEval (Zhou et al., 2023, arXiv 2311.07911), one function
per instruction.

A constraint is {"kind": KIND, **params}. KIND is one of IFEval's 25 instruction ids with IFEval's
own kwargs
    {"kind": "length_constraints:number_words", "num_words": 50, "relation": "less than"}
or one of the short kinds of our sample file data/ifeval.jsonl ({"kind": "max_words", "n": 50}). The
reward (rewards.score) is the fraction of an example's constraints the response satisfies; pass@k
counts a sample right only when it satisfies all of them, as IFEval's strict prompt-level accuracy
does.

Semantics follow IFEval's instructions.py: "less than" is <, "at least" is >=; keywords match
case-insensitively anywhere in the text; a paragraph is what *** (or, for nth_paragraph_first_word,
a blank line) separates. Where IFEval calls a library we do not ship, the check is close, and says
so: sentences are split on . ! ? (IFEval: its own splitter), and capital words are \\w runs joined
by - or ' (IFEval: nltk's word_tokenize). IFEval also asks langdetect whether an all-capitals or
all-lowercase response is English; we check the case only. language:response_language needs a
language detector, which is not a dependency here, so it is UNSUPPORTED: a file's examples that ask
for it are skipped and counted (layouts.py), never scored as passed. So are IFBench's ids, none of
which is checked here.
"""

import inspect
import json
import re

# IFEval's _COMPARISON_RELATION
RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
UNSUPPORTED = {"language:response_language":
               "needs a language detector (langdetect), not a dependency here"}


# A response may run to twice the longest length a constraint asks for, and at least this many
# words.
MIN_WORD_LIMIT = 300
# words a sentence, paragraph, bullet or section asked for may take, at most
WORDS_PER_UNIT = 100
# the character bound: what has few \w words (JSON, "*" * 50000) is bounded too
CHARS_PER_WORD = 10
# The length each constraint asks for, by parameter: a count of words, or of units (sentences,
# paragraphs, bullets, sections, highlights) that may take WORDS_PER_UNIT words each. Short kinds
# name theirs "n".
WORD_PARAMS = {"num_words", "frequency", "capital_frequency"}
UNIT_PARAMS = {"num_sentences", "num_paragraphs", "num_bullets", "num_sections", "num_highlights"}
SHORT_WORD_KINDS = {"max_words", "min_words", "keyword_frequency"}
SHORT_UNIT_KINDS = {"max_sentences", "min_sentences", "paragraphs", "bullet_points",
                    "highlighted_sections"}


def score(example: dict, response: str) -> float:
    """Fraction of example["constraints"] the response satisfies; 0 for a response that is empty, is
    not about the prompt (none of example["topic"]'s words) or runs past word_limit(constraints).

    IFEval's checks read form only: without the last two, another prompt's answer in lowercase meets
    "all in lowercase", and so does the right answer with 50,000 more characters after it. RL finds
    both."""
    if not response.strip():
        # an empty response follows no instruction (it would pass "no_comma", "max_words", ...)
        return 0.0
    constraints = example["constraints"]
    if not on_topic(response, example.get("topic")):
        return 0.0
    limit = word_limit(constraints)
    if len(response) > CHARS_PER_WORD * limit or len(words(response)) > limit:
        return 0.0
    satisfied = [CHECKS[c["kind"]](response, **params(c)) for c in constraints]
    return sum(map(bool, satisfied)) / len(constraints)


def params(constraint: dict) -> dict:
    """A constraint's parameters: all but its kind."""
    return {k: v for k, v in constraint.items() if k != "kind"}


def on_topic(response: str, topic: list[str] | None) -> bool:
    """Any of the topic's words (whole words, case-insensitive) in the response; True where the data
    gives no topic (IFEval's own rows carry none)."""
    return topic is None or any(count_word(response, word) for word in topic)


def word_limit(constraints: list[dict]) -> int:
    """The most words a response may take: twice the largest length any constraint asks for, and at
    least MIN_WORD_LIMIT ("at least 300 words" allows 600; "at most 40 words" still allows 300)."""
    asked = [MIN_WORD_LIMIT // 2]
    for c in constraints:
        short_words = c["n"] if c["kind"] in SHORT_WORD_KINDS else 0
        short_units = c["n"] if c["kind"] in SHORT_UNIT_KINDS else 0
        asked += [short_words, WORDS_PER_UNIT * short_units]
        asked += [c[p] for p in WORD_PARAMS & c.keys()]
        asked += [WORDS_PER_UNIT * c[p] for p in UNIT_PARAMS & c.keys()]
    return 2 * max(asked)


def check_example(example: dict) -> None:
    """Raise ValueError unless each constraint is well formed and "topic", where given, is a list of
    words."""
    for constraint in example["constraints"]:
        check_constraint(constraint)
    topic = example.get("topic", ["any"])
    words_given = isinstance(topic, list) and all(isinstance(w, str) and w.strip() for w in topic)
    if not (words_given and topic):
        raise ValueError(f"'topic' must be a non-empty list of words, not {topic!r}")


def compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# --------------------------------------------------------------------------- text units

def words(text: str) -> list[str]:
    # IFEval counts words with nltk's RegexpTokenizer(r"\w+")
    return re.findall(r"\w+", text)


def sentences(text: str) -> list[str]:
    # IFEval uses its own splitter; close enough
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def count_phrase(text: str, phrase: str) -> int:
    """Occurrences anywhere, case-insensitive (IFEval's re.findall(keyword, ...), escaped: data is
    not a regex)."""
    return len(re.findall(re.escape(phrase.strip()), text, re.IGNORECASE))


def count_word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))


def is_json(text: str) -> bool:
    # IFEval strips the fences too, exactly so
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.strip().removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def starred_paragraphs(text: str) -> int | None:
    """Paragraphs separated by ***; None when one between two separators is empty (IFEval: not
    followed)."""
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index not in (0, len(paragraphs) - 1):
                return None
            count -= 1
    return count


# ----------------------------------------------------------------- IFEval's instructions

def nth_paragraph_first_word(r: str, num_paragraphs: int, nth_paragraph: int,
                             first_word: str) -> bool:
    """Paragraphs split on a blank line ("\\n\\n"); the count must match and paragraph n start with
    the word."""
    paragraphs = r.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    if not 1 <= nth_paragraph <= count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'\"")
    # up to the first punctuation mark, as IFEval reads it
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def two_responses(r: str) -> bool:
    """Exactly two different non-empty responses separated by ******; an empty one in the middle
    fails."""
    parts = r.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    kept = [p.strip() for p in parts if p.strip()]
    return len(kept) == 2 and kept[0] != kept[1]


def postscript(r: str, postscript_marker: str = "P.S.") -> bool:
    """The marker anywhere, case-insensitive (IFEval's pattern has no ^); P.S. and P.P.S may have a
    space after each dot."""
    marker = postscript_marker.strip()
    known = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}
    pattern = known.get(marker, re.escape(marker.lower()))
    return re.search(pattern, r.lower()) is not None


def highlighted_sections(r: str, num_highlights: int) -> bool:
    """*single* and **double** highlights with text inside; IFEval counts a **double** one twice, as
    here."""
    single = [h for h in re.findall(r"\*[^\n*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", r) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def sections(r: str, section_spliter: str, num_sections: int) -> bool:
    """At least num_sections markers "SPLITTER <number>" (IFEval splits on them and counts the
    pieces − 1)."""
    marker = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(marker, r)) - 1 >= num_sections


def bullet_points(r: str, num_bullets: int) -> bool:
    """Exactly num_bullets lines starting with "* " (not "**") or "-" (IFEval's two patterns)."""
    # IFEval's ^\s* also spans blank lines, which counts the same bullets but is quadratic on "\n" *
    # 50000
    stars = re.findall(r"^[^\S\n]*\*[^*].*$", r, re.MULTILINE)
    dashes = re.findall(r"^[^\S\n]*-.*$", r, re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def capital_words(r: str, capital_frequency: int, capital_relation: str) -> bool:
    """Words in all capitals ("NASA", "A", "X-RAY" once) against the threshold."""
    capitals = sum(w.isupper() for w in re.findall(r"\w+(?:[-']\w+)*", r))
    return compare(capitals, capital_relation, capital_frequency)


def title(r: str) -> bool:
    r"""IFEval's greedy <<[^\n]+>>: on each line, from the first << to the last >>, with text
    inside. (Found with find/rfind: the regex is quadratic on a line of 25000 "<<".)"""
    for line in r.split("\n"):
        start, end = line.find("<<"), line.rfind(">>")
        if start >= 0 and end >= start + 2 and line[start:end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


def placeholders(r: str) -> int:
    r"""IFEval's re.findall(r"\[.*?\]"): each [ to the nearest ] on its line, without overlap. A [
    with no ] before its line ends rules out every [ after it on that line (the regex would rescan:
    quadratic)."""
    count, position = 0, 0
    while (start := r.find("[", position)) >= 0:
        line_end = r.find("\n", start)
        line_end = len(r) if line_end < 0 else line_end
        close = r.find("]", start + 1, line_end)
        count, position = (count + 1, close + 1) if close >= 0 else (count, line_end + 1)
    return count


# kind -> check(response, **params). The first 24 are IFEval's ids with its kwargs; the rest our
# short kinds.
CHECKS = {
    "keywords:existence": lambda r, keywords: all(count_phrase(r, k) for k in keywords),
    "keywords:frequency": lambda r, keyword, frequency, relation:
        compare(count_phrase(r, keyword), relation, frequency),
    "keywords:forbidden_words": lambda r, forbidden_words:
        not any(count_word(r, w) for w in forbidden_words),
    "keywords:letter_frequency": lambda r, letter, let_frequency, let_relation:
        compare(r.lower().count(letter.lower()), let_relation, let_frequency),
    "length_constraints:number_sentences": lambda r, num_sentences, relation:
        compare(len(sentences(r)), relation, num_sentences),
    "length_constraints:number_paragraphs": lambda r, num_paragraphs:
        starred_paragraphs(r) == num_paragraphs,
    "length_constraints:number_words": lambda r, num_words, relation:
        compare(len(words(r)), relation, num_words),
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": lambda r, num_placeholders:
        placeholders(r) >= num_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": bullet_points,
    "detectable_format:constrained_response": lambda r:
        any(option in r for option in CONSTRAINED_RESPONSES),
    "detectable_format:number_highlighted_sections": highlighted_sections,
    "detectable_format:multiple_sections": sections,
    "detectable_format:json_format": is_json,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": lambda r, prompt_to_repeat:
        r.strip().lower().startswith(prompt_to_repeat.strip().lower()),
    "startend:end_checker": lambda r, end_phrase:
        r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == r.strip()[-1] == '"',
    "change_case:capital_word_frequency": capital_words,
    "change_case:english_capital": lambda r: r.isupper(),
    "change_case:english_lowercase": lambda r: r.islower(),
    "punctuation:no_comma": lambda r: "," not in r,
    # the short kinds of data/ifeval.jsonl (each after the IFEval id beside it)
    # length_constraints:number_words
    "max_words": lambda r, n: len(words(r)) <= n,
    #   (at most / at least)
    "min_words": lambda r, n: len(words(r)) >= n,
    # length_constraints:number_sentences
    "max_sentences": lambda r, n: len(sentences(r)) <= n,
    "min_sentences": lambda r, n: len(sentences(r)) >= n,
    "paragraphs": lambda r, n: len([p for p in re.split(r"\s*\*\*\*\s*", r.strip()) if p]) == n,
    # keywords:existence
    "include_keywords": lambda r, keywords: all(count_word(r, k) for k in keywords),
    # keywords:forbidden_words
    "forbidden_words": lambda r, words: not any(count_word(r, w) for w in words),
    # keywords:frequency
    "keyword_frequency": lambda r, keyword, n: count_word(r, keyword) >= n,
    "json_format": is_json,
    "lowercase": lambda r: r == r.lower(),
    "uppercase": lambda r: r == r.upper(),
    "no_comma": lambda r: "," not in r,
    "ends_with": lambda r, phrase: r.strip().endswith(phrase),
    "quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == r.strip()[-1] == '"',
    "title": lambda r: re.search(r"<<[^\n<>]+>>", r) is not None,
    "bullet_points": lambda r, n: len(re.findall(r"^[ \t]*[*-]\s", r, re.MULTILINE)) == n,
    "highlighted_sections": lambda r, n: len(re.findall(r"\*[^\n*]+\*", r)) >= n,
    "placeholders": lambda r, n: len(re.findall(r"\[[^\[\]]+\]", r)) >= n,
    "postscript": lambda r, marker="P.S.":
        re.search(rf"^[ \t]*{re.escape(marker)}", r, re.MULTILINE) is not None,
}
# all 25 of IFEval's instruction ids
IFEVAL_IDS = [kind for kind in CHECKS if ":" in kind] + list(UNSUPPORTED)

# What each parameter must be: a value of the wrong type ("50", a bare "cat") would silently score
# every response 0.
PARAM_TYPES = {"n": int, "keywords": list, "words": list, "keyword": str, "phrase": str,
               "marker": str, "frequency": int, "relation": str, "forbidden_words": list,
               "letter": str, "let_frequency": int, "let_relation": str, "num_sentences": int,
               "num_paragraphs": int, "num_words": int, "nth_paragraph": int, "first_word": str,
               "num_placeholders": int, "postscript_marker": str, "num_bullets": int,
               "num_highlights": int, "section_spliter": str, "num_sections": int,
               "prompt_to_repeat": str, "end_phrase": str, "capital_frequency": int,
               "capital_relation": str}
TYPE_NAMES = {int: "an integer", list: "a list of strings", str: "a string"}


def check_constraint(constraint: dict) -> None:
    """Raise ValueError unless `constraint` names a known kind with the parameters it takes."""
    kind = constraint.get("kind") if isinstance(constraint, dict) else None
    if kind in UNSUPPORTED:
        raise ValueError(f"constraint {kind!r} cannot be checked here: {UNSUPPORTED[kind]}")
    if kind not in CHECKS:
        raise ValueError(f"unknown constraint kind {kind!r}; known: {', '.join(CHECKS)}")
    given = params(constraint)
    try:
        inspect.signature(CHECKS[kind]).bind("", **given)
    except TypeError as error:
        raise ValueError(f"constraint {kind!r}: {error}") from None
    for name, value in given.items():
        problem = param_problem(name, value)
        if problem:
            raise ValueError(f"constraint {kind!r}: {name} {problem}")
    if len(given.get("letter", "x")) != 1:
        letter = given["letter"]
        raise ValueError(f"constraint {kind!r}: letter must be one character, not {letter!r}")


def param_problem(name: str, value) -> str | None:
    """What is wrong with a parameter's value, or None."""
    expected = PARAM_TYPES[name]
    if expected is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, expected) and not isinstance(value, bool)
    if not ok:
        return f"must be {TYPE_NAMES[expected]}, got {value!r}"
    if value in ("", []) or (isinstance(value, list) and not all(v.strip() for v in value)):
        return "is empty, which every response would match or miss"
    if name.endswith("relation") and value not in RELATIONS:
        return f"must be one of {RELATIONS}, not {value!r}"
    return None
