"""Caption grammars for the procedural scenes in six languages: en, de, fr, cs, zh, ja.

`describe(scene, lang, template)` is a pure function: the same scene, language and template always give the
same caption. Every caption names, for each object in `scene.objects` order, its size, colour, shape and
position, and it names the background colour.

Captions are parallel: template t in every language translates English template t and lists the objects in
the same order. The three templates differ in structure (English shown; the others translate it):

    0  objects first, background last:
       "a large red circle at the top left, a small blue square in the centre and a medium green star
        on the right, on a grey background"
    1  background first, objects attached to it:
       "a grey background with a large red circle at the top left, a small blue square in the centre and
        a medium green star on the right"
    2  position-led clauses, then a sentence about the background:
       "at the top left there is a large red circle, in the centre a small blue square and on the right
        a medium green star. the background is grey."

English is all lowercase (CLIP's tokenizer lowercases anyway). German, French and Czech follow their normal
orthography: a capital at the start of each sentence, and German nouns capitalised. Chinese and Japanese use
full-width punctuation (、，。).

Each language is a set of word tables plus a few small functions that apply its agreement rules; the rules
are described next to the tables.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

from ccr_ray.data.scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, SceneObject

LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "cs", "zh", "ja")
NUM_TEMPLATES: int = 3


def _cap(text: str) -> str:
    """Capitalise the first character (sentence start); `str.upper` handles Š, À, É ..."""
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str], sep: str, last: str) -> str:
    """'a', 'a<last>b', 'a<sep>b<last>c': a list with commas and a final conjunction (no serial comma)."""
    if len(items) == 1:
        return items[0]
    return sep.join(items[:-1]) + last + items[-1]


# ---------------------------------------------------------------------------------------------------------
# English. Every size word starts with a consonant, so the article is always "a".
# ---------------------------------------------------------------------------------------------------------
_EN_SHAPES = {s: s for s in SHAPES}
_EN_COLOURS = {c: c for c in COLOURS}
_EN_SIZES = {s: s for s in SIZES}
_EN_POSITIONS = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
_EN_BACKGROUNDS = {b: b for b in BACKGROUNDS}


def _en_np(o: SceneObject) -> str:
    return f"a {_EN_SIZES[o.size]} {_EN_COLOURS[o.colour]} {_EN_SHAPES[o.shape]}"


def _en(scene: Scene, template: int) -> str:
    objs, bg = scene.objects, _EN_BACKGROUNDS[scene.background]
    if template == 0:
        items = _join([f"{_en_np(o)} {_EN_POSITIONS[o.position]}" for o in objs], ", ", " and ")
        return f"{items}{',' if len(objs) > 1 else ''} on a {bg} background"
    if template == 1:
        items = _join([f"{_en_np(o)} {_EN_POSITIONS[o.position]}" for o in objs], ", ", " and ")
        return f"a {bg} background with {items}"
    first, rest = objs[0], objs[1:]
    clauses = [f"{_EN_POSITIONS[first.position]} there is {_en_np(first)}"]
    clauses += [f"{_EN_POSITIONS[o.position]} {_en_np(o)}" for o in rest]  # gapping: "..., in the centre a ..."
    return f"{_join(clauses, ', ', ' and ')}. the background is {bg}."


# ---------------------------------------------------------------------------------------------------------
# German. Nouns carry gender (m/f/n). After the indefinite article the adjectives take the mixed declension:
#   nominative  m: ein großer roter Kreis    n: ein großes rotes Quadrat    f: eine große rote Raute
#   dative      m: einem großen roten Kreis  n: einem großen roten Quadrat  f: einer großen roten Raute
# (Herz has the irregular dative "Herzen": "mit einem großen roten Herzen").
# "lila" and "rosa" are indeclinable ("ein großer lila Kreis"); orange is given as "orangefarben", which
# declines normally ("ein orangefarbener Kreis"). The background adjective has no article in "auf grauem
# Hintergrund" (strong dative -em), "ein grauer Hintergrund" (mixed nominative -er), "ist grau" (bare).
# Position phrases are adverbials and take no case. Template 2 puts the position first (verb second:
# "Oben links befindet sich ein ...") and gaps the verb in later clauses.
# ---------------------------------------------------------------------------------------------------------
_DE_SHAPES = {  # noun, gender
    "circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"), "star": ("Stern", "m"),
    "cross": ("Kreuz", "n"), "diamond": ("Raute", "f"), "heart": ("Herz", "n"), "hexagon": ("Sechseck", "n"),
}
_DE_DATIVE_NOUNS = {"Herz": "Herzen"}  # irregular dative singular (dem Herzen); the others do not change
_DE_COLOURS = {
    "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb",
    "purple": "lila", "orange": "orangefarben", "pink": "rosa", "brown": "braun",
}
_DE_INDECLINABLE = frozenset({"lila", "rosa"})
_DE_SIZES = {"small": "klein", "medium": "mittelgroß", "large": "groß"}
_DE_INDEF = {  # (case, gender) -> (indefinite article, adjective ending of the mixed declension)
    ("nom", "m"): ("ein", "er"), ("nom", "n"): ("ein", "es"), ("nom", "f"): ("eine", "e"),
    ("dat", "m"): ("einem", "en"), ("dat", "n"): ("einem", "en"), ("dat", "f"): ("einer", "en"),
}
_DE_POSITIONS = {
    "top left": "oben links", "top": "oben", "top right": "oben rechts",
    "left": "links", "centre": "in der Mitte", "right": "rechts",
    "bottom left": "unten links", "bottom": "unten", "bottom right": "unten rechts",
}
_DE_BACKGROUNDS = {"white": "weiß", "black": "schwarz", "grey": "grau"}


def _de_adj(stem: str, ending: str) -> str:
    return stem if stem in _DE_INDECLINABLE else stem + ending


def _de_np(o: SceneObject, case: str) -> str:
    noun, gender = _DE_SHAPES[o.shape]
    article, ending = _DE_INDEF[(case, gender)]
    if case == "dat":
        noun = _DE_DATIVE_NOUNS.get(noun, noun)
    return f"{article} {_de_adj(_DE_SIZES[o.size], ending)} {_de_adj(_DE_COLOURS[o.colour], ending)} {noun}"


def _de(scene: Scene, template: int) -> str:
    objs, bg = scene.objects, _DE_BACKGROUNDS[scene.background]
    if template == 0:
        items = _join([f"{_de_np(o, 'nom')} {_DE_POSITIONS[o.position]}" for o in objs], ", ", " und ")
        return _cap(f"{items}{',' if len(objs) > 1 else ''} auf {bg}em Hintergrund")
    if template == 1:
        items = _join([f"{_de_np(o, 'dat')} {_DE_POSITIONS[o.position]}" for o in objs], ", ", " und ")
        return f"Ein {bg}er Hintergrund mit {items}"
    first, rest = objs[0], objs[1:]
    clauses = [f"{_DE_POSITIONS[first.position]} befindet sich {_de_np(first, 'nom')}"]
    clauses += [f"{_DE_POSITIONS[o.position]} {_de_np(o, 'nom')}" for o in rest]
    return _cap(f"{_join(clauses, ', ', ' und ')}. Der Hintergrund ist {bg}.")


# ---------------------------------------------------------------------------------------------------------
# French. Nouns carry gender; article un/une. "petit"/"grand" go before the noun and agree
# ("un petit cercle", "une petite étoile"); medium is "de taille moyenne" after the colour
# ("un cercle rouge de taille moyenne", "une étoile verte de taille moyenne"). Colour adjectives follow the
# noun and agree in gender: vert/verte, bleu/bleue, violet/violette; rouge, jaune, rose, orange and marron
# have one form for both genders (orange and marron are invariable). "fond" is masculine.
# Template 2 inverts the subject after the position ("En haut à gauche se trouve un ...") and gaps the verb.
# ---------------------------------------------------------------------------------------------------------
_FR_SHAPES = {  # noun, gender
    "circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"), "star": ("étoile", "f"),
    "cross": ("croix", "f"), "diamond": ("losange", "m"), "heart": ("cœur", "m"), "hexagon": ("hexagone", "m"),
}
_FR_COLOURS = {  # (masculine, feminine)
    "red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "orange": ("orange", "orange"),
    "pink": ("rose", "rose"), "brown": ("marron", "marron"),
}
_FR_SIZES_BEFORE = {"small": ("petit", "petite"), "large": ("grand", "grande")}  # (m, f), placed before the noun
_FR_SIZE_AFTER = {"medium": "de taille moyenne"}  # placed after the colour, invariable
_FR_ARTICLE = {"m": "un", "f": "une"}
_FR_POSITIONS = {
    "top left": "en haut à gauche", "top": "en haut", "top right": "en haut à droite",
    "left": "à gauche", "centre": "au centre", "right": "à droite",
    "bottom left": "en bas à gauche", "bottom": "en bas", "bottom right": "en bas à droite",
}
_FR_BACKGROUNDS = {"white": "blanc", "black": "noir", "grey": "gris"}  # agree with masculine "fond"


def _fr_np(o: SceneObject) -> str:
    noun, gender = _FR_SHAPES[o.shape]
    g = 0 if gender == "m" else 1
    colour = _FR_COLOURS[o.colour][g]
    if o.size in _FR_SIZES_BEFORE:
        return f"{_FR_ARTICLE[gender]} {_FR_SIZES_BEFORE[o.size][g]} {noun} {colour}"
    return f"{_FR_ARTICLE[gender]} {noun} {colour} {_FR_SIZE_AFTER[o.size]}"


def _fr(scene: Scene, template: int) -> str:
    objs, bg = scene.objects, _FR_BACKGROUNDS[scene.background]
    if template == 0:
        items = _join([f"{_fr_np(o)} {_FR_POSITIONS[o.position]}" for o in objs], ", ", " et ")
        return _cap(f"{items}{',' if len(objs) > 1 else ''} sur un fond {bg}")
    if template == 1:
        items = _join([f"{_fr_np(o)} {_FR_POSITIONS[o.position]}" for o in objs], ", ", " et ")
        return f"Un fond {bg} avec {items}"
    first, rest = objs[0], objs[1:]
    clauses = [f"{_FR_POSITIONS[first.position]} se trouve {_fr_np(first)}"]
    clauses += [f"{_FR_POSITIONS[o.position]} {_fr_np(o)}" for o in rest]
    return _cap(f"{_join(clauses, ', ', ' et ')}. Le fond est {bg}.")


# ---------------------------------------------------------------------------------------------------------
# Czech. No articles; nouns carry gender (the masculine shapes are all inanimate) and every adjective here
# is a hard adjective (stem + ending) that agrees in gender and case:
#   nominative     m: velký červený kruh       f: velká červená hvězda      n: velké červené srdce
#   instrumental   m: velkým červeným kruhem   f: velkou červenou hvězdou   n: velkým červeným srdcem
# Medium is "středně velký" (the adverb does not decline; "střední" would read as "the middle one").
# The background "pozadí" is neuter: "na šedém pozadí" (locative), "šedé pozadí" / "pozadí je šedé"
# (nominative). The preposition "s" becomes "se" before a word starting with s, z, š or ž
# ("se středně velkým ..."). The last list item is joined by "a" with no comma before it.
# ---------------------------------------------------------------------------------------------------------
_CS_SHAPES = {  # nominative, instrumental, gender
    "circle": ("kruh", "kruhem", "m"), "square": ("čtverec", "čtvercem", "m"),
    "triangle": ("trojúhelník", "trojúhelníkem", "m"), "star": ("hvězda", "hvězdou", "f"),
    "cross": ("kříž", "křížem", "m"), "diamond": ("kosočtverec", "kosočtvercem", "m"),
    "heart": ("srdce", "srdcem", "n"), "hexagon": ("šestiúhelník", "šestiúhelníkem", "m"),
}
_CS_COLOURS = {  # hard adjective stems: červen-ý/á/é
    "red": "červen", "green": "zelen", "blue": "modr", "yellow": "žlut",
    "purple": "fialov", "orange": "oranžov", "pink": "růžov", "brown": "hněd",
}
_CS_SIZES = {"small": "mal", "medium": "středně velk", "large": "velk"}
_CS_ENDINGS = {  # hard adjective endings, (case, gender)
    ("nom", "m"): "ý", ("nom", "f"): "á", ("nom", "n"): "é",
    ("ins", "m"): "ým", ("ins", "f"): "ou", ("ins", "n"): "ým",
}
_CS_POSITIONS = {
    "top left": "vlevo nahoře", "top": "nahoře", "top right": "vpravo nahoře",
    "left": "vlevo", "centre": "uprostřed", "right": "vpravo",
    "bottom left": "vlevo dole", "bottom": "dole", "bottom right": "vpravo dole",
}
_CS_BACKGROUNDS = {"white": "bíl", "black": "čern", "grey": "šed"}  # neuter: nom -é, loc -ém


def _cs_np(o: SceneObject, case: str) -> str:
    nom, ins, gender = _CS_SHAPES[o.shape]
    ending = _CS_ENDINGS[(case, gender)]
    noun = nom if case == "nom" else ins
    return f"{_CS_SIZES[o.size]}{ending} {_CS_COLOURS[o.colour]}{ending} {noun}"


def _cs_with(word: str) -> str:
    """The preposition "s" (with), vocalised to "se" before s/z/š/ž."""
    return "se" if word[:1].lower() in "szšž" else "s"


def _cs(scene: Scene, template: int) -> str:
    objs, bg = scene.objects, _CS_BACKGROUNDS[scene.background]
    if template == 0:
        items = _join([f"{_cs_np(o, 'nom')} {_CS_POSITIONS[o.position]}" for o in objs], ", ", " a ")
        return _cap(f"{items}{',' if len(objs) > 1 else ''} na {bg}ém pozadí")
    if template == 1:
        items = _join([f"{_cs_np(o, 'ins')} {_CS_POSITIONS[o.position]}" for o in objs], ", ", " a ")
        return f"{_cap(bg)}é pozadí {_cs_with(items)} {items}"
    first, rest = objs[0], objs[1:]
    clauses = [f"{_CS_POSITIONS[first.position]} je {_cs_np(first, 'nom')}"]
    clauses += [f"{_CS_POSITIONS[o.position]} {_cs_np(o, 'nom')}" for o in rest]
    return _cap(f"{_join(clauses, ', ', ' a ')}. Pozadí je {bg}é.")


# ---------------------------------------------------------------------------------------------------------
# Chinese. A noun phrase is 一 + measure word + modifiers + noun; the star takes 颗 (一颗五角星), the other
# shapes 个. Colour and size: "红色的大圆形" / "蓝色的小正方形" (a bare 大/小 right before the noun; "大红色"
# would read as "bright red"), medium "中等大小的绿色五角星". Lists use 、 and a final 和; clauses are
# separated by ，and end with 。.
# ---------------------------------------------------------------------------------------------------------
_ZH_SHAPES = {  # noun, measure word
    "circle": ("圆形", "个"), "square": ("正方形", "个"), "triangle": ("三角形", "个"), "star": ("五角星", "颗"),
    "cross": ("十字", "个"), "diamond": ("菱形", "个"), "heart": ("心形", "个"), "hexagon": ("六边形", "个"),
}
_ZH_COLOURS = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
    "purple": "紫色", "orange": "橙色", "pink": "粉色", "brown": "棕色",
}
_ZH_SIZES = {"small": "小", "large": "大"}  # bound to the noun: 红色的大圆形
_ZH_MEDIUM = "中等大小的"  # before the colour: 中等大小的红色圆形
_ZH_POSITIONS = {
    "top left": "左上角", "top": "上方", "top right": "右上角",
    "left": "左侧", "centre": "中间", "right": "右侧",
    "bottom left": "左下角", "bottom": "下方", "bottom right": "右下角",
}
_ZH_BACKGROUNDS = {"white": "白色", "black": "黑色", "grey": "灰色"}


def _zh_desc(o: SceneObject) -> str:
    """Modifiers + noun, without the numeral and measure word."""
    noun, colour = _ZH_SHAPES[o.shape][0], _ZH_COLOURS[o.colour]
    if o.size in _ZH_SIZES:
        return f"{colour}的{_ZH_SIZES[o.size]}{noun}"
    return f"{_ZH_MEDIUM}{colour}{noun}"


def _zh_located(o: SceneObject) -> str:
    """一个位于左上角的红色的大圆形"""
    return f"一{_ZH_SHAPES[o.shape][1]}位于{_ZH_POSITIONS[o.position]}的{_zh_desc(o)}"


def _zh(scene: Scene, template: int) -> str:
    objs, bg = scene.objects, _ZH_BACKGROUNDS[scene.background]
    if template == 0:
        return f"{_join([_zh_located(o) for o in objs], '、', '和')}，背景为{bg}。"
    if template == 1:
        return f"{bg}背景上有{_join([_zh_located(o) for o in objs], '、', '和')}。"
    clauses = [f"{_ZH_POSITIONS[o.position]}有一{_ZH_SHAPES[o.shape][1]}{_zh_desc(o)}" for o in objs]
    return f"{'，'.join(clauses)}。背景是{bg}的。"


# ---------------------------------------------------------------------------------------------------------
# Japanese. Modifiers precede the noun: size (大きな / 小さな / 中くらいの) then colour; the i-adjective
# colours are attributive as they are (赤い, 青い, 黄色い), the others take の (緑の, 紫の, オレンジ色の,
# ピンクの, 茶色の). No counter is needed with existence (左上に大きな赤い円があり、...). The background is
# 白い / 黒い / 灰色の 背景 before a noun and 白 / 黒 / 灰色 before です. Noun lists use 、 and a final と.
# Template 0 is a caption-style noun phrase ("灰色の背景に、左上の..."), template 1 a relative clause on the
# background ("左上に...、中央に...がある灰色の背景"), template 2 sentences (…があり、…があります。背景は…です。).
# ---------------------------------------------------------------------------------------------------------
_JA_SHAPES = {
    "circle": "円", "square": "正方形", "triangle": "三角形", "star": "星",
    "cross": "十字", "diamond": "ひし形", "heart": "ハート", "hexagon": "六角形",
}
_JA_COLOURS = {  # attributive forms
    "red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い",
    "purple": "紫の", "orange": "オレンジ色の", "pink": "ピンクの", "brown": "茶色の",
}
_JA_SIZES = {"small": "小さな", "medium": "中くらいの", "large": "大きな"}
_JA_POSITIONS = {
    "top left": "左上", "top": "上", "top right": "右上",
    "left": "左", "centre": "中央", "right": "右",
    "bottom left": "左下", "bottom": "下", "bottom right": "右下",
}
_JA_BACKGROUNDS = {"white": ("白い", "白"), "black": ("黒い", "黒"), "grey": ("灰色の", "灰色")}  # (attributive, before です)


def _ja_np(o: SceneObject) -> str:
    return f"{_JA_SIZES[o.size]}{_JA_COLOURS[o.colour]}{_JA_SHAPES[o.shape]}"


def _ja(scene: Scene, template: int) -> str:
    objs = scene.objects
    bg_attr, bg_pred = _JA_BACKGROUNDS[scene.background]
    if template == 0:
        items = _join([f"{_JA_POSITIONS[o.position]}の{_ja_np(o)}" for o in objs], "、", "と")
        return f"{bg_attr}背景に、{items}"
    if template == 1:
        items = "、".join(f"{_JA_POSITIONS[o.position]}に{_ja_np(o)}" for o in objs)
        return f"{items}がある{bg_attr}背景"
    clauses = [f"{_JA_POSITIONS[o.position]}に{_ja_np(o)}があり" for o in objs]
    clauses[-1] = clauses[-1][: -len("あり")] + "あります"
    return f"{'、'.join(clauses)}。背景は{bg_pred}です。"


# ---------------------------------------------------------------------------------------------------------

_GRAMMARS: dict[str, Callable[[Scene, int], str]] = {
    "en": _en, "de": _de, "fr": _fr, "cs": _cs, "zh": _zh, "ja": _ja,
}
assert tuple(_GRAMMARS) == LANGUAGES


def _check_scene(scene: Scene) -> None:
    if not scene.objects:
        raise ValueError("cannot describe a scene with no objects")
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; expected one of {tuple(BACKGROUNDS)}")
    for o in scene.objects:
        if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES or o.position not in POSITIONS:
            raise ValueError(f"object {o!r} has an attribute outside SHAPES/COLOURS/SIZES/POSITIONS")


def describe(scene: Scene, lang: str, template: int) -> str:
    """Caption of `scene` in `lang` using paraphrase template `template` (0 <= template < NUM_TEMPLATES)."""
    grammar = _GRAMMARS.get(lang)
    if grammar is None:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGUAGES}")
    try:
        index = operator.index(template)  # accepts int and numpy integers, rejects floats and strings
    except TypeError:
        index = -1
    if not 0 <= index < NUM_TEMPLATES:
        raise ValueError(f"template must be an integer in [0, {NUM_TEMPLATES}), got {template!r}")
    _check_scene(scene)
    return grammar(scene, index)
