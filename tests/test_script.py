"""The script-format contract shared by the corpus, training and the bot."""

from sitcom.scenes.script import (
    is_direction,
    is_heading,
    is_turn,
    is_well_formed,
    normalize_prompt,
    normalize_speaker,
    speaker_of,
)


def test_line_kinds():
    assert is_turn("JERRY: Hello, Newman.") and speaker_of("MAN #1: Hi.") == "MAN #1"
    assert is_turn("JERRY, GEORGE AND ELAINE: Hi!")
    assert not is_turn("Jerry: lowercase speakers are not corpus format")
    assert is_heading("[Scene: Jerry's apartment]") and not is_heading("[pause]")
    assert is_direction("(Kramer bursts in)") and is_direction("(he (finally) leaves)")
    assert not is_well_formed("just some narration")


def test_normalize_speaker_repairs_main_cast_typos_only():
    assert normalize_speaker("KRMAER") == "KRAMER"
    assert normalize_speaker("Elaien ") == "ELAINE"
    assert normalize_speaker("Jerry and Elaine") == "JERRY AND ELAINE"
    assert normalize_speaker("Jerry & George") == "JERRY AND GEORGE"
    assert normalize_speaker("Newman") == "NEWMAN"
    assert normalize_speaker("MAGRO", main=("MARGO", "TEDDY")) == "MARGO"
    assert normalize_speaker("MAGRO") == "MAGRO"


def test_normalize_prompt():
    assert normalize_prompt("elaine: hi\n\n(she waves)") == "ELAINE: hi\n(she waves)\n"


def test_a_speaker_after_emoji_is_recognised():
    """Issue 19 item 9: `🎉Kramer: hi` is Kramer speaking, however the emoji is written."""
    for line in (
        "🎉Kramer: hi",
        "🎉 Kramer: hi",
        "👍🏽 kramer: hi",
        "👨‍👩‍👧 Kramer: hi",
        "🇺🇸Kramer: hi",
        "<:party:123456789012345678> Kramer: hi",
        ":tada: Kramer: hi",
        ":tada:Kramer: hi",
    ):
        assert normalize_prompt(line) == "KRAMER: hi\n", line
    # not a speaker: kept as written
    assert normalize_prompt("🎉 party time") == "🎉 party time\n"
    assert normalize_prompt("(🎉 Kramer: enters)") == "(🎉 Kramer: enters)\n"
