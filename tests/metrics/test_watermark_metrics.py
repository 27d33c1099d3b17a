"""Detection ROC, PSNR/SSIM and attacks of diffcore.metrics.watermark."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore.metrics import watermark as mw


def test_roc_auc_and_tpr():
    assert mw.roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert mw.roc_auc([0, 1], [2, 3]) == 0.0
    assert mw.roc_auc([1, 1], [1, 1]) == 0.5
    # brute force: P(pos > neg) + P(tie)/2
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(37, generator=g).round(decimals=1) + 0.5, torch.randn(41, generator=g).round(decimals=1)
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos.tolist() for n in neg.tolist()]
    assert mw.roc_auc(pos, neg) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    # 1 % FPR with 200 negatives allows 2 false positives: the threshold is the third largest
    neg = torch.arange(200, dtype=torch.float64)
    assert mw.tpr_at_fpr([197.5, 196.5, 300.0, 198.0], neg, 0.01) == 0.75
    assert mw.tpr_at_fpr([48.5, 49.5], torch.arange(50.0), 0.01) == 0.5  # < 100 negatives: none allowed
    fpr, tpr = mw.roc_curve([2.0, 3.0], [1.0, 2.0])
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    with pytest.raises(ValueError, match="fpr"):
        mw.tpr_at_fpr([1.0], [0.0], 1.0)
    with pytest.raises(ValueError, match="negatives"):
        mw.roc_auc([1.0], [float("nan")])


def test_psnr_ssim():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    assert torch.allclose(mw.psnr(a, b), 10 * torch.log10(4.0 / mse), atol=1e-9)
    assert math.isinf(float(mw.psnr(a, a)[0]))
    s = mw.ssim(a, b)
    assert s.shape == (3,) and float(s.max()) < 1.0 and float(mw.ssim(a, a).min()) == pytest.approx(1.0)
    ref = structural_similarity(a[1].double().numpy(), b[1].double().numpy(), data_range=2.0, channel_axis=0)
    assert float(s[1]) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="b"):
        mw.psnr(a, b[:2])


@pytest.mark.parametrize("channels", [1, 3])
def test_attacks_shapes_and_behaviour(channels):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, channels, 32, 32, generator=g) * 2 - 1
    quantized = mw.attack(images, "none")
    assert torch.allclose(quantized, images, atol=1 / 127.5)
    for name in mw.ATTACKS:
        out = mw.attack(images, name)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert float(out.min()) >= -1 and float(out.max()) <= 1
        if name != "none":
            assert not torch.equal(out, quantized), name
    # per-image seeds: image i's noise does not depend on the batch
    assert torch.equal(mw.attack(images, "noise")[:2], mw.attack(images[:2], "noise"))
    # blur radius scales with the side: 4 px at 256 is 0.5 px at 32
    assert mw.AttackParams().scaled_blur_radius(32) == 0.5
    blurred = mw.attack(images, "blur")
    assert float((blurred[..., 1:] - blurred[..., :-1]).abs().mean()) < float(
        (quantized[..., 1:] - quantized[..., :-1]).abs().mean()
    )


def test_attack_bad_input():
    with pytest.raises(ValueError, match="name"):
        mw.attack(torch.zeros(1, 1, 8, 8), "rotate")
    with pytest.raises(ValueError, match="images"):
        mw.attack(torch.zeros(1, 2, 8, 8), "jpeg")
    with pytest.raises(ValueError, match="jpeg_quality"):
        mw.attack(torch.zeros(1, 1, 8, 8), "jpeg", mw.AttackParams(jpeg_quality=0))
