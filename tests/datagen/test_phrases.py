"""Phrase extraction, the detector prompt and the colour palette."""

from __future__ import annotations

import pytest

from datagen.phrases import (
    PALETTE,
    background_phrase,
    colour_of,
    detector_prompt,
    extract_phrases,
    join_caption,
    nearest_colour,
    singular,
    with_article,
)


@pytest.mark.parametrize("caption, expected", [
    ("a red star and a blue square on a striped green background", ["red star", "blue square"]),
    ("A Red Star, a blue circle and a green square on a checkered gray background",
     ["red star", "blue circle", "green square"]),
    ("two red stars and a red star", ["red star"]),  # singular, de-duplicated
    ("a cat sitting on a couch next to a dog", ["cat", "couch", "dog"]),
    ("a close up of a cat on a couch", ["cat", "couch"]),  # "close up" is not an object
    ("a photo of a group of people riding horses", ["person", "horse"]),
    ("A motorcycle parked on the street.", ["motorcycle"]),  # the street is its setting
    ("a clock on a grey wall", ["clock"]),
    ("a grey teddy bear in front of a building", ["gray teddy bear", "building"]),
    ("an image of a background", []),
    ("", []),
])
def test_extract_phrases(caption: str, expected: list[str]) -> None:
    assert extract_phrases(caption) == expected


@pytest.mark.parametrize("word, expected", [
    ("stars", "star"), ("boxes", "box"), ("berries", "berry"), ("people", "person"),
    ("glass", "glass"), ("bus", "bus"), ("dishes", "dish"), ("knives", "knife"), ("cat", "cat"),
])
def test_singular(word: str, expected: str) -> None:
    assert singular(word) == expected


def test_detector_prompt_is_groundingdino_style() -> None:
    assert detector_prompt(["cat", "Red Ball"]) == "cat . red ball ."
    assert detector_prompt([]) == ""
    assert detector_prompt(extract_phrases("a red star and a cat.")) == "red star . cat ."


def test_colours() -> None:
    assert colour_of("red star") == "red"
    assert colour_of("a grey box") == "gray"  # synonyms map onto the palette
    assert colour_of("cat") is None
    assert all(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb) for rgb in PALETTE.values())
    for name, rgb in PALETTE.items():
        assert nearest_colour(rgb) == name


def test_background_phrase_and_captions() -> None:
    assert background_phrase("a red star on a striped green background") == "striped green background"
    assert background_phrase("a cat on a couch") == ""
    assert background_phrase("a clock on a grey wall") == "gray wall"
    assert background_phrase("A motorcycle parked on the street.") == "street"
    assert with_article("orange circle") == "an orange circle"
    assert with_article("red star") == "a red star"
    caption = join_caption(["red star", "blue square"], "striped green background")
    assert caption == "a red star and a blue square on a striped green background"
    assert extract_phrases(caption) == ["red star", "blue square"]
