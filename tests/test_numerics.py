"""Reduced precision and decoding on the device (retrieval/numerics.py, retrieval/encoders/device_decode.py).

No GPU here or in CI: the device paths run with the CPU as the device, the same code a GPU
runs with "cuda" in its place (bench/gpu_check.sh measures them on a GPU)."""
import io
import json

import numpy as np
import torch
import pytest
from PIL import Image

from conftest import cli_in_process, write_jsonl
from umr.retrieval.encoders import device_decode
from umr.retrieval import numerics
from umr.retrieval.encoders.base import EncoderError
from umr.retrieval.images import DEFAULT_LIMITS, BadImage
from umr.retrieval.items import Item


@pytest.fixture
def chosen():
    """numerics.choose for one test, put back to the defaults after it."""
    yield numerics.choose
    numerics.choose()


def embed(encoder, items):
    return encoder.embed([encoder.prepare(it) for it in items])


def test_float16_and_device_decode_stay_within_cosine_0999_of_the_cpu_path(lit, flickr, flickr_test, chosen):
    names, caps = flickr_test
    items = [Item(id=n, image=str(flickr / "images" / n)) for n in names[:48]]
    texts = [Item(id=f"t{i}", text=caps[n][0]) for i, n in enumerate(names[:48])]
    ref_img, ref_txt = embed(lit, items), embed(lit, texts)
    plain = lit.record()
    assert "numerics" not in plain and lit.vectors_fingerprint == lit.fingerprint

    chosen("float16", "cpu")
    img, txt = embed(lit, items), embed(lit, texts)
    cos_img, cos_txt = (img * ref_img).sum(1), (txt * ref_txt).sum(1)
    assert cos_img.min() >= 0.999 and cos_txt.min() >= 0.999
    assert cos_img.min() < 1 - 1e-7  # it did run at reduced precision
    rec = lit.record()
    assert rec["numerics"] == {"precision": "float16"} and rec["fingerprint"] == plain["fingerprint"]
    assert rec["vectors_fingerprint"] != plain["fingerprint"]

    chosen("float32", "device")
    prepared = [lit.prepare(it) for it in items]
    assert all(isinstance(p.image, device_decode.EncodedJpeg) for p in prepared)  # left for the device
    dev = lit.embed(prepared)
    assert ((dev * ref_img).sum(1)).min() >= 0.999
    assert lit.record()["numerics"] == {"image_decode": "device"}
    # A batch mixing device JPEGs with CPU-prepared images keeps their order.
    mixed = [prepared[0], lit.prepare(Item(id="png", image=_png(flickr / "images" / names[1]))), prepared[2]]
    assert not isinstance(mixed[1].image, device_decode.EncodedJpeg)
    np.testing.assert_allclose(lit.embed(mixed)[[0, 2]], dev[[0, 2]], atol=1e-5)
    assert float(lit.embed(mixed)[1] @ ref_img[1]) >= 0.999


def _png(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_only_what_the_device_decodes_as_the_cpu_does_goes_there(flickr, flickr_test):
    path = flickr / "images" / flickr_test[0][0]
    photo = Image.open(path)
    assert isinstance(device_decode.for_device(str(path), DEFAULT_LIMITS), device_decode.EncodedJpeg)
    assert isinstance(device_decode.for_device(_jpeg(photo.convert("L")), DEFAULT_LIMITS), device_decode.EncodedJpeg)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the CPU path turns it
    assert device_decode.for_device(_jpeg(photo, exif=exif.tobytes()), DEFAULT_LIMITS) is None
    assert device_decode.for_device(_jpeg(photo.convert("CMYK")), DEFAULT_LIMITS) is None
    assert device_decode.for_device(_png(path), DEFAULT_LIMITS) is None
    assert device_decode.for_device(_jpeg(photo.crop((0, 0, 500, 100))), DEFAULT_LIMITS) is None  # past crop aspect
    whole = path.read_bytes()
    assert device_decode.for_device(whole[: len(whole) // 2], DEFAULT_LIMITS) is None  # truncated: PIL rules
    with pytest.raises(BadImage, match="not a readable image"):
        device_decode.for_device(b"not an image at all", DEFAULT_LIMITS)
    with pytest.raises(BadImage, match="not found"):
        device_decode.for_device(str(path) + ".missing", DEFAULT_LIMITS)


def test_numerics_are_recorded_resumed_only_alike_and_refused_where_unsupported(lit, tiny, flickr, flickr_test, tmp_path,
                                                                                 chosen):
    names, caps = flickr_test
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": n, "image": str(flickr / "images" / n), "text": caps[n][0]}
                                                for n in names[:24]])
    out = tmp_path / "idx"
    r = cli_in_process("index", "build", corpus, "--out", out, "--encoder", "lit-base", "--precision", "float16",
                       "--image-decode", "device", "--no-progress")
    assert r.returncode == 0, r.stderr
    built = json.loads(cli_in_process("index", "info", out, "--json").stdout)["built_with"]
    assert built["numerics"] == {"precision": "float16", "image_decode": "device"}
    r = cli_in_process("index", "build", corpus, "--out", out, "--encoder", "lit-base", "--no-progress")
    assert r.returncode == 2 and "was started with --precision float16 --image-decode device" in r.stderr
    # Queries at float32 match it: the fingerprint names the weights, numerics stay within 0.999.
    r = cli_in_process("search", out, caps[names[3]][0], "-k", "3", "--json")
    assert r.returncode == 0 and names[3] in [h["id"] for h in json.loads(r.stdout)]

    r = cli_in_process("index", "build", corpus, "--out", tmp_path / "b", "--precision", "bfloat16")
    assert r.returncode == 2 and "invalid choice: 'bfloat16'" in r.stderr
    with pytest.raises(Exception, match="bfloat16 moves image vectors past cosine 0.999"):
        chosen("bfloat16")
    chosen("float32", "device")
    with pytest.raises(EncoderError, match="--image-decode device: encoder tiny-clip"):
        tiny.prepare(Item(id="x", image=str(flickr / "images" / names[0])))
    from umr.retrieval.indexing.pipeline import build_index

    with pytest.raises(Exception, match="not to Ray workers"):
        build_index(corpus, lit, tmp_path / "ray", ray="auto", progress=False)
    assert not (tmp_path / "ray").exists()


def test_jpegs_decoded_straight_to_tensors_on_the_cpu_are_pils_pixels_to_the_bit(lit, flickr, flickr_test, monkeypatch):
    """The CPU path's libjpeg-to-tensor decoding (device_decode.decoded_here) is an optimisation
    only: every image it takes gives the tensor PIL's path gives, and what it must not take
    (turned, CMYK, PNG, truncated, draft-sized) goes to PIL, which keeps its verdicts."""
    from umr.retrieval.encoders.base import Preparer
    from umr.retrieval.encoders.towers import ImageTower, resize_crop

    pil = Preparer("lit-base", ImageTower.preprocess, 224, True, True)
    fast = lit.preparer()
    assert fast.resize_crop is resize_crop and lit.preparer().decode_on_device is False
    photos = [flickr / "images" / n for n in flickr_test[0][:40]]
    big = Image.open(photos[0]).resize((900, 600))  # shorter side past twice 224: PIL decodes it in draft mode
    exif = Image.Exif()
    exif[0x0112] = 6
    cut = photos[3].read_bytes()[: len(photos[3].read_bytes()) // 2]
    grey, progressive = _jpeg(Image.open(photos[1]).convert("L")), _jpeg(Image.open(photos[2]), progressive=True)
    sources = [str(p) for p in photos] + [p.read_bytes() for p in photos[:4]] + [grey, progressive]
    taken = [s for s in sources if device_decode.decoded_here(s, DEFAULT_LIMITS, 224, resize_crop) is not None]
    assert len(taken) == len(sources) - sum(min(Image.open(p).size) >= 448 for p in photos)  # all but draft-sized ones
    for s in sources:
        ours, theirs = fast.prepare(Item(id="x", image=s)).image, pil.prepare(Item(id="x", image=s)).image
        assert torch.equal(ours, theirs) and ours.stride() == theirs.stride()
    for odd in (_jpeg(Image.open(photos[3]), exif=exif.tobytes()), _jpeg(Image.open(photos[3]).convert("CMYK")),
                _png(photos[3]), _jpeg(big), cut):
        assert device_decode.decoded_here(odd, DEFAULT_LIMITS, 224, resize_crop) is None
    turned = Item(id="t", image=_jpeg(Image.open(photos[3]), exif=exif.tobytes()))
    assert fast.prepare(turned).image.shape == pil.prepare(turned).image.shape
    assert torch.equal(fast.prepare(turned).image, pil.prepare(turned).image)
    with pytest.raises(BadImage, match="truncated or corrupt"):
        fast.prepare(Item(id="cut", image=cut))
    assert device_decode.decoders_agree()  # checked once per process on a JPEG made there
    monkeypatch.setattr(device_decode, "decoders_agree", lambda: False)  # as where torchvision's libjpeg differs
    assert device_decode.decoded_here(str(photos[0]), DEFAULT_LIMITS, 224, resize_crop) is None
    assert torch.equal(fast.prepare(Item(id="p", image=str(photos[0]))).image, pil.prepare(Item(id="p", image=str(photos[0]))).image)
    monkeypatch.undo()
    monkeypatch.setenv("UMR_JPEG_DRAFT", "0")  # no draft mode: PIL decodes every pixel, and so may libjpeg
    assert device_decode.decoded_here(_jpeg(big), DEFAULT_LIMITS, 224, resize_crop) is not None
    assert torch.equal(fast.prepare(Item(id="b", image=_jpeg(big))).image, pil.prepare(Item(id="b", image=_jpeg(big))).image)
