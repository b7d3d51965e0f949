"""Make `fid_inception_reference.safetensors`: pytorch-fid's pool3 features of a few fixed images,
with fixed pseudo-random weights, for `tests/test_inception.py`.

The real weights (95 MB) cannot ship with the tests, so both sides fill the same network with
the same made-up weights. They come from an integer hash of (seed, key, index), not from
torch's random generators, so they are bit-identical across torch versions: this script runs
once in a scratch environment with pytorch-fid and torchvision, the test in ours.

    python3 -m venv /tmp/fidref
    /tmp/fidref/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid scipy safetensors
    /tmp/fidref/bin/python tests/data/make_fid_inception_reference.py

No download happens: pytorch-fid's `load_state_dict_from_url` is replaced by the made-up weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zlib
from pathlib import Path

import torch

SEED = 2015
OUT = Path(__file__).with_name("fid_inception_reference.safetensors")
INPUT_SIDES = (32, 64)  # two images at each: pytorch-fid resizes each batch to 299x299
MASK = 0xFFFFFFFF


def hash_uniform(name: str, numel: int, seed: int) -> torch.Tensor:
    """numel float64 values in (0, 1) from a 32-bit integer hash of (seed, name, index): exact
    integer arithmetic, so every torch version and machine gives the same bits."""
    key = zlib.crc32(f"{seed}:{name}".encode())
    h = (torch.arange(numel, dtype=torch.int64) * 2654435761 + key) & MASK
    for _ in range(2):
        h = h ^ (h >> 16)
        h = (h * 0x45D9F3B) & MASK
    h = h ^ (h >> 16)
    return (h.double() + 0.5) / 2.0**32


def _centred(name: str, shape, seed: int, std: float) -> torch.Tensor:
    """Uniform with mean 0 and standard deviation `std`."""
    u = hash_uniform(name, math.prod(shape), seed)
    return ((u * 2 - 1) * (std * math.sqrt(3))).reshape(shape).float()


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Made-up weights for the key -> shape map of the FID Inception network, scaled so that
    activations neither vanish nor explode through its 94 layers (He-scaled convolutions,
    BatchNorm statistics near 0 mean and unit variance), so the comparison tests every layer."""
    sd = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros(shape, dtype=torch.long)
        elif name.endswith("conv.weight"):
            sd[name] = _centred(name, shape, seed, math.sqrt(2 / math.prod(shape[1:])))
        elif name.endswith("bn.weight"):
            sd[name] = (hash_uniform(name, math.prod(shape), seed) + 0.5).reshape(shape).float()  # U(0.5, 1.5)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            sd[name] = _centred(name, shape, seed, 0.1)
        elif name.endswith("bn.running_var"):
            sd[name] = (hash_uniform(name, math.prod(shape), seed) + 0.5).reshape(shape).float()  # U(0.5, 1.5)
        elif name == "fc.weight":
            sd[name] = _centred(name, shape, seed, 1 / math.sqrt(shape[1]))
        elif name == "fc.bias":
            sd[name] = _centred(name, shape, seed, 0.01)
        else:
            raise ValueError(f"no rule for {name}")
    return sd


def state_dict_digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(sd):
        h.update(name.encode())
        h.update(sd[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_images(seed: int = SEED) -> dict[int, torch.Tensor]:
    """Two RGB images per side in [-1, 1], on 8-bit levels like decoded PNGs; smooth gradients
    plus hash noise, so both the resize and the texture matter."""
    images = {}
    for side in INPUT_SIDES:
        levels = (hash_uniform(f"images{side}", 2 * 3 * side * side, seed) * 256).floor().clamp(max=255)
        noise = levels.reshape(2, 3, side, side) / 255
        ramp = torch.linspace(0, 1, side, dtype=torch.float64)
        smooth = torch.stack([ramp[None, :].expand(side, side), ramp[:, None].expand(side, side),
                              (ramp[None, :] * ramp[:, None])])
        x = (0.5 * noise + 0.5 * smooth) * 255
        images[side] = (x.round() / 255 * 2 - 1).float()
    return images


def _pytorch_fid_features():
    import pytorch_fid
    import torchvision
    from pytorch_fid import inception as pfi

    captured = {}
    original = pfi._inception_v3

    def capture(*args, **kwargs):
        captured["net"] = original(*args, **kwargs)
        return captured["net"]

    def no_download(url, **kwargs):  # called after the FID blocks are patched in: the final keys
        shapes = {k: tuple(v.shape) for k, v in captured["net"].state_dict().items()}
        captured["shapes"] = shapes
        return random_state_dict(shapes)

    pfi._inception_v3, pfi.load_state_dict_from_url = capture, no_download
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    sd = random_state_dict(captured["shapes"])
    features = {}
    with torch.no_grad():
        for side, x in reference_images().items():
            features[f"features_{side}"] = model((x + 1) / 2)[0].flatten(1).contiguous()  # it takes [0, 1]
    meta = {"keys": json.dumps([[k, list(s)] for k, s in captured["shapes"].items()]), "seed": str(SEED),
            "weights_sha256": state_dict_digest(sd), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pytorch_fid": pytorch_fid.__version__}
    return features, meta


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    features, meta = _pytorch_fid_features()
    for name, f in features.items():
        print(f"{name}: mean {f.mean():.4g} std {f.std():.4g} zero fraction {(f == 0).double().mean():.3f}",
              file=sys.stderr)
    save_file(features, str(OUT), metadata=meta)
    print(f"wrote {OUT} (pytorch-fid {meta['pytorch_fid']}, torch {meta['torch']})", file=sys.stderr)


if __name__ == "__main__":
    main()
