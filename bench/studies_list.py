"""The names of ``mpm-bench study`` with one line each, for ``--help`` without importing torch
(``studies.STUDIES`` holds the functions; a test keeps the two lists alike)."""

STUDY_NAMES = {
    "op-cost": "one merge of each method against one ViT block (--methods, --memory)",
    "high-res": "merge cost against tokens up to 8,192; merge share of whole runs (--sizes, "
                "--share-sizes, --methods, --share-methods, --schedules)",
    "local": "local MPM at global MPM's fidelity at 896 px, chosen on the search photos "
             "(--size, --schedules)",
    "batches": "a padded batch against each image alone (--size, --schedule, --batches)",
    "size-aware": "plain MPM against size-aware attention (--size, --photos, --schedules)",
    "onnx": "the real model through export_onnx and ONNX Runtime, against eager (--sizes, "
            "--schedules)",
}
