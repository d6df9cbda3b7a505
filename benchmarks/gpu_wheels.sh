#!/usr/bin/env bash
# The wheels the GPU check needs beside what the GPU machine has (torch, Triton, transformers, pytest, numpy,
# pandas, pyarrow, tqdm, matplotlib; no network there): the pipeline's config and data packages, for
# tests/test_train_cuda.py and the tests' shared fixtures. Run here, in the repository's root, before the
# call; the folder .whl/ is ignored by git and travels with `carry: [".whl"]` (about 1.5 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    gguf==0.19.0 schedulefree==1.4.1
# antlr4's runtime (omegaconf's parser): pip wheel takes its wheel, or builds one from a source distribution
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.13.2
ls -la .whl
