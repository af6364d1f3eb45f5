"""`augment eval` as a plain function: read a run folder, compute every metric, write eval.json and
report.html.

What is compared with what:
- alignment / fidelity / diversity (MMD² + permutation p-value, KID, Fréchet distance, precision /
  recall / density / coverage): the kept samples against the *held-out* references (a separate folder,
  or the run's holdout split recorded in run.json; else the guidance references themselves, which is
  optimistic and said so). With rejected shards, also all generated samples (kept + rejected, sampled in
  the run's proportions); with a real held-out split, also the guidance references against the held-out
  ones: the score of real data, the floor to read the others against.
- memorisation: the kept samples against the *guidance* references (the images the run could copy),
  in the feature space and in pixel space.
- class accuracy (labelled runs): the shipped digit classifier when the run used the shipped prior and
  its class folders are digits, or a user classifier; always also a k-NN vote among the held-out
  references in the feature space.
- the filter's scores: every row of the manifest, kept vs rejected.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from storage.errors import InputError
from storage.eval_io import (
    EVAL_FILE,
    REPORT_FILE,
    UTILITY_FILE,
    read_optional_json,
    read_samples,
    write_eval_json,
    write_report_html,
)
from storage.manifest import read_manifest
from storage.references import References, read_references
from storage.run_folder import RunFolder
from storage.shards import REJECTED_DIR, SHARDS_DIR, shard_path

from ..measures import metrics as M
from ..measures.features import FeatureExtractor, extract, resolve_extractor
from .class_accuracy import class_accuracy_metrics
from .figures import run_figures
from .warnings_log import Warnings

log = logging.getLogger(__name__)

__all__ = ["EVAL_VERSION", "compare_sets", "evaluate_run"]

EVAL_VERSION = 1
_MANIFEST_COLUMNS = ["key", "shard", "label", "mmd_contribution", "kept"]


def _guarded(fn: Callable[[], dict[str, Any]], where: str, warns: Warnings) -> dict[str, Any]:
    """Run a metric; a metric that cannot be computed at this size becomes {"error": ...} and a warning."""
    try:
        out = fn()
    except ValueError as e:
        warns.add(f"not computed ({e})", where)
        return {"error": str(e)}
    warns.extend(out.get("warnings", []), where)
    return out


def _compare(
    x: Tensor, y: Tensor, n_permutations: int, kid_subsets: int, k: int, seed: int, where: str, warns: Warnings
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mmd": _guarded(lambda: M.mmd2_permutation_test(x, y, n_permutations=n_permutations, seed=seed), where, warns),
        "kid": _guarded(lambda: M.kid(x, y, n_subsets=kid_subsets, seed=seed), where, warns),
        "fd": _guarded(lambda: M.frechet_distance(x, y), where, warns),
    }
    k_eff = min(k, x.shape[0] - 1, y.shape[0] - 1)
    if 1 <= k_eff < k:
        warns.add(f"k of precision/recall/density/coverage lowered from {k} to {k_eff} (too few samples)", where)
    out["prdc"] = _guarded(lambda: M.prdc(x, y, k=max(k_eff, 1)), where, warns)
    return out


def compare_sets(
    x: Tensor,
    y: Tensor,
    *,
    n_permutations: int = 1000,
    kid_subsets: int = 100,
    k: int = 5,
    seed: int = 0,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """MMD² (+ permutation p-value), KID, Fréchet distance and precision/recall/density/coverage of
    features ``x`` [n, F] against references ``y`` [m, F]: {"mmd": ..., "kid": ..., "fd": ..., "prdc": ...}.

    A metric that cannot be computed at this size is {"error": "..."}; its warnings (and every other
    metric's) are appended to ``warnings`` when a list is given.
    """
    warns = Warnings()
    out = _compare(x, y, n_permutations, kid_subsets, k, seed, "", warns)
    if warnings is not None:
        warnings.extend(warns.items)
    return out


# ------------------------------------------------------------------------------------------------ inputs


def _to_images(arr: np.ndarray) -> Tensor:
    """uint8 [n, H, W, C] -> float32 [n, C, H, W] in [-1, 1]."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _choose(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    count = min(int(count), len(pool))
    return np.sort(rng.choice(pool, size=count, replace=False)) if count else pool[:0]


def _rows_for_files(refs: References, files: list[str] | None, warns: Warnings, what: str) -> np.ndarray:
    if files is None:
        return np.arange(len(refs.files))
    index = {f: i for i, f in enumerate(refs.files)}
    rows = [index[f] for f in files if f in index]
    if len(rows) < len(files):
        warns.add(f"{len(files) - len(rows)} of the {what} listed in run.json are no longer in the reference folder")
    return np.asarray(rows, dtype=np.int64)


def _labels_by_name(refs: References, rows: np.ndarray, class_names: list[str] | None) -> Tensor | None:
    """Labels of ``rows`` as ids into the run's ``class_names`` (by folder name; -1 if unknown)."""
    if refs.labels is None or class_names is None:
        return None
    index = {name: i for i, name in enumerate(class_names)}
    names = refs.class_names or []
    mapped = [index.get(names[int(c)], -1) for c in refs.labels[torch.as_tensor(rows, dtype=torch.long)]]
    return torch.tensor(mapped, dtype=torch.long)


def _subsample(rng: np.random.Generator, rows: np.ndarray, limit: int) -> np.ndarray:
    return rows if len(rows) <= limit else np.sort(rng.choice(rows, size=limit, replace=False))


def _run_summary(cfg: dict[str, Any]) -> str:
    keys = ("model", "n", "guidance", "strength", "kernel", "keep", "steps", "sampler", "cfg_scale", "ig_scale")
    return ", ".join(
        f"{k}={cfg.get(k) if cfg.get(k) is not None else 'shipped' if k == 'model' else None}" for k in keys
    )


# --------------------------------------------------------------------------------------------- the command


@dataclass
class _Run:
    """A finished run folder: its record and its manifest's columns (one entry per generated sample)."""

    path: Path
    record: dict[str, Any]
    cfg: dict[str, Any]
    prefix: str
    keys: np.ndarray
    shards: np.ndarray
    kept: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class _Samples:
    """The evaluated samples: a seeded subset of the kept ones, and of the rejected ones when on disk."""

    kept_images: Tensor
    kept_order: np.ndarray  # manifest rows of kept_images
    rej_images: Tensor | None
    rejected_on_disk: bool


@dataclass
class _ReferenceSets:
    """The held-out references (alignment) and the guidance references (memorisation, real baseline)."""

    held_images: Tensor
    held_labels: Tensor | None
    guid_images: Tensor | None
    guid_labels: Tensor | None
    reused: bool  # no held-out set: the guidance references stand in (optimistic)
    source: str


@dataclass
class _Features:
    extractor: FeatureExtractor
    kept: Tensor
    held: Tensor
    guid: Tensor | None
    rej: Tensor | None


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str, since: float | None = None) -> Iterator[None]:
    start = time.perf_counter() if since is None else since
    yield
    seconds[name] = time.perf_counter() - start


def evaluate_run(
    run_dir: str | Path,
    heldout: str | None = None,
    features: str = "auto",
    max_samples: int = 2000,
    seed: int = 0,
    *,
    max_references: int = 2000,
    n_permutations: int = 1000,
    kid_subsets: int = 100,
    k: int = 5,
    copy_ratio: float = 0.5,
    classifier: str | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished `augment` run folder; returns the eval.json dict (and writes eval.json and
    report.html into ``out_dir``, default the run folder, unless ``write`` is False).

    Args:
        run_dir: output folder of `augment` (run.json, manifest.parquet, shards/).
        heldout: a separate folder of held-out references; default: the run's holdout split if it
            recorded one (run.json reference.heldout_files), else the guidance references (optimistic).
        features: "auto" | "classifier" | "vae" | "pixels" | "pkg.mod:fn" (see `features.resolve_extractor`).
        max_samples: at most this many kept samples are evaluated (a seeded random subset).
        seed: seeds the subsets, the permutations and the KID subsets.
        max_references: at most this many held-out (and guidance) references.
        n_permutations: permutations of the MMD² test.
        kid_subsets: subsets KID is averaged over.
        k: neighbours of the precision/recall/density/coverage balls.
        copy_ratio: memorisation rule (see `metrics.MemorisationResult`).
        classifier: "pkg.mod:fn" with fn(images in [-1, 1]) -> logits [n, K] over the run's classes
            (class ids as in run.json reference.class_names); default: the shipped digit classifier for
            shipped-prior runs with digit class folders.
        device: where feature extractors run ("auto", "cpu", "cuda", ...).
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    warns = Warnings()
    rng = np.random.default_rng(seed)  # one stream, drawn from in this order: samples, then references
    with _timed(seconds, "read_samples", since=t0):
        run = _read_run(run_dir)
        samples = _read_samples(run, rng, max_samples, warns)
    with _timed(seconds, "read_references"):
        refs = _read_reference_sets(run, heldout, tuple(samples.kept_images.shape[1:]), rng, max_references, warns)
    with _timed(seconds, "features"):
        feats = _extract_features(run.cfg, samples, refs, features, device, warns)
    with _timed(seconds, "set_metrics"):
        opts = dict(n_permutations=n_permutations, kid_subsets=kid_subsets, k=k, seed=seed)
        sets = _set_metrics(feats, refs, opts, warns)
    with _timed(seconds, "memorisation"):
        memo, mem_results = _memorisation(samples, refs, feats, copy_ratio, warns)
    with _timed(seconds, "class_accuracy"):
        accuracy = _class_accuracy_section(run, samples, refs, feats, classifier, device, k, warns)
    options = dict(
        max_samples=max_samples,
        max_references=max_references,
        seed=seed,
        n_permutations=n_permutations,
        kid_subsets=kid_subsets,
        k=k,
        copy_ratio=copy_ratio,
        classifier=classifier,
    )
    settings = _settings(feats, refs, samples, options)
    result = _result(run, samples, refs, settings, sets, memo, accuracy, _filter_scores(run, samples, warns), warns)
    figures: list[tuple[str, bytes, str]] = []
    if write:
        with _timed(seconds, "figures"):
            figures = _run_figures(run, samples, refs, feats, mem_results)
    seconds["total"] = time.perf_counter() - t0
    result["seconds"] = {k_: round(v, 3) for k_, v in seconds.items()}
    if write:
        _write_outputs(result, figures, Path(out_dir) if out_dir is not None else run.path)
    return result


def _write_outputs(result: dict[str, Any], figures: list[tuple[str, bytes, str]], target: Path) -> None:
    """report.html and eval.json into `target` (the result names both files)."""
    from .report import render_report

    result["files"] = {"eval_json": EVAL_FILE, "report_html": REPORT_FILE}
    write_report_html(target, render_report(result, figures))
    write_eval_json(target, result)


def _read_run(run_dir: str | Path) -> _Run:
    """run.json and the manifest's columns; InputError if the folder holds no finished run."""
    path = Path(run_dir)
    folder = RunFolder(path)
    record = folder.require_finished()
    cfg: dict[str, Any] = record.get("config", {})
    manifest_path = folder.manifest_path
    table = read_manifest(manifest_path, columns=_MANIFEST_COLUMNS).to_pydict()
    kept = np.asarray(table["kept"], dtype=bool)
    if not kept.any():
        raise InputError(f"{manifest_path}: no kept samples")
    return _Run(
        path=path,
        record=record,
        cfg=cfg,
        prefix=cfg.get("prefix", "synthetic"),
        keys=np.asarray(table["key"], dtype=object),
        shards=np.asarray(table["shard"], dtype=np.int64),
        kept=kept,
        scores=np.asarray(table["mmd_contribution"], dtype=np.float64),
        labels=np.asarray([-1 if v is None else int(v) for v in table["label"]], dtype=np.int64),
    )


def _read_samples(run: _Run, rng: np.random.Generator, max_samples: int, warns: Warnings) -> _Samples:
    """A seeded subset of the kept samples, and of the rejected ones in the run's proportion (if on disk)."""
    kept_rows = np.flatnonzero(run.kept)
    sel_kept = _choose(rng, kept_rows, max_samples)
    if len(sel_kept) < len(kept_rows):
        warns.add(f"evaluating a random {len(sel_kept)} of the {len(kept_rows)} kept samples (--max-samples)")
    rej_rows = np.flatnonzero(~run.kept)
    rejected_on_disk = len(rej_rows) > 0 and all(
        shard_path(run.path, f"{run.prefix}_rejected", int(s), folder=REJECTED_DIR).is_file()
        for s in np.unique(run.shards[rej_rows])
    )
    sel_rej = rej_rows[:0]
    if rejected_on_disk:
        sel_rej = _choose(rng, rej_rows, round(len(sel_kept) / len(kept_rows) * len(rej_rows)))
    key_row = {str(kk): i for i, kk in enumerate(run.keys)}

    def load(rows: np.ndarray, prefix: str, folder: str = SHARDS_DIR) -> tuple[Tensor, np.ndarray]:
        pairs = zip(run.shards[rows].tolist(), run.keys[rows].tolist(), strict=True)
        found, arr, _ = read_samples(run.path, prefix, pairs, folder=folder)
        return _to_images(arr), np.asarray([key_row[kk] for kk in found], dtype=np.int64)

    kept_images, kept_order = load(sel_kept, run.prefix)
    rej_images = load(sel_rej, f"{run.prefix}_rejected", REJECTED_DIR)[0] if len(sel_rej) else None
    return _Samples(kept_images, kept_order, rej_images, rejected_on_disk)


def _read_reference_sets(
    run: _Run,
    heldout: str | None,
    image_shape: tuple[int, ...],
    rng: np.random.Generator,
    max_references: int,
    warns: Warnings,
) -> _ReferenceSets:
    """The held-out set: a separate folder, else the run's holdout split, else the guidance references
    themselves (optimistic, said so); and the guidance references, if the run's folder can be read."""
    channels, height, width = image_shape
    cfg = run.cfg
    ref_info = run.record.get("reference", {}) or {}
    class_names: list[str] | None = ref_info.get("class_names")
    heldout_files: list[str] = ref_info.get("heldout_files") or []
    run_refs: References | None = None
    try:
        run_refs = read_references(str(cfg.get("ref")), channels=int(channels), size=(height, width), min_count=1)
    except (InputError, OSError, ValueError) as e:
        warns.add(f"the run's reference folder {cfg.get('ref')} cannot be read ({e})")

    guid_images = guid_labels = None
    if run_refs is not None:
        g_rows = _rows_for_files(run_refs, ref_info.get("files"), warns, "guidance references")
        g_rows = _subsample(rng, g_rows, max_references)
        guid_images, guid_labels = run_refs.images[g_rows], _labels_by_name(run_refs, g_rows, class_names)
    reused = False
    if heldout is not None:
        ho = read_references(str(heldout), channels=int(channels), size=(height, width), min_count=2)
        h_rows = _subsample(rng, np.arange(len(ho.files)), max_references)
        held_images, held_labels = ho.images[h_rows], _labels_by_name(ho, h_rows, class_names)
        source = f"separate folder {heldout} ({len(ho.files)} images)"
        if class_names is not None and held_labels is None:
            warns.add(f"{heldout} has no class sub-folders: class metrics use the guidance references' labels only")
    elif heldout_files and run_refs is not None:
        h_rows = _subsample(rng, _rows_for_files(run_refs, heldout_files, warns, "held-out references"), max_references)
        held_images, held_labels = run_refs.images[h_rows], _labels_by_name(run_refs, h_rows, class_names)
        source = f"{len(heldout_files)} references the run held out of guidance (holdout={cfg.get('holdout')})"
    elif guid_images is not None:
        held_images, held_labels, reused = guid_images, guid_labels, True
        source = "none: the guidance references were reused (alignment numbers are optimistic)"
        warns.add(
            "no held-out references (run with --holdout or pass --heldout DIR): metrics compare the samples "
            "with the very references that guided them, so alignment is optimistic"
        )
    else:
        raise InputError(
            f"no references to evaluate against: the run's reference folder {cfg.get('ref')} cannot be read; "
            "pass --heldout DIR"
        )
    if guid_images is None:
        warns.add("memorisation is measured against the held-out references (guidance references unavailable)")
    return _ReferenceSets(held_images, held_labels, guid_images, guid_labels, reused, source)


def _extract_features(
    cfg: dict[str, Any], samples: _Samples, refs: _ReferenceSets, features: str, device: str, warns: Warnings
) -> _Features:
    """Every image set in the feature space (`features`; the run's model is loaded only if it needs it)."""
    loaded: dict[str, Any] = {}

    def model_loader() -> Any:
        if "model" not in loaded:
            from pipeline.models.loading import load_model

            spec = cfg.get("model")
            try:
                loaded["model"] = load_model(spec, device=device, dtype="float32")
            except (OSError, ValueError, ImportError) as e:
                raise ValueError(
                    f"cannot load the run's model {spec or 'shipped'} for VAE features ({e}); "
                    "pass --features pixels or an extractor 'pkg.mod:fn'"
                ) from e
        return loaded["model"]

    extractor: FeatureExtractor = resolve_extractor(
        features, run_model=cfg.get("model"), device=device, model_loader=model_loader
    )
    if features == "auto" and cfg.get("model") in (None, "shipped") and extractor.name != "classifier":
        warns.add("the shipped classifier is not installed: features are VAE latents instead")
    f_kept = extract(extractor, samples.kept_images)
    f_held = extract(extractor, refs.held_images)
    f_guid = None if refs.guid_images is None else (f_held if refs.reused else extract(extractor, refs.guid_images))
    f_rej = extract(extractor, samples.rej_images) if samples.rej_images is not None else None
    return _Features(extractor, f_kept, f_held, f_guid, f_rej)


def _set_metrics(feats: _Features, refs: _ReferenceSets, opts: dict[str, Any], warns: Warnings) -> dict[str, Any]:
    """Alignment, fidelity and diversity against the held-out set: kept samples, all generated ones (with
    rejected shards), and the guidance references (the real-data baseline, with a real held-out set)."""
    opts = dict(opts, warns=warns)
    sets: dict[str, Any] = {"kept": _compare(feats.kept, feats.held, where="kept samples", **opts)}
    if feats.rej is not None and len(feats.rej):
        sets["generated"] = _compare(torch.cat([feats.kept, feats.rej]), feats.held, where="all generated", **opts)
    if feats.guid is not None and not refs.reused:
        sets["guidance_references"] = _compare(feats.guid, feats.held, where="real baseline", **opts)
    return sets


def _memorisation_targets(refs: _ReferenceSets, feats: _Features) -> tuple[Tensor, Tensor]:
    """(images, features) memorisation is measured against: the guidance references, else the held-out."""
    if refs.guid_images is None or feats.guid is None:
        return refs.held_images, feats.held
    return refs.guid_images, feats.guid


def _memorisation(
    samples: _Samples, refs: _ReferenceSets, feats: _Features, copy_ratio: float, warns: Warnings
) -> tuple[dict[str, Any], dict[str, M.MemorisationResult]]:
    """Nearest-reference distances of the kept samples in the feature space and in pixel space."""
    target_images, target_feats = _memorisation_targets(refs, feats)
    memo: dict[str, Any] = {}
    results: dict[str, M.MemorisationResult] = {}
    for space, xs, ys in (
        (feats.extractor.name, feats.kept, target_feats),
        ("pixels", samples.kept_images.flatten(1), target_images.flatten(1)),
    ):
        if space in memo:
            continue
        try:
            res = M.memorisation(xs, ys, copy_ratio=copy_ratio)
        except ValueError as e:
            warns.add(f"not computed ({e})", f"memorisation ({space})")
            memo[space] = {"error": str(e)}
            continue
        results[space] = res
        memo[space] = res.summary()
        warns.extend(res.warnings, f"memorisation ({space})")
        if res.is_copy.any():
            warns.add(
                f"{int(res.is_copy.sum())} of {len(res.is_copy)} kept samples are near-copies of a guidance "
                f"reference in {space} space (see the closest pairs)"
            )
    return memo, results


def _class_accuracy_section(
    run: _Run,
    samples: _Samples,
    refs: _ReferenceSets,
    feats: _Features,
    classifier: str | None,
    device: str,
    k: int,
    warns: Warnings,
) -> dict[str, Any]:
    """Class accuracy of labelled runs (empty for unlabelled ones)."""
    class_names = (run.record.get("reference", {}) or {}).get("class_names")
    sample_labels = torch.from_numpy(run.labels[samples.kept_order])
    if class_names is None or not bool((sample_labels >= 0).any()):
        return {}
    return class_accuracy_metrics(
        run.cfg,
        class_names,
        samples.kept_images,
        sample_labels,
        refs.held_images,
        refs.held_labels,
        feats.kept,
        feats.held,
        feats.guid if not refs.reused else None,
        refs.guid_labels,
        classifier,
        device,
        k,
        warns,
    )


def _filter_scores(run: _Run, samples: _Samples, warns: Warnings) -> dict[str, Any]:
    """The filter's scores, kept vs rejected, with what they cannot show."""
    summary = M.filter_score_summary(run.scores, run.kept)
    if len(run.scores) > 1 and float(np.ptp(run.scores)) == 0.0:
        warns.add(
            "every filter score is identical (the kernel underflowed: samples far from every reference?), "
            "so the filter's choice of kept samples was arbitrary"
        )
    if not (~run.kept).any():
        warns.add("the filter kept every sample (keep=1): no rejected samples to compare")
    elif not samples.rejected_on_disk:
        warns.add("rejected samples are not on disk (run with --keep-rejected to evaluate and show them)")
    return summary


def _settings(feats: _Features, refs: _ReferenceSets, samples: _Samples, options: dict[str, Any]) -> dict[str, Any]:
    """What the evaluation used: feature space, held-out source, the options, the image shape."""
    return {
        "features": feats.extractor.name,
        "feature_description": feats.extractor.description,
        "feature_dim": int(feats.kept.shape[1]),
        "heldout_source": refs.source,
        "heldout_reused_guidance_references": refs.reused,
        **options,
        "image_shape": [int(d) for d in samples.kept_images.shape[1:]],
    }


def _run_figures(
    run: _Run, samples: _Samples, refs: _ReferenceSets, feats: _Features, mem_results: dict[str, M.MemorisationResult]
) -> list[tuple[str, bytes, str]]:
    return run_figures(
        samples.kept_images,
        samples.rej_images,
        refs.held_images,
        None if refs.reused else refs.guid_images,
        _memorisation_targets(refs, feats)[0],
        mem_results.get(feats.extractor.name),
        run.scores,
        run.kept,
        feats.extractor.name,
        run.record.get("pilot"),
    )


def _result(
    run: _Run,
    samples: _Samples,
    refs: _ReferenceSets,
    settings: dict[str, Any],
    sets: dict[str, Any],
    memo: dict[str, Any],
    accuracy: dict[str, Any],
    filter_scores: dict[str, Any],
    warns: Warnings,
) -> dict[str, Any]:
    """The eval.json dict (without timings and file names)."""
    from pipeline import __version__

    result: dict[str, Any] = {
        "eval_version": EVAL_VERSION,
        "version": __version__,
        "run_dir": str(run.path),
        "config_hash": run.record.get("config_hash"),
        "model_id": run.record.get("model_id"),
        "run_summary": _run_summary(run.cfg),
        "settings": settings,
        "counts": {
            "generated": int(len(run.kept)),
            "kept": int(run.kept.sum()),
            "rejected": int((~run.kept).sum()),
            "evaluated_kept": int(len(samples.kept_images)),
            "evaluated_rejected": 0 if samples.rej_images is None else int(len(samples.rej_images)),
            "heldout_references": int(len(refs.held_images)),
            "guidance_references": None if refs.guid_images is None else int(len(refs.guid_images)),
        },
        "sets": sets,
        "memorisation": memo,
        "class_accuracy": accuracy,
        "filter_scores": filter_scores,
        "label_fidelity": run.record.get("label_fidelity"),
        "pilot": run.record.get("pilot"),
        "warnings": warns.items,
    }
    utility = read_optional_json(run.path / UTILITY_FILE)  # from an earlier `augment utility` on this run
    if utility is not None:
        result["utility"] = utility
    return result
