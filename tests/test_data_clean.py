"""Cleaning one page at a time: every speaker layout and every kind of junk, on fixtures."""

from pathlib import Path

import pytest

from data.clean import is_junk, parse_page, tidy
from sitcom.scenes.script import is_well_formed

PAGES = Path(__file__).parent / "fixtures" / "data" / "sitcom"


def clean(name: str, **kwargs) -> list[str]:
    return parse_page((PAGES / name).read_text(encoding="utf-8"), **kwargs).lines


def test_mixed_case_colon_layout_joins_wraps_and_strips_site_junk():
    lines = clean("TheFakeColon.txt")
    assert lines[0] == "[Scene: Monk's. Jerry and George are sitting at a booth]"
    assert "JERRY: Say you, me, and Kramer are flying over the Andes." in lines
    # inline actions stay inside the speech, in parentheses
    assert "GEORGE: Kramer. (points at the door)" in lines
    assert "(Kramer slides in)" in lines
    # narration between turns becomes one direction line
    assert "(The waitress brings the check and everyone stares at it.)" in lines
    text = "\n".join(lines)
    for junk in (
        "Gift Guide",
        "Copyright",
        "Transcript by",
        "Written By",
        "....",
        "Home",
        "Commercial",
        "Cast:",
        "Episode 12",
    ):
        assert junk not in text


def test_typos_of_the_main_cast_are_repaired():
    assert "KRAMER: Who ordered the soup?" in clean("TheFakeColon.txt")
    assert "ELAINE: Where is George?" in clean("TheFakeUpper1.txt")


def test_upper_case_layout_keeps_every_speaker_and_drops_markers():
    lines = clean("TheFakeUpper1.txt")
    speakers = {line.split(":")[0] for line in lines if ":" in line and line[0] != "["}
    assert {"JERRY", "ELAINE", "NEWMAN", "PUDDY", "GEORGE", "JERRY AND ELAINE"} <= speakers
    assert lines[0] == "[Scene: Jerry's apartment]"  # from `INT. JERRY'S APARTMENT - DAY`
    assert "[Scene: George's car]" in lines  # from `[setting: George's car]`
    text = "\n".join(lines)
    for junk in ("ACT", "COMMERCIAL", "Written", "Directed", "Broadcast", "THE FAKE UPPER"):
        assert junk not in text


def test_name_alone_layout_becomes_turns():
    lines = clean("TheFakeAlone.txt")
    assert lines[:4] == [
        "[Scene: Hospital room]",
        "(JERRY AND ELAINE ARE VISITING STAN. STAN IS IN THE MIDST OF A LONG STORY.)",
        "STAN: ...And so the baby's head comes out, and I'm screaming.",
        "ELAINE: Whoa.",
    ]
    assert "JERRY: (LOOKING AWAY) Yeah, yeah, yeah." in lines
    assert not any("SEINFELD" in line or "SCENE A" in line for line in lines)


def test_spaced_colon_layout_and_percent_scene_lines():
    lines = clean("TheFakeSpaced.txt")
    assert lines[0] == "[Scene: Jerry and George are sitting outside]"
    assert "JERRY: It's a calzone, sir." in lines
    assert "[Scene: Elaine's office]" in lines


def test_speech_without_colons_is_read_with_known_speakers():
    page = (
        "Title\n\nJerry I told you.\nGeorge Good.\nJerry How good?\nGeorge Very good.\n"
        "Elaine Let me taste that.\nJerry Huh? Huh?\n"
    )
    ep = parse_page(page, known_speakers=frozenset({"JERRY", "GEORGE", "ELAINE"}))
    assert ep.layout == "prefix"
    assert ep.lines[:2] == ["JERRY: I told you.", "GEORGE: Good."]


@pytest.mark.parametrize("name", ["quotes.txt", "cast-page.txt", "The-Clip-Show-1.txt"])
def test_non_episode_pages_have_little_or_no_dialogue(name):
    assert parse_page((PAGES / name).read_text()).turns < 5


def test_every_output_line_is_well_formed():
    pages = sorted(PAGES.glob("TheFake*.txt"))
    assert len(pages) >= 6, f"the TheFake*.txt fixture pages are missing from {PAGES}"
    for page in pages:
        lines = clean(page.name)
        assert lines, page.name
        assert all(is_well_formed(line) for line in lines), page.name


def test_junk_and_tidy_rules():
    assert is_junk("Copyright 2002-2011 SomeScripts.com")
    assert is_junk("Supervising Producer ................. Larry Charles")
    assert is_junk("------------- COMMERCIAL BREAK -------------")
    assert is_junk("END OF ACT 2")
    assert not is_junk("JERRY: Well...........you know.")
    assert not is_junk("(Kramer enters)")
    assert tidy("It's a calzone , sir .  ") == "It's a calzone, sir."


def test_bracketed_actions_are_directions_and_places_are_headings():
    # Generation stops at a scene heading, so an action in brackets must not become one.
    page = "\n".join(
        [
            "[Jerry's Apartment]",
            "JERRY: So, what happened?",
            "GEORGE: Nothing happened.",
            "[Kramer enters with his golf clubs]",
            "KRAMER: Hey buddy.",
            "JERRY: What's with the clubs?",
            "[Monk's]",
            "GEORGE: I'm going to the bathroom.",
            "JERRY: Again?",
            "[pause]",
            "GEORGE: Again.",
        ]
    )
    lines = parse_page(page).lines
    assert "[Scene: Jerry's Apartment]" in lines and "[Scene: Monk's]" in lines
    assert "(Kramer enters with his golf clubs)" in lines and "(pause)" in lines
    assert all(is_well_formed(line) for line in lines)
