"""Best of n: the coherence checks and the ranking that picks the scene to post."""

from __future__ import annotations

from sitcom.scenes.ranking import (
    cast_of_prompt,
    coherence,
    derails,
    keep_lines,
    on_premise,
    premise_words,
    rank,
)

OPENING = ["ELAINE: Jerry! George! You guys, listen!"]
GOOD = OPENING + [
    "JERRY: What is it?",
    "ELAINE: I got a job offer from the Pendant people.",
    "GEORGE: Pendant? They're crooks!",
    "ELAINE: They are not crooks, George.",
    "JERRY: So what's the job?",
    "ELAINE: Head of the whole mail room.",
]
STRANGERS = OPENING + [
    "AUDIENCE: (laughs)",
    "BABY: Waaah!",
    "JERRY: What is it?",
    "MAN #3: I'm the man from the store.",
    "BABY: Waaah!",
]
FILLER = OPENING + [
    "JERRY: Okay.",
    "GEORGE: Yeah.",
    "JERRY: Okay.",
    "GEORGE: Yeah.",
    "JERRY: What?",
    "GEORGE: No.",
]
SILENT_CAST = OPENING + [
    "ELAINE: I went to the store.",
    "ELAINE: It was a big store.",
    "ELAINE: I bought a big thing at the store.",
    "ELAINE: Then I went home from the store.",
    "ELAINE: It was nice.",
]
ECHO = OPENING + [
    "KRAMER: Well, I can't go, I don't have a place to go.",
    "JERRY: You don't have a place to go?",
    "KRAMER: I can't go, I don't have a place to go.",
    "JERRY: You can't go.",
    "KRAMER: Well, I can't go, I don't have a place to go, Jerry.",
    "GEORGE: What?",
]
PROSE = OPENING + [
    "It was a cold day in New York and the city was grey and everyone was walking to work "
    "with their heads down, thinking about nothing but the weather and their jobs.",
    "JERRY: What?",
    "ELAINE: The Pendant people offered me a job.",
    "GEORGE: Pendant? They're crooks!",
    "ELAINE: They are not crooks.",
]


def test_cast_of_prompt_takes_speakers_and_named_main_characters():
    assert cast_of_prompt(OPENING) == {"ELAINE", "JERRY", "GEORGE"}
    assert cast_of_prompt(["KRAMER: Hey buddy."]) == {"KRAMER"}


def test_a_scene_without_problems_scores_full():
    score, problems = coherence(GOOD, prompt_count=1)
    assert (score, problems) == (1.0, ())


def test_each_failure_readers_named_is_found_and_costs():
    good, _ = coherence(GOOD, 1)
    for bad, problem in [
        (STRANGERS, "invented strangers"),
        (FILLER, "filler"),
        (SILENT_CAST, "talks to himself"),
        (PROSE, "prose"),
        (ECHO, "echoes"),
    ]:
        score, problems = coherence(bad, 1)
        assert problem in problems, (problem, problems)
        assert score < good
    assert "opening's characters silent" in coherence(SILENT_CAST, 1)[1]
    assert coherence(OPENING + ["JERRY: Hi."], 1) == (0.0, ("no scene",))


def test_prompt_lines_are_not_the_models_work():
    # The opening itself is a filler line spoken by a stranger: not held against the scene.
    opening = ["BABY: Okay."]
    score, problems = coherence(opening + GOOD[1:], prompt_count=1)
    assert score == 1.0 and problems == ()


class KeywordScorer:
    """A humour model stand-in: lines mentioning the keyword get laughs."""

    def __init__(self, keyword: str):
        self.keyword = keyword
        self.calls: list[list[str]] = []

    def line_scores(self, lines: list[str]) -> list[float]:
        self.calls.append(lines)
        return [0.9 if self.keyword in line else 0.1 for line in lines]


def test_rank_puts_coherent_scenes_first_without_a_humour_model():
    ranked = rank([FILLER, STRANGERS, GOOD, SILENT_CAST], prompt_count=1)
    assert ranked[0].index == 2
    assert [r.total for r in ranked] == sorted((r.total for r in ranked), reverse=True)


def test_the_humour_model_breaks_ties_between_coherent_scenes():
    funny = GOOD[:-1] + ["ELAINE: Head of the whole mail room. No soup for the mail room!"]
    scorer = KeywordScorer("soup")
    ranked = rank([GOOD, funny], prompt_count=1, scorer=scorer)
    assert ranked[0].index == 1 and ranked[0].humour > ranked[1].humour
    assert len(scorer.calls) == 2  # every candidate scored, each as a whole scene
    # ...but a funny line does not rescue a scene full of strangers
    assert rank([GOOD, STRANGERS + ["JERRY: soup"]], 1, scorer)[0].index == 0


def test_ties_keep_the_given_order():
    assert [r.index for r in rank([GOOD, list(GOOD)], 1)] == [0, 1]


# -- second round: what readers rewarded (keeping to the opening) and trimming ---------------

VAN_BUREN = ["KRAMER: I'm gonna sell my Van Buren Boys jacket to Peterman."]
ON_TOPIC = VAN_BUREN + [
    "JERRY: Peterman wants a gang jacket?",
    "KRAMER: He's putting the Van Buren Boys in the catalogue.",
    "ELAINE: He's not putting a jacket from a street gang in my catalogue.",
    "JERRY: What's the catalogue gonna call it?",
    "KRAMER: The Urban Sombrero of jackets.",
]
OFF_TOPIC = VAN_BUREN + [
    "JERRY: I had lunch with my uncle.",
    "ELAINE: Your uncle is a dentist?",
    "GEORGE: My mother called me at work.",
    "JERRY: What did she say?",
    "GEORGE: She wants a new couch.",
]


def test_turns_that_drop_the_opening_cost():
    assert coherence(ON_TOPIC, 1) == (1.0, ())
    score, problems = coherence(OFF_TOPIC, 1)
    assert "drops the opening" in problems and score < 1.0
    assert premise_words(VAN_BUREN) >= {"buren", "jacket", "peterman"}
    assert "kramer" not in premise_words(VAN_BUREN)  # every scene names the regulars
    assert on_premise(["Everyone is stealing."], {"steam"}) == 0.0
    assert on_premise(["He's stealing it."], {"stealer"}) == 1.0


def test_turns_that_derail_are_named():
    assert derails("JERRY", " Jerry, listen to me.") == "talks to himself"
    assert derails("JERRY", " (to Jerry) What?") == "talks to himself"
    assert derails("JERRY", " What is it, Jerry?") == "talks to himself"
    assert derails("KRAMER", " My name is Elaine.") == "mixed-up names"
    assert derails("GEORGE", " Hey hey hey!") == "loops"
    assert derails("GEORGE", " It's not. It's not. It's not.") == "loops"
    for fine in [("GEORGE", " Jerry, I can't."), ("KRAMER", " I'm Kramer."), ("JERRY", " Hey.")]:
        assert derails(*fine) is None, fine


def test_a_scene_is_posted_up_to_the_turn_before_it_derails():
    good = GOOD[:4]  # the opening and three fine turns
    for bad in [
        "GEORGE: George, what are you doing?",  # talks to himself
        "KRAMER: My name is Elaine.",  # mixed-up names
        "JERRY: Hey hey hey hey!",  # loops
        "JERRY: What is it?",  # repeats an earlier turn
        "AUDIENCE: (laughs)",  # a stranger
        "It was a cold day in New York and everyone walked to work.",  # prose
    ]:
        lines = good + [bad, "ELAINE: Head of the whole mail room."]
        assert keep_lines(lines, 1) == len(good), bad
    # a run of filler goes from its first turn; one filler turn alone stays
    assert keep_lines(good + ["JERRY: Okay.", "GEORGE: Yeah.", "JERRY: So?"], 1) == len(good)
    assert keep_lines(good + ["JERRY: Okay.", "GEORGE: The mail room!"], 1) == len(good) + 2
    assert keep_lines(GOOD, 1) == len(GOOD)  # nothing derails: all of it
    # never fewer than two turns: a scene that derails at once is left to the ranking
    assert keep_lines(OPENING + ["JERRY: What?", "JERRY: What?", "GEORGE: Hm."], 1) == 4


def test_rank_scores_and_keeps_the_trimmed_scene():
    runs_on = GOOD + ["JERRY: Jerry, Jerry, Jerry.", "KRAMER: Hey hey hey hey!"]
    ranked = rank([runs_on], prompt_count=1)
    assert ranked[0].keep == len(GOOD)
    assert (ranked[0].coherence, ranked[0].problems) == (1.0, ())  # scored as posted
