"""The Raspberry Pi 5 path, verified on an emulated Cortex-A76 (``bench/pi5/emulate.sh``).

- ``reference.py`` (x86 host): the model's weights, real photos as inputs, and what eager
  ``mpm_fx.optimize`` gives on them (merged and unmerged, token counts);
- ``build.py`` (emulated aarch64, with mpm_fx): ``mpm_fx.aot_compile`` of the merged model and of
  its unmerged baseline;
- ``run_packages.py`` (emulated aarch64, a fresh process without mpm_fx or model code): both
  ``.pt2`` packages on the photos;
- ``compare.py`` (host): the emulated outputs against the x86 reference, into
  ``bench/results/pi5_emulated.json``.

Times under emulation say nothing about a Pi; only build and match are claimed.
"""
