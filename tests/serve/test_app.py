"""The retrieval service on a local Ray, called over HTTP on 127.0.0.1: demo captions find their images in every
language, every endpoint answers what the runtime computes, bad input gets a 4xx naming the field while the
service keeps answering, and a replica killed under load is replaced."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from tests.serve.conftest import wait_until

pytestmark = pytest.mark.ray

APP = "ccr-ray"
# Small limits so the over-limit cases stay small requests.
LIMITS = {"max_text_chars": 300, "max_k": 50, "max_texts": 8, "max_body_bytes": 4096, "max_upload_bytes": 200_000,
          "max_pixels": 100_000}
RULE_IMAGES = 4  # the demo captions: the first caption of each of the first 4 test images, in every language


def deploy(model: dict, index: str = "exact", **args):
    from ray import serve

    from ccr_ray.serve.app import build_app

    app = build_app({"model": model["model"], "index": model[index], "images": model["data"], "num_cpus": 0.5,
                     **args})
    serve.run(app, name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def service(serve_port, demo_model):
    deploy(demo_model, num_replicas=2, user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.005,
                                                    "limits": LIMITS})
    return {"url": f"http://127.0.0.1:{serve_port}", **demo_model}


@pytest.fixture(scope="module")
def test_rows(demo_model):
    from ccr_ray.data import schema

    return schema.read_split_table(demo_model["data"], "test", ["en", *("de", "zh")])


def search(url: str, text: str, lang: str, k: int = 5) -> requests.Response:
    return requests.post(f"{url}/search", json={"text": text, "lang": lang, "k": k}, timeout=30)


def png(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ retrieval


def test_demo_captions_find_their_image_in_every_language(service, test_rows):
    from ccr_ray import runtime as rt
    from ccr_ray.inference.index import Index

    ids = test_rows["image_id"].to_pylist()
    languages = requests.get(f"{service['url']}/languages", timeout=10).json()["languages"]
    assert [entry["code"] for entry in languages] == ["en", "de", "zh"]
    encoder, index = rt.Encoder(service["model"]), Index.load(service["exact"])
    for lang in ("en", "de", "zh"):
        captions = [caps[0] for caps in test_rows[f"captions_{lang}"].to_pylist()]
        for image_id, caption in zip(ids[:RULE_IMAGES], captions[:RULE_IMAGES]):
            response = search(service["url"], caption, lang, k=5)
            assert response.status_code == 200, response.text
            body = response.json()
            assert image_id in body["ids"], f"[{lang}] {caption!r}: {image_id} not in the top 5 {body['ids']}"
            # the service answers exactly what the runtime and the index compute in one process
            (expected,) = index.top_k(encoder.encode_text([caption], lang), 5)
            assert body["ids"] == [i for i, _ in expected]
            assert np.allclose(body["scores"], [s for _, s in expected], atol=1e-5)
            assert body["urls"] == [f"/images/{i}" for i in body["ids"]]
        # and not by luck: over every test image's first caption (chance 5/64)
        found = sum(image_id in search(service["url"], caption, lang, k=5).json()["ids"]
                    for image_id, caption in zip(ids, captions))
        assert found / len(ids) >= 0.75, f"[{lang}] only {found}/{len(ids)} captions find their image in the top 5"
        print(f"[{lang}] {found}/{len(ids)} test captions find their image in the top 5 over HTTP")


def test_endpoints_answer_what_the_runtime_computes(service, test_rows):
    from ccr_ray import runtime as rt

    url = service["url"]
    encoder = rt.Encoder(service["model"])
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["index"]["images"] == 64 and health["languages"] == ["en", "de", "zh"]
    assert health["model"]["fingerprint"] == encoder.manifest["model"]["fingerprint"]
    assert health["limits"]["max_k"] == LIMITS["max_k"] and health["batching"]["max_batch_size"] == 8

    texts = ["ein roter Kreis oben links", "Ein blaues Quadrat"]
    body = requests.post(f"{url}/encode/text", json={"texts": texts, "lang": "de"}, timeout=30).json()
    assert np.allclose(body["embeddings"], encoder.encode_text(texts, "de"), atol=1e-5) and body["dim"] == 32

    image_bytes = test_rows["image"].to_pylist()[7]
    image_id = test_rows["image_id"].to_pylist()[7]
    raw = requests.post(f"{url}/encode/image", data=image_bytes, headers={"content-type": "image/png"}, timeout=30)
    form = requests.post(f"{url}/encode/image", files={"image": ("x.png", image_bytes, "image/png")}, timeout=30)
    assert np.allclose(raw.json()["embeddings"][0], encoder.encode_image([image_bytes])[0], atol=1e-5)
    assert raw.json()["embeddings"] == form.json()["embeddings"]

    hits = requests.post(f"{url}/search/image?k=3", data=image_bytes, timeout=30).json()
    assert hits["ids"][0] == image_id and hits["scores"][0] == pytest.approx(1.0, abs=1e-4)

    stored = requests.get(f"{url}/images/{image_id}", timeout=10)
    assert stored.status_code == 200 and stored.content == image_bytes
    thumb = requests.get(f"{url}/images/{image_id}?max_side=16", timeout=10)
    assert thumb.headers["content-type"] == "image/png" and Image.open(io.BytesIO(thumb.content)).size == (16, 16)
    assert requests.get(f"{url}/images/no-such-id", timeout=10).status_code == 404

    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    for path in ("/search", "/search/image", "/encode/text", "/encode/image", "/languages", "/healthz"):
        assert path in spec["paths"], path
    page = requests.get(url + "/", params={"q": "ein roter Kreis", "lang": "de", "k": 6}, timeout=30)
    assert page.status_code == 200 and page.text.count('class="hit"') == 6
    assert "<script" not in page.text and "http://" not in page.text and "https://" not in page.text


# ------------------------------------------------------------------------------------------ bad input


def big_png() -> bytes:  # 400 x 400 = 160,000 pixels > max_pixels, but small as a file
    return png((400, 400), (10, 10, 10))


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A 70-byte PNG whose header declares width x height pixels (900 M: Pillow's own decompression-bomb check
    refuses it inside Image.open, before the service's max_pixels check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


BAD = {
    # name: (method, path, kwargs, expected status, field)
    "empty text": ("post", "/search", {"json": {"text": "", "lang": "de"}}, 422, "text"),
    "whitespace text": ("post", "/search", {"json": {"text": " \n\t ", "lang": "de"}}, 422, "text"),
    "text over the limit": ("post", "/search", {"json": {"text": "rot " * 100, "lang": "de"}}, 422, "text"),
    "text not a string": ("post", "/search", {"json": {"text": 5, "lang": "de"}}, 422, "text"),
    "unknown language": ("post", "/search", {"json": {"text": "ein Kreis", "lang": "fr"}}, 422, "lang"),
    "k below 1": ("post", "/search", {"json": {"text": "ein Kreis", "lang": "de", "k": 0}}, 422, "k"),
    "k over the cap": ("post", "/search", {"json": {"text": "ein Kreis", "lang": "de", "k": 51}}, 422, "k"),
    "k not an integer": ("post", "/search", {"json": {"text": "ein Kreis", "lang": "de", "k": "5"}}, 422, "k"),
    "unknown field": ("post", "/search", {"json": {"text": "ein Kreis", "langs": "de"}}, 422, "langs"),
    "malformed JSON": ("post", "/search", {"data": b'{"text": "ein Kreis", "lang": ',
                                           "headers": {"content-type": "application/json"}}, 400, "body"),
    "no body": ("post", "/search", {}, 422, "body"),
    "body over the limit": ("post", "/search", {"json": {"text": "x" * 5000, "lang": "de"}}, 413, "body"),
    "chunked body over the limit": ("post", "/search", {"data": iter([b'{"text": "', b"x" * 5000, b'"}']),
                                                        "headers": {"content-type": "application/json"}}, 413, "body"),
    "too many texts": ("post", "/encode/text", {"json": {"texts": ["a"] * 9, "lang": "en"}}, 422, "texts"),
    "empty text in a list": ("post", "/encode/text", {"json": {"texts": ["a", " "], "lang": "en"}}, 422, "texts[1]"),
    "non-image upload": ("post", "/search/image", {"data": b"hello, not an image"}, 422, "image"),
    "corrupt image": ("post", "/search/image", {"data": png()[:60]}, 422, "image"),
    "empty upload": ("post", "/encode/image", {"data": b""}, 422, "image"),
    "multipart without the image field": ("post", "/encode/image", {"files": {"img": ("a.png", png())}}, 422, "image"),
    "image over the pixel limit": ("post", "/search/image", {"data": big_png()}, 413, "image"),
    "header declaring 30,000 x 30,000 pixels": ("post", "/search/image", {"data": bomb_png()}, 413, "image"),
    "bomb header on /encode/image": ("post", "/encode/image", {"files": {"image": ("b.png", bomb_png())}}, 413,
                                     "image"),
    # text with nothing for the tokenizer to read is refused like whitespace (it was answered with arbitrary images)
    "control characters only": ("post", "/search", {"json": {"text": "\x00\x00", "lang": "en"}}, 422, "text"),
    "zero-width characters only": ("post", "/search", {"json": {"text": "\u200b\ufeff", "lang": "de"}}, 422, "text"),
    "empty once CLIP's cleaning ran": ("post", "/search", {"json": {"text": "&nbsp;", "lang": "en"}}, 422, "text"),
    "special tokens only": ("post", "/search", {"json": {"text": "[SEP] [PAD]", "lang": "de"}}, 422, "text"),
    "lone surrogate": ("post", "/search", {"data": b'{"text": "ein Kreis \\ud800", "lang": "de"}',
                                           "headers": {"content-type": "application/json"}}, 422, "text"),
    "control characters in a list": ("post", "/encode/text", {"json": {"texts": ["a", "\x07"], "lang": "zh"}}, 422,
                                     "texts[1]"),
    # FastAPI's own refusals, in the service's shape
    "body not UTF-8": ("post", "/search", {"data": b'{"text": "\xff\xfe", "lang": "de"}',
                                           "headers": {"content-type": "application/json"}}, 400, "body"),
    "JSON nested too deeply": ("post", "/search", {"data": b"[" * 2000 + b"]" * 2000,
                                                   "headers": {"content-type": "application/json"}}, 400, "body"),
    "unknown path": ("get", "/serach", {}, 404, "path"),
    "wrong method": ("put", "/search", {"json": {"text": "ein Kreis", "lang": "de"}}, 405, "method"),
    "upload over the byte limit": ("post", "/encode/image", {"data": b"\x89PNG" + b"\0" * 250_000}, 413, "image"),
    "image search k over the cap": ("post", "/search/image?k=500", {"data": png()}, 422, "k"),
    "image search k not a number": ("post", "/search/image?k=many", {"data": png()}, 422, "k"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_naming_the_field_and_the_service_keeps_serving(service, test_rows, case):
    method, path, kwargs, status, field = BAD[case]
    caption = test_rows["captions_de"].to_pylist()[0][0]
    before = search(service["url"], caption, "de")
    response = getattr(requests, method)(service["url"] + path, timeout=30, **kwargs)
    after = search(service["url"], caption, "de")
    assert response.status_code == status, (case, response.status_code, response.text)
    body = response.json()
    assert body["field"] == field and body["detail"].startswith(f"{field}: "), body
    assert before.status_code == after.status_code == 200
    assert before.json() == after.json()


PAGE_BAD = {
    # name: (query string, status, field named in the page's error)
    "control characters only": ({"q": "\x00\x00", "lang": "de"}, 422, "text"),
    "unknown language with a query": ({"q": "ein Kreis", "lang": "xx"}, 422, "lang"),  # was searched as English
    "k not a number": ({"q": "ein Kreis", "lang": "de", "k": "many"}, 422, "k"),
    "k zero": ({"q": "ein Kreis", "lang": "de", "k": "0"}, 422, "k"),
    "k huge": ({"q": "ein Kreis", "lang": "de", "k": "9" * 30}, 422, "k"),
}


@pytest.mark.parametrize("case", list(PAGE_BAD))
def test_bad_page_queries_show_the_error_and_the_service_keeps_serving(service, case):
    params, status, field = PAGE_BAD[case]
    response = requests.get(service["url"] + "/", params=params, timeout=30)
    assert response.status_code == status, (case, response.status_code)
    assert f'role="alert">{field}: ' in response.text
    assert requests.get(service["url"] + "/", params={"q": "ein Kreis", "lang": "de"}, timeout=30).status_code == 200


# ------------------------------------------------------------------------------------------ config, faults


def test_batching_and_limits_are_live_config(service, test_rows):
    """user_config changes apply to the running replicas (Serve calls reconfigure), answers stay the same."""
    caption = test_rows["captions_zh"].to_pylist()[3][0]
    before = search(service["url"], caption, "zh", k=7).json()
    deploy(service, num_replicas=2, user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0,
                                                 "limits": {**LIMITS, "max_k": 5}})
    health = requests.get(f"{service['url']}/healthz", timeout=10).json()
    assert health["batching"] == {"max_batch_size": 1, "batch_wait_timeout_s": 0}
    refused = search(service["url"], caption, "zh", k=7)
    assert refused.status_code == 422 and refused.json()["field"] == "k"
    assert search(service["url"], caption, "zh", k=5).json()["ids"] == before["ids"][:5]
    deploy(service, num_replicas=2, user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.005,
                                                 "limits": LIMITS})
    assert search(service["url"], caption, "zh", k=7).json() == before


def replica_names() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#")}


def running_replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments["Retrieval"].replica_states
    if len(states) != 1:
        print(f"replica states: {dict(states)}")  # what else the controller holds, in the test's output
    return int(states.get("RUNNING", 0)) if len(states) == 1 else -1


def test_a_replica_killed_under_load_is_replaced_and_every_request_after_recovery_succeeds(service, test_rows):
    import ray

    captions = [(caps[0], lang) for lang in ("de", "zh", "en")
                for caps in test_rows[f"captions_{lang}"].to_pylist()[:6]]
    expected = {c: search(service["url"], *c).json() for c in captions}
    old = replica_names()
    assert len(old) == 2 and running_replicas() == 2

    log: list[tuple[float, int]] = []  # (time, status or -1 for a connection error)
    stop = threading.Event()

    def load():  # until told to stop; bounded all the same (20,000 requests or 300 s)
        deadline = time.monotonic() + 300
        for i in range(20_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                status = search(service["url"], *captions[i % len(captions)]).status_code
            except requests.RequestException:
                status = -1
            log.append((time.monotonic(), status))

    def answered_since(moment: float, count: int) -> bool:
        return sum(t > moment for t, _ in log) >= count


    clients = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for client in clients:
        client.start()
    wait_until(lambda: answered_since(0, 20), "the load to run")  # requests in flight, not a guess at a rate
    victim = sorted(old)[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    recovered_at = wait_until(lambda: running_replicas() == 2 and victim not in replica_names()
                              and len(replica_names()) == 2, "a replacement replica", timeout=90)
    wait_until(lambda: answered_since(recovered_at, 40), "40 answers after recovery")
    stop.set()
    for client in clients:
        client.join(timeout=60)
    # Two replicas serve at the end. Not asserted at this instant: under 4 clients on 2 busy cores the controller has
    # been seen to hold a second state for a moment after the replacement ran (CI: RUNNING plus another entry)
    wait_until(lambda: victim not in replica_names() and len(replica_names()) == 2 and running_replicas() == 2,
               "two running replicas after the load", timeout=90)
    assert any(t > killed_at for t, _ in log), "no load while the replica died"
    after = [status for t, status in log if t > recovered_at]
    assert after and all(status == 200 for status in after), f"{after.count(200)}/{len(after)} ok after recovery"
    for caption in captions:  # and the new replica answers as the old ones did
        response = search(service["url"], *caption)
        assert response.status_code == 200 and response.json() == expected[caption]
    during = [status for t, status in log if killed_at < t <= recovered_at]
    print(f"load: {len(log)} requests; while recovering {during.count(200)}/{len(during)} ok; "
          f"after {len(after)}/{len(after)} ok; recovery {recovered_at - killed_at:.1f}s")
    json.dumps(log)  # the log is plain data (kept for a failure message)
