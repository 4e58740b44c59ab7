"""Build DeepSpeed's CPU shared-memory communication op once, at install time.

DeepSpeed compiles this C++ op the first time a process group starts on CPU (every pretraining and
fine-tuning run here). That takes minutes on a small machine, and it happens in the middle of the
first training run with nothing on screen. `make venv` runs this script instead, so the op is
already in the torch extensions cache (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> int:
    from uniter.runtime import shm_op_built  # noqa: PLC0415 -- after DS_ACCELERATOR is set

    if shm_op_built():
        print("[make] DeepSpeed's shared-memory op is already built", file=sys.stderr)
        return 0
    import deepspeed.ops  # noqa: PLC0415
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("[make] DeepSpeed's shared-memory op does not apply here; nothing to build", file=sys.stderr)
        return 0
    print("[make] building DeepSpeed's shared-memory op (once per machine; minutes on 2 cores)", file=sys.stderr)
    start = time.time()
    builder.load(verbose=False)
    print(f"[make] built in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
