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

import logging
import time
from collections.abc import Callable
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
from storage.run_record import read_run_record
from storage.shards import shard_path

from . import metrics as M
from .features import (
    FeatureExtractor,
    extract,
    load_shipped_classifier,
    resolve_extractor,
    shipped_classifier_available,
)

log = logging.getLogger(__name__)

__all__ = ["EVAL_VERSION", "compare_sets", "evaluate_run"]

EVAL_VERSION = 1
_MANIFEST_COLUMNS = ["key", "shard", "label", "mmd_contribution", "kept"]


class _Warnings:
    """Warnings in order of first appearance; the same message from several places is listed once."""

    def __init__(self) -> None:
        self._where: dict[str, list[str]] = {}

    def add(self, message: str, where: str | None = None) -> None:
        places = self._where.get(message)
        if places is None:
            self._where[message] = places = []
            log.warning("%s%s", f"{where}: " if where else "", message)
        if where and where not in places:
            places.append(where)

    def extend(self, messages: list[str], where: str | None = None) -> None:
        for m in messages:
            self.add(m, where)

    @property
    def items(self) -> list[str]:
        return [f"{', '.join(places)}: {m}" if places else m for m, places in self._where.items()]


def _guarded(fn: Callable[[], dict[str, Any]], where: str, warns: _Warnings) -> dict[str, Any]:
    """Run a metric; a metric that cannot be computed at this size becomes {"error": ...} and a warning."""
    try:
        out = fn()
    except ValueError as e:
        warns.add(f"not computed ({e})", where)
        return {"error": str(e)}
    warns.extend(out.get("warnings", []), where)
    return out


def _compare(
    x: Tensor, y: Tensor, n_permutations: int, kid_subsets: int, k: int, seed: int, where: str, warns: _Warnings
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
    warns = _Warnings()
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


def _rows_for_files(refs: References, files: list[str] | None, warns: _Warnings, what: str) -> np.ndarray:
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
    warns = _Warnings()
    run = Path(run_dir)
    record = read_run_record(run)
    if record is None:
        raise InputError(f"{run}: no run.json (not an `augment` output folder, or the run has not finished)")
    cfg: dict[str, Any] = record.get("config", {})
    prefix = cfg.get("prefix", "synthetic")
    manifest_path = run / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: missing (the run has not finished)")
    table = read_manifest(manifest_path, columns=_MANIFEST_COLUMNS).to_pydict()
    keys = np.asarray(table["key"], dtype=object)
    shards = np.asarray(table["shard"], dtype=np.int64)
    kept = np.asarray(table["kept"], dtype=bool)
    scores = np.asarray(table["mmd_contribution"], dtype=np.float64)
    labels = np.asarray([-1 if v is None else int(v) for v in table["label"]], dtype=np.int64)
    if not kept.any():
        raise InputError(f"{manifest_path}: no kept samples")
    rng = np.random.default_rng(seed)

    # -- samples: a seeded subset of the kept ones, and of the rejected ones in the run's proportion
    kept_rows = np.flatnonzero(kept)
    sel_kept = _choose(rng, kept_rows, max_samples)
    if len(sel_kept) < len(kept_rows):
        warns.add(f"evaluating a random {len(sel_kept)} of the {len(kept_rows)} kept samples (--max-samples)")
    rej_rows = np.flatnonzero(~kept)
    rejected_on_disk = len(rej_rows) > 0 and all(
        shard_path(run, f"{prefix}_rejected", int(s)).is_file() for s in np.unique(shards[rej_rows])
    )
    sel_rej = rej_rows[:0]
    if rejected_on_disk:
        sel_rej = _choose(rng, rej_rows, round(len(sel_kept) / len(kept_rows) * len(rej_rows)))
    key_row = {str(kk): i for i, kk in enumerate(keys)}

    def load(rows: np.ndarray, pfx: str) -> tuple[Tensor, np.ndarray]:
        found, arr, _ = read_samples(run, pfx, zip(shards[rows].tolist(), keys[rows].tolist(), strict=True))
        return _to_images(arr), np.asarray([key_row[kk] for kk in found], dtype=np.int64)

    kept_images, kept_order = load(sel_kept, prefix)
    rej_images, rej_order = load(sel_rej, f"{prefix}_rejected") if len(sel_rej) else (None, sel_rej)
    channels, height, width = kept_images.shape[1:]
    seconds["read_samples"] = time.perf_counter() - t0

    # -- references: held-out (for alignment) and guidance (for memorisation)
    t = time.perf_counter()
    ref_info = record.get("reference", {}) or {}
    class_names: list[str] | None = ref_info.get("class_names")
    guidance_files: list[str] | None = ref_info.get("files")
    heldout_files: list[str] = ref_info.get("heldout_files") or []
    run_refs: References | None = None
    try:
        run_refs = read_references(str(cfg.get("ref")), channels=int(channels), size=(height, width), min_count=1)
    except (InputError, OSError, ValueError) as e:
        warns.add(f"the run's reference folder {cfg.get('ref')} cannot be read ({e})")

    guid_images = guid_labels = None
    if run_refs is not None:
        g_rows = _rows_for_files(run_refs, guidance_files, warns, "guidance references")
        g_rows = _subsample(rng, g_rows, max_references)
        guid_images, guid_labels = run_refs.images[g_rows], _labels_by_name(run_refs, g_rows, class_names)
    reused = False
    if heldout is not None:
        ho = read_references(str(heldout), channels=int(channels), size=(height, width), min_count=2)
        h_rows = _subsample(rng, np.arange(len(ho.files)), max_references)
        held_images, held_labels = ho.images[h_rows], _labels_by_name(ho, h_rows, class_names)
        heldout_source = f"separate folder {heldout} ({len(ho.files)} images)"
        if class_names is not None and held_labels is None:
            warns.add(f"{heldout} has no class sub-folders: class metrics use the guidance references' labels only")
    elif heldout_files and run_refs is not None:
        h_rows = _subsample(rng, _rows_for_files(run_refs, heldout_files, warns, "held-out references"), max_references)
        held_images, held_labels = run_refs.images[h_rows], _labels_by_name(run_refs, h_rows, class_names)
        heldout_source = f"{len(heldout_files)} references the run held out of guidance (holdout={cfg.get('holdout')})"
    elif guid_images is not None:
        held_images, held_labels, reused = guid_images, guid_labels, True
        heldout_source = "none: the guidance references were reused (alignment numbers are optimistic)"
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
    seconds["read_references"] = time.perf_counter() - t

    # -- features
    t = time.perf_counter()
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
    f_kept = extract(extractor, kept_images)
    f_held = extract(extractor, held_images)
    f_guid = None if guid_images is None else (f_held if reused else extract(extractor, guid_images))
    f_rej = extract(extractor, rej_images) if rej_images is not None else None
    seconds["features"] = time.perf_counter() - t

    # -- alignment, fidelity, diversity
    t = time.perf_counter()
    opts = dict(n_permutations=n_permutations, kid_subsets=kid_subsets, k=k, seed=seed, warns=warns)
    sets: dict[str, Any] = {"kept": _compare(f_kept, f_held, where="kept samples", **opts)}
    if f_rej is not None and len(f_rej):
        sets["generated"] = _compare(torch.cat([f_kept, f_rej]), f_held, where="all generated", **opts)
    if f_guid is not None and not reused:
        sets["guidance_references"] = _compare(f_guid, f_held, where="real baseline", **opts)
    seconds["set_metrics"] = time.perf_counter() - t

    # -- memorisation against the guidance references
    t = time.perf_counter()
    mem_target_images = guid_images if guid_images is not None else held_images
    mem_target_feats = f_guid if f_guid is not None else f_held
    memo: dict[str, Any] = {}
    mem_results: dict[str, M.MemorisationResult] = {}
    for space, xs, ys in (
        (extractor.name, f_kept, mem_target_feats),
        ("pixels", kept_images.flatten(1), mem_target_images.flatten(1)),
    ):
        if space in memo:
            continue
        try:
            res = M.memorisation(xs, ys, copy_ratio=copy_ratio)
        except ValueError as e:
            warns.add(f"not computed ({e})", f"memorisation ({space})")
            memo[space] = {"error": str(e)}
            continue
        mem_results[space] = res
        memo[space] = res.summary()
        warns.extend(res.warnings, f"memorisation ({space})")
        if res.is_copy.any():
            warns.add(
                f"{int(res.is_copy.sum())} of {len(res.is_copy)} kept samples are near-copies of a guidance "
                f"reference in {space} space (see the closest pairs)"
            )
    seconds["memorisation"] = time.perf_counter() - t

    # -- class accuracy
    t = time.perf_counter()
    accuracy: dict[str, Any] = {}
    sample_labels = torch.from_numpy(labels[kept_order])
    if class_names is not None and bool((sample_labels >= 0).any()):
        accuracy.update(
            _class_accuracy(
                cfg,
                class_names,
                kept_images,
                sample_labels,
                held_images,
                held_labels,
                f_kept,
                f_held,
                f_guid if not reused else None,
                guid_labels,
                classifier,
                device,
                k,
                warns,
            )
        )
    seconds["class_accuracy"] = time.perf_counter() - t

    filter_scores = M.filter_score_summary(scores, kept)
    if len(scores) > 1 and float(np.ptp(scores)) == 0.0:
        warns.add(
            "every filter score is identical (the kernel underflowed: samples far from every reference?), "
            "so the filter's choice of kept samples was arbitrary"
        )
    if not (~kept).any():
        warns.add("the filter kept every sample (keep=1): no rejected samples to compare")
    elif not rejected_on_disk:
        warns.add("rejected samples are not on disk (run with --keep-rejected to evaluate and show them)")

    from pipeline import __version__

    result: dict[str, Any] = {
        "eval_version": EVAL_VERSION,
        "version": __version__,
        "run_dir": str(run),
        "config_hash": record.get("config_hash"),
        "model_id": record.get("model_id"),
        "run_summary": _run_summary(cfg),
        "settings": {
            "features": extractor.name,
            "feature_description": extractor.description,
            "feature_dim": int(f_kept.shape[1]),
            "heldout_source": heldout_source,
            "heldout_reused_guidance_references": reused,
            "max_samples": max_samples,
            "max_references": max_references,
            "seed": seed,
            "n_permutations": n_permutations,
            "kid_subsets": kid_subsets,
            "k": k,
            "copy_ratio": copy_ratio,
            "classifier": classifier,
            "image_shape": [int(channels), int(height), int(width)],
        },
        "counts": {
            "generated": int(len(kept)),
            "kept": int(kept.sum()),
            "rejected": int((~kept).sum()),
            "evaluated_kept": int(len(kept_images)),
            "evaluated_rejected": 0 if rej_images is None else int(len(rej_images)),
            "heldout_references": int(len(held_images)),
            "guidance_references": None if guid_images is None else int(len(guid_images)),
        },
        "sets": sets,
        "memorisation": memo,
        "class_accuracy": accuracy,
        "filter_scores": filter_scores,
        "label_fidelity": record.get("label_fidelity"),
        "pilot": record.get("pilot"),
        "warnings": warns.items,
    }
    utility = read_optional_json(run / UTILITY_FILE)  # from an earlier `augment utility` on this run
    if utility is not None:
        result["utility"] = utility

    if write:
        t = time.perf_counter()
        target = Path(out_dir) if out_dir is not None else run
        figures = _figures(
            kept_images,
            rej_images,
            held_images,
            None if reused else guid_images,
            mem_target_images,
            mem_results.get(extractor.name),
            scores,
            kept,
            extractor.name,
            record.get("pilot"),
        )
        seconds["figures"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        result["seconds"] = {k_: round(v, 3) for k_, v in seconds.items()}
        result["files"] = {"eval_json": EVAL_FILE, "report_html": REPORT_FILE}
        from .report import render_report

        write_report_html(target, render_report(result, figures))
        write_eval_json(target, result)
    else:
        seconds["total"] = time.perf_counter() - t0
        result["seconds"] = {k_: round(v, 3) for k_, v in seconds.items()}
    return result


def _class_accuracy(
    cfg,
    class_names,
    kept_images,
    sample_labels,
    held_images,
    held_labels,
    f_kept,
    f_held,
    f_guid,
    guid_labels,
    classifier,
    device,
    k,
    warns: _Warnings,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    predict: Callable[[Tensor], Tensor] | None = None
    description = ""
    if classifier is not None:
        from pipeline.adapters import load_object

        fn = load_object(classifier)

        def predict(images: Tensor) -> Tensor:
            return torch.cat([torch.as_tensor(fn(c)).detach().cpu().argmax(1) for c in images.split(256)])

        description = f"user classifier {classifier}"
    elif cfg.get("model") in (None, "shipped") and shipped_classifier_available():
        from pipeline.models.loading import resolve_device
        from pipeline.worker import model_label_map

        from .features import classifier_extractor

        clf = load_shipped_classifier(device=resolve_device(device))
        label_map = model_label_map(class_names, int(clf.config["num_classes"]))
        if label_map is None:
            warns.add("class folders are not digits: the shipped digit classifier cannot score these classes")
        else:
            to_run = {digit: cid for cid, digit in label_map.items()}
            feats = classifier_extractor(clf)

            def predict(images: Tensor) -> Tensor:
                digits = torch.cat([clf.fc(feats.fn(c)).argmax(1).cpu() for c in images.split(256)])
                return torch.tensor([to_run.get(int(d), -2) for d in digits], dtype=torch.long)

            description = "shipped digit classifier (independent of guidance)"
    if predict is not None:
        with torch.no_grad():
            res = M.class_accuracy(predict(kept_images), sample_labels, class_names)
            out["classifier"] = dict(res, description=description + " on the kept samples")
            warns.extend(res["warnings"], "class accuracy")
            if held_labels is not None and bool((held_labels >= 0).any()):
                ceiling = M.class_accuracy(predict(held_images), held_labels, class_names)
                out["classifier_on_references"] = dict(
                    ceiling, description=description + " on the held-out references (its ceiling)"
                )
    if held_labels is not None and bool((held_labels >= 0).any()):
        use = held_labels >= 0
        pred = M.knn_predict(f_kept, f_held[use], held_labels[use], k=k)
        res = M.class_accuracy(pred, sample_labels, class_names)
        out["knn"] = dict(res, description=f"{k}-NN vote among held-out references in the feature space")
        if f_guid is not None and guid_labels is not None and bool((guid_labels >= 0).any()):
            g = guid_labels >= 0
            base = M.class_accuracy(
                M.knn_predict(f_held[use], f_guid[g], guid_labels[g], k=k), held_labels[use], class_names
            )
            out["knn_real_baseline"] = dict(
                base, description=f"{k}-NN of held-out references among guidance references (real data)"
            )
    return out


def _figures(
    kept_images: Tensor,
    rej_images: Tensor | None,
    held_images: Tensor,
    guid_images: Tensor | None,
    mem_images: Tensor,
    mem: M.MemorisationResult | None,
    scores: np.ndarray,
    kept: np.ndarray,
    feature_name: str,
    pilot: dict[str, Any] | None = None,
) -> list[tuple[str, bytes, str]]:
    from .report import grids_figure, histogram_figure, pairs_figure, pilot_figure

    figures = []
    panels = [("kept samples", kept_images)]
    if rej_images is not None and len(rej_images):
        panels.append(("rejected samples", rej_images))
    panels.append(("held-out references", held_images))
    if guid_images is not None:
        panels.append(("guidance references", guid_images))
    figures.append(("Sample grids", grids_figure(panels), "Random samples of each set, side by side."))
    figures.append(
        (
            "Filter scores",
            histogram_figure(
                {"kept": scores[kept], "rejected": scores[~kept]},
                title="per-sample MMD² contribution (every generated sample)",
                xlabel="leave-one-out MMD² contribution (lower = helps alignment)",
            ),
            "The filter keeps the lowest scores of each shard; overlap means the filter separates little.",
        )
    )
    if mem is not None:
        figures.append(
            (
                "Nearest-reference distances",
                histogram_figure(
                    {
                        "sample → nearest guidance reference": mem.sample_nn_distance,
                        "reference → nearest other reference": mem.reference_nn_distance,
                    },
                    title=f"nearest-neighbour distances ({feature_name} features)",
                    xlabel="Euclidean distance",
                    vlines={"copy threshold": mem.threshold},
                ),
                "Samples far left of the references' own distances are suspiciously close to one reference.",
            )
        )
        order = torch.argsort(mem.sample_nn_distance)[:8]
        figures.append(
            (
                "Closest pairs",
                pairs_figure(
                    kept_images[order],
                    mem_images[mem.nearest_reference[order]],
                    mem.sample_nn_distance[order].tolist(),
                    mem.is_copy[order].tolist(),
                ),
                f"The kept samples nearest to a guidance reference ({feature_name} features), above that reference; "
                "near-copies in red.",
            )
        )
    if pilot and pilot.get("candidates"):
        figures.append(
            (
                "Strength pilot",
                pilot_figure(pilot),
                "MMD² of each candidate strength's pilot batch to the held-out references; crosses violate a "
                "fidelity constraint (precision, coverage, class histogram, garbage); the circle is the choice.",
            )
        )
    return figures
