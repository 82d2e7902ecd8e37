"""The names of ``mpm-bench study`` with one line each, for ``--help`` without importing torch
(``studies.STUDIES`` holds the functions; a test keeps the two lists alike), and the flags each
study reads besides ``--json``, ``--repeats``, ``--backends`` and ``--quick``: a flag given to a
study that does not read it is an error, not silently ignored."""

_STUDIES = {
    "op-cost": ("one merge of each method against one ViT block", ("methods", "memory")),
    "high-res": ("merge cost against tokens up to 8,192; merge share of whole runs",
                 ("sizes", "share_sizes", "photos", "methods", "share_methods", "schedules")),
    "local": ("local MPM at global MPM's fidelity at 896 px, chosen on the search photos",
              ("size", "schedules")),
    "batches": ("a padded batch against each image alone", ("size", "schedule", "batches")),
    "size-aware": ("plain MPM against size-aware attention", ("size", "photos", "schedules")),
    "onnx": ("the real model through export_onnx and ONNX Runtime, against eager",
             ("sizes", "schedules")),
}

STUDY_FLAGS = {name: flags for name, (_, flags) in _STUDIES.items()}
ALL_FLAGS = tuple(dict.fromkeys(f for flags in STUDY_FLAGS.values() for f in flags))


def flag(name: str) -> str:
    """The command-line spelling of an option: share_sizes -> --share-sizes."""
    return "--" + name.replace("_", "-")


STUDY_NAMES = {name: f"{line} ({', '.join(flag(f) for f in flags)})"
               for name, (line, flags) in _STUDIES.items()}
