"""Reference bundle: safetensors + JSON round trip, staleness, incompleteness."""

from __future__ import annotations

import json

import pytest
import torch

from storage.bundle import BUNDLE_JSON, BUNDLE_TENSORS, bundle_dir, load_bundle, save_bundle

HASH = "ab" * 32
MODEL = "org/model@rev1"


def tensors() -> dict[str, torch.Tensor]:
    latents = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    return {
        "latents": latents,
        "labels": torch.tensor([0, 3], dtype=torch.int64),
        "view": latents[:, 0],  # shares storage with latents: must still save
        "bandwidth": torch.tensor(1.5, dtype=torch.float64),
    }


def meta(**extra) -> dict:
    return {"content_hash": HASH, "model_id": MODEL, "latent_shape": (4, 8, 8), **extra}


def test_round_trip(tmp_path):
    folder = bundle_dir(tmp_path, HASH, MODEL)
    assert folder == bundle_dir(tmp_path, HASH, MODEL) and folder.parent == tmp_path
    assert folder != bundle_dir(tmp_path, HASH, "other") and folder != bundle_dir(tmp_path, "cd" * 32, MODEL)
    assert save_bundle(folder, tensors(), meta(kernel={"name": "rbf", "scales": [0.5, 1, 2]})) == folder
    loaded, stored = load_bundle(folder, content_hash=HASH, model_id=MODEL, extra_key={"latent_shape": (4, 8, 8)})
    for name, t in tensors().items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype
    assert stored["format_version"] == 1 and stored["created"]
    assert stored["tensors"]["labels"] == {"dtype": "int64", "shape": [2]}
    assert stored["kernel"] == {"name": "rbf", "scales": [0.5, 1, 2]}
    assert sorted(p.name for p in folder.iterdir()) == [BUNDLE_JSON, BUNDLE_TENSORS]
    raw = (folder / BUNDLE_TENSORS).read_bytes()
    assert b"pickle" not in raw and raw[8:9] == b"{"  # safetensors: u64 header length then JSON


def test_missing_or_stale_bundles_are_none(tmp_path):
    folder = tmp_path / "b"
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL) is None
    save_bundle(folder, tensors(), meta(kernel={"name": "rbf"}))
    assert load_bundle(folder, content_hash="cd" * 32, model_id=MODEL) is None
    assert load_bundle(folder, content_hash=HASH, model_id="other") is None
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL, extra_key={"latent_shape": [4, 16, 16]}) is None
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL, extra_key={"kernel": {"name": "imq"}}) is None
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL, extra_key={"unknown": 1}) is None
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL, extra_key={"kernel": {"name": "rbf"}}) is not None


def test_incomplete_or_corrupt_bundles_are_none(tmp_path):
    folder = tmp_path / "b"
    save_bundle(folder, tensors(), meta())
    good = (folder / BUNDLE_TENSORS).read_bytes()
    # A crash after the new tensors but before the new JSON: hashes disagree.
    (folder / BUNDLE_TENSORS).write_bytes(good[:-4] + b"\0\0\0\0")
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL) is None
    (folder / BUNDLE_TENSORS).unlink()
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL) is None
    (folder / BUNDLE_TENSORS).write_bytes(good)
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL) is not None
    (folder / BUNDLE_JSON).write_text("{truncated")
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL) is None
    (folder / BUNDLE_JSON).unlink()  # tensors written, JSON never: incomplete
    assert load_bundle(folder, content_hash=HASH, model_id=MODEL) is None


def test_rebuild_overwrites_stale_bundle(tmp_path):
    folder = tmp_path / "b"
    save_bundle(folder, tensors(), meta(latent_shape=(4, 16, 16)))
    save_bundle(folder, {"latents": torch.zeros(3)}, meta())
    loaded, stored = load_bundle(folder, content_hash=HASH, model_id=MODEL, extra_key={"latent_shape": (4, 8, 8)})
    assert list(loaded) == ["latents"] and stored["latent_shape"] == [4, 8, 8]
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


def test_save_validates_before_writing(tmp_path):
    with pytest.raises(ValueError, match="content_hash"):
        save_bundle(tmp_path / "a", tensors(), {"model_id": MODEL})
    with pytest.raises(ValueError, match="model_id"):
        save_bundle(tmp_path / "a", tensors(), {"content_hash": HASH})
    with pytest.raises(ValueError, match="reserved"):
        save_bundle(tmp_path / "a", tensors(), meta(created="yesterday"))
    with pytest.raises(TypeError):
        save_bundle(tmp_path / "a", tensors(), meta(bad=object()))
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        save_bundle(tmp_path / "a", {"x": [1, 2]}, meta())
    assert not (tmp_path / "a").exists()
    json.dumps(meta())  # the helper itself is JSON-able
