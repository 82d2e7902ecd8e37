"""``mpm-bench`` (also ``python -m bench`` from a checkout): benchmarks of mpm_fx.

    mpm-bench [run] ...        models x schedules x backends x batch sizes: latency, fidelity,
                               speed bound, plots (``bench/run.py``); the default command
    mpm-bench frontier ...     every method's fidelity at equal measured latency: the fronts
                               and which is ahead of ToMe (``bench/frontier.py``)
    mpm-bench tune ...         ``mpm_fx.tune`` on the real model, checked on photos it never saw
    mpm-bench study NAME ...   the studies behind docs/benchmarks.md (``bench/studies.py``)
    mpm-bench gate ...         the CI regression gate: thresholds in ``bench/gate.json``
    mpm-bench gpu ...          the GPU study in one process (``bench/gpu.py``)
    mpm-bench report           docs/benchmarks.md's tables from ``bench/results/*.json``
    mpm-bench eval-ade20k ...  mIoU of an official Segmenter checkpoint on ADE20K, with and
                               without MPM

Installed as ``mpm_fx.bench``.
"""
