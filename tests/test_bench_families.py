"""benchmarks/bench_families.py's published shapes: every family's networks, built on the meta device, have the
published parameter counts (its `--smoke` run is in tests/test_benchmarks_smoke.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_every_familys_published_networks_have_the_published_parameter_counts(tmp_path: Path) -> None:
    import bench_families

    out = tmp_path / "shapes.json"
    report = bench_families.main(["--check-shapes", "--out", str(out)])
    shapes = report["shapes"]
    assert json.loads(out.read_text())["shapes"] == shapes
    assert list(shapes) == list(bench_families.FAMILIES)
    for family, components in shapes.items():
        denoiser = components[bench_families.denoiser_name(family)]
        assert abs(denoiser["ratio"] - 1) <= 0.03, (family, denoiser)
        for name, c in components.items():  # text encoders and VAEs too
            assert c["measured"] > 0 and abs(c["ratio"] - 1) <= 0.03, (family, name, c)
    assert shapes["flux"]["transformer"]["measured"] == 11_901_408_320
    assert shapes["sdxl"]["unet"]["measured"] == 2_567_463_684
    table = out.with_suffix(".md").read_text()
    assert "| sd15 | unet | UNet2DConditionModel | 859,520,964 | 859,520,964 | 1.0000 |" in table
