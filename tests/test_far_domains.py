"""The far domains (pipeline.evaluation.far_domains): deterministic, balanced, disjoint draws of legible digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.far_domains import FAR_DOMAINS, make_far_domain, render_far, write_domain

NAMES = sorted(FAR_DOMAINS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The renderers run many small ops; on a busy 2-core box OpenMP's thread hand-offs cost more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small() -> dict:
    return {n: make_far_domain(n, references_per_class=3, test_per_class=4, oracle_per_class=5, seed=1) for n in NAMES}


def test_suite_has_the_four_domains_and_only_inverted_is_unreachable():
    assert {"fonts", "sevenseg", "textured", "inverted"} <= set(FAR_DOMAINS)
    assert {n for n, s in FAR_DOMAINS.items() if not s.reachable} == {"inverted"}
    assert all(s.description for s in FAR_DOMAINS.values())


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtype_balance(name, small):
    d = small[name]
    assert d.spec.name == name
    for images, labels, per_class in (
        (d.ref_images, d.ref_labels, 3),
        (d.test_images, d.test_labels, 4),
        (d.oracle_images, d.oracle_labels, 5),
    ):
        assert images.shape == (10 * per_class, 32, 32) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and labels.shape == (10 * per_class,)
        assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, per_class))
        assert images.max() - images.min() > 100  # digit and background both present
        assert all(len(np.unique(img)) > 2 for img in images)  # no blank images


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_seeded_and_splits_disjoint(name, small):
    d = small[name]
    again = make_far_domain(name, references_per_class=3, test_per_class=4, oracle_per_class=5, seed=1)
    for field in ("ref_images", "test_images", "oracle_images", "ref_labels"):
        assert np.array_equal(getattr(d, field), getattr(again, field))
    other = make_far_domain(name, references_per_class=3, test_per_class=4, oracle_per_class=5, seed=2)
    assert not np.array_equal(d.ref_images, other.ref_images)
    keys = [{img.tobytes() for img in imgs} for imgs in (d.ref_images, d.test_images, d.oracle_images)]
    assert [len(k) for k in keys] == [30, 40, 50]  # no repeats within a split either
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_background_polarity(small):
    for name in NAMES:
        d = small[name]
        median = np.median(np.concatenate([d.ref_images, d.test_images, d.oracle_images]))
        if name == "inverted":
            assert median > 200, name
        elif name == "textured":
            assert 0.15 * 255 - 1 <= median <= 0.45 * 255 + 1, name  # grey textured background
        else:
            assert median < 80, name


def _normalised(images: np.ndarray, size: int = 16) -> np.ndarray:
    """MNIST-style size normalisation: each image's ink (|pixel − median| > 40% of its peak) cropped to its
    bounding box, padded to a square and resized to `size`², peak 1; [n, size²] features."""
    from PIL import Image

    out = []
    for img in images.astype(np.float32):
        a = np.abs(img - np.median(img))
        ys, xs = np.nonzero(a > 0.4 * a.max())
        crop = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        h, w = crop.shape
        s = max(h, w)
        square = np.zeros((s, s), dtype=np.float32)
        square[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = crop
        small = np.asarray(Image.fromarray(square, mode="F").resize((size, size), Image.Resampling.BOX))
        out.append(small.ravel() / max(small.max(), 1e-6))
    return np.stack(out)


@pytest.mark.parametrize("name", ["fonts", "sevenseg"])
def test_nearest_centroid_reads_the_digits(name):
    """Legibility proxy: the classes are distinct and consistent. The jitter (size, position, rotation, font)
    is deliberate, so the classifier sees size-normalised images (on raw pixels it scores only ~0.5)."""
    train_labels = np.repeat(np.arange(10), 20)
    test_labels = np.repeat(np.arange(10), 100)
    train = _normalised(render_far(name, train_labels, seed=3, split="refs"))
    test = _normalised(render_far(name, test_labels, seed=3, split="test"))
    centroids = np.stack([train[train_labels == c].mean(0) for c in range(10)])
    predicted = ((test[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test_labels).mean() > 0.9


def test_write_domain_layout(tmp_path, small):
    d = small["sevenseg"]
    paths = write_domain(d, tmp_path / "dom")
    assert set(paths) == {"refs", "refs_flat", "test", "oracle"}
    assert sorted(p.name for p in paths["refs"].iterdir()) == [str(c) for c in range(10)]
    for key, per_class in (("refs", 3), ("test", 4), ("oracle", 5)):
        for c in range(10):
            assert len(list((paths[key] / str(c)).glob("*.png"))) == per_class, (key, c)
    flat = sorted(paths["refs_flat"].glob("*.png"))
    assert len(flat) == 30 and all(p.is_file() for p in flat)

    from PIL import Image

    first = sorted((paths["refs"] / "0").glob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), d.ref_images[0])


def test_bad_arguments():
    with pytest.raises(KeyError):
        render_far("nope", np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError):
        render_far("fonts", np.array([10]))
    with pytest.raises(ValueError):
        render_far("fonts", np.array([1]), split="train")
    assert render_far("fonts", np.array([], dtype=np.int64)).shape == (0, 32, 32)
