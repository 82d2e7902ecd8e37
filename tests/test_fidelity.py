"""mpm_fx.fidelity against plain loops, sklearn and the pass."""

import pytest
import torch

import mpm_fx  # noqa: F401
from mpm_fx.bench.models import segmenter
from mpm_fx.fidelity import class_miou, compare, encoder_tokens, kmeans

from families import hook_encoder_tokens
from fixtures import photos


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


def test_kmeans_finds_separated_clusters_like_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g, dtype=torch.float64) * 10
    points = (centres.repeat_interleave(40, 0) + torch.randn(200, 16, generator=g,
                                                              dtype=torch.float64))
    ours = torch.cdist(points, kmeans(points, 5)).argmin(1)
    theirs = KMeans(5, n_init=10, random_state=0).fit_predict(points.numpy())
    assert adjusted_rand_score(ours.numpy(), theirs) == 1.0
    assert torch.equal(kmeans(points, 5), kmeans(points, 5))  # deterministic
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(points[:3], 5)


def test_class_miou_against_a_hand_count():
    a = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    b = torch.tensor([[0, 1, 1, 1], [2, 2, 2, 3]])
    # image 0: class 0 IoU 1/2, class 1 IoU 2/3; image 1: class 2 IoU 3/4, class 3 IoU 0
    assert class_miou(a, b) == pytest.approx(((1 / 2 + 2 / 3) / 2 + (3 / 4 + 0) / 2) / 2)


def test_encoder_tokens_match_a_hook_oracle():
    """encoder_tokens reads the rewritten program; the oracle applies the SPEC op with hooks
    around the encoder's own blocks (tests/families.py), independent of the pass."""
    torch.manual_seed(0)
    seg = segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=96,
                              n_layers=4).eval().double()
    x = photos(("astronaut", "coffee"), 96).double()
    blocks = list(seg.encoder.blocks)
    tokens, maps = encoder_tokens(seg, x, (1, 3))
    expected, expected_maps = hook_encoder_tokens(seg, blocks, x, (1, 3), prefix=1)
    torch.testing.assert_close(tokens, expected, rtol=1e-9, atol=1e-9)
    assert len(maps) == 2 and all(torch.equal(a, b) for a, b in zip(maps, expected_maps))
    plain, none = encoder_tokens(seg, x)
    torch.testing.assert_close(plain, hook_encoder_tokens(seg, blocks, x, (), prefix=1)[0])
    assert none == []
