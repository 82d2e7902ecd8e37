"""Emulated aarch64 side, a fresh process with torch only (no mpm_fx, no model code): both
``.pt2`` packages on the reference's photos, into ``DIR/emulated.pt``.

    python run_packages.py DIR      (a plain script: it must not need mpm_fx installed)
"""

import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    out = Path(sys.argv[1])
    x = torch.load(out / "reference.pt", weights_only=False)["x"]
    results, seconds = {}, {}
    for name in ("unmerged", "merged"):
        runner = torch._inductor.aoti_load_package(str(out / f"{name}.pt2"))
        start = time.perf_counter()
        with torch.inference_mode():
            results[name] = torch.cat([runner(x[i:i + 1]) for i in range(len(x))])
        seconds[name] = round(time.perf_counter() - start, 1)
    leaked = sorted(m for m in sys.modules if m.startswith("mpm_fx"))
    torch.save({"outputs": results, "mpm_fx_imported": leaked, "run_s": seconds},
               out / "emulated.pt")
    print(json.dumps({"ran": list(results), "mpm_fx_imported": leaked, "run_s": seconds}))


if __name__ == "__main__":
    main()
