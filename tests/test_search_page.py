"""search serve: the JSON API over HTTP, then the page itself in headless Chromium (tests/browser.py):
typing a sentence, a ?q= link, choosing and dropping an image, an empty query. The server runs in
a thread of the test on 127.0.0.1 (a free port), over a gallery whose embeddings are known by
hand (tests/search_fixtures.py)."""

from __future__ import annotations

import http.client
import io
import json
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from search.build import build_index, folder_items
from search.index import open_index
from search.query import Searcher
from search.server import MAX_UPLOAD, THUMB_PX, PortInUseError, SearchServer
from pipeline.config import PipelineConfig, with_values
from tests.browser import chromium
from tests.fixtures import write_bad_images
from tests.search_fixtures import ColourModel, make_gallery

TOP_K = 4


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    images = make_gallery(root / "g")
    model = ColourModel()
    cfg = with_values(PipelineConfig(), {"search.index": str(root / "ix")})
    build_index(model, model.ref, folder_items(images), cfg, {"kind": "folder"})
    return {"root": root, "images": images, "searcher": Searcher(open_index(root / "ix", 8), model, model.ref)}


@pytest.fixture(scope="module")
def server(gallery):
    srv = SearchServer(0, gallery["searcher"], top_k=TOP_K)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def _post(url: str, data: bytes):
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), rgb).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the API
def test_api(server, gallery):
    url = server.url
    status, ctype, body = _get(url)
    assert status == 200 and ctype.startswith("text/html") and b"Search the gallery" in body
    info = json.loads(_get(url + "api/info")[2])
    assert info["n"] == 12 and info["model"] == "colours" and info["engine"] == "exact" and info["top_k"] == TOP_K
    status, _, body = _get(url + "api/search?q=a%20red%20kite")
    doc = json.loads(body)
    assert status == 200 and doc["query"] == "a red kite" and len(doc["results"]) == TOP_K
    assert [r["id"] for r in doc["results"][:2]] == ["red/red_0", "red/red_1"]
    assert doc["results"][0]["thumb"] == f"/thumb/{doc['results'][0]['row']}"
    assert doc["results"][0]["captions"] == ["a red square number 0"]
    assert len(json.loads(_get(url + "api/search?q=blue&k=2")[2])["results"]) == 2
    status, ctype, jpeg = _get(url + doc["results"][0]["thumb"].lstrip("/"))
    assert status == 200 and ctype == "image/jpeg"
    thumb = Image.open(io.BytesIO(jpeg))
    assert max(thumb.size) <= THUMB_PX and thumb.getpixel((5, 5))[0] > 200  # red
    status, doc = _post(url + "api/search?k=3", _png((0, 0, 250)))
    assert status == 200 and [r["id"] for r in doc["results"][:2]] == ["blue/blue_0", "blue/blue_1"]


def test_api_errors(server, gallery):
    url = server.url
    for q in ("", "%20%20"):
        status, _, body = _get(url + f"api/search?q={q}")
        assert status == 400 and json.loads(body)["error"].startswith("The query is empty")
    assert _get(url + "api/search?q=red&k=x")[0] == 400
    assert _get(url + "api/search?q=red&k=0")[0] == 400
    for row in ("999", "abc", "-1"):
        assert _get(url + f"thumb/{row}")[0] == 404
    assert _get(url + "nothing")[0] == 404
    bad = write_bad_images(gallery["root"] / "bad")
    status, doc = _post(url + "api/search", bad["corrupt"].read_bytes())
    assert status == 400 and "not an image that can be decoded" in doc["error"]
    status, doc = _post(url + "api/search", b"")
    assert status == 400 and "empty" in doc["error"]
    conn = http.client.HTTPConnection(server.server_address[0], server.server_address[1], timeout=10)
    conn.putrequest("POST", "/api/search")
    conn.putheader("Content-Length", str(MAX_UPLOAD + 1))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_a_missing_file_has_no_thumbnail_but_its_result_stands(gallery, tmp_path):
    images = make_gallery(tmp_path / "g", per_colour=1)
    model = ColourModel()
    cfg = with_values(PipelineConfig(), {"search.index": str(tmp_path / "ix")})
    build_index(model, model.ref, folder_items(images), cfg, {})
    (images / "red" / "red_0.png").unlink()
    srv = SearchServer(0, Searcher(open_index(tmp_path / "ix", 8), model, model.ref))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        doc = json.loads(_get(srv.url + "api/search?q=red")[2])
        assert doc["results"][0]["id"] == "red/red_0"
        status, _, body = _get(srv.url + doc["results"][0]["thumb"].lstrip("/"))
        assert status == 404 and "cannot be read" in json.loads(body)["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_port_in_use_and_still_loading(server):
    with pytest.raises(PortInUseError, match=f"Port {server.server_address[1]} on 127.0.0.1 is in use"):
        SearchServer(server.server_address[1])
    srv = SearchServer(0)  # bound, model not loaded yet
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, _, body = _get(srv.url + "api/search?q=red")
        assert status == 503 and "still loading" in json.loads(body)["error"]
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- the page, in a browser
def test_the_page_in_headless_chromium(server, gallery):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def results(driver, count=TOP_K):
        WebDriverWait(driver, 15).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "figure.hit")) == count
                                        and "results for" in d.find_element(By.ID, "status").text)
        WebDriverWait(driver, 15).until(lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))  # thumbnails shown
        return [(f.find_element(By.CLASS_NAME, "id").text, [c.text for c in f.find_elements(By.CLASS_NAME, "caption")])
                for f in driver.find_elements(By.CSS_SELECTOR, "figure.hit")]

    with chromium() as driver:
        driver.get(server.url)
        WebDriverWait(driver, 15).until(lambda d: "12 images" in d.find_element(By.ID, "info").text)
        box = driver.find_element(By.ID, "q")
        box.send_keys("a green frog", Keys.ENTER)  # typed, as a person would
        shown = results(driver)
        assert shown[0] == ("green/green_0", ["a green square number 0"]) and shown[1][0] == "green/green_1"
        assert driver.current_url.endswith("?q=a%20green%20frog")
        assert driver.find_element(By.CSS_SELECTOR, "figure.hit .score").text.startswith("1. cosine ")

        driver.get(server.url + "?q=yellow")  # a link with the query
        assert results(driver)[0][0] == "yellow/yellow_0"

        driver.find_element(By.ID, "file").send_keys(str(gallery["images"] / "red" / "red_1.png"))  # choose a file
        shown = results(driver)
        assert {shown[0][0], shown[1][0]} == {"red/red_0", "red/red_1"}
        assert "the image red_1.png" in driver.find_element(By.ID, "status").text

        driver.execute_script("""
            const blob = await (await fetch('/thumb/' + arguments[0])).blob();
            const dt = new DataTransfer();
            dt.items.add(new File([blob], 'dropped.jpg', {type: 'image/jpeg'}));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        """, [it.id for it in gallery["searcher"].index.items].index("blue/blue_0"))  # drop an image
        WebDriverWait(driver, 15).until(lambda d: "dropped.jpg" in d.find_element(By.ID, "status").text)
        assert results(driver)[0][0].startswith("blue/")

        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys("   ", Keys.ENTER)
        WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "status").text.startswith("Error: "))
        assert "The query is empty" in driver.find_element(By.ID, "status").text
        assert driver.find_elements(By.CSS_SELECTOR, "figure.hit") == []
