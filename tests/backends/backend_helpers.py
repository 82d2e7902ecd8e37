"""What the backend tests share: small photos, the eager one-image-at-a-time reference, a
fresh-process runner and the tolerance between compiled and eager outputs."""

import subprocess
import sys
import textwrap

import torch

from fixtures import NAMES, photos

SIZE = 96  # 6 x 6 patches of 16: small compiles, yet photos merge to different counts
# Compiled vs eager: flat regions of real photos give near-duplicate tokens whose similarities
# tie to ~1e-12 even in float64, and compiled code may sum them in another order and pick the
# other twin (SPEC, measured notes). Swapping two near-identical partners moves outputs by
# ~1e-5 (seen once in CI); a wrong merge or gather moves them by O(0.1). Hence 1e-4, not 1e-9.
CLOSE = {"rtol": 1e-4, "atol": 1e-4}


def twenty_photos(size=SIZE, dtype=torch.float64):
    x = photos(NAMES, size, dtype=dtype)
    return torch.cat([x, x[:20 - len(x)].flip(-1)])  # 17 photos + 3 mirrored = 20 images


def one_by_one(optimized, x) -> tuple:
    """Eager outputs of each image alone, concatenated, and each image's token counts."""
    outputs, counts = [], []
    with torch.no_grad():
        for i in range(len(x)):
            outputs.append(optimized(x[i:i + 1]))
            counts.append(optimized.mpm_report().token_counts)
    return torch.cat(outputs), counts


def run_fresh(code: str, tmp_path) -> None:
    script = tmp_path / "fresh.py"
    script.write_text(textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run_package_fresh(package, x, expected, tmp_path) -> None:
    """Run an AOTInductor package on each image alone in a fresh process that never imports
    mpm_fx, and compare with ``expected``."""
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    run_fresh(f"""
        import sys
        import torch
        runner = torch._inductor.aoti_load_package({str(package)!r})
        io = torch.load("io.pt")
        out = torch.cat([runner(io["x"][i:i + 1]) for i in range(len(io["x"]))])
        torch.testing.assert_close(out, io["expected"], rtol=1e-4, atol=1e-4)
        assert not any(m.startswith("mpm_fx") for m in sys.modules), "mpm_fx was imported"
    """, tmp_path)
