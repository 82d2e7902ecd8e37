"""mpm_fx.fidelity.compare against a plain per-pixel loop."""

import pytest
import torch

from mpm_fx.fidelity import compare


def _loop(reference, merged, threshold=0.5):
    B, C, H, W = reference.shape
    agree, ious = 0, []
    for b in range(B):
        if C == 1:
            a = [[reference[b, 0, i, j] > threshold for j in range(W)] for i in range(H)]
            m = [[merged[b, 0, i, j] > threshold for j in range(W)] for i in range(H)]
            classes = [True]
        else:
            a = [[int(reference[b, :, i, j].argmax()) for j in range(W)] for i in range(H)]
            m = [[int(merged[b, :, i, j].argmax()) for j in range(W)] for i in range(H)]
            classes = sorted({v for row in a + m for v in row})
        agree += sum(a[i][j] == m[i][j] for i in range(H) for j in range(W)) / (H * W)
        per = []
        for c in classes:
            inter = sum(a[i][j] == c and m[i][j] == c for i in range(H) for j in range(W))
            union = sum(a[i][j] == c or m[i][j] == c for i in range(H) for j in range(W))
            per.append(inter / union if union else 1.0)
        ious.append(sum(per) / len(per))
    return agree / B, sum(ious) / B


@pytest.mark.parametrize("channels", [1, 4])
def test_compare_matches_a_loop(channels):
    torch.manual_seed(0)
    reference = torch.rand(3, channels, 7, 5)
    merged = (reference + 0.3 * torch.randn_like(reference)).clamp(0, 1)
    got = compare(reference, merged)
    agreement, iou = _loop(reference, merged)
    assert got["pixel_agreement"] == pytest.approx(agreement)
    assert got["iou"] == pytest.approx(iou)
    assert got["mae"] == pytest.approx((reference - merged).abs().mean().item())
    assert compare(reference, reference) == {"mae": 0.0, "pixel_agreement": 1.0, "iou": 1.0}


def test_compare_rejects_mismatched_outputs():
    with pytest.raises(ValueError, match="one shape"):
        compare(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))
