#!/usr/bin/env bash
# Incremental developer rebuild of moe_ext._C (ninja), swapped in atomically so running processes keep theirs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
python setup.py build_ext > build/dev_build.log 2>&1 || { tail -40 build/dev_build.log; exit 1; }
built=$(ls -t build/lib.*/moe_ext/_C*.so | head -1)
cp "$built" "moe_ext/.$(basename "$built").tmp"
mv -f "moe_ext/.$(basename "$built").tmp" "moe_ext/$(basename "$built")"
echo "built $(basename "$built")"
