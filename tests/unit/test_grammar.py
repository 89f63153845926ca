"""Tests for the caption grammars (ccr_ray.data.grammar).

The word tables below are written independently of the module: the tests parse every caption back into
(size, colour, shape, position) per object plus the background, and compare with the scene.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from ccr_ray.data.grammar import LANGUAGES, NUM_TEMPLATES, describe
from ccr_ray.data.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    SceneSampler,
    heldout_pairs,
)

Obj = SceneObject

# One regex per attribute value and language. Each must match exactly the mentions of that value (so the
# position regexes keep "oben" from matching inside "oben links", and so on). Matching ignores case.
_SHAPES = {
    "en": {s: rf"\b{s}\b" for s in SHAPES},
    "de": {"circle": r"\bKreis\b", "square": r"\bQuadrat\b", "triangle": r"\bDreieck\b", "star": r"\bStern\b",
           "cross": r"\bKreuz\b", "diamond": r"\bRaute\b", "heart": r"\bHerz(en)?\b", "hexagon": r"\bSechseck\b"},
    "fr": {"circle": r"\bcercle\b", "square": r"\bcarré\b", "triangle": r"\btriangle\b", "star": r"\bétoile\b",
           "cross": r"\bcroix\b", "diamond": r"\blosange\b", "heart": r"\bcœur\b", "hexagon": r"\bhexagone\b"},
    "cs": {"circle": r"\bkruh(em)?\b", "square": r"\bčtver(ec|cem)\b", "triangle": r"\btrojúhelník(em)?\b",
           "star": r"\bhvězd(a|ou)\b", "cross": r"\bkříž(em)?\b", "diamond": r"\bkosočtver(ec|cem)\b",
           "heart": r"\bsrdcem?\b", "hexagon": r"\bšestiúhelník(em)?\b"},
    "zh": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星", "cross": "十字",
           "diamond": "菱形", "heart": "心形", "hexagon": "六边形"},
    "ja": {"circle": "円", "square": "正方形", "triangle": "三角形", "star": "星", "cross": "十字",
           "diamond": "ひし形", "heart": "ハート", "hexagon": "六角形"},
}
_COLOURS = {
    "en": {c: rf"\b{c}\b" for c in COLOURS},
    "de": {"red": r"\brot\w*", "green": r"\bgrün\w*", "blue": r"\bblau\w*", "yellow": r"\bgelb\w*",
           "purple": r"\blila\b", "orange": r"\borangefarben\w*", "pink": r"\brosa\b", "brown": r"\bbraun\w*"},
    "fr": {"red": r"\brouge\b", "green": r"\bverte?\b", "blue": r"\bbleue?\b", "yellow": r"\bjaune\b",
           "purple": r"\bviolet(te)?\b", "orange": r"\borange\b", "pink": r"\brose\b", "brown": r"\bmarron\b"},
    "cs": {c: rf"\b{stem}(ý|á|é|ým|ou)\b" for c, stem in {
        "red": "červen", "green": "zelen", "blue": "modr", "yellow": "žlut",
        "purple": "fialov", "orange": "oranžov", "pink": "růžov", "brown": "hněd"}.items()},
    "zh": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
           "pink": "粉色", "brown": "棕色"},
    "ja": {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の",
           "orange": "オレンジ色の", "pink": "ピンクの", "brown": "茶色の"},
}
_SIZES = {
    "en": {s: rf"\b{s}\b" for s in SIZES},
    "de": {"small": r"\bklein\w*", "medium": r"\bmittelgroß\w*", "large": r"\bgroß\w*"},
    "fr": {"small": r"\bpetite?\b", "medium": r"\bde taille moyenne\b", "large": r"\bgrande?\b"},
    "cs": {"small": r"\bmal(ý|á|é|ým|ou)\b", "medium": r"\bstředně velk(ý|á|é|ým|ou)\b",
           "large": r"(?<!středně )\bvelk(ý|á|é|ým|ou)\b"},
    "zh": {"small": "的小", "medium": "中等大小的", "large": "的大"},
    "ja": {"small": "小さな", "medium": "中くらいの", "large": "大きな"},
}
_POSITIONS = {
    "en": {"top left": r"\bat the top left\b", "top": r"\bat the top\b(?! (left|right))",
           "top right": r"\bat the top right\b", "left": r"\bon the left\b", "centre": r"\bin the centre\b",
           "right": r"\bon the right\b", "bottom left": r"\bat the bottom left\b",
           "bottom": r"\bat the bottom\b(?! (left|right))", "bottom right": r"\bat the bottom right\b"},
    "de": {"top left": r"\boben links\b", "top": r"\boben\b(?! (links|rechts))", "top right": r"\boben rechts\b",
           "left": r"(?<!oben )(?<!unten )\blinks\b", "centre": r"\bin der Mitte\b",
           "right": r"(?<!oben )(?<!unten )\brechts\b", "bottom left": r"\bunten links\b",
           "bottom": r"\bunten\b(?! (links|rechts))", "bottom right": r"\bunten rechts\b"},
    "fr": {"top left": r"\ben haut à gauche\b", "top": r"\ben haut\b(?! à)", "top right": r"\ben haut à droite\b",
           "left": r"(?<!haut )(?<!bas )\bà gauche\b", "centre": r"\bau centre\b",
           "right": r"(?<!haut )(?<!bas )\bà droite\b", "bottom left": r"\ben bas à gauche\b",
           "bottom": r"\ben bas\b(?! à)", "bottom right": r"\ben bas à droite\b"},
    "cs": {"top left": r"\bvlevo nahoře\b", "top": r"(?<!vlevo )(?<!vpravo )\bnahoře\b",
           "top right": r"\bvpravo nahoře\b", "left": r"\bvlevo\b(?! (nahoře|dole))", "centre": r"\buprostřed\b",
           "right": r"\bvpravo\b(?! (nahoře|dole))", "bottom left": r"\bvlevo dole\b",
           "bottom": r"(?<!vlevo )(?<!vpravo )\bdole\b", "bottom right": r"\bvpravo dole\b"},
    "zh": {"top left": "左上角", "top": "上方", "top right": "右上角", "left": "左侧", "centre": "中间",
           "right": "右侧", "bottom left": "左下角", "bottom": "下方", "bottom right": "右下角"},
    "ja": {"top left": "左上", "top": "(?<![左右])上(?=[のに])", "top right": "右上", "left": "左(?![上下])",
           "centre": "中央", "right": "右(?![上下])", "bottom left": "左下", "bottom": "(?<![左右])下(?=[のに])",
           "bottom right": "右下"},
}
_BACKGROUNDS = {
    "en": {b: rf"\b{b}\b" for b in BACKGROUNDS},
    "de": {"white": r"\bweiß\w*", "black": r"\bschwarz\w*", "grey": r"\bgrau\w*"},
    "fr": {"white": r"\bblanc\b", "black": r"\bnoir\b", "grey": r"\bgris\b"},
    "cs": {"white": r"\bbíl(é|ém)\b", "black": r"\bčern(é|ém)\b", "grey": r"\bšed(é|ém)\b"},
    "zh": {"white": "白色", "black": "黑色", "grey": "灰色"},
    "ja": {"white": "白", "black": "黒", "grey": "灰色"},
}
_TABLES = {"shape": _SHAPES, "colour": _COLOURS, "size": _SIZES, "position": _POSITIONS}
_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": POSITIONS}


def _mentions(caption: str, table: dict[str, str]) -> list[tuple[int, str]]:
    """(offset, value) for every mention of any value in `table`, in caption order."""
    found = [(m.start(), value) for value, rx in table.items() for m in re.finditer(rx, caption, re.IGNORECASE)]
    return sorted(found)


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    sampler = SceneSampler(heldout_pairs(seed))
    return [sampler.sample(rng, include_held_out=bool(i % 5 == 0)) for i in range(n)]


SCENE_1 = Scene("black", (Obj("hexagon", "yellow", "small", "left"),))
SCENE_2 = Scene("white", (Obj("diamond", "blue", "small", "bottom right"), Obj("heart", "red", "large", "top")))
SCENE_3 = Scene("grey", (Obj("circle", "red", "large", "top left"), Obj("square", "blue", "small", "centre"),
                         Obj("star", "green", "medium", "right")))


# ------------------------------------------------------------------------------------------------- API


def test_api_constants():
    assert LANGUAGES == ("en", "de", "fr", "cs", "zh", "ja")
    assert isinstance(NUM_TEMPLATES, int) and NUM_TEMPLATES >= 3


@pytest.mark.parametrize("lang", ["xx", "EN", "english", "", None])
def test_unknown_language_raises(lang):
    with pytest.raises(ValueError, match="language"):
        describe(SCENE_3, lang, 0)


@pytest.mark.parametrize("template", [-1, NUM_TEMPLATES, NUM_TEMPLATES + 5, 1.0, "0", None])
def test_bad_template_raises(template):
    with pytest.raises(ValueError, match="template"):
        describe(SCENE_3, "en", template)


def test_numpy_template_index_accepted():
    assert describe(SCENE_3, "de", np.int64(1)) == describe(SCENE_3, "de", 1)


def test_bad_scene_raises():
    with pytest.raises(ValueError):
        describe(Scene("grey", ()), "en", 0)
    with pytest.raises(ValueError):
        describe(Scene("pink", SCENE_1.objects), "en", 0)
    with pytest.raises(ValueError):
        describe(Scene("grey", (Obj("oval", "red", "large", "top"),)), "fr", 0)


# ------------------------------------------------------------------------------- content of every caption


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_attribute_is_mentioned_in_order(lang):
    """Parse each caption back: the sizes, colours, shapes and positions mentioned, in order, are exactly the
    scene's objects in order, and the background is mentioned once with the right colour."""
    scenes = [SCENE_1, SCENE_2, SCENE_3] + _scenes(300)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for scene in scenes:
        for t in range(NUM_TEMPLATES):
            caption = describe(scene, lang, t)
            assert caption and caption == caption.strip() and "  " not in caption
            for attr, tables in _TABLES.items():
                got = [v for _, v in _mentions(caption, tables[lang])]
                want = [getattr(o, attr) for o in scene.objects]
                assert got == want, (lang, t, attr, caption)
            assert [v for _, v in _mentions(caption, _BACKGROUNDS[lang])] == [scene.background], (lang, t, caption)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_test_tables_cover_every_value(lang):
    """Guard for the test above: every attribute value has a regex in every language."""
    for attr, tables in _TABLES.items():
        assert set(tables[lang]) == set(_VALUES[attr])
    assert set(_BACKGROUNDS[lang]) == set(BACKGROUNDS)


def test_templates_differ_within_a_language():
    for scene in [SCENE_1, SCENE_2, SCENE_3] + _scenes(30, seed=1):
        for lang in LANGUAGES:
            captions = [describe(scene, lang, t) for t in range(NUM_TEMPLATES)]
            assert len(set(captions)) == NUM_TEMPLATES, captions


def test_languages_differ():
    for t in range(NUM_TEMPLATES):
        assert len({describe(SCENE_3, lang, t) for lang in LANGUAGES}) == len(LANGUAGES)


def test_deterministic():
    for lang, t in itertools.product(LANGUAGES, range(NUM_TEMPLATES)):
        assert describe(SCENE_3, lang, t) == describe(Scene("grey", tuple(SCENE_3.objects)), lang, t)


def test_one_attribute_change_changes_caption():
    """Changing any single attribute of any object, or the background, changes every caption."""
    base = SCENE_3
    variants = [Scene(b, base.objects) for b in BACKGROUNDS if b != base.background]
    for i, obj in enumerate(base.objects):
        taken = {o.position for o in base.objects}
        for attr, values in _VALUES.items():
            for v in values:
                if v == getattr(obj, attr) or (attr == "position" and v in taken):
                    continue
                objs = list(base.objects)
                objs[i] = SceneObject(**{**obj.__dict__, attr: v})
                variants.append(Scene(base.background, tuple(objs)))
    # and the same objects in another order
    variants.append(Scene(base.background, base.objects[::-1]))
    for lang, t in itertools.product(LANGUAGES, range(NUM_TEMPLATES)):
        ref = describe(base, lang, t)
        for v in variants:
            assert describe(v, lang, t) != ref, (lang, t, v)


def test_single_object_captions_are_unique():
    """Every one-object scene (all shapes x colours x sizes x positions x backgrounds) gets its own caption."""
    scenes = [Scene(b, (Obj(s, c, z, p),))
              for s, c, z, p, b in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS)]
    for lang, t in itertools.product(LANGUAGES, range(NUM_TEMPLATES)):
        assert len({describe(s, lang, t) for s in scenes}) == len(scenes), (lang, t)


@pytest.mark.parametrize("lang", ["zh", "ja"])
def test_cjk_punctuation(lang):
    for scene in [SCENE_1, SCENE_2, SCENE_3]:
        for t in range(NUM_TEMPLATES):
            caption = describe(scene, lang, t)
            assert not re.search(r"[ ,.;:!?]", caption), caption
    assert "、" in describe(SCENE_3, lang, 0)
    assert describe(SCENE_3, lang, 2).endswith("。")


# --------------------------------------------------------------------------------- hand-checked captions

EXPECTED_3 = {  # SCENE_3: large red circle top left, small blue square centre, medium green star right; grey
    ("en", 0): "a large red circle at the top left, a small blue square in the centre and a medium green star "
               "on the right, on a grey background",
    ("en", 1): "a grey background with a large red circle at the top left, a small blue square in the centre "
               "and a medium green star on the right",
    ("en", 2): "at the top left there is a large red circle, in the centre a small blue square and on the right "
               "a medium green star. the background is grey.",
    ("de", 0): "Ein großer roter Kreis oben links, ein kleines blaues Quadrat in der Mitte und ein mittelgroßer "
               "grüner Stern rechts, auf grauem Hintergrund",
    ("de", 1): "Ein grauer Hintergrund mit einem großen roten Kreis oben links, einem kleinen blauen Quadrat in "
               "der Mitte und einem mittelgroßen grünen Stern rechts",
    ("de", 2): "Oben links befindet sich ein großer roter Kreis, in der Mitte ein kleines blaues Quadrat und "
               "rechts ein mittelgroßer grüner Stern. Der Hintergrund ist grau.",
    ("fr", 0): "Un grand cercle rouge en haut à gauche, un petit carré bleu au centre et une étoile verte de "
               "taille moyenne à droite, sur un fond gris",
    ("fr", 1): "Un fond gris avec un grand cercle rouge en haut à gauche, un petit carré bleu au centre et une "
               "étoile verte de taille moyenne à droite",
    ("fr", 2): "En haut à gauche se trouve un grand cercle rouge, au centre un petit carré bleu et à droite une "
               "étoile verte de taille moyenne. Le fond est gris.",
    ("cs", 0): "Velký červený kruh vlevo nahoře, malý modrý čtverec uprostřed a středně velká zelená hvězda "
               "vpravo, na šedém pozadí",
    ("cs", 1): "Šedé pozadí s velkým červeným kruhem vlevo nahoře, malým modrým čtvercem uprostřed a středně "
               "velkou zelenou hvězdou vpravo",
    ("cs", 2): "Vlevo nahoře je velký červený kruh, uprostřed malý modrý čtverec a vpravo středně velká zelená "
               "hvězda. Pozadí je šedé.",
    ("zh", 0): "一个位于左上角的红色的大圆形、一个位于中间的蓝色的小正方形和一颗位于右侧的中等大小的绿色五角星，背景为灰色。",
    ("zh", 1): "灰色背景上有一个位于左上角的红色的大圆形、一个位于中间的蓝色的小正方形和一颗位于右侧的中等大小的绿色五角星。",
    ("zh", 2): "左上角有一个红色的大圆形，中间有一个蓝色的小正方形，右侧有一颗中等大小的绿色五角星。背景是灰色的。",
    ("ja", 0): "灰色の背景に、左上の大きな赤い円、中央の小さな青い正方形と右の中くらいの緑の星",
    ("ja", 1): "左上に大きな赤い円、中央に小さな青い正方形、右に中くらいの緑の星がある灰色の背景",
    ("ja", 2): "左上に大きな赤い円があり、中央に小さな青い正方形があり、右に中くらいの緑の星があります。背景は灰色です。",
}

EXPECTED_1 = {  # SCENE_1: small yellow hexagon on the left; black
    ("en", 0): "a small yellow hexagon on the left on a black background",
    ("en", 2): "on the left there is a small yellow hexagon. the background is black.",
    ("de", 0): "Ein kleines gelbes Sechseck links auf schwarzem Hintergrund",
    ("de", 1): "Ein schwarzer Hintergrund mit einem kleinen gelben Sechseck links",
    ("de", 2): "Links befindet sich ein kleines gelbes Sechseck. Der Hintergrund ist schwarz.",
    ("fr", 2): "À gauche se trouve un petit hexagone jaune. Le fond est noir.",
    ("cs", 0): "Malý žlutý šestiúhelník vlevo na černém pozadí",
    ("cs", 1): "Černé pozadí s malým žlutým šestiúhelníkem vlevo",
    ("cs", 2): "Vlevo je malý žlutý šestiúhelník. Pozadí je černé.",
    ("zh", 2): "左侧有一个黄色的小六边形。背景是黑色的。",
    ("ja", 1): "左に小さな黄色い六角形がある黒い背景",
    ("ja", 2): "左に小さな黄色い六角形があります。背景は黒です。",
}


@pytest.mark.parametrize("key", sorted(EXPECTED_3))
def test_exact_captions_three_objects(key):
    assert describe(SCENE_3, *key) == EXPECTED_3[key]


@pytest.mark.parametrize("key", sorted(EXPECTED_1))
def test_exact_captions_one_object(key):
    assert describe(SCENE_1, *key) == EXPECTED_1[key]


def _one(shape, colour, size, position="centre", background="grey"):
    return Scene(background, (Obj(shape, colour, size, position),))


# (scene, lang, template, phrase that must appear)
AGREEMENT = [
    # German: nominative mixed declension, all genders
    (_one("circle", "red", "large"), "de", 0, "Ein großer roter Kreis in der Mitte"),
    (_one("square", "green", "medium"), "de", 0, "Ein mittelgroßes grünes Quadrat"),
    (_one("diamond", "blue", "small"), "de", 0, "Eine kleine blaue Raute"),
    (_one("star", "yellow", "large"), "de", 2, "befindet sich ein großer gelber Stern"),
    # German: dative after "mit"
    (_one("diamond", "blue", "small"), "de", 1, "mit einer kleinen blauen Raute in der Mitte"),
    (_one("circle", "blue", "small"), "de", 1, "mit einem kleinen blauen Kreis in der Mitte"),
    (_one("cross", "brown", "large"), "de", 1, "mit einem großen braunen Kreuz"),
    (_one("heart", "red", "large"), "de", 1, "mit einem großen roten Herzen"),
    # German: indeclinable lila / rosa, declined orangefarben
    (_one("circle", "purple", "large"), "de", 0, "Ein großer lila Kreis"),
    (_one("diamond", "pink", "medium"), "de", 1, "mit einer mittelgroßen rosa Raute"),
    (_one("hexagon", "orange", "small"), "de", 0, "Ein kleines orangefarbenes Sechseck"),
    (_one("triangle", "orange", "small"), "de", 1, "mit einem kleinen orangefarbenen Dreieck"),
    # German: background adjective (strong dative, mixed nominative, predicative)
    (_one("circle", "red", "large", background="white"), "de", 0, "auf weißem Hintergrund"),
    (_one("circle", "red", "large", background="black"), "de", 1, "Ein schwarzer Hintergrund mit"),
    (_one("circle", "red", "large", background="white"), "de", 2, "Der Hintergrund ist weiß."),
    # German positions
    (_one("circle", "red", "large", "bottom right"), "de", 2, "Unten rechts befindet sich"),
    (_one("circle", "red", "large", "top"), "de", 0, "Kreis oben auf"),
    # French: gender, size before the noun, colour agreement after it
    (_one("star", "green", "large"), "fr", 0, "Une grande étoile verte au centre"),
    (_one("star", "green", "medium"), "fr", 1, "une étoile verte de taille moyenne"),
    (_one("cross", "purple", "small"), "fr", 0, "Une petite croix violette"),
    (_one("cross", "blue", "large"), "fr", 1, "une grande croix bleue"),
    (_one("circle", "purple", "small"), "fr", 1, "un petit cercle violet"),
    (_one("heart", "pink", "large"), "fr", 0, "Un grand cœur rose"),
    (_one("star", "brown", "small"), "fr", 1, "une petite étoile marron"),
    (_one("star", "orange", "small"), "fr", 1, "une petite étoile orange"),
    (_one("diamond", "yellow", "medium"), "fr", 2, "se trouve un losange jaune de taille moyenne"),
    (_one("hexagon", "red", "large", "bottom left"), "fr", 0, "Un grand hexagone rouge en bas à gauche"),
    (_one("square", "red", "large", "top right", "white"), "fr", 2, "En haut à droite se trouve un grand carré "
                                                                    "rouge. Le fond est blanc."),
    # Czech: nominative agreement in the three genders
    (_one("circle", "red", "large"), "cs", 0, "Velký červený kruh uprostřed"),
    (_one("star", "red", "large"), "cs", 0, "Velká červená hvězda"),
    (_one("heart", "red", "large"), "cs", 2, "je velké červené srdce"),
    (_one("diamond", "brown", "small"), "cs", 2, "je malý hnědý kosočtverec"),
    # Czech: instrumental after s / se
    (_one("circle", "red", "large"), "cs", 1, "s velkým červeným kruhem uprostřed"),
    (_one("star", "red", "large"), "cs", 1, "s velkou červenou hvězdou"),
    (_one("heart", "red", "large"), "cs", 1, "s velkým červeným srdcem"),
    (_one("cross", "pink", "small"), "cs", 1, "s malým růžovým křížem"),
    (_one("square", "purple", "medium"), "cs", 1, "se středně velkým fialovým čtvercem"),
    (_one("star", "orange", "medium"), "cs", 1, "se středně velkou oranžovou hvězdou"),
    # Czech: background (locative / nominative neuter)
    (_one("circle", "red", "large", background="white"), "cs", 0, "na bílém pozadí"),
    (_one("circle", "red", "large", background="black"), "cs", 2, "Pozadí je černé."),
    (_one("circle", "red", "large", "bottom right"), "cs", 2, "Vpravo dole je"),
    # Chinese: measure words and modifier order
    (_one("star", "yellow", "large"), "zh", 2, "中间有一颗黄色的大五角星。"),
    (_one("heart", "pink", "small"), "zh", 2, "中间有一个粉色的小心形。"),
    (_one("cross", "brown", "medium", "top"), "zh", 0, "一个位于上方的中等大小的棕色十字，背景为灰色。"),
    (_one("diamond", "orange", "large", background="white"), "zh", 1, "白色背景上有一个位于中间的橙色的大菱形。"),
    # Japanese: adjective forms and background
    (_one("triangle", "yellow", "large"), "ja", 2, "中央に大きな黄色い三角形があります。"),
    (_one("heart", "brown", "small"), "ja", 0, "灰色の背景に、中央の小さな茶色のハート"),
    (_one("cross", "orange", "medium", "bottom left", "white"), "ja", 1, "左下に中くらいのオレンジ色の十字がある白い背景"),
    (_one("diamond", "purple", "small", "top right", "black"), "ja", 2, "右上に小さな紫のひし形があります。背景は黒です。"),
]


@pytest.mark.parametrize("scene, lang, template, phrase", AGREEMENT,
                         ids=[f"{lang}{t}-{p[:24]}" for _, lang, t, p in AGREEMENT])
def test_agreement(scene, lang, template, phrase):
    assert phrase in describe(scene, lang, template)


def test_list_joining():
    """Commas between items and a single final conjunction (no comma before it) in every language."""
    finals = {"en": " and ", "de": " und ", "fr": " et ", "cs": " a ", "zh": "和", "ja": "と"}
    for lang, final in finals.items():
        two, three = describe(SCENE_2, lang, 0), describe(SCENE_3, lang, 0)
        assert two.count(final) == 1 and three.count(final) == 1, (two, three)
        assert f",{final}" not in three and f"、{final}" not in three
    assert describe(SCENE_2, "cs", 1) == ("Bílé pozadí s malým modrým kosočtvercem vpravo dole a velkým "
                                         "červeným srdcem nahoře")
    assert describe(SCENE_2, "de", 1) == ("Ein weißer Hintergrund mit einer kleinen blauen Raute unten rechts und "
                                         "einem großen roten Herzen oben")
    assert describe(SCENE_2, "en", 2) == ("at the bottom right there is a small blue diamond and at the top a "
                                         "large red heart. the background is white.")


# ----------------------------------------------------------------------------------------- CLIP tokens


def test_english_captions_fit_clip_context():
    """English 3-object captions stay under 48 CLIP BPE tokens (start and end tokens included), checked on the
    worst case (the longest word choice for every attribute) and on random scenes."""
    from ccr_ray._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")

    def count(texts):
        return (tok(list(texts)) != 0).sum(dim=1).tolist()

    # BPE works word by word, so the longest caption takes the longest phrase for every attribute.
    def longest(values, phrase):
        lengths = count(phrase(v) for v in values)
        return [v for _, v in sorted(zip(lengths, values), key=lambda p: -p[0])]

    shape = longest(SHAPES, lambda v: describe(_one(v, "red", "large"), "en", 0))[0]
    colour = longest(list(COLOURS), lambda v: describe(_one("circle", v, "large"), "en", 0))[0]
    size = longest(list(SIZES), lambda v: describe(_one("circle", "red", v), "en", 0))[0]
    bg = longest(list(BACKGROUNDS), lambda v: describe(_one("circle", "red", "large", background=v), "en", 0))[0]
    positions = longest(POSITIONS, lambda v: describe(_one("circle", "red", "large", v), "en", 0))[:3]
    worst = Scene(bg, tuple(Obj(shape, colour, size, p) for p in positions))
    scenes = [worst] + [s for s in _scenes(400, seed=2) if len(s.objects) == 3]
    captions = [describe(s, "en", t) for s in scenes for t in range(NUM_TEMPLATES)]
    lengths = count(captions)
    assert max(lengths) < 48, max(zip(lengths, captions))
    assert max(lengths) == max(count(describe(worst, "en", t) for t in range(NUM_TEMPLATES)))
