"""The search page in a real headless browser (the system's Chromium driven by Playwright): a caption typed in
German shows thumbnails with scores, the OpenAPI page renders, and neither asks for anything but the service.

Chromium comes from Debian (`make test` installs it when apt-get is there); `playwright install` is never run.
CCR_RAY_UPDATE_SCREENSHOT=1 also writes the screenshot to docs/search-page.png (the README shows it)."""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import pytest

from tests.conftest import REPO
from tests.serve.test_app import APP

pytestmark = pytest.mark.ray

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "docs" / "search-page.png"


@pytest.fixture(scope="module")
def page_service(serve_port, demo_model):
    from ray import serve

    from ccr_ray.serve.app import build_app

    serve.run(build_app({"model": demo_model["model"], "index": demo_model["hnsw"], "images": demo_model["data"],
                         "num_replicas": 1, "num_cpus": 0.5}), name=APP, route_prefix="/")
    return {"url": f"http://127.0.0.1:{serve_port}", **demo_model}


def why_no_chromium() -> str:
    log = REPO / ".venv" / ".chromium-install.log"  # the Makefile's install attempt
    tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    return ("Chromium is not installed and could not be installed here (`make test` installs the Debian package "
            "`chromium` where apt-get exists and it runs as root)" + (f"; the attempt said: {tail[0]}" if tail else ""))


@pytest.mark.skipif(CHROMIUM is None, reason=why_no_chromium())
def test_a_german_query_typed_in_the_page_shows_thumbnails(page_service, tmp_path):
    import requests
    from playwright.sync_api import sync_playwright

    from ccr_ray.data import schema

    rows = schema.read_split_table(page_service["data"], "test", ["de"])
    query = rows["captions_de"].to_pylist()[0][0]
    expected = requests.post(f"{page_service['url']}/search", json={"text": query, "lang": "de", "k": 12},
                             timeout=30).json()
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        context = browser.new_context(viewport={"width": 1100, "height": 860})
        context.route("**/*", lambda route: (requested.append(route.request.url), route.continue_())
                      if urlparse(route.request.url).hostname == "127.0.0.1" else
                      (requested.append(route.request.url), route.abort()))
        page = context.new_page()
        page.goto(page_service["url"] + "/")
        options = page.locator("select[name=lang] option").evaluate_all("els => els.map(e => e.value)")
        assert options == ["en", "de", "zh"]  # every language the model knows
        page.fill("input[name=q]", query)
        page.select_option("select[name=lang]", "de")
        page.click("button[type=submit]")
        page.wait_for_selector("figure.hit img")
        page.wait_for_function("[...document.querySelectorAll('figure.hit img')].every(i => i.complete)")
        hits = page.locator("figure.hit")
        assert hits.count() == 12
        widths = page.locator("figure.hit img").evaluate_all("els => els.map(e => e.naturalWidth)")
        assert all(w > 0 for w in widths), widths  # every thumbnail decoded
        shown = hits.evaluate_all("els => els.map(e => e.dataset.id)")
        assert shown == expected["ids"]  # the page shows what the API answers, in order
        scores = page.locator("figure.hit .score").all_inner_texts()
        assert scores == [f"{s:.3f}" for s in expected["scores"]]
        assert "lang=de" in page.url and page.input_value("input[name=q]") == query
        shot = tmp_path / "search-page.png"
        page.screenshot(path=str(shot), full_page=True)
        # the OpenAPI page renders from the service's own files too (no CDN)
        page.goto(page_service["url"] + "/docs")
        page.wait_for_selector(".opblock-summary-path[data-path='/search']", timeout=30_000)
        browser.close()
    external = [u for u in requested if urlparse(u).hostname != "127.0.0.1"]
    assert not external, f"the page asked for {external}"
    assert shot.stat().st_size > 10_000
    if os.environ.get("CCR_RAY_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

