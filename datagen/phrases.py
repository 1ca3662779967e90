"""Object phrases from captions, the detector prompt, and the named colour palette.

Pure-python rules (no NLTK data to download): a caption is cut into chunks at punctuation,
conjunctions, prepositions and verbs; each chunk loses its determiners and counts, its last
word is made singular, and chunks whose head noun names no object (background, photo, ...)
are dropped. Good enough for short generated captions ("a red star and a blue square on a
striped green background") and for BLIP-style ones ("a cat sitting on a couch next to a dog").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

# Named colours shared with the scene generator (datagen.scenes). The RGB values are the
# exact colours the generator paints, and the centres the contrast grounder starts from.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 170, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (130, 60, 190),
    "pink": (240, 130, 190),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}

# What each colour word covers, as a region of hue (degrees, may wrap past 0/360), value
# (max(R, G, B) / 255) and chroma ((max - min) / 255): the words mean ranges of shades, not the
# palette's paint values, so "blue" fits navy, royal blue and (0, 0, 255) alike. Regions of
# neighbouring words overlap (CSS "brown" is a dark red): the grounder assigns words to the
# image's colours jointly, so a word takes the best-fitting colour present, not a fixed one.
# hue None: an achromatic word (chroma decides, hue is ignored).
COLOUR_REGIONS: dict[str, tuple[tuple[float, float] | None, tuple[float, float], tuple[float, float]]] = {
    "red": ((-25.0, 15.0), (0.3, 1.0), (0.25, 1.0)),
    "orange": ((12.0, 45.0), (0.65, 1.0), (0.3, 1.0)),
    "yellow": ((42.0, 72.0), (0.6, 1.0), (0.3, 1.0)),
    "green": ((70.0, 165.0), (0.2, 1.0), (0.2, 1.0)),
    "cyan": ((160.0, 200.0), (0.4, 1.0), (0.25, 1.0)),
    "blue": ((195.0, 250.0), (0.2, 1.0), (0.2, 1.0)),
    "purple": ((245.0, 310.0), (0.2, 1.0), (0.2, 1.0)),
    "pink": ((290.0, 365.0), (0.6, 1.0), (0.12, 1.0)),
    "brown": ((-10.0, 45.0), (0.2, 0.75), (0.15, 0.8)),
    "white": (None, (0.85, 1.0), (0.0, 0.12)),
    "black": (None, (0.0, 0.22), (0.0, 0.25)),
    "gray": (None, (0.25, 0.85), (0.0, 0.15)),
}
COLOUR_FIT_MAX = 1.0  # a misfit below this: the word describes the colour


def _outside(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.maximum(lo - x, 0) + np.maximum(x - hi, 0)


def colour_fit(rgb: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
    """Per colour word, how badly it describes each RGB colour (..., 3): 0 inside the word's
    region (:data:`COLOUR_REGIONS`), growing with the distance outside it (30 degrees of hue,
    0.15 of value or 0.1 of chroma count 1 each; hue counts less on low-chroma colours)."""
    x = np.asarray(rgb, np.float64) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    out = {}
    for word, (hues, vals, chromas) in COLOUR_REGIONS.items():
        miss = _outside(mx, *vals) / 0.15 + _outside(chroma, *chromas) / 0.1
        if hues is not None:
            lo, hi = hues
            mid, half = (lo + hi) / 2, (hi - lo) / 2
            off = np.abs((hue - mid + 180.0) % 360.0 - 180.0)  # circular distance to the middle
            miss = miss + np.maximum(off - half, 0) / 30.0 * np.minimum(1.0, chroma / 0.2)
        out[word] = miss
    return out


def colour_name(rgb: Sequence[float]) -> str:
    """The colour word that best describes one RGB colour (by :func:`colour_fit`)."""
    fit = colour_fit(rgb)
    return min(fit, key=lambda w: float(fit[w]))


# Spellings that mean a palette colour.
COLOUR_SYNONYMS: dict[str, str] = {
    "grey": "gray",
    "violet": "purple",
    "magenta": "pink",
    "turquoise": "cyan",
    "teal": "cyan",
    "gold": "yellow",
    "golden": "yellow",
    "silver": "gray",
}

# Head nouns that are not objects to decompose into a layer.
STOP_NOUNS = frozenset("""
    background backdrop foreground photo photograph image picture pic snapshot shot view scene
    closeup close-up close up illustration painting drawing render rendering sketch artwork art
    wallpaper texture pattern surface side top bottom front back left right middle center centre
    corner edge day night daytime light color colour style detail area part piece lot number
    group couple pair bunch set kind type sort variety row line camera frame screen shot
    thing something stuff it that this there one
""".split())

# Head nouns of settings, not objects: "a clock on a grey wall" is a clock in front of its background.
SETTING_NOUNS = frozenset("""
    floor ground table desk counter countertop shelf sky grass lawn field meadow road street
    pavement sidewalk wall water sea ocean lake river beach sand snow room garage kitchen yard
    garden park forest mountain hill city space pad stage runway track court carpet rug tablecloth
    surface landscape horizon cloud clouds
""".split())
# Words that place the subject in (on, against, ...) a setting; "of" and "with" do not.
_PLACE_LEADS = frozenset("""
    on in at against over above under below beneath behind across along through inside near by upon
""".split())

_DETERMINERS = frozenset("""
    a an the some any this that these those its their his her my our your each every another
    several many few lots lot of one two three four five six seven eight nine ten dozen
    no both all other
""".split())

# Words that end a noun phrase: conjunctions, prepositions, relative words, common verbs.
_SPLITTERS = frozenset("""
    and or but with without on in into onto at by for from of to near next beside besides
    behind under underneath below beneath above over across along against around between
    among amid through inside outside within upon towards toward via like as than
    while where when which who whom whose that
    is are was were be been being am has have had having does do did
    sits sit stands stand lies lie holds hold looks look walks walk runs run rides ride eats
    eat plays play flies fly rests rest hangs hang shows show features feature contains
    contain wears wear carries carry
    there here very also just
""".split())

# -ing words that are nouns, so they do not end a phrase.
_ING_NOUNS = frozenset("""
    building ceiling ring king thing string wing pudding clothing painting drawing sling
    swing spring evening morning earring icing stuffing dumpling sibling railing awning
    frosting bedding wedding ping
""".split())

_IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "knives": "knife",
    "wives": "wife", "leaves": "leaf", "loaves": "loaf", "wolves": "wolf", "calves": "calf",
    "halves": "half", "shelves": "shelf", "scarves": "scarf", "lives": "life", "dice": "die",
    "buses": "bus", "houses": "house", "horses": "horse", "vases": "vase", "cases": "case",
    "bases": "base", "roses": "rose", "noses": "nose", "hoses": "hose",
    "dresses": "dress", "boxes": "box", "foxes": "fox", "axes": "axe", "cacti": "cactus",
    "fungi": "fungus", "potatoes": "potato", "tomatoes": "tomato", "heroes": "hero",
    "criteria": "criterion", "phenomena": "phenomenon", "cookies": "cookie", "movies": "movie",
    "ties": "tie", "pies": "pie", "shoes": "shoe", "toes": "toe",
}
_UNCOUNTED = frozenset("""
    sheep fish deer series species aircraft grass glass bus gas lens dress chess news
    bass moss cross boss class mass cactus octopus walrus virus bonus canvas atlas iris
    pants jeans scissors shorts trousers glasses clothes sunglasses binoculars
""".split())

# -ed words that are nouns, not participles.
_ED_NOUNS = frozenset("bed shed sled seed weed steed speed reed sofa-bed flowerbed hundred".split())

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
_CUT = re.compile(r"[,;:.!?()\[\]\"/]|\s&\s")


def singular(word: str) -> str:
    """Rule-based singular of one lower-case noun ("stars" -> "star", "boxes" -> "box")."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _UNCOUNTED or len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return word[:-2]
    if word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("s"):
        return word[:-1]
    return word


def normalise_colour(word: str) -> str | None:
    """The palette name a colour word stands for, or None."""
    word = word.lower()
    if word in PALETTE:
        return word
    return COLOUR_SYNONYMS.get(word)


def colour_of(phrase: str) -> str | None:
    """The palette colour a phrase names ("red star" -> "red"; "cat" -> None)."""
    for word in _WORD.findall(phrase.lower()):
        name = normalise_colour(word)
        if name is not None:
            return name
    return None


def _led_chunks(caption: str) -> list[tuple[list[str], str | None]]:
    """Cut a caption into word runs at punctuation, splitter words and verb-like -ing words;
    each run with the splitter word just before it (None at the start of a part)."""
    out: list[tuple[list[str], str | None]] = []
    for part in _CUT.split(caption.lower()):
        words = _WORD.findall(part)
        run: list[str] = []
        lead: str | None = None
        for i, w in enumerate(words):
            # An -ing word followed by more words is a verb or a participle ("riding a horse",
            # "sleeping cat"): it ends the phrase. Listed -ing nouns ("building") are kept.
            is_verb = w.endswith("ing") and w not in _ING_NOUNS and i + 1 < len(words)
            if w in _SPLITTERS or is_verb:
                if run:
                    out.append((run, lead))
                run, lead = [], w
                continue
            run.append(w)
        if run:
            out.append((run, lead))
    return out


def _chunks(caption: str) -> list[list[str]]:
    return [run for run, _lead in _led_chunks(caption)]


def _clean(run: list[str]) -> list[str]:
    """Drop determiners and counts; keep the remaining modifiers and the head noun."""
    words = [w for w in run if w not in _DETERMINERS and not w.isdigit()]
    if not words:
        return []
    # A trailing participle follows its noun ("a motorcycle parked on ..."): drop it.
    while (len(words) > 1 and words[-1].endswith("ed") and len(words[-1]) > 4
           and words[-1] not in _ED_NOUNS and normalise_colour(words[-1]) is None):
        words.pop()
    words[-1] = singular(words[-1])
    words = [normalise_colour(w) or w for w in words]
    return words


def _is_setting(words: list[str], lead: str | None) -> bool:
    """A run that places the subject in a setting ("on a grey wall"): the background, not a layer."""
    return bool(words) and words[-1] in SETTING_NOUNS and lead in _PLACE_LEADS


def _object_runs(caption: str) -> Iterator[tuple[str, str | None]]:
    """Each object phrase of the caption, in order, with the word that leads it in."""
    for run, lead in _led_chunks(caption or ""):
        words = _clean(run)
        if _is_object(words) and not _is_setting(words, lead):
            yield " ".join(words), lead


def _is_object(words: list[str]) -> bool:
    if not words:
        return False
    head = words[-1]
    if head in STOP_NOUNS or " ".join(words[-2:]) in STOP_NOUNS:
        return False
    # A lone colour or a lone adjective-looking word is not an object.
    if normalise_colour(head) is not None:
        return False
    if head.endswith("ed") and len(head) > 4 and head not in _ED_NOUNS:
        return False  # a lone participle ("parked")
    return not head.endswith("ly") and len(head) > 1


def extract_phrases(caption: str) -> list[str]:
    """Object noun phrases of a caption, singular and de-duplicated, in caption order.

    ``"two red stars and a blue square on a striped green background"`` ->
    ``["red star", "blue square"]``; stop-listed heads (background, photo, ...) are dropped.
    """
    phrases: list[str] = []
    for phrase, _lead in _object_runs(caption):
        if phrase not in phrases:
            phrases.append(phrase)
    return phrases


def phrase_leads(caption: str) -> dict[str, str | None]:
    """Each object phrase of :func:`extract_phrases` with the word that introduces it in the
    caption ("a cup on a saucer" -> {"cup": None, "saucer": "on"}): its relation to the subject."""
    out: dict[str, str | None] = {}
    for phrase, lead in _object_runs(caption):
        out.setdefault(phrase, lead)
    return out


def background_phrase(caption: str) -> str:
    """The phrase that describes the background: a "... background" or "... backdrop" phrase
    ("striped green background"), else the setting the subject is placed in ("on a grey wall"
    -> "gray wall"), else ""."""
    setting = ""
    for run, lead in _led_chunks(caption or ""):
        words = _clean(run)
        if words and words[-1] in ("background", "backdrop"):
            return " ".join(words)
        if not setting and _is_setting(words, lead):
            setting = " ".join(words)
    return setting


def detector_prompt(phrases: Iterable[str]) -> str:
    """The text prompt GroundingDINO expects: lower-case phrases joined by " . ", ending with "."."""
    cleaned = [" ".join(_WORD.findall(p.lower())) for p in phrases]
    cleaned = [p for p in cleaned if p]
    return " . ".join(cleaned) + " ." if cleaned else ""


def with_article(phrase: str) -> str:
    """ "red star" -> "a red star", "orange circle" -> "an orange circle" (layer captions)."""
    phrase = phrase.strip()
    if not phrase:
        return phrase
    article = "an" if phrase[0].lower() in "aeiou" else "a"
    return f"{article} {phrase}"


def join_caption(layer_phrases: Sequence[str], background: str = "") -> str:
    """ "a red star, a blue circle and a green square on a striped gray background"."""
    items = [with_article(p) for p in layer_phrases]
    if len(items) > 1:
        text = ", ".join(items[:-1]) + " and " + items[-1]
    else:
        text = items[0] if items else ""
    if background:
        text = f"{text} on {with_article(background)}" if text else with_article(background)
    return text


def nearest_colour(rgb: Sequence[float]) -> str:
    """The palette name nearest to an RGB triple (Euclidean in RGB)."""
    r, g, b = (float(v) for v in rgb[:3])
    return min(PALETTE, key=lambda n: (PALETTE[n][0] - r) ** 2 + (PALETTE[n][1] - g) ** 2
               + (PALETTE[n][2] - b) ** 2)
