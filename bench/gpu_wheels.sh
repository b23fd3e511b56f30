#!/usr/bin/env bash
# Download into .whl/ (ignored by git through .git/info/exclude) the wheels bench/gpu_check.sh installs on the GPU
# machine, whose image (Python 3.12) has torch, accelerate, safetensors, huggingface_hub, timm and tensorboard but
# not diffusers or open_clip; transformers, peft and regex travel at the versions this project is tested with,
# whatever the image has. Run here, where pip reaches the registry; then carry .whl in the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 peft==0.21.2 open_clip_torch==3.3.0 ftfy==6.3.1 \
    wcwidth==0.2.14 regex==2026.11.19
du -sh .whl
