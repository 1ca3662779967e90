"""The word list of the tiny config's tokenizer (built at runtime by :mod:`model.modeling.text`).

Whole words for the vocabulary of coloured-shape scenes and common caption words; any other word
falls back to word pieces and single characters (WordPiece), so no caption is ever lost to [UNK].
"""

from __future__ import annotations

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]

_COLOURS = """
red green blue yellow orange purple pink brown black white gray grey cyan magenta teal navy maroon olive
lime violet indigo turquoise gold golden silver beige tan khaki crimson scarlet coral salmon lavender mint
aqua azure ivory cream charcoal amber bronze copper rust peach plum lilac mauve burgundy emerald jade ochre
sienna umber fuchsia chartreuse periwinkle sand slate steel cobalt sapphire ruby cerulean vermilion mustard
orchid thistle wheat linen snow honeydew seashell tomato chocolate firebrick goldenrod lemon lemonchiffon
aquamarine moccasin navajo papaya whip blanched almond bisque cornsilk gainsboro ghost smoke wood burly
cadet royal dodger midnight forest sea spring lawn yellowgreen olivedrab darkgreen seagreen skyblue
steelblue slategray slategrey dimgray dimgrey lightgray lightgrey darkgray darkgrey hot deep rosy indian
misty rose blush sky powder alice dark light pale bright dull pastel neon vivid muted medium faded rich
warm cool colored coloured colorful colourful color colour colors colours tone shade hue
reddish greenish bluish yellowish orangish purplish pinkish brownish grayish greyish whitish blackish
"""

_SHAPES = """
circle circles square squares triangle triangles rectangle rectangles ellipse ellipses oval ovals star
stars hexagon hexagons pentagon pentagons octagon octagons diamond diamonds rhombus heart hearts cross
crosses ring rings disk disks disc discs blob blobs polygon polygons shape shapes line lines stripe stripes
arc arcs crescent crescents trapezoid parallelogram semicircle dot dots spiral arrow arrows box boxes ball
balls sphere spheres cube cubes cylinder cone pyramid round rounded triangular rectangular
circular outline filled hollow
"""

_SCENE = """
a an the one two three four five six seven eight nine ten zero first second third fourth last
small smaller smallest large larger largest big bigger biggest tiny huge little medium tall short wide
narrow thin thick long
left right top bottom center centre middle corner corners edge side upper lower above below behind front
back in on at of over under near next to beside between with and or on onto into inside outside around
against across along from by for is are it its this that there their them
background foreground backdrop layer layers image picture photo photograph scene object objects item items
plain solid striped stripes checkered checkerboard checks gradient noise noisy textured texture pattern
patterned flat smooth grainy grain horizontal vertical diagonal wavy dotted spotted grid tiled mottled speckled
overlapping overlaps covering partially partly fully empty blank simple
"""

_COMMON = """
person people man men woman women child children boy girl baby face hand hands hair eye eyes
dog dogs cat cats bird birds horse horses cow sheep fish animal animals
car cars truck bus train bicycle bike motorcycle boat ship plane airplane
tree trees flower flowers plant plants grass leaf leaves garden forest field mountain mountains hill sky
cloud clouds sun moon water river lake sea ocean beach sand road street city building buildings house
houses wall floor ground table chair bed sofa couch window door room kitchen shelf lamp
cup mug bottle glass plate bowl food fruit apple apples banana bananas cake pizza bread
book books phone computer laptop screen clock sign logo text letter letters word words
shirt dress hat shoes bag
standing sitting lying holding wearing walking running flying floating parked
white isolated closeup close up view portrait
"""

_PUNCTUATION = list(",.!?'\"-:;()&/+")


def word_list() -> list[str]:
    """Whole-word tokens, de-duplicated, in a fixed order."""
    words: list[str] = []
    for block in (_COLOURS, _SHAPES, _SCENE, _COMMON):
        words.extend(block.split())
    words.extend(_PUNCTUATION)
    return list(dict.fromkeys(words))
