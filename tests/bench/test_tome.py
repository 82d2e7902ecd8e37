"""The ToMe comparison of mpm-bench (bench/tome.py) against a loop over the paper's algorithm."""

import torch

from mpm_fx.bench.tome import ToMeSegmenter, bipartite_merge


def _loop_tome(x, size, r):
    """Bipartite soft matching for one image, prefix-free, as the paper states it."""
    N = len(x)
    a, b = list(range(0, N, 2)), list(range(1, N, 2))
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    best = {i: max(b, key=lambda j: (float(unit[i] @ unit[j]), -j)) for i in a}
    score = {i: float(unit[i] @ unit[best[i]]) for i in a}
    merged = sorted(a, key=lambda i: -score[i])[:r]
    kept = [i for i in sorted(a, key=lambda i: -score[i])[r:]]
    groups = [[i] for i in kept] + [[j] + [i for i in merged if best[i] == j] for j in b]
    tokens = torch.stack([sum(x[i] * size[i] for i in g) / sum(size[i] for i in g) for g in groups])
    sizes = torch.stack([sum(size[i] for i in g) for g in groups])
    to = {i: k for k, g in enumerate(groups) for i in g}
    return tokens, sizes, torch.tensor([to[i] for i in range(N)])


def test_bipartite_merge_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    for N, r in ((10, 3), (9, 4), (16, 0), (7, 1)):
        x = torch.randn(2, 1 + N, 6, generator=g, dtype=torch.float64)
        size = torch.randint(1, 4, (2, 1 + N, 1), generator=g).double()
        source = torch.arange(N).expand(2, N)
        tokens, sizes, to = bipartite_merge(x, size, source, r, prefix=1)
        assert tokens.shape == (2, 1 + N - r, 6)
        for i in range(2):
            want, want_sizes, want_to = _loop_tome(x[i, 1:], size[i, 1:], r)
            torch.testing.assert_close(tokens[i, 1:], want)
            torch.testing.assert_close(sizes[i, 1:], want_sizes)
            assert torch.equal(to[i], want_to)
            assert torch.equal(tokens[i, 0], x[i, 0])  # the prefix is protected
            assert sizes[i].sum() == size[i].sum()  # patches are neither lost nor made


def test_sources_compose_over_merges():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 4, generator=g, dtype=torch.float64)
    size, source = torch.ones(1, 12, 1, dtype=torch.float64), torch.arange(12)[None]
    t1, s1, src1 = bipartite_merge(x, size, source, 4, prefix=0)
    t2, s2, src2 = bipartite_merge(t1, s1, src1, 3, prefix=0)
    _, _, step = bipartite_merge(t1, s1, torch.arange(8)[None], 3, prefix=0)
    assert torch.equal(src2, step.gather(1, src1))
    for k in range(t2.shape[1]):  # each token is the mean of the original tokens it stands for
        torch.testing.assert_close(t2[0, k], x[0, src2[0] == k].mean(0))


def test_no_merge_is_the_model():
    from mpm_fx.bench.models import focus

    torch.manual_seed(0)
    import timm

    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                 img_size=56, depth=4, embed_dim=96, num_heads=3)
    model = focus.FocusSegmenter(backbone, focus.FocusDecoder(96)).double().eval()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        same = ToMeSegmenter(model, (1,), (16,))(x)  # 16 image tokens: r = 0
        merged = ToMeSegmenter(model, (1, 2), (10, 6))(x)
        torch.testing.assert_close(same, model(x))
        assert not torch.allclose(merged, model(x), atol=1e-4)
