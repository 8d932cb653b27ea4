"""The search page (`umr serve` at /) in a real browser: Debian's chromium driven by Playwright,
against real Flickr8k photos indexed with lit-base and served by uvicorn on 127.0.0.1."""
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_jsonl
from umr.retrieval.engine import Engine, Query
from umr.retrieval.indexing.pipeline import build_index
from umr.server.app import create_app
from umr.server.keys import KeyEntry, KeyRing, digest
from umr.server.settings import ServerSettings
from umr.demo import BackgroundServer

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
N_PHOTOS = 24
KEY = "umr_page-test-key-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def photos(tmp_path_factory, flickr, flickr_test, lit):
    """An index of N_PHOTOS test photos (metadata n = their number) and, for each, one caption
    the engine ranks that photo first for: (folder, engine, {photo id: caption})."""
    names, captions = flickr_test
    tmp = tmp_path_factory.mktemp("page")
    records = []
    for n, name in enumerate(names[:N_PHOTOS]):
        shutil.copy(flickr / "images" / name, tmp / name)
        records.append({"id": f"photo/{Path(name).stem}", "image": name, "metadata": {"n": n, "file": name}})
    build_index(write_jsonl(tmp / "c.jsonl", records), lit, tmp / "idx", progress=False)
    engine = Engine.open(tmp / "idx", lit)
    found = {}
    for rec in records:
        for caption in captions[rec["image"]]:
            if engine.search([Query(caption)], 1)[0][0].doc.id == rec["id"]:
                found[rec["id"]] = caption
                break
    assert len(found) >= N_PHOTOS // 2, "lit-base should rank most photos first for one of their captions"
    yield tmp, engine, found
    engine.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (scripts/browser.sh), or apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def first_card(page):
    page.wait_for_selector("#results article.hit")
    return page.locator("#results article.hit").first


def wait_for_results_of(page, action):
    """Run `action` and wait for the search it triggers to answer."""
    with page.expect_response(lambda r: r.url.endswith("/v1/search")):
        action()
    page.wait_for_function("() => document.getElementById('status').textContent.includes('results in')"
                           " || !document.getElementById('error').hidden")


def thumbnail_loaded(card) -> bool:
    return card.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth > 0 && img.src.startsWith('blob:')")


def test_search_page_text_image_filters_errors(photos, browser, tmp_path):
    folder, engine, found = photos
    with BackgroundServer(create_app(engine)) as srv:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        console_errors = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(srv.url + "/")
        page.wait_for_function("() => document.getElementById('index-info').textContent.includes('documents')")
        header = page.locator("#index-info").text_content()
        assert f"{N_PHOTOS} documents" in header and "lit-base" in header and "version 1 active" in header

        # A text query, from the keyboard: "/" focuses the box, Enter searches.
        target, caption = next(iter(found.items()))
        page.locator("body").click()
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "text"
        page.keyboard.type(caption)
        wait_for_results_of(page, lambda: page.keyboard.press("Enter"))
        card = first_card(page)
        assert card.get_attribute("data-id") == target
        page.wait_for_function("() => [...document.querySelectorAll('#results img.thumb')].slice(0, 1)"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert thumbnail_loaded(card)
        assert page.locator("#results article.hit").count() == 12  # the page's default k
        assert "score 0." in card.text_content() and "n" in card.locator("pre").text_content()
        page.screenshot(path=str(tmp_path / "search-page.png"), full_page=True)
        if os.environ.get("UMR_PAGE_SCREENSHOT"):  # how the README's docs/search-page.jpg is made
            Image.open(tmp_path / "search-page.png").convert("RGB").save(os.environ["UMR_PAGE_SCREENSHOT"], quality=85)
        assert (tmp_path / "search-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # An uploaded photo finds itself first; the query image is shown.
        other = [r for r in found if r != target][0]
        file = folder / (other.split("/", 1)[1] + ".jpg")
        wait_for_results_of(page, lambda: page.set_input_files("#image", str(file)))
        assert first_card(page).get_attribute("data-id") == other
        assert page.locator("#image-preview").is_visible()
        # Image + text together are sent as one query.
        with page.expect_request(lambda r: r.url.endswith("/v1/search")) as sent:
            page.click("#search")
        body = sent.value.post_data_json
        assert body["text"] == caption and body["image"].startswith("data:image/jpeg;base64,")
        page.keyboard.press("Escape")
        assert not page.locator("#image-preview").is_visible()

        # A typed metadata filter: n=3 is the number 3, so exactly one photo matches.
        page.click("summary")
        page.fill("#filter", "n=3")
        wait_for_results_of(page, lambda: page.click("#search"))
        assert page.locator("#results article.hit").count() == 1
        assert '"n": 3' in first_card(page).locator("pre").text_content()
        page.fill("#filter", "")

        # "More like this" queries by that document's own photo: it comes back first.
        wait_for_results_of(page, lambda: page.click("#search"))
        third = page.locator("#results article.hit").nth(2)
        third_id = third.get_attribute("data-id")
        wait_for_results_of(page, lambda: third.locator("button.more").click())
        assert first_card(page).get_attribute("data-id") == third_id
        assert page.locator("#image-preview").is_visible()

        # The API's errors are shown with their code and message.
        page.keyboard.press("Escape")
        page.fill("#k", "0")
        wait_for_results_of(page, lambda: page.click("#search"))
        error = page.locator("#error")
        assert error.is_visible()
        assert error.text_content().startswith("422 limit_k: k must be between 1 and 1000")
        assert page.locator("#results article.hit").count() == 0  # the last query's results are gone
        page.fill("#k", "12")
        page.fill("#filter", "n")
        page.click("#search")
        assert "is not key=value" in error.text_content()
        page.fill("#filter", "")
        not_an_image = tmp_path / "notes.png"
        not_an_image.write_text("these are not pixels")
        wait_for_results_of(page, lambda: page.set_input_files("#image", str(not_an_image)))
        assert error.text_content().startswith("400 ") and "image" in error.text_content()
        assert not console_errors or all("400" in m or "422" in m for m in console_errors), console_errors
        page.close()


def test_search_page_with_keys(photos, browser):
    """With keys and no public reading, the page says a key is needed, and works once it is typed."""
    folder, engine, found = photos
    settings = ServerSettings(keys=KeyRing([KeyEntry("page", "read", digest(KEY), 0.0)]))
    with BackgroundServer(create_app(engine, settings)) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_function("() => document.getElementById('index-info').textContent.includes('API key')")
        target, caption = next(iter(found.items()))
        page.fill("#text", caption)
        wait_for_results_of(page, lambda: page.click("#search"))
        assert page.locator("#error").text_content().startswith("401 ")
        page.fill("#api-key", KEY)
        page.locator("#api-key").dispatch_event("change")
        page.wait_for_function("() => document.getElementById('index-info').textContent.includes('documents')")
        wait_for_results_of(page, lambda: page.click("#search"))
        assert page.locator("#error").is_hidden()
        card = first_card(page)
        assert card.get_attribute("data-id") == target
        page.wait_for_function("() => { const i = document.querySelector('#results img.thumb');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        assert thumbnail_loaded(card)  # fetched with the key: a plain <img src> could not send it
        page.close()


def test_search_page_shows_the_rerank_detail(photos, browser):
    """When the server re-ranks, the header says so and each re-ranked card shows the cosine and
    P(yes) behind its score, as the API returned them; cards below the depth show their cosine."""
    from umr.retrieval.rerank.reranker import CrossConfig, LitReranker

    folder, engine, found = photos
    depth, weight = 5, 0.5
    # The seeded scorer `umr reranker train` starts from: untrained, it still gives every candidate
    # its own P(yes), which is all the page has to show.
    engine.use_reranker(LitReranker.fresh(CrossConfig(seed=0)), depth, weight)
    try:
        with BackgroundServer(create_app(engine)) as srv:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(srv.url + "/")
            page.wait_for_function("() => document.getElementById('index-info').textContent.includes('re-ranking')")
            assert f"re-ranking the top {depth} (cosine + {weight} × P(yes))" in page.locator("#index-info").text_content()
            caption = next(iter(found.values()))
            page.fill("#text", caption)
            with page.expect_response(lambda r: r.url.endswith("/v1/search")) as answered:
                page.click("#search")
            results = answered.value.json()["results"]
            page.wait_for_function("() => document.getElementById('status').textContent.includes('results in')")
            cards = page.locator("#results article.hit")
            assert cards.count() == len(results) == 12
            for i, hit in enumerate(results):
                text = cards.nth(i).text_content()
                assert cards.nth(i).get_attribute("data-id") == hit["id"]
                if i < depth:
                    r = hit["rerank"]
                    assert r and hit["score"] == pytest.approx(r["cosine"] + weight * r["p_yes"], abs=1e-5)
                    assert (f"score {hit['score']:.4f} (re-ranked: cosine {r['cosine']:.4f}, P(yes) {r['p_yes']:.3f})"
                            in text), text
                else:
                    assert hit["rerank"] is None and f"score {hit['score']:.4f}" in text and "re-ranked" not in text
            page.close()
    finally:
        engine.reranker = None
