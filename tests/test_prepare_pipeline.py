"""The build's preparation stage: torch resizing as PIL did, batches for the device, workers per core."""
import os

import numpy as np
import torch
from PIL import Image

from conftest import DATA
from umr.retrieval.device import bucket, default_batch_size, default_workers, pad_rows, stack_batch
from umr.retrieval.encoders import load_encoder
from umr.retrieval.encoders.base import Prepared
from umr.retrieval.encoders.towers import IMAGE_SIZE, ImageTower, image_tower, resize_crop
from umr.retrieval.images import open_image
from umr.retrieval.items import Item


def pil_preprocess(image):
    """PREPROCESS_VERSION 2: PIL's bicubic resize, then the centre crop."""
    w, h = image.size
    s = IMAGE_SIZE / min(w, h)
    nw, nh = max(IMAGE_SIZE, round(w * s)), max(IMAGE_SIZE, round(h * s))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - IMAGE_SIZE) // 2, (nh - IMAGE_SIZE) // 2
    return torch.from_numpy(np.asarray(image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))).copy()).permute(2, 0, 1)


def photos(n=24):
    flickr = sorted((DATA / "flickr8k-1k" / "images").glob("*.jpg"))[: n // 2]
    clothing = sorted((DATA / "clothing-small").glob("*/*/*.jpg"))[: n // 2]
    return flickr + clothing


def test_torch_resize_gives_pil_pixels_and_vectors():
    enc = load_encoder("lit-base")
    images = [open_image(p, min_side=IMAGE_SIZE) for p in photos()]
    images.append(Image.new("RGB", (900, 230), "navy"))  # wide: resized by its height
    images.append(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 224, 3), dtype=np.uint8)))  # noise
    new = [ImageTower.preprocess(i) for i in images]
    old = [pil_preprocess(i) for i in images]
    for a, b in zip(new, old):
        assert a.shape == b.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and a.dtype == torch.uint8
        assert (a.int() - b.int()).abs().float().mean() < 0.5  # grey levels of 255
    cos = (enc.embed([Prepared(None, t) for t in new]) * enc.embed([Prepared(None, t) for t in old])).sum(1)
    assert cos.min() > 0.999, cos.min()


def test_images_keep_the_layout_the_resize_wrote_and_vectors_do_not_change():
    enc = load_encoder("lit-base")
    images = [ImageTower.preprocess(open_image(p, min_side=IMAGE_SIZE)) for p in photos(8)]
    assert all(t.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and t.permute(1, 2, 0).is_contiguous() for t in images)  # HWC
    assert stack_batch(images).is_contiguous(memory_format=torch.channels_last)  # what the convolutions read
    as_chw = [t.contiguous() for t in images]
    assert np.array_equal(enc.embed([Prepared(None, t) for t in images]), enc.embed([Prepared(None, t) for t in as_chw]))
    decoded_chw = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)  # as a device decoder gives them
    out = resize_crop(decoded_chw)
    assert out.is_contiguous() and torch.equal(out, resize_crop(decoded_chw.permute(1, 2, 0).contiguous().permute(2, 0, 1)))


def test_padding_to_a_bucket_leaves_the_real_rows_alone():
    assert [bucket(n) for n in (1, 2, 3, 5, 64, 65, 200, 256)] == [1, 2, 4, 8, 64, 128, 256, 256]
    tower = image_tower()
    batch = torch.stack([ImageTower.preprocess(open_image(p, min_side=IMAGE_SIZE)) for p in photos(6)[:5]])
    padded = pad_rows(batch, bucket(len(batch)))
    assert padded.shape[0] == 8 and torch.equal(padded[5], batch[-1])
    assert torch.allclose(tower.features(padded)[:5], tower.features(batch), atol=1e-5)
    assert pad_rows(batch, 3) is batch  # never cut


def test_batches_and_workers_follow_the_machine():
    assert default_workers() == min(32, len(os.sched_getaffinity(0)))
    assert default_batch_size(torch.device("cpu")) == 64 and default_batch_size(torch.device("cuda")) == 256
    tensors = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    assert torch.equal(stack_batch(tensors, torch.device("cpu")), torch.stack(tensors))


def test_encoding_is_the_same_with_one_worker_or_many():
    """Workers split each batch; results come back in input order whatever their count."""
    from umr.retrieval.encoders.prefetch import prefetch_batches

    enc = load_encoder("lit-base")
    items = [Item(p.name, None, str(p)) for p in photos(20)]
    chunks = [items[i : i + 7] for i in range(0, len(items), 7)]
    runs = []
    for workers in (1, 3, 32):
        rows, order = [], []
        for chunk, prepared in prefetch_batches(chunks, lambda it: enc.prepare(it), workers):
            order += [c.id for c in chunk]
            rows.append(enc.embed(prepared))
        assert order == [it.id for it in items]
        runs.append(np.concatenate(rows))
    assert np.allclose(runs[0], runs[1], atol=1e-6) and np.allclose(runs[0], runs[2], atol=1e-6)
    solo = enc.encode(items[5:6])
    assert np.allclose(runs[0][5], solo[0], atol=1e-5)
