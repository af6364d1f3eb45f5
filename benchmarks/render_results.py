"""Render the methods study's JSON results (benchmarks/methods_study.py) as Markdown tables.

python benchmarks/render_results.py runs/study > runs/study/tables.md
python benchmarks/render_results.py --smoke   # methods_study.py --smoke (strength, rff) into a temp dir, rendered
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

COLUMNS = [
    ("mmd2", "MMD² ↓", 4),
    ("class_mmd2", "per-class MMD² ↓", 4),  # only in tables whose rows have it
    ("kid", "KID ↓", 4),
    ("fd", "FD ↓", 2),
    ("precision", "precision ↑", 2),
    ("recall", "recall ↑", 2),
    ("coverage", "coverage ↑", 2),
    ("class_acc", "class acc ↑", 3),
    ("calls", "calls/sample", 0),
    ("sec", "ms/sample", 0),
]


def _cell(row: dict, key: str, digits: int) -> str:
    if key == "sec":
        return f"{row[key] * 1000:.0f}"
    if key == "calls":
        return f"{row[key]:.0f}"
    std = row.get(key + "_std", 0.0)
    return f"{row[key]:.{digits}f} ± {std:.{digits}f}" if std else f"{row[key]:.{digits}f}"


def table(rows: list[dict]) -> str:
    if rows and "references" in rows[0]:  # the RFF accuracy/speed table
        head = (
            "| references | RBF MMD² | RFF MMD² | abs. error | RBF grad ms | RFF grad ms |\n|---|---|---|---|---|---|"
        )
        body = [
            f"| {r['references']} | {r['rbf_mmd2']:.4f} | {r['rff_mmd2']:.4f} | {r['abs_error']:.4f} | "
            f"{r['rbf_grad_ms']:.1f} | {r['rff_grad_ms']:.1f} |"
            for r in rows
        ]
        return "\n".join([head, *body])
    columns = [c for c in COLUMNS if all(c[0] in r for r in rows)]
    head = "| domain | setting | " + " | ".join(c[1] for c in columns) + " |"
    sep = "|---|---|" + "---|" * len(columns)
    body = [
        f"| {r['domain']} | {r['setting']} | " + " | ".join(_cell(r, k, d) for k, _, d in columns) + " |" for r in rows
    ]
    return "\n".join([head, sep, *body])


def render(folder: Path) -> str:
    """Every study record (<study>.json) of `folder`, as Markdown: a heading, the command, the table."""
    out = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if "study" not in record:  # e.g. bench_throughput.json beside the study files
            continue
        s = record["settings"]
        out.append(f"### {record['study']}\n")
        flags = f"--n {s['n']} --seeds {s['seeds']} --steps {s['steps']} --eta {s.get('eta', 0.0):g}"
        if s.get("mode", "latent") != "latent" and record["study"] in ("strength", "filter"):
            flags += f" --mode {s['mode']}"
        if record["study"] == "strength":
            flags += " --strengths " + " ".join(f"{v:g}" for v in s["strengths"])
        else:
            flags += f" --default-strength {s['default_strength']:g}"
        out.append(
            f"`python benchmarks/methods_study.py --study {record['study']} {flags}` "
            f"({record['seconds'] / 60:.1f} min)\n"
        )
        out.append(table(record["rows"]))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, nargs="?", default=Path("runs/study"), help="the methods study's --out")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="render `methods_study.py --smoke --study strength,rff` (both kinds of table), run into a temp folder",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        import methods_study  # beside this script

        with tempfile.TemporaryDirectory() as tmp:
            methods_study.main(["--smoke", "--study", "strength,rff", "--out", tmp])
            text = render(Path(tmp))
    else:
        text = render(args.folder)
    print(text)
    return text


if __name__ == "__main__":
    main()
