"""What a request gets when it, or the server, is at fault (issue 23, part 5), over real HTTP:
images as a viewer shows them, a batch naming its bad query, ids that can be addressed (and
links that cannot be turned into another document's), and the server's own faults as 5xx."""
from __future__ import annotations

import base64
import io
import sqlite3

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FLICKR, require_data, served_index


def photo() -> Image.Image:
    return Image.open(sorted((require_data(FLICKR) / "images").glob("*.jpg"))[0]).convert("RGB")


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def sideways_with_exif(img: Image.Image) -> bytes:
    """As a phone stores a turned photo: the pixels turned, the EXIF Orientation tag (6) saying
    how to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def test_16_bit_palette_transparent_and_turned_images_embed_as_they_look(lit):
    from umr.retrieval.items import Item

    img = photo()
    grey = img.convert("L")
    sixteen = encoded(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    palette = encoded(img.quantize(255), "PNG", transparency=0)  # one colour transparent, as GIF-style PNGs have
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.new("L", img.size, 255))
    opaque_rgba = encoded(rgba, "PNG")
    v = lit.encode([Item("o", None, encoded(img, "PNG")), Item("g", None, encoded(grey.convert("RGB"), "PNG")),
                    Item("16", None, sixteen), Item("p", None, palette), Item("a", None, opaque_rgba),
                    Item("e", None, sideways_with_exif(img)),
                    Item("s", None, encoded(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95))])
    cos = v @ v.T
    assert cos[2, 1] > 0.999  # 16-bit grey is the 8-bit grey photo, not near-white
    assert cos[3, 0] > 0.97 and cos[4, 0] > 0.9999  # palette and opaque RGBA: the photo
    assert cos[5, 0] > 0.99 and cos[5, 0] - cos[6, 0] > 0.02  # turned upright, not embedded sideways


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("faults")
    records = [{"id": f"t{i}", "text": f"document number {i}"} for i in range(20)]
    with served_index(tmp, tiny, records) as (url, engine):
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, engine


def test_a_batch_names_its_bad_query(served):
    client, _ = served
    good = {"text": "document number 3", "k": 2}
    r = client.post("/v1/search/batch", json={"queries": [good, good, {"text": " \u200b "}, good]})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["query"] == 2 and err["message"].startswith("queries[2]: ")
    r = client.post("/v1/search/batch", json={"queries": [good, {"text": "x", "filter": {"bad key!": 1}}]})
    assert r.status_code == 422 and r.json()["error"]["query"] == 1
    r = client.post("/v1/search/batch", json={"queries": [good, good]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_a_field_of_several_forms_is_refused_once_in_the_apis_words(served):
    """`modality` takes a name or a list of names: a bad one gets one message naming the
    choices and the value sent, not one line per form in pydantic's internal names."""
    client, _ = served
    r = client.post("/v1/search", json={"text": "document", "modality": "audio"})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "modality: Input should be 'image', 'text' or 'image,text' (got 'audio')"
    r = client.post("/v1/search", json={"text": "document", "modality": ["text", "audio"]})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("modality.1: Input should be 'image'")
    r = client.post("/v1/search", json={"text": "document", "k": "many", "colour": "red"})
    msg = r.json()["error"]["message"]
    assert r.status_code == 422 and "k: Input should be a valid integer" in msg and "(got 'many')" in msg
    assert "unknown field 'colour'" in msg


def test_ids_are_addressable_and_links_cannot_lead_elsewhere(served):
    client, _ = served
    for bad in ("line\nbreak", "tab\there", ".", "..", "photos/x/image"):
        r = client.post("/v1/documents", json={"documents": [{"id": bad, "text": "some text"}]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_document", bad
    original = photo()
    assert original.width != original.height
    img = base64.b64encode(sideways_with_exif(original)).decode()
    docs = [{"id": "x/../t1", "text": "a tricky id", "image": img}, {"id": "a b?c#d%2F", "text": "odd but fine"}]
    assert client.post("/v1/documents", json={"documents": docs}).status_code == 200
    link = client.get("/v1/documents/x%2F..%2Ft1").json()["image"]
    assert link == "/v1/documents/x%2F..%2Ft1/image"
    thumb = Image.open(io.BytesIO(client.get(link, params={"size": 64}).content))
    # Upright: the stored pixels are sideways, their EXIF tag turns them back.
    assert (thumb.width > thumb.height) == (original.width > original.height)
    hits = client.post("/v1/search", json={"text": "a tricky id", "k": 30}).json()["results"]
    assert [h["image"] for h in hits if h["id"] == "x/../t1"] == [link]
    assert client.get("/v1/documents/a%20b%3Fc%23d%252F").json()["text"] == "odd but fine"
    assert client.delete("/v1/documents/x%2F..%2Ft1").status_code == 200
    assert client.get("/v1/documents/t1").json()["text"] == "document number 1"  # the other document is untouched


def test_a_damaged_stored_row_is_the_servers_fault(served):
    client, engine = served
    db = sqlite3.connect(str(engine.store.path / "docs.sqlite"))
    with db:
        db.execute("UPDATE docs SET metadata = '{not json' WHERE id = 't7'")
    db.close()
    r = client.post("/v1/search", json={"text": "document number 7", "k": 3})
    assert r.status_code == 500 and r.json()["error"]["code"] == "index_damaged"
    assert "docs.sqlite" not in r.text and "/tmp" not in r.text  # where the index lies stays the server's business
    r = client.get("/v1/documents/t7")
    assert r.status_code == 500 and r.json()["error"]["code"] == "index_damaged"
    r = client.post("/v1/search", json={"text": "document number 2", "k": 3, "filter": {"n": 1}})
    assert r.status_code == 500 and r.json()["error"]["code"] == "index_damaged"  # the filter reads every row
    assert client.get("/v1/documents/t2").status_code == 200
