"""The web page in a real browser: Debian's chromium, headless, driven by Selenium, against `python server.py` on
tiny checkpoints. Two of them are scripted (tiny.script) to answer with boxes and a mask whatever the image, so
that detections and segments are drawn from real answers, through the same stream and rendering as any other.

Screenshots of a caption, a detection and an error are written to $PALIGEMMA_SCREENSHOTS (or a temporary folder).
"""

import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import tiny
from conftest import random_image
from PIL import Image
from test_masks import vivid_vae_arrays
from test_server import Server, message, wait_for

from paligemma.masks import rle_decode

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("PALIGEMMA_REQUIRE_BROWSER"):
        raise RuntimeError("the page's tests need Debian's chromium and chromium-driver (apt-get install -y chromium "
                           "chromium-driver)")
    pytest.skip("no chromium and chromedriver on this machine", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "sesame"
BODY_LIMIT = 400_000  # the segment server's --max_body_bytes: more than a picture's 230 kB, less than a big one's
COLOURS = ["rgb(66, 133, 244)", "rgb(219, 68, 55)", "rgb(244, 180, 0)", "rgb(15, 157, 88)", "rgb(228, 142, 241)"]


def locs(*values: int) -> list[str]:
    return [f"<loc{v:04d}>" for v in values]


DETECT = locs(100, 200, 700, 900) + ["▁cat", "▁", ";"] + locs(300, 50, 800, 400) + ["▁dog"]
SEGMENT = locs(100, 200, 700, 900) + [f"<seg{i:03d}>" for i in range(16)] + ["▁cat"]


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """Three servers started together: a random tiny model behind an API key, and the two scripted ones."""
    folder = tmp_path_factory.mktemp("web")
    for name, answer in (("detect", DETECT), ("segment", SEGMENT)):
        tiny.build_checkpoint(folder / name, answer=answer)
    np.savez(folder / "vae.npz", **vivid_vae_arrays())
    started = {"plain": Server(checkpoint("v1_mqa"), "--api_key", KEY),
               "detect": Server(folder / "detect"),
               "segment": Server(folder / "segment", "--vae_path", str(folder / "vae.npz"), "--max_body_bytes",
                                 str(BODY_LIMIT))}
    yield {name: server.wait_ready() for name, server in started.items()}
    for server in started.values():
        assert server.stop() == 0


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.requested = []  # every URL the page asked for, from the browser's own network log
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def network_log(request):
    yield
    if "browser" in request.fixturenames:
        driver = request.getfixturevalue("browser")
        for entry in driver.get_log("performance"):
            event = json.loads(entry["message"])["message"]
            if event["method"] == "Network.requestWillBeSent":
                driver.requested.append(event["params"]["request"]["url"])


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PALIGEMMA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pictures") / "picture.png"
    random_image(320, 240, seed=5).save(path)
    return path


def open_page(driver, server, key: str | None = None):
    driver.get(server.url)
    if key is not None:
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        driver.find_element(By.ID, "key").send_keys(key, Keys.ENTER)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "run").is_enabled())


def ask(driver, image: Path, task: str, **fields):
    """Upload image, pick the task and fill the decoding options (opened), then press Run."""
    driver.find_element(By.ID, "file").send_keys(str(image))
    Select(driver.find_element(By.ID, "task")).select_by_visible_text(task)
    if fields:
        driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        if element.get_attribute("type") == "checkbox":
            if element.is_selected() != value:
                element.click()
        else:
            element.clear()
            element.send_keys(str(value))
    driver.find_element(By.ID, "run").click()


def finished(driver, seconds: float = 30):
    WebDriverWait(driver, seconds).until(lambda d: d.find_element(By.ID, "save-json").is_enabled())


def answered(driver, server, image: Path, task: str) -> dict:
    """The record the page shows for image and task, on a page just opened."""
    open_page(driver, server)
    ask(driver, image, task)
    finished(driver)
    return json.loads(driver.execute_script("return JSON.stringify(page.record)"))


def test_the_page_and_its_files_carry_a_policy_that_allows_only_the_servers_own_origin(servers):
    server = servers["plain"]
    for path in ("/", "/app.js", "/style.css"):
        reply = httpx.get(server.url + path)  # the page loads without the key; the API behind it needs it
        assert reply.status_code == 200, path
        policy = dict(part.strip().split(" ", 1) for part in reply.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
        assert "http://" not in reply.text and "https://" not in reply.text  # nothing named on another origin
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/app.js", params={"name": "../server.py"}).text == httpx.get(
        server.url + "/app.js").text


def test_a_caption_streams_in_and_equals_the_apis_answer_with_the_key_kept_for_the_tab(
        servers, browser, picture, screenshots):
    server = servers["plain"]
    open_page(browser, server, key=KEY)
    assert browser.execute_script("return sessionStorage.getItem('paligemma-key')") == KEY
    assert KEY not in browser.current_url
    browser.execute_script("""window.seen = [];
        new MutationObserver(() => window.seen.push(document.getElementById('answer').textContent))
            .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});""")
    ask(browser, picture, "Caption, short", **{"max-tokens": 24})
    finished(browser)
    shown = browser.find_element(By.ID, "answer").text
    reply = server.client(api_key=KEY).chat.completions.create(
        model=server_name(server), max_tokens=24,
        messages=message("data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode(), "caption en"))
    assert shown == reply.choices[0].message.content != ""
    seen = browser.execute_script("return window.seen")
    assert len(set(seen)) > 3 and all(shown.startswith(text) for text in seen)  # it grew piece by piece
    assert "tokens/s" in browser.find_element(By.ID, "stats").text
    browser.save_screenshot(str(screenshots / "caption.png"))


def server_name(server) -> str:
    return httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]


def box_geometry(driver) -> tuple[list[dict], dict, dict]:
    return driver.execute_script("""
        const image = document.getElementById('picture').getBoundingClientRect();
        const boxes = [...document.querySelectorAll('.box')].map((b) => {
            const r = b.getBoundingClientRect();
            return {left: r.left, top: r.top, width: r.width, height: r.height,
                    colour: getComputedStyle(b).borderTopColor};
        });
        const natural = document.getElementById('picture');
        return [boxes, {left: image.left, top: image.top, width: image.width, height: image.height},
                {width: natural.naturalWidth, height: natural.naturalHeight}];""")


def test_detected_boxes_sit_on_their_objects_within_a_pixel_in_every_window_size(
        servers, browser, picture, screenshots):
    record = answered(browser, servers["detect"], picture, "Detect objects")
    assert [d["label"] for d in record["detections"]] == ["cat", "dog"]
    browser.save_screenshot(str(screenshots / "detection.png"))
    for size in ((1280, 900), (700, 900), (390, 844)):  # and a phone's
        browser.set_window_size(*size)
        boxes, image, natural = box_geometry(browser)
        scale = image["width"] / natural["width"]
        assert image["height"] / natural["height"] == pytest.approx(scale, rel=0.01)  # the image keeps its shape
        assert len(boxes) == 2
        for box, detection, colour in zip(boxes, record["detections"], COLOURS):
            x0, y0, x1, y1 = detection["box"]
            expected = (image["left"] + x0 * scale, image["top"] + y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale)
            drawn = (box["left"], box["top"], box["width"], box["height"])
            assert drawn == pytest.approx(expected, abs=1), size
            assert box["colour"] == colour
    browser.set_window_size(1280, 900)
    items = browser.find_elements(By.CSS_SELECTOR, "#objects-list li")
    assert [item.text for item in items] == ["cat 1.00", "dog 1.00"]
    items[1].send_keys("")  # focus by keyboard highlights the second box only
    assert browser.execute_script("return [...document.querySelectorAll('.box')].map((b) => b.classList.contains("
                                  "'hot'))") == [False, True]


def test_segment_masks_are_painted_on_exactly_the_pixels_of_the_records_mask_and_both_downloads_hold_them(
        servers, browser, picture, downloads):
    record = answered(browser, servers["segment"], picture, "Segment objects")
    painted = browser.execute_script("""
        const canvas = document.getElementById('masks');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let bits = '';
        for (let i = 3; i < data.length; i += 4) bits += data[i] ? '1' : '0';
        return [canvas.width, canvas.height, bits];""")
    width, height, bits = painted
    mask = np.frombuffer(bits.encode(), dtype=np.uint8).reshape(height, width) == ord("1")
    expected = rle_decode(record["segments"][0]["mask"])
    assert (width, height) == (320, 240) and expected.any() and not expected.all()
    np.testing.assert_array_equal(mask, expected)

    browser.find_element(By.ID, "save-json").click()
    browser.find_element(By.ID, "save-png").click()
    wait_for(lambda: {p.name for p in downloads.iterdir()} == {"paligemma.json", "paligemma.png"})
    assert json.loads((downloads / "paligemma.json").read_text()) == record
    with Image.open(downloads / "paligemma.png") as drawn:
        drawn = np.asarray(drawn.convert("RGB")).astype(int)
    plain = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    changed = np.abs(drawn - plain).sum(-1) > 0
    assert changed[expected].mean() > 0.99 and changed[~expected].mean() < 0.05  # the mask, and the box's outline


def test_pasted_and_dropped_images_are_shown_at_once(servers, browser, picture):
    open_page(browser, servers["detect"])
    payload = base64.b64encode(picture.read_bytes()).decode()
    for target, event in (("document", "new ClipboardEvent('paste', {clipboardData: data})"),
                          ("document.getElementById('drop')", "new DragEvent('drop', {dataTransfer: data})")):
        shown = browser.execute_script(f"""
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], 'given.png', {{type: 'image/png'}}));
            const picture = document.getElementById('picture');
            picture.removeAttribute('src');
            {target}.dispatchEvent({event});
            return picture.decode().then(() => [page.image.name, picture.naturalWidth]);""", payload)
        assert shown == ["given.png", 320]


def test_stop_aborts_the_answer_and_the_server_frees_its_row(servers, browser, picture):
    server = servers["plain"]
    open_page(browser, server)  # the key is still in this tab's sessionStorage
    ask(browser, picture, "Caption, long", **{"max-tokens": 3000, "sample": True, "temperature": 1, "top-p": 1,
                                               "seed": 1})
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "answer").text)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert server.metric("paligemma_running_rows", headers) == 1
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: server.metric("paligemma_running_rows", headers) == 0)
    assert browser.find_element(By.ID, "stats").text == "stopped"
    assert browser.find_element(By.ID, "run").is_enabled()


def test_a_bad_image_or_a_body_over_the_limit_shows_one_readable_error_line_and_the_next_answer_comes(
        servers, browser, picture, tmp_path, screenshots):
    broken, big = tmp_path / "broken.png", tmp_path / "big.png"
    broken.write_bytes(b"this is not a picture")
    random_image(500, 400, seed=7).save(big)
    assert big.stat().st_size > BODY_LIMIT
    for server, image, words in (("detect", broken, "Error 400: the image: not an image"),
                                 ("segment", big, "Error 413: the body is over the limit")):
        open_page(browser, servers[server])
        ask(browser, image, "Caption, short")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
        line = browser.find_element(By.ID, "error").text
        assert line.startswith(words) and "\n" not in line
        if server == "detect":
            browser.save_screenshot(str(screenshots / "error.png"))
    ask(browser, picture, "Detect objects")
    finished(browser)
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_every_control_is_reached_by_keyboard_and_dark_mode_is_followed(servers, browser):
    open_page(browser, servers["detect"])
    browser.execute_script("document.activeElement.blur()")
    reached = []
    for _ in range(20):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(browser.switch_to.active_element.get_attribute("id"))
    assert {"drop", "file", "task", "lang", "prompt", "run"} <= set(reached)
    background = "return getComputedStyle(document.body).backgroundColor"
    light = browser.execute_script(background)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                          "value": "dark"}]})
    dark = browser.execute_script(background)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert light != dark and sum(map(int, dark[4:-1].split(","))) < 150


def test_no_request_left_for_another_origin(servers, browser):
    origins = tuple(server.url + "/" for server in servers.values())
    assert browser.requested and all(url.startswith(origins + ("blob:", "data:")) for url in browser.requested), \
        browser.requested
