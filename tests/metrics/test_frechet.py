"""Frechet distance: the float64 matrix square root, streaming statistics, files, and the distance
against an independent float64 computation on Gaussian features with known statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore.metrics import FeatureStatistics, feature_statistics, frechet_distance
from diffcore.metrics.frechet import frechet_distance_gaussians, sqrt_psd, trace_sqrt_product


def random_spd(dim: int, seed: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, rank or dim)) / np.sqrt(dim)
    return a @ a.T + (0.0 if rank else 0.1 * np.eye(dim))


def independent_frechet(mu1, s1, mu2, s2) -> float:
    """Textbook route, float64 numpy: Tr sqrt(S1 S2) = sum of sqrt of the (real, >= 0) eigenvalues of S1 S2."""
    eig = np.linalg.eigvals(s1 @ s2)
    assert np.abs(eig.imag).max() < 1e-8 * np.abs(eig).max()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def t64(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_sqrt_psd_squares_back_and_clamps_rounding_negatives():
    s = random_spd(9, 0)
    root = sqrt_psd(t64(s))
    assert torch.allclose(root @ root, t64(s), rtol=0, atol=1e-13)
    singular = random_spd(9, 1, rank=3)  # eigenvalues ~ -1e-17 from rounding
    root = sqrt_psd(t64(singular))
    assert torch.isfinite(root).all() and torch.allclose(root @ root, t64(singular), atol=1e-12)


def test_trace_sqrt_product_matches_eigenvalues_of_the_product():
    s1, s2 = random_spd(12, 2), random_spd(12, 3)
    expected = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    assert trace_sqrt_product(t64(s1), t64(s2)) == pytest.approx(expected, rel=1e-12)


def test_commuting_covariances_have_the_closed_form():
    # diagonal (commuting) covariances, some directions degenerate: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    a = np.array([4.0, 1.0, 0.0, 2.5, 0.0])
    b = np.array([1.0, 1.0, 3.0, 0.0, 0.0])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1].copy()
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_gaussians(t64(mu1), t64(np.diag(a)), t64(mu2), t64(np.diag(b)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_known_gaussians_match_an_independent_float64_computation():
    dim = 16
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = random_spd(dim, 5), random_spd(dim, 6)
    expected = independent_frechet(mu1, s1, mu2, s2)
    got = frechet_distance_gaussians(t64(mu1), t64(s1), t64(mu2), t64(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance_gaussians(t64(mu1), t64(s1), t64(mu1), t64(s1)) == pytest.approx(0.0, abs=1e-12)


def test_gaussian_features_estimate_the_population_distance():
    """Features drawn from two Gaussians of known statistics: the distance of the samples is the
    independent computation on the samples' own statistics (to rounding), and the population's
    distance within sampling error (relative std ~ 1/sqrt(N) ~ 0.3% here)."""
    dim, n = 6, 200_000
    rng = np.random.default_rng(7)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = random_spd(dim, 8), random_spd(dim, 9)
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    got = frechet_distance(torch.from_numpy(x1).float(), torch.from_numpy(x2).float())
    f1, f2 = x1.astype(np.float32).astype(np.float64), x2.astype(np.float32).astype(np.float64)
    on_samples = independent_frechet(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert got == pytest.approx(on_samples, rel=1e-9)
    assert got == pytest.approx(independent_frechet(mu1, s1, mu2, s2), rel=0.03)


def test_streaming_statistics_equal_numpy_in_float64():
    rng = np.random.default_rng(10)
    x = 100.0 + rng.standard_normal((1001, 7))  # a large mean: the merge must not cancel
    stats = FeatureStatistics()
    for chunk in np.array_split(x, [1, 2, 300, 301, 777]):
        stats.update(torch.from_numpy(chunk))
    assert stats.count == 1001
    assert np.allclose(stats.mean.numpy(), x.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(stats.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-11, atol=0)
    merged = FeatureStatistics.from_features(torch.from_numpy(x[:400])).merge(
        FeatureStatistics.from_features(torch.from_numpy(x[400:]))
    )
    assert torch.allclose(merged.covariance, stats.covariance, rtol=1e-12, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_statistics_save_and_load(tmp_path, suffix):
    x = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stats = FeatureStatistics.from_features(x, extractor="stand-in")
    path = stats.save(tmp_path / f"ref{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ref{suffix}"]  # no temporary left behind
    loaded = FeatureStatistics.load(path, extractor="stand-in")
    assert loaded.count == 300 and loaded.extractor == "stand-in"
    assert torch.equal(loaded.mean, stats.mean) and torch.allclose(loaded.covariance, stats.covariance, rtol=1e-15)
    loaded.update(x[:10])  # a saved count makes the statistics extendable
    assert loaded.count == 310


def test_pytorch_fid_statistics_file_is_read(tmp_path):
    """pytorch-fid's files hold only ``mu`` and ``sigma`` (np.cov, ddof=1)."""
    x = np.random.default_rng(1).standard_normal((50, 4))
    np.savez(tmp_path / "fid_stats.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    loaded = FeatureStatistics.load(tmp_path / "fid_stats.npz", extractor="inception-v3-pool3")
    ours = FeatureStatistics.from_features(torch.from_numpy(x), extractor="inception-v3-pool3")
    assert frechet_distance(loaded, ours) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cannot be extended"):
        loaded.update(torch.from_numpy(x))


def test_refusals(tmp_path):
    a = FeatureStatistics.from_features(torch.randn(10, 3), extractor="one")
    b = FeatureStatistics.from_features(torch.randn(10, 3), extractor="two")
    with pytest.raises(ValueError, match="different feature extractors"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match="b has 4"):
        frechet_distance(a, torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"expected 3 features per row"):
        a.update(torch.randn(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        a.update(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        FeatureStatistics().update(torch.randn(3))
    with pytest.raises(ValueError, match=".safetensors or .npz"):
        a.save(tmp_path / "stats.pt")
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStatistics.from_features(torch.randn(1, 3)).covariance
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "bad.npz").write_bytes((tmp_path / "x.npy").read_bytes())
    with pytest.raises(ValueError):
        FeatureStatistics.load(tmp_path / "bad.npz")


def test_images_through_a_stand_in_extractor():
    """Any callable [B, C, H, W] -> [B, F] with a name is an extractor; batching does not change the result."""

    class StandIn(torch.nn.Module):
        name = "row-means"

        def forward(self, x):
            return x.mean(dim=(2, 3))

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(64, 3, 4, 4, generator=g), 0.5 + torch.randn(64, 3, 4, 4, generator=g)
    direct = frechet_distance(real.mean(dim=(2, 3)), fake.mean(dim=(2, 3)))
    via = frechet_distance(real, fake, extractor=StandIn(), batch_size=7)
    assert via == pytest.approx(direct, rel=1e-12)
    stats = feature_statistics(iter(real.split(10)), StandIn())
    assert stats.extractor == "row-means" and stats.count == 64


def _fid_file(tmp_path, name="stats.npz", **arrays):
    x = np.random.default_rng(2).standard_normal((40, 3))
    base = {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}
    path = tmp_path / name
    np.savez(path, **{**base, **arrays})
    return path


def test_merging_statistics_without_a_count_is_an_error(tmp_path):
    uncounted = FeatureStatistics.load(_fid_file(tmp_path), extractor="e")
    ours = FeatureStatistics.from_features(torch.randn(10, 3), extractor="e")
    with pytest.raises(ValueError, match="no row count"):
        ours.merge(uncounted)
    with pytest.raises(ValueError, match="no row count"):
        FeatureStatistics(extractor="e").merge(uncounted)


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"mu": np.array([0.0, np.nan, 1.0])}, "'mu' holds NaN"),
        ({"sigma": np.diag([1.0, np.inf, 1.0])}, "'sigma' holds NaN"),
        ({"sigma": np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}, "not symmetric"),
        ({"sigma": -np.eye(3)}, "negative eigenvalue"),
        ({"sigma": np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}, "negative eigenvalue"),
        ({"count": np.array([40.5])}, "'count' must be one integer"),
        ({"count": np.array([1])}, "'count' is 1"),
        ({"mu": np.array(["a", "b", "c"])}, "expected real numbers"),
    ],
    ids=["nan-mean", "inf-cov", "asymmetric", "negative-definite", "indefinite", "float-count", "one-row", "strings"],
)
def test_loaded_statistics_that_are_no_gaussian_are_refused_naming_the_file(tmp_path, arrays, message):
    path = _fid_file(tmp_path, "bad-stats.npz", **arrays)
    with pytest.raises(ValueError, match=f"bad-stats.npz.*{message}"):
        FeatureStatistics.load(path)


def test_an_unreadable_statistics_file_is_named(tmp_path):
    for name in ("garbage.npz", "garbage.safetensors"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 not really an archive")
        with pytest.raises(ValueError, match=name):
            FeatureStatistics.load(tmp_path / name)
