"""A self-contained HTML report: matplotlib figures (Agg) embedded as base64 PNG, the metric tables,
the warnings and the settings. No external files, scripts or fonts: it reads offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = [
    "figure_png",
    "grids_figure",
    "histogram_figure",
    "image_grid",
    "pairs_figure",
    "pilot_figure",
    "pilot_section",
    "render_report",
    "utility_section",
    "with_utility_section",
]

_DPI = 100


def image_grid(images: Tensor, ncol: int = 8, pad: int = 1) -> np.ndarray:
    """Images [n, C, H, W] in [-1, 1] -> one float array [rows·(H+pad)+pad, ncol·(W+pad)+pad, 3] in [0, 1]
    (grayscale repeated to RGB; white padding)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    ncol = max(1, min(ncol, n))
    nrow = max(1, math.ceil(n / ncol))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    return grid


def figure_png(fig: Any) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def grids_figure(panels: Sequence[tuple[str, Tensor]], ncol: int = 8, max_images: int = 64) -> bytes:
    """Side-by-side sample grids, one panel per (title, images [n, C, H, W] in [-1, 1])."""
    panels = [(t, im[:max_images]) for t, im in panels if im is not None and len(im)]
    if not panels:
        raise ValueError("no images to draw")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels, strict=True):
        ax.imshow(image_grid(images, ncol=ncol), interpolation="nearest")
        ax.set_title(f"{title}\n({len(images)} shown)", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    return figure_png(fig)


def pairs_figure(samples: Tensor, references: Tensor, distances: Sequence[float], copies: Sequence[bool]) -> bytes:
    """Top row: samples closest to a reference; bottom row: that nearest reference (distance above)."""
    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(1.25 * n + 0.6, 3.0), squeeze=False)
    for i in range(n):
        for row, img in ((0, samples[i]), (1, references[i])):
            ax = axes[row][i]
            ax.imshow(image_grid(img[None], ncol=1, pad=0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        colour = "#c0392b" if copies[i] else "black"
        axes[0][i].set_title(f"d={distances[i]:.3g}" + ("\ncopy" if copies[i] else ""), fontsize=8, color=colour)
    axes[0][0].set_ylabel("sample", fontsize=9)
    axes[1][0].set_ylabel("nearest\nreference", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def histogram_figure(
    groups: dict[str, np.ndarray | Tensor],
    *,
    title: str,
    xlabel: str,
    vlines: dict[str, float] | None = None,
    bins: int = 40,
) -> bytes:
    """Overlaid density histograms of named 1-D groups (empty groups are skipped), optional vertical lines."""
    data = {k: np.asarray(torch.as_tensor(v).double().numpy()).ravel() for k, v in groups.items()}
    data = {k: v[np.isfinite(v)] for k, v in data.items() if v.size}
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    if data:
        lo = min(float(v.min()) for v in data.values())
        hi = max(float(v.max()) for v in data.values())
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for name, v in data.items():
            ax.hist(v, bins=edges, alpha=0.55, density=True, label=f"{name} (n={v.size})")
    for name, x in (vlines or {}).items():
        if x is not None and math.isfinite(x):
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
            ax.text(x, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=8, va="top")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if data:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def pilot_figure(pilot: dict[str, Any]) -> bytes:
    """`--strength auto`: each candidate's MMD² to the held-out references against its strength (feasible
    ●, violating a constraint ✕), unguided as a dashed line, the choice circled."""
    cands = sorted(pilot.get("candidates", []), key=lambda c: c["strength"])
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ok = [c for c in cands if c["feasible"]]
    bad = [c for c in cands if not c["feasible"]]
    if ok:
        ax.plot([c["strength"] for c in ok], [c["mmd2"] for c in ok], "o", label="feasible")
    if bad:
        xs, ys = [c["strength"] for c in bad], [c["mmd2"] for c in bad]
        ax.plot(xs, ys, "x", color="#c0392b", label="violates a constraint")
    base = pilot.get("baseline") or {}
    if base.get("mmd2") is not None:
        ax.axhline(base["mmd2"], color="black", linestyle="--", linewidth=1, label="unguided")
    chosen = [c for c in cands if c["strength"] == pilot.get("chosen")]
    if chosen:
        ax.plot(chosen[0]["strength"], chosen[0]["mmd2"], "o", markersize=14, fillstyle="none", color="#27ae60",
                label=f"chosen s = {pilot['chosen']:.3g}")  # fmt: skip
    if cands:
        ax.set_xscale("log")
    ax.set_xlabel("guidance strength s")
    ax.set_ylabel("MMD² to held-out references")
    ax.set_title(f"strength pilot ({pilot.get('feature_space', '')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def pilot_section(pilot: dict[str, Any] | None) -> str:
    """The pilot's candidates as an HTML table (empty string when the run did not use `--strength auto`)."""
    if not pilot:
        return ""
    parts = [
        "<h2>Strength pilot (<code>--strength auto</code>)</h2>",
        f'<p class="muted">chosen s = {_e(fmt(pilot.get("chosen")))}: {_e(pilot.get("reason", ""))}; '
        f"{_e(pilot.get('samples_generated', 0))} samples, {_e(fmt(pilot.get('seconds')))} s "
        f"({_e(fmt(100 * (pilot.get('cost_fraction_of_job') or 0), 3))}% of this job's samples); "
        f"scored in {_e(pilot.get('feature_space', ''))} against "
        f"{_e(pilot.get('heldout_references'))} held-out references.</p>",
    ]
    rows = []
    for c in [pilot.get("baseline"), *pilot.get("candidates", [])]:
        if c:
            rows.append(
                [c["strength"], c["mmd2"], c["precision"], c["recall"], c["coverage"], c.get("spread"), c["garbage"],
                 c["class_tv"], "; ".join(c.get("violations", [])) or ("baseline" if c["strength"] == 0 else "ok")]
            )  # fmt: skip
    parts.append(
        _table(
            ["s", "MMD²", "precision", "recall", "coverage", "spread", "garbage", "class TV", "constraints"], rows, True
        )
    )
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td.name,th.name{text-align:left}td.note{text-align:left;color:#555;font-size:.9em}
.warn{background:#fff6e0;border:1px solid #e8c66b;padding:8px 16px;border-radius:4px}
.muted{color:#666;font-size:.9em}figure{margin:12px 0}figcaption{color:#555;font-size:.9em}
img{max-width:100%;height:auto}code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 4) -> str:
    """Numbers for the tables: 4 significant digits, scientific when tiny or huge, '–' when missing."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], note_col: bool = False, cls: str = "") -> str:
    head = "".join(
        f'<th class="name">{_e(h)}</th>' if i == 0 or (note_col and i == len(header) - 1) else f"<th>{_e(h)}</th>"
        for i, h in enumerate(header)
    )
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if i == 0:
                cells.append(f'<td class="name">{_e(v)}</td>')
            elif note_col and i == len(row) - 1:
                cells.append(f'<td class="note">{_e(v)}</td>')
            else:
                cells.append(f"<td>{_e(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _get(d: dict | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


#: (label, metric group, key, what "better" means)
METRIC_ROWS = (
    ("MMD² (RBF, median bandwidth, unbiased)", "mmd", "mmd2", "lower = closer to the held-out references"),
    ("MMD² permutation p-value", "mmd", "p_value", "small = distinguishable from the references"),
    ("KID (cubic kernel, unbiased)", "kid", "kid", "lower = closer"),
    ("KID std over subsets", "kid", "kid_std", "spread at the subset size below"),
    ("KID subset size", "kid", "subset_size", ""),
    ("Fréchet distance", "fd", "fd", "lower = closer (biased at small n)"),
    ("precision", "prdc", "precision", "fidelity: samples inside the reference manifold"),
    ("recall", "prdc", "recall", "diversity: references inside the sample manifold"),
    ("density", "prdc", "density", "fidelity, ≈1 when matched"),
    ("coverage", "prdc", "coverage", "diversity: references with a sample nearby"),
    ("samples n", "fd", "n", ""),
    ("references m", "fd", "m", ""),
)

SET_TITLES = {
    "kept": "kept samples",
    "generated": "all generated (kept + rejected)",
    "guidance_references": "guidance references (real baseline)",
}


def metric_table(sets: dict[str, dict]) -> str:
    names = list(sets)
    header = ["metric (vs held-out references)"] + [SET_TITLES.get(n, n) for n in names] + ["meaning"]
    rows = []
    for label, group, key, note in METRIC_ROWS:
        values = [_get(sets[n], group, key) for n in names]
        if all(v is None for v in values):
            continue
        rows.append([label, *values, note])
    return _table(header, rows, note_col=True, cls="metrics")


def render_report(result: dict[str, Any], figures: Sequence[tuple[str, bytes, str]]) -> str:
    """The report as one HTML string: summary, warnings, tables from ``result`` (the eval.json dict) and
    ``figures`` as (title, PNG bytes, caption), embedded as data URIs."""
    parts = _summary_parts(result)
    parts += _alignment_parts(result)
    parts += _memorisation_parts(result.get("memorisation") or {})
    parts += _class_accuracy_parts(result.get("class_accuracy") or {})
    parts += _filter_parts(result.get("filter_scores") or {})
    parts += _label_fidelity_parts(result.get("label_fidelity"))
    parts.append(pilot_section(result.get("pilot")))
    parts.append(utility_section(result.get("utility")))
    parts += _figure_parts(figures)
    parts += _settings_parts(result)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary_parts(result: dict[str, Any]) -> list[str]:
    """The report's head: title, the run, the summary table and the run's warnings."""
    s = result.get("settings", {})
    counts = result.get("counts", {})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>augment eval: {_e(result.get('run_dir', ''))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Evaluation of a synthetic data run</h1>",
        f'<p class="muted">run <code>{_e(result.get("run_dir"))}</code> · config hash '
        f"<code>{_e(result.get('config_hash'))}</code> · model <code>{_e(result.get('model_id'))}</code></p>",
    ]
    summary_rows = [
        ["feature space", s.get("feature_description", s.get("features"))],
        ["held-out references", s.get("heldout_source")],
        [
            "samples generated / kept / rejected",
            f"{counts.get('generated')} / {counts.get('kept')} / {counts.get('rejected')}",
        ],
        ["evaluated kept / rejected samples", f"{counts.get('evaluated_kept')} / {counts.get('evaluated_rejected')}"],
        ["held-out / guidance references", f"{counts.get('heldout_references')} / {counts.get('guidance_references')}"],
        ["run settings", result.get("run_summary", "")],
    ]
    parts.append(
        "<table><tbody>"
        + "".join(f'<tr><td class="name">{_e(k)}</td><td class="note">{_e(v)}</td></tr>' for k, v in summary_rows)
        + "</tbody></table>"
    )
    warns = result.get("warnings") or []
    if warns:
        parts.append(
            '<div class="warn"><b>Warnings</b><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warns) + "</ul></div>"
        )
    return parts


def _alignment_parts(result: dict[str, Any]) -> list[str]:
    """The alignment and fidelity metric table, and the metrics that could not be computed."""
    parts = ["<h2>Alignment and fidelity</h2>", metric_table(result.get("sets", {}))]
    errors = [
        f"{SET_TITLES.get(n, n)} · {g}: {v['error']}"
        for n, d in result.get("sets", {}).items()
        for g, v in d.items()
        if isinstance(v, dict) and "error" in v
    ]
    if errors:
        parts.append('<p class="muted">not computed: ' + _e("; ".join(errors)) + "</p>")
    return parts


def _memorisation_parts(mem: dict[str, Any]) -> list[str]:
    """The nearest-reference distances per feature space (nothing when not measured)."""
    if not mem:
        return []
    parts = ["<h2>Memorisation (nearest-reference distances)</h2>"]
    any_rule = next((v.get("rule") for v in mem.values() if isinstance(v, dict) and v.get("rule")), "")
    parts.append(f'<p class="muted">Against the guidance references. Rule: {_e(any_rule)}.</p>')
    mrows = []
    for space, v in mem.items():
        if not isinstance(v, dict) or "error" in v:
            continue
        mrows.append(
            [
                space,
                v.get("num_copies"),
                v.get("fraction_copies"),
                v.get("threshold"),
                v.get("sample_nn_min"),
                v.get("sample_nn_median"),
                v.get("reference_nn_median"),
                v.get("relative_median"),
            ]
        )
    parts.append(
        _table(
            [
                "space",
                "near-copies",
                "fraction",
                "threshold",
                "min sample→ref",
                "median sample→ref",
                "median ref→ref",
                "median ratio to own ref NN",
            ],
            mrows,
        )
    )
    return parts


def _class_accuracy_parts(acc: dict[str, Any]) -> list[str]:
    """Class accuracy per classifier, and per class when known (nothing when not measured)."""
    if not acc:
        return []
    parts = ["<h2>Class accuracy</h2>"]
    arows = []
    for name, v in acc.items():
        if isinstance(v, dict) and "accuracy" in v:
            arows.append([name, v.get("accuracy"), v.get("n"), v.get("description", "")])
    parts.append(_table(["classifier", "accuracy", "n", "what"], arows, note_col=True))
    per_class = {name: v.get("per_class", {}) for name, v in acc.items() if isinstance(v, dict)}
    classes = sorted({c for pc in per_class.values() for c in pc})
    if classes:
        cols = [n for n in per_class if per_class[n]]
        rows = [
            [c, *[_get(per_class[n], c, "accuracy") for n in cols], *[_get(per_class[n], c, "n") for n in cols]]
            for c in classes
        ]
        parts.append(_table(["class", *[f"{n} accuracy" for n in cols], *[f"{n} n" for n in cols]], rows))
    return parts


def _filter_parts(filt: dict[str, Any]) -> list[str]:
    """Statistics of the filter's scores, kept against rejected (nothing without kept scores)."""
    if not filt.get("kept"):
        return []
    keys = ["count", "mean", "std", "min", "q05", "q25", "q50", "q75", "q95", "max"]
    frows = [[k, _get(filt, "kept", k), _get(filt, "rejected", k)] for k in keys]
    return [
        "<h2>Filter scores (leave-one-out MMD² contribution; lower = helps alignment)</h2>",
        _table(["statistic", "kept", "rejected"], frows),
    ]


def _label_fidelity_parts(fid: dict[str, Any] | None) -> list[str]:
    """How many kept samples the run's judge sees as their target class (nothing without a judge)."""
    if not fid:
        return []
    return [
        "<h2>Label fidelity (the run's judge)</h2>",
        f'<p class="muted">{_e(fid.get("judge"))}: {_e(fid.get("agreed"))} of {_e(fid.get("judged"))} kept '
        f"samples show their target class ({_e(fmt(fid.get('rate')))}).</p>",
    ]


def _figure_parts(figures: Sequence[tuple[str, bytes, str]]) -> list[str]:
    """The figures as <figure> elements with their PNG inlined as a data URI."""
    parts = ["<h2>Figures</h2>"] if figures else []
    for title, png, caption in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{_e(title)}.</b> {_e(caption)}</figcaption></figure>"
        )
    return parts


def _settings_parts(result: dict[str, Any]) -> list[str]:
    """The table of the evaluation's settings and the closing note."""
    s = result.get("settings", {})
    return [
        "<h2>Settings</h2>",
        _table(
            ["setting", "value"], [[k, v if not isinstance(v, list | dict) else str(v)] for k, v in sorted(s.items())]
        ),
        f'<p class="muted">Numbers in <code>eval.json</code> next to this file. '
        f"Generated by mmd-augment {_e(result.get('version', ''))}.</p>",
    ]


_UTILITY_START, _UTILITY_END = "<!-- utility:start -->", "<!-- utility:end -->"
_ARM_TITLES = {
    "a_real": "(a) real train part alone",
    "b_real_plus_synthetic": "(b) real + synthetic (this run)",
    "c_synthetic": "(c) synthetic alone",
    "d_real_plus_unguided": "(d) real + unguided prior samples",
}


def utility_section(utility: dict[str, Any] | None) -> str:
    """The downstream-utility tables (`augment utility`), between markers so a later utility run can
    replace them in an existing report; empty markers when there is no utility result."""
    if not utility or not utility.get("arms"):
        return _UTILITY_START + _UTILITY_END
    s, arms = utility.get("settings", {}), utility["arms"]
    parts = [
        _UTILITY_START,
        '<section id="utility"><h2>Downstream utility (held-out accuracy of a small classifier)</h2>',
        f'<p class="muted">{_e(s.get("n_real_train"))} real training images, {_e(s.get("n_synthetic"))} synthetic, '
        f"{_e(s.get('n_test'))} held-out real test images; {_e(s.get('seeds'))} seeds × {_e(s.get('steps'))} "
        "training steps per arm; same classifier, optimiser and augmentation in every arm.</p>",
    ]
    rows = [
        [
            _ARM_TITLES.get(name, name),
            arm.get("n_train"),
            f"{fmt(arm.get('accuracy_mean'), 3)} ± {fmt(arm.get('accuracy_std'), 3)}",
            ", ".join(fmt(a, 3) for a in arm.get("accuracies", [])),
        ]
        for name, arm in arms.items()
    ]
    parts.append(_table(["arm", "train images", "accuracy (mean ± std)", "per seed"], rows))
    classes = list(s.get("classes") or sorted({c for a in arms.values() for c in a.get("per_class", {})}))
    if classes:
        names = list(arms)
        prow = [[c, *[_get(arms[n], "per_class", c) for n in names]] for c in classes]
        parts.append(_table(["class", *[_ARM_TITLES.get(n, n) for n in names]], prow))
    parts.append("</section>" + _UTILITY_END)
    return "".join(parts)


def with_utility_section(report_html: str, utility: dict[str, Any]) -> str:
    """An existing report with its utility section replaced (or added before the settings)."""
    section = utility_section(utility)
    start, end = report_html.find(_UTILITY_START), report_html.find(_UTILITY_END)
    if start != -1 and end > start:
        return report_html[:start] + section + report_html[end + len(_UTILITY_END) :]
    anchor = report_html.find("<h2>Settings</h2>")
    anchor = anchor if anchor != -1 else report_html.find("</body>")
    return report_html[:anchor] + section + report_html[anchor:]
