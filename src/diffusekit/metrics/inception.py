"""The Inception-v3 network of standard FID and KID, with weights the user points to.

    net = load_inception("pt_inception-2015-12-05-6726825d.pth")
    real_f = inception_features(real_images, net)      # images [N, 3 or 1, H, W] in [-1, 1]
    fake_f = inception_features(fake_images, net)      # -> [N, 2048] "pool3" features
    frechet_distance(fake_f, real_f); kernel_inception_distance(fake_f, real_f)

Standard FID is defined by one particular network: the TensorFlow graph of Heusel et al. (2017,
"2015-12-05"), which differs from torchvision's Inception-v3 in its pooling (average pools ignore
padding; the last block max-pools) and has 1008 classes. pytorch-fid ported it and its weights
(`pt_inception-2015-12-05-6726825d.pth`). This module rebuilds that port so those weights load
under the same key names and give the same features.

Why not pytorch-fid or torch-fidelity: both import torchvision, and PyPI's torchvision fails to
import beside a CPU torch ("operator torchvision::nms does not exist"); torch-fidelity also
unpickles its weights. The network is small enough to write out, and `tests/test_inception.py`
checks it against pytorch-fid: with the same weights the features agree to about 1e-6 of their
scale (bit for bit in the default memory layout; `inception_features` feeds channels-last
batches, about 1.4x faster on CPU, which only reorders float sums).

diffusekit never downloads: the user obtains the weights file and passes its path. `.pth`/`.pt`
files are read with `torch.load(weights_only=True)`, never a full unpickle; `.safetensors` also works.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
EXPECTED = f"pytorch-fid's Inception weights file ({WEIGHTS_NAME})"
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes plus 8 unused
INPUT_SIDE = 299


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    # TensorFlow's average pool divides by the pixels inside the image, not the 9 of the window
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e: factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool: the TF graph's quirk)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pool),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID graph; `forward` maps images [N, 3, H, W] in [-1, 1] to pool3
    features [N, 2048]. Attribute names follow torchvision's Inception3, so the state dict's keys
    are those of pytorch-fid's `fid_inception_v3()` (and of its weights file). `fc` (1008 classes)
    is kept only when the weights have it, for `logits`; FID and KID never use it."""

    def __init__(self, with_fc: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES) if with_fc else None

    def forward(self, images: Tensor) -> Tensor:
        # pytorch-fid resizes its [0, 1] input, then maps it to [-1, 1]; do the same steps in the
        # same order (bilinear, no antialiasing), so features match it to rounding
        x = (images + 1) / 2
        x = F.interpolate(x, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))

    def logits(self, features: Tensor) -> Tensor:
        """The 1008-way classifier on pool3 features (what the Inception Score reads)."""
        if self.fc is None:
            raise ValueError("these Inception weights have no classifier (fc.weight, fc.bias)")
        return self.fc(features)


# -- loading --------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise ValueError(f"cannot read {path} as safetensors ({_first_line(e)}); expected {EXPECTED}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # weights_only met a class or function: never unpickled here
            raise ValueError(f"{path} holds Python objects besides tensors, which diffusekit does not unpickle "
                             f"(weights_only=True); expected {EXPECTED}, a plain state dict") from None
        raise ValueError(f"cannot read {path} as a PyTorch state dict (not a torch.save file); expected {EXPECTED}") \
            from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read {path} as a PyTorch state dict ({_first_line(e)}); expected {EXPECTED}") \
            from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} is not a state dict (names to tensors); expected {EXPECTED}")
    return sd


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def load_inception(path, device=None) -> FIDInceptionV3:
    """The FID Inception network with the weights at `path` (.pth/.pt state dict or .safetensors),
    in eval mode. Keys we do not use are ignored (e.g. `num_batches_tracked`, or `fc` only when
    absent); a missing key or a wrong shape is a one-line error naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights at {path}: point --inception-weights at {EXPECTED}; "
                                "diffusekit never downloads it")
    sd = _read_state_dict(path)
    with torch.device("meta"):  # no random init of 24M parameters that the file replaces anyway
        net = FIDInceptionV3(with_fc="fc.weight" in sd or "fc.bias" in sd)
    full = {}
    for key, want in net.state_dict().items():
        if key.endswith("num_batches_tracked"):  # training-only counter; old files lack it
            full[key] = torch.zeros((), dtype=torch.long)
            continue
        if key not in sd:
            raise ValueError(f"{path} is not the FID Inception network's weights: key {key!r} is missing; "
                             f"expected {EXPECTED}")
        if tuple(sd[key].shape) != tuple(want.shape):
            raise ValueError(f"{path}: {key!r} has shape {tuple(sd[key].shape)}, the FID Inception network needs "
                             f"{tuple(want.shape)}; expected {EXPECTED}")
        if not sd[key].is_floating_point():
            raise ValueError(f"{path}: {key!r} is {sd[key].dtype}, not floating point; expected {EXPECTED}")
        full[key] = sd[key].float()
    net.load_state_dict(full, assign=True)
    return net.requires_grad_(False).eval().to(device or "cpu")


def weights_digest(path) -> str:
    """sha256 of the weights file (hex), so cached features are never reused with other weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- features -------------------------------------------------------------------------------------


def _check_images(images: Tensor) -> Tensor:
    """Images [N, 1 or 3, H, W] in [-1, 1]; small overshoots are clamped (samplers land a little
    outside), far-off values mean [0, 1] or [0, 255] data, which is an error rather than a guess."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Inception features need grey or RGB images [N, 1 or 3, H, W], got shape "
                         f"{tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    if images.numel() and (images.amin() < -1.5 or images.amax() > 1.5):
        raise ValueError(f"images must be in [-1, 1], got values in [{images.amin():.3g}, {images.amax():.3g}]")
    return images


@torch.no_grad()
def inception_features(images: Tensor, weights, *, batch_size: int = 50, device=None,
                       progress: bool = False) -> Tensor:
    """Pool3 features [N, 2048] (float32, CPU) of images [N, 3 or 1, H, W] in [-1, 1] (grey is
    repeated to RGB). `weights` is a path (see `load_inception`) or a loaded `FIDInceptionV3`;
    `device` defaults to the network's."""
    from tqdm.auto import tqdm

    images = _check_images(images)
    net = weights if isinstance(weights, FIDInceptionV3) else load_inception(weights, device)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net = net.to(device).eval()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="inception", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        x = images[start:start + batch_size].to(device, torch.float32).clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append(net(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)


__all__ = ["FIDInceptionV3", "WEIGHTS_NAME", "inception_features", "load_inception", "weights_digest"]
