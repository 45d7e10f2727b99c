"""The search page of `edje serve --quickstart`, driven in a real headless Chromium (Debian's,
through Playwright) on the quickstart folder the shipped model leaves: a caption typed, both
columns shown, EDJE's first image the caption's own where the first stage's is not; a click
(by keyboard) shows the picture's captions. The screenshot is the README's."""

from __future__ import annotations

import http.client
import json
import os
import shutil
from pathlib import Path

import pytest

import edje.serving.app
from edje.cli import main
from edje.serving.app import serve_in_background
from tests.helpers.paths import ROOT

CHROMIUM = os.environ.get("EDJE_CHROMIUM") or shutil.which("chromium")
SCREENSHOT = ROOT / "docs" / "search_page.png"


def request(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    payload = None if body is None else json.dumps(body)
    connection.request(method, path, payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    is_json = response.getheader("content-type", "").startswith("application/json")
    return response.status, (json.loads(data) if is_json else {"bytes": len(data)})


def first_stage_miss_reranked_hit(url: str, folder: Path) -> tuple[str, str]:
    """A caption whose image the first stage does not put first and EDJE does."""
    captions = folder / "images" / "builtin" / "captions.jsonl"
    for line in captions.read_text().splitlines():
        record = json.loads(line)
        _, answer = request(url, "POST", "/v1/search", {"query": record["caption"], "k": 10})
        first, reranked = answer["first_stage"][0], answer["reranked"][0]
        if first["image_id"] != record["image_id"] == reranked["image_id"]:
            return record["caption"], record["image_id"]
    raise AssertionError("no caption that the first stage gets wrong and EDJE gets right")


@pytest.fixture(scope="module")
def page_url(shipped_quickstart):
    """`edje serve --quickstart DIR`, served on a free port while the module's tests run."""
    served = {}

    def serve(app, host, port, **kwargs):  # the command's own app, on a free loopback port
        served["app"] = app

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edje.serving.app, "run_server", serve)
        assert main(["serve", "--quickstart", str(shipped_quickstart), "--device", "cpu"]) == 0
    with serve_in_background(served["app"]) as url:
        yield url


def test_the_page_shows_the_first_stage_and_the_reranking_and_edje_fixes_a_miss(
    page_url, shipped_quickstart, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "Chromium is installed by scripts/install_system_deps.sh --browser"
    caption, image_id = first_stage_miss_reranked_hit(page_url, shipped_quickstart)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_url + "/")
        page.get_by_role("searchbox", name="Caption").fill(caption)
        page.get_by_role("searchbox", name="Caption").press("Enter")  # keyboard: the form submits
        first, reranked = page.locator("#first-stage img"), page.locator("#reranked img")
        expect(reranked).to_have_count(10)
        expect(first).to_have_count(10)
        assert reranked.first.get_attribute("alt") == image_id  # alt text: the image id
        assert first.first.get_attribute("alt") != image_id
        expect(page.locator("#reranked .up").first).to_be_visible()  # the moves are marked
        expect(page.locator("#status")).to_contain_text("EDJE rerank")
        page.wait_for_function(  # every thumbnail loaded from the image folder
            "[...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.screenshot(path=tmp_path / "search_page.png", full_page=True)
        page.locator("#reranked button").first.focus()
        page.keyboard.press("Enter")  # image -> text, by keyboard
        expect(page.locator("#captions-reranked li")).to_have_count(10)
        browser.close()
    assert (tmp_path / "search_page.png").stat().st_size > 10_000
    if os.environ.get("EDJE_WRITE_SCREENSHOT") == "1":  # refresh the README's picture
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "search_page.png", SCREENSHOT)


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../../../etc/passwd",
        "/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/%2Fetc%2Fpasswd",
        "/images/not-an-image-id",
    ],
)
def test_a_thumbnail_outside_the_collection_is_a_404(page_url, path):
    status, _ = request(page_url, "GET", path)
    assert status == 404


def test_a_thumbnail_of_the_collection_is_served_and_cacheable(page_url, shipped_quickstart):
    image_id = next((shipped_quickstart / "images" / "builtin").glob("*.png")).stem
    status, body = request(page_url, "GET", f"/images/{image_id}")
    assert status == 200 and body["bytes"] > 100


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"query": "x" * 5000}, 400),  # as /v1/rerank: the same check (edje.serving.requests)
        ({"query": "a", "pad": "x" * 34_000_000}, 413),  # over max_body_bytes (32 MiB), never read
        ({"query": ""}, 400),
        ({"query": "a red circle", "k": 0}, 400),
        ({"query": "a red circle", "k": 10_000}, 400),
        ({"query": "a red circle", "fusion": "yes"}, 400),
        ({"query": "a red circle", "extra": 1}, 400),
    ],
    ids=[
        "oversized query",
        "oversized body",
        "empty query",
        "k 0",
        "k too large",
        "fusion not bool",
        "unknown",
    ],
)
def test_bad_search_requests_are_4xx_with_a_message(page_url, body, status):
    got, answer = request(page_url, "POST", "/v1/search", body)
    assert got == status and answer["message"]
    if body.get("query") == "x" * 5000:
        assert "at most 4096" in answer["message"]


def test_describe_an_unknown_image_is_a_404(page_url):
    status, answer = request(page_url, "POST", "/v1/describe", {"image_id": "../etc/passwd"})
    assert status == 404 and "no image" in answer["message"]
