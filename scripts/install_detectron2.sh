#!/usr/bin/env bash
# Install detectron2 into the venv at $1, from the package registry, without compiling anything.
#
# There is no official detectron2 release on PyPI. pb1-detectron2==0.6 is a source package whose
# Python files equal upstream detectron2's v0.6 tag, but it lacks the C++ sources its setup.py
# compiles, so its own build fails. We build it with the extension list emptied (Faster R-CNN C4
# needs no compiled op: RoIPool, RoIAlign and NMS come from torchvision) and without its pinned
# formatter (black==21.4b2, development only). The two import-time bridges are in
# feature_extraction/d2compat.py. The sdist is checked against its sha256.
#
# A detectron2 with compiled ops already in the venv (upstream, built for your GPU — see
# docs/features.md) is left alone.
set -euo pipefail
VENV=${1:?usage: install_detectron2.sh VENV}
PY="$VENV/bin/python"
SDIST=pb1-detectron2-0.6.tar.gz
SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29

if "$PY" -c "import detectron2._C" 2>/dev/null; then
  echo "[make] detectron2 with compiled ops present: kept" >&2
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# (--no-build-isolation: pip reads the sdist's metadata by running its setup.py, which imports torch)
"$PY" -m pip download -qq --disable-pip-version-check --no-deps --no-build-isolation pb1-detectron2==0.6 -d "$work"
echo "$SDIST_SHA256  $work/$SDIST" | sha256sum -c --quiet -
tar xzf "$work/$SDIST" -C "$work"
"$PY" - "$work/pb1-detectron2-0.6/setup.py" <<'PATCH'
import sys
path = sys.argv[1]
text = open(path).read()
assert "ext_modules=get_extensions()," in text, "unexpected setup.py: refusing to patch"
text = text.replace("ext_modules=get_extensions(),", "ext_modules=[],")
text = text.replace('        "black==21.4b2",\n', "")
open(path, "w").write(text)
PATCH
"$PY" -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation "$work/pb1-detectron2-0.6"
