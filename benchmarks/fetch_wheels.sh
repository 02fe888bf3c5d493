#!/usr/bin/env bash
# Fills benchmarks/wheels/ (git-ignored) with what benchmarks/gpu_suite.sh installs on a GPU machine that
# has Python 3.12 and torch but no DeepSpeed and no network: DeepSpeed 0.19.8 as a pure-Python wheel
# (built here from its sdist with no ops compiled; DeepSpeed publishes no wheel) and its dependencies
# that such a machine lacks, as CPython 3.12 manylinux wheels. Run it here, where pip reaches PyPI:
#
#   bash benchmarks/fetch_wheels.sh        # ~5 MB
set -euo pipefail
cd "$(dirname "$0")"
DEST=wheels
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing-extensions==4.15.0 hjson==3.1.0
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -l "$DEST"
