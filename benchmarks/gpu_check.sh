#!/bin/bash
# The CUDA path in one call on a lent GPU machine (its image has torch but none of the test-only
# packages: put pure-Python copies of diffusers, k_diffusion, torchsde, trampoline and mlxtend in
# .dev/site and carry .dev). Each part has its own time limit; logs land in $OUT.
#   bash benchmarks/gpu_check.sh [unet] [precision] [tests] [compile] [upsample]  (default: the first three)
#   1. benchmarks/unet_speed.py --device cuda --bf16: diffusekit's U-Net against diffusers' on the GPU
#   2. benchmarks/precision_check.py: fp32 / bf16 / fp16 training curves and sample grids on CUDA
#   3. the test suite with a GPU present (the trainer's default device is then CUDA)
#   4. compile: unet_speed.py --compile on the GPU (what `diffusekit train --compile` buys there)
#   5. upsample: whether upsampling as a transposed convolution pays on the GPU too (CPU-only so far)
set -u
export PYTHONPATH="$PWD/src:$PWD/.dev/site" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
parts=" ${*:-unet precision tests} "
[[ $parts == *" unet "* ]] && timeout 130 python3 benchmarks/unet_speed.py --device cuda --bf16 --repeats 3 --window 0.5 2>&1 | tee "$OUT/unet_speed.txt"
if [[ $parts == *" precision "* ]]; then
    timeout 200 python3 benchmarks/precision_check.py --device cuda --steps 600 --batch-size 128 \
        --out "$OUT/precision" > "$OUT/precision.txt" 2>&1
    tail -8 "$OUT/precision.txt"
    rm -rf "$OUT"/precision/*/  # keep the grids, not the runs
fi
[[ $parts == *" compile "* ]] && timeout 300 python3 benchmarks/unet_speed.py --device cuda --compile --config small \
    --repeats 3 --window 0.5 2>&1 | grep -v Warning | tee "$OUT/unet_compile.txt"
if [[ $parts == *" upsample "* ]]; then
    for group in train unet vae; do
        timeout 60 python3 benchmarks/issue4_unet/upsample_conv_micro.py 1 $group --device cuda 2>&1 | tee -a "$OUT/upsample.txt"
    done
fi
if [[ $parts == *" tests "* ]]; then
    timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 120 > "$OUT/pytest.txt" 2>&1
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | cut -c1-300
    tail -3 "$OUT/pytest.txt"
fi
