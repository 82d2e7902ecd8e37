"""``mpm-bench`` (also ``python -m bench`` from a checkout): benchmarks of mpm_fx.

    mpm-bench [run] ...        models x schedules x backends x batch sizes: latency, fidelity,
                               speed bound, plots (``bench/run.py``); the default command
    mpm-bench tune ...         ``mpm_fx.tune`` on the real model
    mpm-bench gate ...         the CI regression gate: thresholds in ``bench/gate.json``
    mpm-bench eval-ade20k ...  mIoU of an official Segmenter checkpoint on ADE20K, with and
                               without MPM

Installed as ``mpm_fx.bench``; the scripts ``python -m bench.op_cost`` and
``python -m bench.size_aware`` hold the op-cost and size-aware studies of the README.
"""
