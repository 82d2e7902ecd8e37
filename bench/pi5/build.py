"""Emulated aarch64 side, with mpm_fx installed: ``mpm_fx.aot_compile`` of the reference's model
with its schedule and without, into ``DIR/merged.pt2`` and ``DIR/unmerged.pt2``.

    python -m mpm_fx.bench.pi5.build DIR      (DIR holds reference.pt)
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    import mpm_fx
    from mpm_fx.bench.pi5.reference import build_model

    out = Path((argv or sys.argv[1:])[0])
    ref = torch.load(out / "reference.pt", weights_only=False)
    model = build_model(ref["spec"])
    model.load_state_dict(ref["state_dict"])
    example = ref["x"][:1]
    info = {"machine": platform.machine(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "build_s": {}}
    for name, schedule in (("unmerged", ()), ("merged", tuple(ref["spec"]["schedule"]))):
        start = time.perf_counter()
        mpm_fx.aot_compile(model, example, out / f"{name}.pt2", schedule=schedule)
        info["build_s"][name] = round(time.perf_counter() - start, 1)
        print(f"built {name}.pt2 in {info['build_s'][name]:.0f} s", flush=True)
    (out / "build.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
