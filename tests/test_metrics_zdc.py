"""ZDC physics features, separation scores and plots on hand-made showers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from calotune.metrics.zdc import (
    PROFILE_FEATURE,
    SCALAR_FEATURES,
    ZDC_OBJECTIVES,
    hcal_cell_coordinates,
    plot_zdc,
    zdc_features,
    zdc_scores,
)
from calotune.showers import ShowerSet


@dataclass(frozen=True)
class TinyGeometry:
    """Stand-in for ZDCGeometry: 2x2 ECAL, 3 layers of 2x2 HCAL, 10 mm cells, 5 mm layers."""

    ecal_nx: int = 2
    ecal_ny: int = 2
    hcal_nx: int = 2
    hcal_ny: int = 2
    hcal_nz: int = 3
    hcal_cell_mm: float = 10.0
    hcal_layer_mm: float = 5.0


@dataclass(frozen=True)
class BareGeometry:
    """No pitch attributes: coordinates fall back to cell units."""

    ecal_nx: int = 2
    ecal_ny: int = 2
    hcal_nx: int = 2
    hcal_ny: int = 2
    hcal_nz: int = 3


GEO = TinyGeometry()


def hcal_index(layer: int, ix: int, iy: int, geo: TinyGeometry = GEO) -> int:
    """Flat HCAL index for reshape(N, nz, nx, ny)."""
    return (layer * geo.hcal_nx + ix) * geo.hcal_ny + iy


def hand_made() -> ShowerSet:
    """Three events whose features are worked out by hand in test_features_by_hand."""
    ecal = np.zeros((3, 4), dtype=np.float32)
    hcal = np.zeros((3, 12), dtype=np.float32)
    # Event 0: E_inc 100; ECAL 10; HCAL 30 at (layer 0, x -5 mm), 10 at (layer 2, x +5 mm).
    ecal[0, 0] = 10.0
    hcal[0, hcal_index(0, 0, 0)] = 30.0
    hcal[0, hcal_index(2, 1, 1)] = 10.0
    # Event 1: E_inc 50; no ECAL; HCAL 20 at (layer 1, ix 1 -> x +5 mm, iy 0).
    hcal[1, hcal_index(1, 1, 0)] = 20.0
    # Event 2: nothing deposited at all.
    energy = np.array([100.0, 50.0, 80.0], dtype=np.float32)
    return ShowerSet(
        conditions={
            "energy": energy,
            "theta": np.zeros(3, np.float32),
            "phi": np.zeros(3, np.float32),
        },
        cells={"ecal": ecal, "hcal": hcal},
    )


def test_coordinates() -> None:
    x, z = hcal_cell_coordinates(GEO)
    np.testing.assert_allclose(x, [-5.0, 5.0])
    np.testing.assert_allclose(z, [2.5, 7.5, 12.5])
    xb, zb = hcal_cell_coordinates(BareGeometry())
    np.testing.assert_allclose(xb, [-0.5, 0.5])
    np.testing.assert_allclose(zb, [0.5, 1.5, 2.5])


def test_features_by_hand() -> None:
    f = zdc_features(hand_made(), GEO)
    # Event 0: E_HCAL 40, E_ECAL 10, E_inc 100.
    #   centre_x = (30 * -5 + 10 * 5) / 40 = -2.5; <x^2> = 25 -> width = sqrt(25 - 6.25).
    #   centre_z = (30 * 2.5 + 10 * 12.5) / 40 = 5; <z^2> = (30 * 6.25 + 10 * 156.25) / 40
    #   = 43.75 -> width = sqrt(43.75 - 25) = sqrt(18.75).
    # Event 1: one cell -> centre (5, 7.5), width 0. Event 2: empty -> all zero, no NaN.
    expected = {
        "hcal_energy_scale": [0.4, 0.4, 0.0],
        "hcal_fraction": [0.8, 1.0, 0.0],
        "ecal_energy_scale": [0.1, 0.0, 0.0],
        "total_energy_scale": [0.5, 0.4, 0.0],
        "centre_x": [-2.5, 5.0, 0.0],
        "width_x": [math.sqrt(18.75), 0.0, 0.0],
        "centre_z": [5.0, 7.5, 0.0],
        "width_z": [math.sqrt(18.75), 0.0, 0.0],
    }
    assert set(f) == {*SCALAR_FEATURES, PROFILE_FEATURE}
    for name, values in expected.items():
        np.testing.assert_allclose(f[name], values, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(f[PROFILE_FEATURE], [[30, 0, 10], [0, 20, 0], [0, 0, 0]])


def test_features_reject_wrong_cell_count() -> None:
    s = hand_made()
    bad = ShowerSet(
        conditions=s.conditions, cells={"ecal": s.cells["ecal"], "hcal": s.cells["hcal"][:, :8]}
    )
    with pytest.raises(ValueError, match="hcal"):
        zdc_features(bad, GEO)


def synthetic(n: int, seed: int, hcal_scale: float = 1.0) -> ShowerSet:
    """Random showers with a smooth structure: enough for histogram-level comparisons."""
    rng = np.random.default_rng(seed)
    energy = rng.uniform(1e4, 1e5, n)
    ecal = rng.gamma(2.0, 0.01, (n, 4)) * energy[:, None]
    depth = np.array([1.0, 2.0, 0.7])[None, :, None, None]
    hcal = rng.gamma(2.0, 0.02, (n, 3, 2, 2)) * depth * energy[:, None, None, None]
    hcal = hcal.reshape(n, 12) * hcal_scale
    return ShowerSet(
        conditions={
            "energy": energy.astype(np.float32),
            "theta": np.zeros(n, np.float32),
            "phi": np.zeros(n, np.float32),
        },
        cells={"ecal": ecal.astype(np.float32), "hcal": hcal.astype(np.float32)},
    )


def test_scores_identical_samples_are_zero() -> None:
    ref = synthetic(500, seed=1)
    scores = zdc_scores(ref, ref.subset(slice(None)), GEO)
    assert set(ZDC_OBJECTIVES) <= set(scores)
    assert all(mode == "min" for mode in ZDC_OBJECTIVES.values())
    for name in ZDC_OBJECTIVES:
        assert scores[name] == pytest.approx(0.0, abs=1e-12), name
    assert scores["gen_hcal_energy_scale_mean"] == scores["ref_hcal_energy_scale_mean"]


def test_scores_types_and_mean() -> None:
    scores = zdc_scores(synthetic(800, seed=2), synthetic(800, seed=3), GEO)
    assert all(type(v) is float and math.isfinite(v) for v in scores.values())
    seps = [v for k, v in scores.items() if k.startswith("sep_")]
    assert len(seps) == len(ZDC_OBJECTIVES) - 1
    assert scores["mean_separation"] == pytest.approx(float(np.mean(seps)))
    # Same distribution, independent draws: only the statistical noise floor
    # (~ n_bins / (2 N) = 50 / 1600 per feature).
    assert scores["mean_separation"] < 0.08


def test_scaled_hcal_is_detected() -> None:
    ref = synthetic(800, seed=2)
    same = zdc_scores(ref, synthetic(800, seed=3), GEO)
    scaled = zdc_scores(ref, synthetic(800, seed=3, hcal_scale=1.3), GEO)
    assert scaled["sep_hcal_energy_scale"] > 0.1
    assert scaled["sep_hcal_energy_scale"] > 3 * same["sep_hcal_energy_scale"]
    assert scaled["sep_hcal_fraction"] > same["sep_hcal_fraction"]
    # A global HCAL scale leaves the shape (centres, widths) alone.
    assert scaled["sep_centre_z"] == pytest.approx(same["sep_centre_z"], abs=1e-6)
    assert scaled["gen_hcal_energy_scale_mean"] == pytest.approx(
        1.3 * same["gen_hcal_energy_scale_mean"], rel=1e-5
    )
    assert scaled["mean_separation"] > same["mean_separation"]


def test_broken_generator_scores_finite_and_bad() -> None:
    ref = synthetic(300, seed=4)
    gen = synthetic(300, seed=5)
    gen.cells["hcal"][:150] = np.nan
    scores = zdc_scores(ref, gen, GEO)
    assert all(math.isfinite(v) for v in scores.values())
    # Half the events have NaN features: overflow puts them in the last bin, penalised.
    assert scores["sep_hcal_energy_scale"] > 0.3


def test_empty_reference_rejected() -> None:
    ref = synthetic(10, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        zdc_scores(ref.subset(slice(0, 0)), ref, GEO)


def test_plot_writes_pngs(tmp_path: Path) -> None:
    out = tmp_path / "plots"
    paths = plot_zdc(synthetic(200, seed=6), synthetic(200, seed=7, hcal_scale=1.3), GEO, out)
    names = {p.name for p in paths}
    assert {
        "zdc_hcal_energy_scale.png",
        "zdc_hcal_fraction.png",
        "zdc_ecal_energy_scale.png",
        "zdc_longitudinal_profile.png",
        "zdc_centre_width.png",
    } <= names
    for p in paths:
        assert p.parent == out
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", p


def test_plot_labels_stay_inside_the_fixed_margins(tmp_path: Path, monkeypatch) -> None:
    """The ZDC figures have fixed margins (no layout engine): every axes with its tick
    labels, axis labels and the experiment label must still lie inside its figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from calotune.detectors import get_detector

    detector = get_detector("zdc")
    reference, generated = detector.synthesize(1000, seed=1), detector.synthesize(1000, seed=2)
    save, checked, outside = Figure.savefig, [], []

    def save_and_check(fig, *args, **kwargs):
        save(fig, *args, **kwargs)
        frame, renderer = fig.bbox, FigureCanvasAgg(fig).get_renderer()
        for ax in fig.axes:
            box = ax.get_tightbbox(renderer)
            checked.append(ax)
            if box.x0 < frame.x0 or box.y0 < frame.y0 or box.x1 > frame.x1 or box.y1 > frame.y1:
                outside.append((str(args[0]), ax.get_xlabel(), tuple(box.extents), tuple(frame.extents)))

    monkeypatch.setattr(Figure, "savefig", save_and_check)
    detector.plot(detector.summarise(reference).for_plots(), detector.summarise(generated).for_plots(), tmp_path)
    assert len(checked) == 9  # five one-axes figures and the 2x2 centre/width figure
    assert not outside, outside
