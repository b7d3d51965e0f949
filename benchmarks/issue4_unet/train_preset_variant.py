"""diffusekit train with the digits/mnist presets patched: python train_variant.py VARIANT [train args]
VARIANT: base | g8 (norm_groups=8) | ss (time_scale_shift=True)"""
import sys
import diffusekit.nn.unet as u
v = sys.argv[1]
for k in ("digits", "mnist"):
    if v == "g8":
        u.PRESETS[k] = {**u.PRESETS[k], "norm_groups": 8}
    elif v == "ss":
        u.PRESETS[k] = {**u.PRESETS[k], "time_scale_shift": True}
    elif v == "base":
        u.PRESETS[k] = {**u.PRESETS[k], "norm_groups": 32, "time_scale_shift": False}
    else:
        raise SystemExit(f"unknown variant {v}")
from diffusekit.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
