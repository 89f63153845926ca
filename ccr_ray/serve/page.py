"""The search page (`GET /`): a form (caption, language, k) submitted as a plain GET and answered with the
results rendered on the server: thumbnails with their scores. No script, no external stylesheet or font, so
it works on machines with no internet and in browsers with scripts off."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif; margin: 2rem auto;
       max-width: 62rem; padding: 0 1rem; color: #1d232a; background: #fafbfc; }
h1 { font-size: 1.4rem; margin-bottom: 0.2rem; } .sub { color: #5b6570; margin-top: 0; font-size: 0.9rem; }
form { display: flex; gap: 0.5rem; flex-wrap: wrap; margin: 1rem 0; }
input[type=text] { flex: 1 1 24rem; font-size: 1rem; padding: 0.45rem 0.6rem; }
select, input[type=number], button { font-size: 1rem; padding: 0.4rem; } input[type=number] { width: 4.5rem; }
button { background: #2456a6; color: white; border: 0; border-radius: 4px; padding: 0.45rem 1.1rem; }
.error { background: #fde8e8; border: 1px solid #e0a0a0; padding: 0.6rem 0.8rem; border-radius: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 0.8rem; }
figure { margin: 0; background: white; border: 1px solid #dde1e6; border-radius: 6px; padding: 0.5rem; }
figure img { width: 100%; aspect-ratio: 1; object-fit: contain; image-rendering: pixelated; background: #eef0f3; }
figcaption { font-size: 0.8rem; display: flex; justify-content: space-between; align-items: baseline; gap: 0.4rem;
             margin-top: 0.3rem; }
.id { color: #5b6570; font-size: 0.72rem; word-break: break-all; }
.score { font-variant-numeric: tabular-nums; font-weight: 600; }
.noimg { width: 100%; aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
         background: #eef0f3; color: #5b6570; font-size: 0.75rem; }
footer { margin-top: 2rem; font-size: 0.8rem; color: #5b6570; }
"""


def render_page(*, languages: dict[str, str], query: str = "", lang: str = "en", k: int = 12,
                results: list[dict] | None = None, error: str | None = None, root: str = "",
                about: dict | None = None) -> str:
    """results: [{"id", "score", "url" (or None)}]; root: the app's route prefix (links and the form)."""
    options = "".join(f'<option value="{escape(code)}"{" selected" if code == lang else ""}>'
                      f'{escape(name)} ({escape(code)})</option>' for code, name in languages.items())
    body = []
    if error:
        body.append(f'<p class="error" role="alert">{escape(error)}</p>')
    if results is not None:
        body.append(f'<p class="sub" id="summary">{len(results)} images for <b>{escape(query)}</b> '
                    f'({escape(languages.get(lang, lang))})</p>')
        cells = []
        for rank, hit in enumerate(results, 1):
            picture = (f'<img src="{escape(hit["url"])}?max_side=256" alt="{escape(hit["id"])}" loading="lazy">'
                       if hit.get("url") else '<div class="noimg">no image store</div>')
            cells.append(f'<figure class="hit" data-id="{escape(hit["id"])}">{picture}<figcaption>'
                         f'<span class="id" title="{escape(hit["id"])}">{rank}. {escape(hit["id"])}</span>'
                         f'<span class="score">{hit["score"]:.3f}</span></figcaption></figure>')
        body.append(f'<div class="grid" id="results">{"".join(cells)}</div>')
    info = ""
    if about:
        index = about.get("index", {})
        info = (f'{index.get("images", 0):,} images, {escape(str(index.get("kind")))} index'
                + (f', recall@10 {index["recall_at_10"]:.3f}' if index.get("recall_at_10") is not None else "")
                + f' · model {escape(str((about.get("model") or {}).get("fingerprint") or "")[:12])} · ')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ccr-ray image search</title><style>{STYLE}</style></head>
<body><h1>ccr-ray image search</h1>
<p class="sub">Describe an image in any of the model's {len(languages)} languages.</p>
<form method="get" action="{escape(root)}/" role="search">
<input type="text" name="q" value="{escape(query)}" placeholder="a caption, e.g. ein roter Kreis oben links"
 aria-label="caption" maxlength="2000" autofocus>
<select name="lang" aria-label="language">{options}</select>
<input type="number" name="k" value="{k}" min="1" aria-label="results">
<button type="submit">Search</button></form>
{"".join(body)}
<footer>{info}<a href="{escape(root)}/docs">API</a></footer>
</body></html>"""


def image_url(root: str, image_id: str) -> str:
    return f"{root}/images/{quote(image_id, safe='')}"
