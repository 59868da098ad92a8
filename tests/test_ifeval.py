"""prorl_verifiers/ifeval.py: each of IFEval's 25 ids against responses worked out by hand, one that
meets it and one that breaks it, at the boundary of its relation ("less than" n: n − 1 passes, n
fails; "at least" n: n passes, n − 1 fails). Scored through rewards.score, as training and
evaluation score them."""

import time

import pytest

import rewards
import tasks
from prorl_verifiers import ifeval

P3 = "One.\n***\nTwo.\n***\nThree."  # three paragraphs separated by IFEval's *** divider

CASES = [  # (instruction id, kwargs, a response that meets it, one that breaks it)
    ("keywords:existence", {"keywords": ["tea", "Cup"]}, "A cup of TEA.", "A cup of coffee."),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "at least"},
     "tea and Tea", "tea only"),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "less than"},
     "tea only", "tea and Tea"),
    ("keywords:forbidden_words", {"forbidden_words": ["love"]}, "lovely, beloved", "I LOVE it"),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "at least"},
     "aAa", "aA"),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"},
     "aA", "aAa"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "One.", "One. Two!"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "One. Two!", "One."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, P3, "One.\n***\nTwo."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},  # empty at the ends only
     "***\nOne.\n***\nTwo.\n***", "One.\n***\n***\nTwo."),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"},
     "one two", "one two three"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"},
     "one, two, three", "one two"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "apple"},
     'Hi there.\n\n"Apple, pie."', "Hi there.\n\nBanana."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "apple"},
     "Hi.\n\nApple.", "Hi.\n\nApple.\n\nThird."),  # the right word, but three paragraphs
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "[name] at [place]", "[name] only"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Bye.\np. s. see you", "Bye. PS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Bye.\nP.P.S more", "Bye.\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* one\n- two\n**bold**", "* one\n* two\n- three"),
    ("detectable_format:constrained_response", {},
     "Well. My answer is maybe.", "My answer is perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*a* and **b**", "*a* and * *"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nx\nSection 2\ny", "Section 1\nx\nSection two\ny"),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ("detectable_format:title", {}, "<<Joy>>\nA poem.", "<< >>\nA poem."),
    ("combination:two_responses", {}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "write a poem. Roses...", "A poem: roses..."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. any other questions?"',
     "Any other questions? No."),
    ("startend:quotation", {}, '  "Quoted."  ', '"Half quoted.'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "NASA and X-RAY", "NASA and x-ray"),
    ("change_case:capital_word_frequency",
     {"capital_frequency": 2, "capital_relation": "less than"},
     "NASA and x-ray", "NASA and X-RAY"),
    ("change_case:english_capital", {}, "ALL LOUD, 42.", "ALL LOUD, nearly."),
    ("change_case:english_lowercase", {}, "all quiet, 42.", "all quiet, Nearly."),
    ("punctuation:no_comma", {}, "No commas here.", "Well, one."),
]


def test_every_ifeval_id_is_checked_here_or_listed_as_unsupported():
    assert len(ifeval.IFEVAL_IDS) == 25
    checked = {kind for kind, *_ in CASES}
    # every checkable id has a case above
    assert checked == set(ifeval.IFEVAL_IDS) - set(ifeval.UNSUPPORTED)
    assert set(ifeval.UNSUPPORTED) == {"language:response_language"}


@pytest.mark.parametrize("kind, kwargs, meets, breaks", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_instruction_at_its_boundary(kind, kwargs, meets, breaks):
    example = {"task": "ifeval", "prompt": "...", "constraints": [{"kind": kind, **kwargs}]}
    ifeval.check_constraint(example["constraints"][0])
    assert rewards.score(example, meets) == 1.0
    assert rewards.score(example, breaks) == 0.0


def test_a_response_is_what_follows_the_reasoning():
    example = {"task": "ifeval", "prompt": "...", "constraints": [
        {"kind": "punctuation:no_comma"},
        {"kind": "length_constraints:number_words", "num_words": 3, "relation": "less than"}]}
    assert rewards.score(example, "<think>Hmm, well, let me see</think>two words") == 1.0
    assert rewards.score(example, "<think>fine</think>three, more, words") == 0.0
    assert rewards.score(example, "two, words") == 0.5  # the fraction satisfied: one of two


def test_kwargs_are_checked_before_scoring():
    with pytest.raises(ValueError, match="cannot be checked here"):
        ifeval.check_constraint({"kind": "language:response_language", "language": "fr"})
    with pytest.raises(ValueError, match="relation must be one of"):
        ifeval.check_constraint({"kind": "length_constraints:number_words", "num_words": 3,
                                 "relation": "at most"})
    with pytest.raises(ValueError, match="num_words must be an integer"):
        ifeval.check_constraint({"kind": "length_constraints:number_words", "num_words": "3",
                                 "relation": "at least"})
    with pytest.raises(ValueError, match="unexpected keyword"):
        ifeval.check_constraint({"kind": "punctuation:no_comma", "n": 1})
    with pytest.raises(ValueError, match="letter must be one character"):
        ifeval.check_constraint({"kind": "keywords:letter_frequency", "letter": "ab",
                                 "let_frequency": 1, "let_relation": "at least"})
    # "" is found everywhere: every response would pass
    with pytest.raises(ValueError, match="keyword is empty"):
        ifeval.check_constraint({"kind": "keywords:frequency", "keyword": "", "frequency": 1,
                                 "relation": "at least"})


def test_data_is_text_not_a_pattern():
    """Keywords, markers and splitters come from data files: matched as text, so "a.c" is not a
    regex."""
    exists = {"task": "ifeval", "prompt": "?",
              "constraints": [{"kind": "keywords:existence", "keywords": ["a.c"]}]}
    assert rewards.score(exists, "see a.c here") == 1.0
    assert rewards.score(exists, "see abc here") == 0.0
    sections = {"task": "ifeval", "prompt": "?", "constraints": [
        {"kind": "detectable_format:multiple_sections", "section_spliter": "(", "num_sections": 1}]}
    assert rewards.score(sections, "( 1 text") == 1.0


DEGENERATE = ["\n" * 50_000, " " * 50_000, "[" * 50_000, "<<" * 25_000, "*" * 50_000,
              "P.S." + "\n" * 50_000, "Section" * 7_000, "\n\n" * 25_000, "******" * 8_000]


def test_degenerate_output_is_scored_fast():
    example = {"task": "ifeval", "prompt": "?",
               "constraints": [{"kind": kind, **kwargs} for kind, kwargs, *_ in CASES]}
    start = time.monotonic()
    for response in DEGENERATE:
        assert 0.0 <= rewards.score(example, response) < 1.0
    # each regex linear: a quadratic one takes minutes on these
    assert time.monotonic() - start < 5.0


# Issue 23: IFEval's checks read form only, so another prompt's answer and the right answer with
# 50,000 more characters met some constraints. A response must be about its prompt and of a length
# the prompt allows.
WATER = {"task": "ifeval",
         "prompt": "Describe the water cycle in at most 40 words, all in lowercase.",
         "constraints": [{"kind": "max_words", "n": 40}, {"kind": "lowercase"}],
         "topic": ["water", "rain", "clouds"]}


def test_a_response_off_the_topic_scores_0():
    assert rewards.score(WATER, "water rises and falls as rain") == 1.0
    # on topic, one of two constraints met
    assert rewards.score(WATER, "Water rises and falls as rain") == 0.5
    # lowercase, short: off topic
    assert rewards.score(WATER, "the leaves let go in amber light") == 0.0
    # whole words: "watery" is not "water"
    assert rewards.score(WATER, "watery rainbows") == 0.0
    # case-insensitive: on topic, not lowercase
    assert rewards.score(WATER, "RAIN") == 0.5
    no_topic = {k: v for k, v in WATER.items() if k != "topic"}
    # IFEval's rows carry no topic
    assert rewards.score(no_topic, "the leaves let go in amber light") == 1.0


def test_the_word_limit_is_twice_the_longest_length_asked_and_at_least_300():
    # by hand: "at most 40 words" asks 40 → max(300, 80) = 300; "at least 400 words" → 800;
    # 5 sentences × 100 words each → 1000; a keyword 200 times → 400
    assert ifeval.word_limit(WATER["constraints"]) == 300
    assert ifeval.word_limit([{"kind": "length_constraints:number_words", "num_words": 400,
                               "relation": "at least"}]) == 800
    assert ifeval.word_limit([{"kind": "min_sentences", "n": 5}, {"kind": "lowercase"}]) == 1000
    assert ifeval.word_limit([{"kind": "keywords:frequency", "keyword": "tea", "frequency": 200,
                               "relation": "at least"}]) == 400
    # placeholders are no length
    assert ifeval.word_limit([{"kind": "placeholders", "n": 400}]) == 300


def test_a_response_past_the_word_or_character_limit_scores_0():
    # limit 300 words
    lowercase = {"task": "ifeval", "prompt": "...", "constraints": [{"kind": "lowercase"}]}
    assert rewards.score(lowercase, "word " * 300) == 1.0
    assert rewards.score(lowercase, "word " * 301) == 0.0
    # 3,000 characters = 10 per word of 300
    assert rewards.score(lowercase, "x" + "*" * 2999) == 1.0
    assert rewards.score(lowercase, "x" + "*" * 3000) == 0.0
    long_form = {"task": "ifeval", "prompt": "...", "constraints": [
        # limit 800 words
        {"kind": "min_words", "n": 400}, {"kind": "lowercase"}]}
    assert rewards.score(long_form, "word " * 800) == 1.0
    assert rewards.score(long_form, "word " * 801) == 0.0


def test_the_sample_file_has_a_topic_for_every_prompt_and_no_answer_fits_another():
    examples = tasks.load_source("ifeval")
    assert all(example["topic"] for example in examples)
    for example in examples:
        assert rewards.score(example, example["solution"]) == 1.0
        # the audit's overlong
        assert rewards.score(example, example["solution"] + " 9" * 25_000) == 0.0
        for other in examples:
            if other is not example:
                score = rewards.score(example, other["solution"])
                assert score == 0.0, (example["prompt"], other["prompt"])


@pytest.mark.parametrize("topic", ["water", [], ["water", ""], ["water", 3]])
def test_a_topic_must_be_a_list_of_words(topic):
    with pytest.raises(ValueError, match="'topic' must be a non-empty list of words"):
        ifeval.check_example({**WATER, "topic": topic})
