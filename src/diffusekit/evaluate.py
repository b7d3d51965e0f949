"""`diffusekit eval RUN`: sample a trained run, score the samples with the metric that fits its
data, and write `eval.json` and `report.html` (self-contained: images and charts are inline, so the
one file can be mailed or archived).

Which metric fits which data:

  digits, mnist   the shipped digit classifier (`metrics.digit_metrics`): FD on its features,
                  confidence, junk rate, class KL, precision/recall. Class-conditional models are
                  asked for every class equally often and also scored on class accuracy.
  shapes + text   prompt adherence read back from the pixels (`metrics.shapes`), on captions of the
                  training split (seen) and of the held-out split (shape/colour pairs never trained on).
  anything else   Fréchet distance, precision and recall on 8x8 area-downsampled pixels against the
                  training data: a fixed feature for comparing runs of the same data, not FID.

`--inception-weights PATH` (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which the user
obtains; diffusekit never downloads) adds standard FID, KID and precision/recall in Inception
features to any of the above, against real training images whose features are cached in
RUN/inception-cache (keyed by the weights' and the images' hashes). Images are rounded to 8 bits
first, as the PNGs pytorch-fid would read hold them. Only the main evaluation gets them; the sweep
keeps charting the main metric.

The sweep draws fewer images (n/4 by default) at a few NFE budgets per sampler and charts the main
metric against NFE, so the user can choose a sampler and a step count. FD is biased upwards at
small n, so sweep values compare with each other, not with the main evaluation's value.

`--likelihood` adds bits/dim (DDPM's variational bound, `metrics.likelihood`) of training images.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ._utils import atomic_path
from .images import image_grid, save_image, tensor_to_pil
from .pipelines import generate
from .sampling import get_sampler

FORMAT = "diffusekit-eval"
VERSION = 1
DEFAULT_SWEEP = "euler,dpmpp_2m,unipc"
DEFAULT_SWEEP_NFE = "5,10,20"
MIN_IMAGES = 4  # precision/recall use each point's 3rd nearest neighbour
PIXEL_SIDE = 8  # the pixel feature: images area-downsampled to at most 8x8, flattened
PIXEL_REFERENCE = 2000  # real images (at most) the pixel metrics compare with
INCEPTION_REFERENCE = 10_000  # real images (at most) FID and KID compare with; their features are cached
GRID_IMAGES = 100  # samples shown in the report's grid
GALLERY_PROMPTS = 8  # text models: prompted samples shown per split, with their captions
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DASHES = ("", "7 4", "2 3", "9 3 2 3")


# -- what to ask for and how to score it, per kind of data ----------------------------------------


@dataclass
class Task:
    """How a run is evaluated: `kind` is "digits", "shapes" or "pixels"; `main` names the metric
    the sweep charts and the report leads with."""

    kind: str
    main: str
    main_label: str
    higher_is_better: bool
    axis: str  # the sweep chart's y label


def task_for(model) -> Task:
    data = model.config["data"]
    if data["name"] in ("digits", "mnist") and data["channels"] == 1:
        return Task("digits", "fd_digits", f"FD on the {data['name']} classifier's features", False,
                    "FD (lower is better)")
    if data["name"] == "shapes" and model.conditioning_kind == "text":
        return Task("shapes", "adherence_all", "prompt adherence (all attributes right)", True,
                    "adherence (higher is better)")
    return Task("pixels", "fd_pixels", f"FD on {PIXEL_SIDE}x{PIXEL_SIDE} pixels", False, "FD (lower is better)")


@dataclass
class Request:
    """What n samples are asked for: class labels (class models, every class in turn) or prompts
    (text models: the first `seen` from the training split's captions, the rest held out)."""

    n: int
    labels: Tensor | None = None
    prompts: list[str] | None = None
    seen: int = 0


def make_request(model, task: Task, n: int) -> Request:
    if model.conditioning_kind == "class":
        return Request(n, labels=torch.arange(n) % model.config["data"]["num_classes"])
    if task.kind == "shapes":
        from .data import ShapesDataset

        size, seen = model.config["data"]["resolution"], (n + 1) // 2
        prompts = ShapesDataset(size, "train").captions(range(seen)) + \
            ShapesDataset(size, "heldout").captions(range(n - seen))
        return Request(n, prompts=prompts, seen=seen)
    return Request(n)


def draw(model, request: Request, *, sampler: str, steps: int, spacing: str, seed: int, guidance: float,
         device, progress: bool) -> Tensor:
    cond, uncond = model.conditioning(request.n, class_labels=request.labels, prompts=request.prompts, device=device)
    x = generate(model.denoiser, model.schedule, model.sample_shape, request.n, seed=seed, sampler=sampler,
                 steps=steps, spacing=spacing, device=device, progress=progress, cond=cond, uncond=uncond,
                 guidance=guidance if cond is not None else 1.0, clip=model.sample_clip)
    return model.decode(x, check_scale=False)  # latent models: through their autoencoder


def pixel_features(images: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C * s * s], s = min(8, H): coarse layout and colour, no texture."""
    side = min(PIXEL_SIDE, images.shape[-1])
    return F.interpolate(images.float(), size=(side, side), mode="area").flatten(1)


class Scorer:
    """Scores images for one run; the real reference data is loaded once and reused by the sweep."""

    def __init__(self, model, task: Task):
        self.model, self.task = model, task
        self._reference: Tensor | None = None

    def reference_features(self) -> Tensor:
        if self._reference is None:
            real, pick = training_subset(self.model, PIXEL_REFERENCE, "the pixel metrics")
            self._reference = pixel_features(real.batch(pick)[0])
        return self._reference

    def __call__(self, images: Tensor, request: Request) -> tuple[dict, float]:
        """(metrics, value of the main metric)."""
        if self.task.kind == "digits":
            from .metrics import digit_metrics

            metrics = digit_metrics(images, self.model.config["data"]["name"], labels=request.labels)
            return metrics, metrics["fd_digits"]
        if self.task.kind == "shapes":
            from .metrics.shapes import ATTRIBUTES, prompt_adherence

            seen = prompt_adherence(images[:request.seen], request.prompts[:request.seen])
            held = prompt_adherence(images[request.seen:], request.prompts[request.seen:])
            pooled = {a: (seen[a] * seen["n"] + held[a] * held["n"]) / request.n for a in ATTRIBUTES}
            metrics = {"seen": seen, "heldout": held, "overall": {**pooled, "n": request.n},
                       "adherence_all": pooled["all"]}
            return metrics, pooled["all"]
        from .metrics import frechet_distance, precision_recall

        real, fake = self.reference_features(), pixel_features(images)
        precision, recall = precision_recall(real, fake)
        metrics = {"fd_pixels": frechet_distance(fake, real), "precision": precision, "recall": recall,
                   "n": len(fake), "reference_n": len(real)}
        return metrics, metrics["fd_pixels"]


def training_subset(model, n: int, purpose: str):
    """The run's training data and the indices of a fixed random subset of at most n of its items."""
    from .data import load_dataset

    data, spec = model.config["data"], model.config.get("train", {}).get("data", "")
    try:
        real = load_dataset(spec or data["name"], data["resolution"], data["channels"])
    except ValueError as e:
        raise ValueError(f"{purpose} use the training data, which cannot be loaded: {e}") from None
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]
    return real, pick.sort().values


def reference_scores(task: Task, model) -> dict:
    """Numbers to read the main metric against (what real data and pure noise score)."""
    if task.kind != "digits":
        return {}
    from .metrics.classifier import classifier_info

    scores = classifier_info(model.config["data"]["name"])["scores"]
    return {"fd_real": scores["fd_train_vs_heldout"], "fd_noise": scores["fd_noise"]}


# -- the sweep ------------------------------------------------------------------------------------


def steps_for_nfe(sampler: str, nfe: int) -> int | None:
    """The most steps whose model evaluations fit in `nfe` (None when even one step needs more)."""
    count = get_sampler(sampler).nfe
    best = None
    for steps in range(1, nfe + 1):
        if count(steps + 1) <= nfe:
            best = steps
    return best


def parse_sweep(samplers: str, nfes: str) -> tuple[list[str], list[int]]:
    names = [s.strip() for s in samplers.split(",") if s.strip()] if samplers.strip().lower() != "none" else []
    for name in names:
        if get_sampler(name).nfe(3) is None:
            raise ValueError(f"--sweep: {name} has a data-dependent NFE and cannot be swept")
    try:
        budgets = sorted({int(v) for v in nfes.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--sweep-nfe must be comma-separated integers, e.g. 5,10,20; got {nfes!r}") from None
    if names and (not budgets or budgets[0] < 1):
        raise ValueError(f"--sweep-nfe needs integers >= 1, got {nfes!r}")
    return names, budgets


def run_sweep(model, scorer: Scorer, samplers: list[str], nfes: list[int], n: int, *, spacing: str, seed: int,
              guidance: float, device, progress: bool) -> tuple[list[dict], list[str]]:
    points, notes = [], []
    request = make_request(model, scorer.task, n)
    plan = [(s, b, steps_for_nfe(s, b)) for s in samplers for b in nfes]
    for sampler, budget, steps in tqdm(plan, desc="sweep", unit="run", disable=not (progress and plan),
                                       dynamic_ncols=True):
        if steps is None:
            notes.append(f"sweep: {sampler} needs more than {budget} evaluations for one step; skipped")
            continue
        nfe = get_sampler(sampler).nfe(steps + 1)
        if any(p["sampler"] == sampler and p["nfe"] == nfe for p in points):
            continue  # two budgets that give the same step count (e.g. heun at 5 and 6)
        start = time.perf_counter()
        x = draw(model, request, sampler=sampler, steps=steps, spacing=spacing, seed=seed, guidance=guidance,
                 device=device, progress=False)
        seconds = time.perf_counter() - start
        _, value = scorer(x, request)
        points.append({"sampler": sampler, "steps": steps, "nfe": nfe, "value": value, "seconds": seconds})
    finite = [p for p in points if math.isfinite(p["value"])]
    if finite:  # the best value; on a tie, the fewest evaluations
        sign = -1 if scorer.task.higher_is_better else 1
        best = min(finite, key=lambda p: (sign * p["value"], p["nfe"]))
        for p in points:
            p["best"] = p is best
    return points, notes


# -- the whole evaluation -------------------------------------------------------------------------


def _run_root(given: Path, checkpoint: Path) -> Path:
    """The run folder (with log.jsonl) whether RUN names the run or one of its checkpoints."""
    if (given / "log.jsonl").exists() or (given / "latest").exists():
        return given
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else given


def evaluate(run_dir, *, n: int = 1000, sampler: str = "dpmpp_2m", steps: int = 25, spacing: str = "karras",
             seed: int = 0, guidance: float = 3.0, out=None, sweep: str = DEFAULT_SWEEP,
             sweep_nfe: str = DEFAULT_SWEEP_NFE, sweep_n: int | None = None, likelihood_n: int = 0,
             likelihood_timesteps: int | None = 100, inception_weights=None,
             inception_reference: int = INCEPTION_REFERENCE, device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate a run; write eval.json, report.html and samples.png into `out` (default RUN/eval)
    and return what eval.json holds. Nothing is written until every number is computed, and each
    file is replaced atomically, so a failure leaves `out` as it was (the one exception: the real
    images' Inception features, cached in RUN/inception-cache as soon as they are computed)."""
    from .train import load

    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if n < MIN_IMAGES:
        raise ValueError(f"--n must be >= {MIN_IMAGES} (precision/recall need neighbours), got {n}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not guidance >= 0:
        raise ValueError(f"--guidance must be >= 0 (1 = no guidance), got {guidance}")
    info = get_sampler(sampler)
    sweep_samplers, sweep_budgets = parse_sweep(sweep, sweep_nfe)
    sweep_n = max(MIN_IMAGES, n // 4) if sweep_n is None else sweep_n
    if sweep_n < MIN_IMAGES:
        raise ValueError(f"--sweep-n must be >= {MIN_IMAGES}, got {sweep_n}")
    if likelihood_n < 0 or likelihood_n == 1:
        raise ValueError(f"--likelihood-n must be 0 (off) or >= 2, got {likelihood_n}")
    if likelihood_timesteps is not None and likelihood_timesteps < 2:
        raise ValueError(f"--likelihood-timesteps must be >= 2 (or 0 for all steps), got {likelihood_timesteps}")
    if inception_weights is not None and inception_reference < MIN_IMAGES:
        raise ValueError(f"--inception-reference must be >= {MIN_IMAGES} (precision/recall need neighbours), "
                         f"got {inception_reference}")

    started = time.perf_counter()
    model = load(run_dir, device=device)
    run_dir = _run_root(Path(run_dir), model.path)
    inception = None
    if inception_weights is not None:  # a bad file or unfit data fails here, before any sampling
        from .metrics.inception import load_inception

        channels = model.config["data"]["channels"]
        if channels not in (1, 3):
            raise ValueError(f"--inception-weights needs grey or RGB images; this run's data has {channels} channels")
        inception = load_inception(inception_weights, device)
    out = Path(out) if out is not None else run_dir / "eval"
    task = task_for(model)
    scorer = Scorer(model, task)
    guided = model.conditioning_kind is not None and guidance != 1.0
    timing = {"load_s": time.perf_counter() - started}

    say(f"sampling {n} images from {model.path} ({sampler}, {steps} steps, seed {seed})")
    request = make_request(model, task, n)
    t = time.perf_counter()
    images = draw(model, request, sampler=sampler, steps=steps, spacing=spacing, seed=seed, guidance=guidance,
                  device=device, progress=progress)
    timing["sample_s"] = time.perf_counter() - t
    say(f"scoring ({task.main_label})")
    t = time.perf_counter()
    metrics, main_value = scorer(images, request)
    timing["score_s"] = time.perf_counter() - t

    notes = []
    if inception is not None:
        say("FID and KID (Inception features)")
        t = time.perf_counter()
        metrics.update(inception_metrics(model, images, inception, inception_weights, inception_reference,
                                         run_dir / "inception-cache", progress=progress))
        timing["inception_s"] = time.perf_counter() - t
        notes.append(f"FID and KID: pytorch-fid's Inception features of {n:,} samples and "
                     f"{metrics['inception_reference_n']:,} training images, both rounded to 8 bits. FID is biased "
                     "upwards at small n (papers use 50,000 samples): compare it only with values at the same n; "
                     "KID is unbiased")
    if task.kind == "pixels":
        notes.append(f"{task.main_label} against {metrics['reference_n']} training images: a simple, fixed feature "
                     "for comparing runs of the same data, not FID"
                     + (" (FID and KID are in the table)" if inception is not None else
                        " (for FID and KID, pass --inception-weights PATH to pytorch-fid's Inception weights)"))
    if isinstance(metrics.get("note"), str):
        notes.append(metrics["note"])
    t = time.perf_counter()
    points, sweep_notes = run_sweep(model, scorer, sweep_samplers, sweep_budgets, sweep_n, spacing=spacing,
                                    seed=seed, guidance=guidance, device=device, progress=progress)
    timing["sweep_s"] = time.perf_counter() - t
    notes += sweep_notes
    nll = None
    if likelihood_n:
        say(f"bits/dim of {likelihood_n} training images")
        t = time.perf_counter()
        nll = likelihood(model, likelihood_n, likelihood_timesteps, seed=seed, device=device, progress=progress)
        timing["likelihood_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - started
    timing["images_per_s"] = n / max(timing["sample_s"], 1e-9)

    data = model.config["data"]
    result = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir),
        "checkpoint": str(model.path),
        "step": model.config.get("step"),
        "data": {k: data.get(k) for k in ("name", "channels", "resolution", "num_classes")},
        "conditioning": model.conditioning_kind,
        "evaluation": task.kind,
        "settings": {"n": n, "sampler": sampler, "steps": steps, "spacing": spacing, "seed": seed,
                     "guidance": guidance if model.conditioning_kind else None, "clip": [-1.0, 1.0],
                     "device": str(device), "sweep": sweep_samplers, "sweep_nfe": sweep_budgets,
                     "sweep_n": sweep_n if sweep_samplers else None,
                     "inception_weights": str(inception_weights) if inception is not None else None},
        "nfe": info.nfe(steps + 1),
        "guided": guided,
        "main_metric": {"name": task.main, "label": task.main_label, "axis": task.axis, "value": main_value,
                        "higher_is_better": task.higher_is_better, "reference": reference_scores(task, model)},
        "metrics": metrics,
        "likelihood": nll,
        "sweep": points,
        "timing": {**timing, "threads": torch.get_num_threads()},
        "notes": notes,
        "versions": {"diffusekit": _version(), "torch": torch.__version__},
    }
    result = _json_safe(result)

    # Everything is computed: render, then write (eval.json last, as the mark of a finished evaluation).
    grid = sample_grid(images, request, model)
    report = render_report(result, grid, gallery(images, request) if task.kind == "shapes" else [],
                           loss_curve(run_dir / "log.jsonl"))
    save_image(grid, out / "samples.png")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(report, encoding="utf-8")
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def likelihood(model, n: int, timesteps: int | None, *, seed: int, device, progress: bool) -> dict:
    """Bits/dim of n training images under DDPM's variational bound (`metrics.likelihood`), each image
    conditioned on its own label or caption. The trainer uses all of the data, so there is no held-out
    split to take: this measures the fit, not generalisation.

    The bound is over quantised pixels: the 8x8 digits are 17-level images and are scored as such;
    anything else is rounded to 8 bits, exactly what a PNG of it would hold. `timesteps` K draws K of
    the T steps per image (unbiased, K + 1 network calls); None sums all T."""
    try:
        from .metrics.likelihood import bits_per_dim
    except ImportError:
        raise ValueError("--likelihood needs diffusekit.metrics.likelihood, which this version does not have") from None
    if model.autoencoder is not None:
        raise ValueError("--likelihood bounds pixel likelihoods; a latent model's bound would be over its latents, "
                         "not the images: leave --likelihood off for latent models")
    real, pick = training_subset(model, n, "--likelihood")
    data = model.config["data"]
    levels = 17 if data["name"] == "digits" and data["resolution"] == 8 else 256
    g = torch.Generator().manual_seed(seed)
    values = []
    for rows in pick.split(256):
        x, labels = real.batch(rows)
        x = ((x + 1) * (levels - 1) / 2).round() * 2 / (levels - 1) - 1
        cond = None
        if model.conditioning_kind == "class":
            cond = {"class_labels": labels.to(device)}
        elif model.conditioning_kind == "text":
            pooled = model.network.config.pooled_context_dim is not None
            cond = {k: v.to(device) for k, v in model.text_encoder(real.captions(rows)).cond(pooled).items()}
        out = bits_per_dim(model, x.to(device), "vlb", num_levels=levels, cond=cond, generator=g,
                           num_timesteps=timesteps, progress=progress)
        values.append(out.bpd.double().cpu())
    bpd = torch.cat(values)
    return {"bits_per_dim": float(bpd.mean()), "stderr": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1
            else None, "n": len(bpd), "num_levels": levels, "method": "vlb", "timesteps": timesteps or "all",
            "images": "training"}


def _levels(images: Tensor) -> Tensor:
    """[-1, 1] images as the 8-bit levels (uint8) a PNG holds: standard FID is computed on image files."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _to_8_bits(images: Tensor) -> Tensor:
    return _levels(images).float() / 127.5 - 1


def inception_metrics(model, images: Tensor, net, weights, reference: int, cache_dir: Path, *,
                      progress: bool = False) -> dict:
    """FID, KID and improved precision/recall of `images` against up to `reference` training images,
    in the pool3 features of the FID Inception network `net` (loaded from `weights`)."""
    from .metrics import frechet_distance, kernel_inception_distance, precision_recall
    from .metrics.inception import inception_features

    real = reference_inception_features(model, net, weights, reference, cache_dir, progress=progress)
    fake = inception_features(_to_8_bits(images), net, progress=progress)
    kid, kid_std = kernel_inception_distance(fake, real)
    precision, recall = precision_recall(real, fake)
    return {"fid": frechet_distance(fake, real), "kid": kid, "kid_std": kid_std, "inception_precision": precision,
            "inception_recall": recall, "inception_n": len(fake), "inception_reference_n": len(real)}


def reference_inception_features(model, net, weights, reference: int, cache_dir: Path, *, chunk: int = 500,
                                 progress: bool = False) -> Tensor:
    """Inception features [M, 2048] of a fixed subset of the training images, from the cache when
    it holds them. The cache key hashes the weights file and the very images (8-bit, in order), so
    another dataset, resolution, count, changed image folder or weights file never reuses a stale
    entry; reading the images again costs little next to the network."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .metrics.inception import FEATURE_DIM, inception_features, weights_digest

    real, pick = training_subset(model, reference, "FID and KID")
    if len(pick) < MIN_IMAGES:
        raise ValueError(f"FID and KID need at least {MIN_IMAGES} training images (precision/recall need "
                         f"neighbours); the data has {len(pick)}")
    weights_sha = weights_digest(weights)
    h = hashlib.sha256(weights_sha.encode())
    batches = [pick[i:i + chunk] for i in range(0, len(pick), chunk)]
    for rows in batches:
        h.update(_levels(real.batch(rows)[0]).numpy().tobytes())
    key = h.hexdigest()
    data = model.config["data"]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(data["name"]))[:40]
    path = cache_dir / f"{name}-{data['resolution']}px-{len(pick)}-{key[:16]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    cached = f.get_tensor("features")
                    if cached.shape == (len(pick), FEATURE_DIM):
                        return cached
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed and replaced
            pass
    features = torch.cat([inception_features(_to_8_bits(real.batch(rows)[0]), net, progress=progress)
                          for rows in batches])
    with atomic_path(path) as tmp:
        save_file({"features": features.contiguous()}, str(tmp),
                  metadata={"key": key, "weights_sha256": weights_sha, "dataset": str(data["name"]),
                            "resolution": str(data["resolution"]), "n": str(len(pick))})
    return features


def _version() -> str:
    from . import __version__

    return __version__


def _json_safe(value):
    """NaN and inf become null: eval.json stays standard JSON that every reader accepts."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def loss_curve(path: Path) -> list[tuple[float, float]]:
    """(step, loss) pairs of a run's log.jsonl."""
    from .train.loop import read_log

    return [(float(r["step"]), float(r["loss"])) for r in read_log(path) if "step" in r and "loss" in r]


# -- the report -----------------------------------------------------------------------------------


def sample_grid(images: Tensor, request: Request, model):
    """The first GRID_IMAGES samples; class models get one column per class."""
    shown = images[:GRID_IMAGES]
    columns = model.config["data"]["num_classes"] if request.labels is not None else None
    return image_grid(shown, columns=columns, min_tile=48)


def gallery(images: Tensor, request: Request) -> list[dict]:
    """A few prompted samples per split with their captions and whether every attribute was read back."""
    from .metrics.shapes import prompt_adherence

    items = []
    for split, rows in (("seen", range(request.seen)), ("held out", range(request.seen, request.n))):
        for i in list(rows)[:GALLERY_PROMPTS]:
            ok = prompt_adherence(images[i:i + 1], request.prompts[i:i + 1])["all"] == 1.0
            tile = tensor_to_pil(images[i]).resize((96, 96), 0)  # nearest: keep the pixels honest
            items.append({"split": split, "prompt": request.prompts[i], "ok": ok, "png": _png(tile)})
    return items


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value) -> str:
    """Four significant digits, trailing zeros kept, so a column of values lines up (24.00, 21.99)."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:,.{min(max(0, 3 - math.floor(math.log10(abs(value)))), 6)}f}"


DIGIT_ROWS = (  # key, label, better, shown as a percentage, meaning
    ("fd_digits", "FD (classifier features)", "lower", False, "Fréchet distance to held-out real digits"),
    ("precision", "precision", "higher", True, "samples inside the real digits' manifold (quality)"),
    ("recall", "recall", "higher", True, "real digits inside the samples' manifold (coverage)"),
    ("confidence", "confidence", "higher", True, "mean top digit probability"),
    ("junk_rate", "junk rate", "lower", True, "samples the classifier calls 'not a digit'"),
    ("class_kl", "class KL", "lower", False, "KL(real || generated) of predicted-digit histograms (mode collapse)"),
    ("class_accuracy", "class accuracy", "higher", True, "samples drawn as the requested class"),
)
PIXEL_ROWS = (
    ("fd_pixels", f"FD ({PIXEL_SIDE}x{PIXEL_SIDE} pixels)", "lower", False, "Fréchet distance to training images"),
    ("precision", "precision", "higher", True, "samples inside the real images' manifold (quality)"),
    ("recall", "recall", "higher", True, "real images inside the samples' manifold (coverage)"),
)
INCEPTION_ROWS = (
    ("fid", "FID", "lower", False, "standard FID: Fréchet distance to {ref} training images in Inception features"),
    ("kid", "KID", "lower", False, "kernel inception distance: unbiased, ± its std over random subsets"),
    ("inception_precision", "precision (Inception)", "higher", True, "samples inside the real images' manifold"),
    ("inception_recall", "recall (Inception)", "higher", True, "real images inside the samples' manifold"),
)
ATTRIBUTE_HELP = {"shape": "shape", "colour": "colour", "size": "small / large", "position": "place or relation",
                  "count": "number of shapes", "shape_colour": "shape and colour together (what held-out pairs test)",
                  "all": "every attribute right"}


def _metrics_table(result: dict) -> str:
    metrics, main = result["metrics"], result["main_metric"]
    if result["evaluation"] == "shapes":
        head = "<tr><th>attribute</th><th class=num>seen prompts</th><th class=num>held-out prompts</th>" \
               "<th class=num>all</th><th>checks</th></tr>"
        from .metrics.shapes import ATTRIBUTES

        rows = []
        for name in ATTRIBUTES:
            meaning = ATTRIBUTE_HELP.get(name, "")
            cls = " class=main" if name == "all" else ""
            cells = "".join(f"<td class=num>{metrics[part][name]:.1%}</td>" for part in ("seen", "heldout", "overall"))
            rows.append(f"<tr{cls}><td>{html.escape(name.replace('_', ' & '))}</td>{cells}"
                        f"<td class=dim>{meaning}</td></tr>")
        counts = "".join(f"<td class=num>{metrics[part]['n']:,}</td>" for part in ("seen", "heldout", "overall"))
        rows.append(f"<tr><td>images</td>{counts}<td></td></tr>")
        table = f"<table>{head}{''.join(rows)}</table>"
        if "fid" in metrics:
            table += _rows_table(metrics, INCEPTION_ROWS, main["name"], metrics["inception_n"])
        return table
    spec = (DIGIT_ROWS if result["evaluation"] == "digits" else PIXEL_ROWS) + INCEPTION_ROWS
    return _rows_table(metrics, spec, main["name"], metrics["n"])


def _rows_table(metrics: dict, spec, main: str, n: int) -> str:
    rows = []
    for key, label, better, percent, meaning in spec:
        if key not in metrics:
            continue
        cls = " class=main" if key == main else ""
        arrow = "↓" if better == "lower" else "↑"
        value = "–" if metrics[key] is None else f"{metrics[key]:.1%}" if percent else _fmt(metrics[key])
        if key == "kid" and metrics.get("kid_std") is not None:
            value += f" ± {metrics['kid_std']:.2g}"
        if key == "fid":
            meaning = meaning.format(ref=f"{metrics['inception_reference_n']:,}")
        rows.append(f"<tr{cls}><td>{label}</td><td class=num>{value}</td>"
                    f"<td class=arrow title='{better} is better'>{arrow}</td><td class=dim>{meaning}</td></tr>")
    rows.append(f"<tr><td>images</td><td class=num>{n:,}</td><td></td><td></td></tr>")
    return "<table><tr><th>metric</th><th class=num>value</th><th></th><th>meaning</th></tr>" + "".join(rows) + "</table>"


def _value(result: dict, v) -> str:
    """A main-metric value as the report shows it: adherence in percent, distances as numbers."""
    return f"{v:.1%}" if result["evaluation"] == "shapes" and v is not None else _fmt(v)


def _steps(k: int) -> str:
    return f"{k} step" if k == 1 else f"{k} steps"


def _likelihood_text(nll: dict) -> str:
    steps = "all T timesteps" if nll["timesteps"] == "all" else f"{nll['timesteps']} random timesteps each"
    stderr = f" ± {nll['stderr']:.3f}" if nll["stderr"] is not None else ""
    return (f"{nll['bits_per_dim']:.3f}{stderr} (variational bound on {nll['n']:,} {nll['images']} images, "
            f"{nll['num_levels']}-level pixels, {steps})")


def _headline(result: dict) -> str:
    main = result["main_metric"]
    value = _value(result, main["value"])
    better = "higher" if main["higher_is_better"] else "lower"
    context = ""
    ref = main.get("reference") or {}
    if "fd_real" in ref:
        context = f"; real digits score {ref['fd_real']:.3g}, uniform noise {ref['fd_noise']:.4g}"
    return (f"<div class=headline><span class=big>{value}</span> {html.escape(main['label'])} "
            f"<span class=dim>({better} is better{context})</span></div>")


def _sweep_section(result: dict) -> str:
    points = result["sweep"]
    if not points:
        return "<p class=dim>No sampler sweep (--sweep none).</p>"
    main = result["main_metric"]
    shapes = result["evaluation"] == "shapes"
    samplers = list(dict.fromkeys(p["sampler"] for p in points))
    nfes = sorted({p["nfe"] for p in points})
    series = [(s, [(p["nfe"], p["value"]) for p in points if p["sampler"] == s and p["value"] is not None])
              for s in samplers]
    best = next((p for p in points if p.get("best")), None)
    mark = (best["nfe"], best["value"], "best") if best else None
    chart = svg_chart(series, x_label="model evaluations per image (NFE)", y_label=main["axis"],
                      log_x=True, x_ticks=nfes, mark=mark, percent=shapes)
    head = "<tr><th>sampler</th>" + "".join(f"<th class=num>NFE {b}</th>" for b in nfes) + "</tr>"
    rows = []
    for s in samplers:
        cells = []
        for b in nfes:
            p = next((p for p in points if p["sampler"] == s and p["nfe"] == b), None)
            if p is None:
                cells.append("<td class=num>–</td>")
            else:
                cls = "num best" if p.get("best") else "num"
                cells.append(f"<td class='{cls}' title='{_steps(p['steps'])}, {p['seconds']:.1f} s'>"
                             f"{_value(result, p['value'])}</td>")
        rows.append(f"<tr><td>{html.escape(s)}</td>{''.join(cells)}</tr>")
    better = "higher" if main["higher_is_better"] else "lower"
    n = result["settings"]["sweep_n"]
    summary = (f"<p><b>Best: {html.escape(best['sampler'])} at {best['nfe']} NFE ({_steps(best['steps'])}), "
               f"{_value(result, best['value'])}.</b> ") if best else "<p>"
    summary += (f"Each point is {n:,} images with seed {result['settings']['seed']} and "
                f"{html.escape(result['settings']['spacing'])} spacing; {better} is better. "
                + ("FD grows as n shrinks, so compare these points with each other, not with the value above. "
                   if not shapes else "")
                + ("With guidance each evaluation runs the network on the conditional and unconditional inputs "
                   "together." if result["guided"] else "") + "</p>")
    return f"{summary}<div class=cols><div>{chart}</div><table>{head}{''.join(rows)}</table></div>"


def _loss_section(log: list[tuple[float, float]], step) -> str:
    if not log:
        return "<p class=dim>No training log (log.jsonl) beside this checkpoint.</p>"
    if len(log) == 1:
        return f"<p class=dim>One log record: loss {log[0][1]:.4g} at step {log[0][0]:.0f}.</p>"
    return svg_chart([("loss", log)], x_label="training step", y_label="loss (log scale)", log_y=True,
                     vline=(step, f"evaluated: step {step}") if step is not None else None, points=False, width=720)


def render_report(result: dict, grid, gallery_items: list[dict], log: list[tuple[float, float]]) -> str:
    s, data = result["settings"], result["data"]
    kind = {"class": "class-conditional", "text": "text-conditional", None: "unconditional"}[result["conditioning"]]
    colour = "grey" if data["channels"] == 1 else "RGB"
    created = datetime.fromisoformat(result["created"]).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"step {_fmt(result['step'])} · {html.escape(str(data['name']))} {data['resolution']}×"
                f"{data['resolution']} {colour} · {kind} · evaluated {created}")
    guidance = f", guidance {s['guidance']:g}" if s["guidance"] is not None else ""
    settings = (f"{s['n']:,} samples · {html.escape(s['sampler'])}, {s['steps']} steps "
                f"({_fmt(result['nfe'])} NFE{', guided' if result['guided'] else ''}), {html.escape(s['spacing'])} "
                f"spacing{guidance} · seed {s['seed']} · {html.escape(s['device'])}")
    t = result["timing"]
    timing = (f"sampling {t['sample_s']:.1f} s ({t['images_per_s']:.3g} images/s), scoring {t['score_s']:.1f} s, "
              f"sweep {t['sweep_s']:.1f} s, total {t['total_s']:.1f} s on {t['threads']} "
              f"{'thread' if t['threads'] == 1 else 'threads'}")
    shown = min(s["n"], GRID_IMAGES)
    caption = f"The first {shown:,} of {s['n']:,} samples" + \
        ("; column k asks for class k." if result["conditioning"] == "class" else ".")
    gallery_html = ""
    if gallery_items:
        tiles = "".join(
            f"<figure class='{'ok' if g['ok'] else 'bad'}'><img src='{g['png']}' alt=''>"
            f"<figcaption><span class=tag>{g['split']}</span> {'✓' if g['ok'] else '✗'} "
            f"{html.escape(g['prompt'])}</figcaption></figure>" for g in gallery_items)
        gallery_html = ("<h3>Prompts and what was drawn</h3><p class=dim>Green: the analyser reads every "
                        f"attribute of the prompt back from the image.</p><div class=gallery>{tiles}</div>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result["notes"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>diffusekit eval: {html.escape(result['run'])}</title>
<style>
body {{ font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
        max-width: 1100px; margin: 24px auto; padding: 0 20px; }}
h1 {{ font-size: 22px; margin: 0; }} h2 {{ font-size: 17px; margin: 32px 0 10px; padding-bottom: 4px;
       border-bottom: 1px solid #ddd; }} h3 {{ font-size: 15px; margin: 20px 0 4px; }}
.dim {{ color: #666; }} .sub {{ color: #555; margin: 2px 0 14px; }}
.headline {{ background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 6px; padding: 10px 14px; }}
.big {{ font-size: 26px; font-weight: 600; margin-right: 6px; }}
table {{ border-collapse: collapse; margin: 6px 0; }}
th, td {{ padding: 4px 12px 4px 0; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }}
th {{ font-weight: 600; border-bottom: 1px solid #ccc; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }} .arrow {{ color: #888; }}
tr.main td {{ font-weight: 600; background: #fff8e1; }} td.best {{ font-weight: 700; background: #e6f4ea; }}
.cols {{ display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }}
img.grid {{ image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; width: 150px; font-size: 12px; }}
figure img {{ image-rendering: pixelated; display: block; border: 3px solid; }}
figure.ok img {{ border-color: #34a853; }} figure.bad img {{ border-color: #d93025; }}
.tag {{ background: #eee; border-radius: 3px; padding: 0 4px; }}
svg text {{ font: 12px system-ui, sans-serif; fill: #333; }}
ul.notes {{ color: #6a4a00; }}
</style></head><body>
<h1>Evaluation of {html.escape(result['run'])}</h1>
<div class=sub>{subtitle}</div>
{_headline(result)}
<p class=dim>{settings}<br>{timing}</p>
<h2>Metrics</h2>
{_metrics_table(result)}
{f'<p>Bits/dim: <b>{html.escape(_likelihood_text(result["likelihood"]))}</b>; lower is better, an upper bound on '
 'the negative log-likelihood.</p>' if result["likelihood"] else ''}
<h2>Samples</h2>
<img class=grid src="{_png(grid)}" alt="sample grid">
<p class=dim>{caption}</p>
{gallery_html}
<h2>Which sampler, how many steps</h2>
{_sweep_section(result)}
<h2>Training loss</h2>
{_loss_section(log, result['step'])}
{f'<h2>Notes</h2><ul class=notes>{notes}</ul>' if notes else ''}
<p class=dim>checkpoint {html.escape(result['checkpoint'])} · diffusekit {html.escape(result['versions']['diffusekit'])},
torch {html.escape(result['versions']['torch'])} · numbers in eval.json beside this file</p>
</body></html>
"""


# -- a small SVG line chart -----------------------------------------------------------------------


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round-numbered ticks (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step = next(m * step for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k within [lo, hi] (values, not logs); falls back to plain ticks over a narrow range."""
    ticks = [m * 10 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= m * 10 ** k <= hi]
    return ticks if len(ticks) >= 3 else _ticks(lo, hi, 4)


def _label(v: float, percent: bool) -> str:
    return f"{v:.0%}" if percent else f"{v:.3g}"


def svg_chart(series: list[tuple[str, list[tuple[float, float]]]], *, x_label: str, y_label: str,
              log_x: bool = False, log_y: bool = False, x_ticks=None, mark=None, vline=None,
              points: bool = True, percent: bool = False, width: int = 560, height: int = 320) -> str:
    """Inline SVG: one line per (name, [(x, y), ...]) with a legend, axes and gridlines; `mark`
    (x, y, text) rings one point; `vline` (x, text) draws a dashed vertical line."""
    left, right, top, bottom = 64, width - (130 if len(series) > 1 else 20), 16, height - 46
    xs = [x for _, pts in series for x, _ in pts] + ([vline[0]] if vline is not None else [])
    ys = [y for _, pts in series for _, y in pts if y is not None and (not log_y or y > 0)]
    if not xs or not ys:
        return "<p class=dim>nothing to plot</p>"
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    y0, y1 = fy(min(ys)), fy(max(ys))
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 < 1e-12 * max(1.0, abs(y0)):
        pad = max(abs(y0) * 0.1, 1e-3)
        y0, y1 = y0 - pad, y1 + pad
    pad_x, pad_y = (x1 - x0) * 0.06, (y1 - y0) * 0.08
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def px(v):
        return left + (fx(v) - x0) / (x1 - x0) * (right - left)

    def py(v):
        return bottom - (fy(v) - y0) / (y1 - y0) * (bottom - top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(y_label)} against '
             f'{html.escape(x_label)}</title>']
    raw_y = (10 ** y0, 10 ** y1) if log_y else (y0, y1)
    for v in (_log_ticks(*raw_y) if log_y else _ticks(*raw_y)):
        y = py(v)
        parts.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(v, percent)}</text>')
    raw_x = (10 ** x0, 10 ** x1) if log_x else (x0, x1)
    for v in (x_ticks if x_ticks is not None else (_log_ticks(*raw_x) if log_x else _ticks(*raw_x))):
        x = px(v)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#f0f0f0"/>'
                     f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{v:g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
                 f'stroke="#999"/>')
    parts.append(f'<text x="{(left + right) / 2:.0f}" y="{height - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
                 f'<text transform="translate(14 {(top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(y_label)}</text>')
    if vline is not None:
        x = px(vline[0])
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#888" '
                     f'stroke-dasharray="4 3"/><text x="{x - 4:.1f}" y="{top + 14}" text-anchor="end" '
                     f'fill="#666">{html.escape(vline[1])}</text>')
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        # series that coincide (two samplers with equal scores) must stay visible: each later one is
        # dashed differently and has smaller markers, drawn over the earlier ones
        dash = f' stroke-dasharray="{DASHES[i % len(DASHES)]}"' if i % len(DASHES) else ""
        radius = max(2.0, 4.5 - 1.0 * i)
        pts = sorted((x, y) for x, y in pts if y is not None and (not log_y or y > 0))
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        if points:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{radius}" fill="{colour}"><title>'
                      f'{html.escape(name)}: {y:.4g} at {x:g}</title></circle>' for x, y in pts]
        if len(series) > 1:
            ly = top + 10 + 20 * i
            parts.append(f'<line x1="{right + 14}" x2="{right + 36}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                         f'stroke-width="2"{dash}/><text x="{right + 42}" y="{ly + 4}">{html.escape(name)}</text>')
    if mark is not None:
        x, y = px(mark[0]), py(mark[1])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#111" stroke-width="1.5"/>'
                     f'<text x="{x - 11:.1f}" y="{y - 10:.1f}" text-anchor="end" font-weight="600">'
                     f'{html.escape(mark[2])}</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- the command ----------------------------------------------------------------------------------


def _run(args) -> None:
    result = evaluate(args.run_dir, n=args.n, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                      seed=args.seed, guidance=args.guidance, out=args.out, sweep=args.sweep,
                      sweep_nfe=args.sweep_nfe, sweep_n=args.sweep_n,
                      likelihood_n=args.likelihood_n if args.likelihood else 0,
                      likelihood_timesteps=args.likelihood_timesteps or None,
                      inception_weights=args.inception_weights, inception_reference=args.inception_reference,
                      device=args.device or "cpu", progress=True)
    out = Path(args.out) if args.out else Path(result["run"]) / "eval"
    main = result["main_metric"]
    print(f"{main['label']}: {_value(result, main['value'])} "
          f"({'higher' if main['higher_is_better'] else 'lower'} is better)")
    best = next((p for p in result["sweep"] if p.get("best")), None)
    if best:
        print(f"sweep best: {best['sampler']} at {best['nfe']} NFE ({_steps(best['steps'])}): "
              f"{_value(result, best['value'])}")
    m = result["metrics"]
    if "fid" in m:
        print(f"FID: {_fmt(m['fid'])}, KID: {_fmt(m['kid'])} ± {m['kid_std']:.2g} "
              f"({m['inception_n']:,} samples against {m['inception_reference_n']:,} training images)")
    if result["likelihood"]:
        print(f"bits/dim: {_likelihood_text(result['likelihood'])}")
    print(f"wrote {out / 'report.html'}, {out / 'eval.json'}, {out / 'samples.png'}")


def add_eval_parser(subparsers) -> None:
    """Add `diffusekit eval` to the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="score a trained run's samples; write eval.json and an HTML report")
    p.add_argument("run_dir", metavar="RUN", help="run folder or checkpoint folder")
    p.add_argument("--n", type=int, default=1000, help="samples to score (default 1000)")
    p.add_argument("--sampler", default="dpmpp_2m", help="any registered sampler (default dpmpp_2m)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--spacing", default="karras", help="sigma spacing (default karras)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale for conditional models (1 = none; default 3)")
    p.add_argument("--out", help="output folder (default RUN/eval)")
    p.add_argument("--sweep", default=DEFAULT_SWEEP, metavar="S1,S2,...",
                   help=f"samplers to chart against NFE, or none (default {DEFAULT_SWEEP})")
    p.add_argument("--sweep-nfe", default=DEFAULT_SWEEP_NFE, metavar="N1,N2,...",
                   help=f"model-evaluation budgets of the sweep (default {DEFAULT_SWEEP_NFE})")
    p.add_argument("--sweep-n", type=int, help="samples per sweep point (default n/4)")
    p.add_argument("--likelihood", action="store_true",
                   help="also report bits/dim (DDPM's variational bound) of training images")
    p.add_argument("--likelihood-n", type=int, default=256, help="images for --likelihood (default 256)")
    p.add_argument("--likelihood-timesteps", type=int, default=100, metavar="K",
                   help="--likelihood: K random timesteps per image, unbiased (default 100; 0 = all T)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .safetensors): adds FID, KID and "
                        "Inception precision/recall; obtain it yourself, diffusekit never downloads")
    p.add_argument("--inception-reference", type=int, default=INCEPTION_REFERENCE, metavar="N",
                   help=f"training images FID and KID compare with (default {INCEPTION_REFERENCE:,}, or all "
                        "if fewer); their features are cached in RUN/inception-cache")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.set_defaults(run=_run)


__all__ = ["add_eval_parser", "evaluate", "svg_chart"]
