from sitcom.scenes.quality import SceneScore, distinct_n, is_known_speaker, score_scene, summarize


def test_well_formed_scene_scores_high():
    lines = [
        "ELAINE: Jerry! George! You guys, listen!",  # the prompt, skipped
        "[Scene: Monk's Cafe]",
        "(George sits down)",
        "GEORGE: What is it?",
        "JERRY AND KRAMER: Tell us!",
    ]
    s = score_scene(lines, skip=1)
    assert s.lines == 4
    assert s.well_formed == 1.0
    assert s.known_speaker == 1.0
    assert s.repeated == 0.0
    assert s.distinct_2 == 1.0
    assert s.top_speaker == 0.5  # GEORGE, JERRY AND KRAMER


def test_prose_unknown_speakers_and_loops_score_low():
    lines = [
        "GEORGE: I'm sorry.",
        "BOB: I'm sorry.",
        "george: i'm  sorry.",
        "and then they all went home",
        "GEORGE: I'm sorry.",
    ]
    s = score_scene(lines, known_speakers=["GEORGE"])
    assert s.lines == 5
    assert s.well_formed == 3 / 5  # lower-case speaker and prose are not script lines
    assert s.known_speaker == 2 / 3  # BOB is a guest
    assert s.repeated == 2 / 5  # case/space-insensitive repeats of line 1: lines 3 and 5
    assert s.distinct_2 < 0.7


def test_empty_scene_is_a_failure_not_perfect():
    assert score_scene(["JERRY: Hi."], skip=1) == SceneScore(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert summarize([])["well_formed"] == 0.0


def test_known_speaker_needs_every_part_known():
    assert is_known_speaker("JERRY, ELAINE", ["JERRY", "ELAINE"])
    assert not is_known_speaker("JERRY AND BOB", ["JERRY"])


def test_distinct_2_and_summary():
    assert distinct_n("a b a b") == 2 / 3
    assert distinct_n("one") == 0.0
    a = SceneScore(2, 1.0, 1.0, 0.0, 1.0, 0.5)
    b = SceneScore(4, 0.5, 0.0, 0.5, 0.5, 1.0)
    assert summarize([a, b]) == {
        "lines": 3.0,
        "well_formed": 0.75,
        "known_speaker": 0.5,
        "repeated": 0.25,
        "distinct_2": 0.75,
        "top_speaker": 0.75,
    }


def test_a_monologue_is_flagged():
    """Every turn by one speaker (seen once from the shipped default): well-formed, known
    speakers, no repeats, and still not a scene."""
    lines = [
        "JERRY: What is the deal?",
        "JERRY: I mean it.",
        "jerry: Who does that?",
        "(He sits.)",
        "JERRY: Nobody.",
    ]
    s = score_scene(lines)
    assert (s.well_formed, s.known_speaker, s.repeated) == (4 / 5, 1.0, 0.0)
    assert s.top_speaker == 1.0
    assert score_scene(["(Silence.)"]).top_speaker == 0.0  # no turns
