"""Stable Diffusion speed on the CPU: diffusekit against diffusers at the SD 1.5 layout, in the same run.

    python benchmarks/sd_speed.py [--part unet|pipeline] [--threads 1] [--repeats 5]

Part `unet` (issue 8): one denoising step of the SD 1.5 U-Net (random weights, the same in both
libraries) at 256x256, i.e. a 32x32x4 latent, batch 2 (classifier-free guidance), CLIP-sized
context [2, 77, 768], float32, under torch.inference_mode. It first checks that the two outputs
agree, then times the libraries alternately (diffusers, diffusekit, diffusekit, diffusers, ...) in
the same process, so a load from other jobs hits both alike, and reports the median seconds per
step and the ratio diffusekit / diffusers (goal: <= 0.9). Peak memory is the max RSS of a fresh
subprocess per library that builds only its own model and runs two steps.

Part `pipeline`: the whole 20-step text-to-image call at the tiny config against diffusers'
StableDiffusionPipeline, same weights and start latents, timed the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

LIBRARIES = ("diffusers", "diffusekit")
LATENT = 32  # 256x256 images through the VAE's 8x downsampling
BATCH = 2  # classifier-free guidance: conditional + unconditional in one batch
CONTEXT = (77, 768)  # CLIP ViT-L/14 token states


# ---------------------------------------------------------------------------------------------
# Part `unet`
# ---------------------------------------------------------------------------------------------


def build_diffusers():
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ).eval()


def build_diffusekit(state: dict | None = None):
    from diffusekit.convert import unet_state_from_diffusers
    from diffusekit.nn.unet import UNet, preset

    model = UNet(preset("sd15")).eval()
    if state is not None:
        model.load_state_dict(unet_state_from_diffusers(state), strict=True)
    return model


def step_fn(which: str, model):
    """One denoising step as the library's users call it."""
    if which == "diffusers":
        return lambda x, t, ctx: model(x, t, encoder_hidden_states=ctx).sample
    return lambda x, t, ctx: model(x, t, context=ctx)


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([500.0] * BATCH)
    ctx = torch.randn(BATCH, *CONTEXT, generator=g)
    return x, t, ctx


def memory_worker(which: str) -> dict:
    """Max RSS of a process that builds one library's U-Net and runs two steps."""
    torch.manual_seed(0)
    model = build_diffusers() if which == "diffusers" else build_diffusekit()
    fn = step_fn(which, model)
    x, t, ctx = inputs()
    with torch.inference_mode():
        for _ in range(2):
            fn(x, t, ctx)
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_unet(args) -> None:
    threads = args.threads
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} thread(s), SD 1.5 U-Net (random weights), latent "
          f"{BATCH}x4x{LATENT}x{LATENT} (256x256 images), context {BATCH}x{CONTEXT[0]}x{CONTEXT[1]}, float32, "
          f"inference_mode; medians of {args.repeats} alternating windows of {args.steps} step(s)")
    # Memory first, while this process is small: a child's max RSS starts from its parent's
    # high-water mark (Linux keeps it across fork and exec), so forking after building the models
    # here would report this process's peak for both libraries.
    memory = {}
    for which in LIBRARIES:  # a fresh process each, so the max RSS is that library's own
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, __file__, "--worker", which, "--threads", str(threads)],
                             capture_output=True, text=True, check=True, env=env)
        memory[which] = json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"]

    torch.manual_seed(0)
    ref = build_diffusers()
    ours = build_diffusekit(ref.state_dict())
    params = {"diffusers": sum(p.numel() for p in ref.parameters()),
              "diffusekit": sum(p.numel() for p in ours.parameters())}
    fns = {"diffusers": step_fn("diffusers", ref), "diffusekit": step_fn("diffusekit", ours)}
    x, t, ctx = inputs()

    with torch.inference_mode():
        a, b = fns["diffusekit"](x, t, ctx), fns["diffusers"](x, t, ctx)
        diff = (a - b).abs().max().item()
        print(f"outputs: max abs diff {diff:.2e} (output max abs {b.abs().max().item():.2f})")
        if not diff < 1e-3 * max(1.0, b.abs().max().item()):
            raise SystemExit("the two U-Nets disagree: the timing below would compare different functions")
        for _ in range(args.warmup):  # warm-up (allocator, oneDNN primitive caches)
            for which in LIBRARIES:
                fns[which](x, t, ctx)
        samples = {which: [] for which in LIBRARIES}
        for window in range(args.repeats):
            order = LIBRARIES if window % 2 == 0 else LIBRARIES[::-1]  # ABBA..., so neither always goes first
            for which in order:
                start = time.perf_counter()
                for _ in range(args.steps):
                    fns[which](x, t, ctx)
                samples[which].append((time.perf_counter() - start) / args.steps)

    sec = {which: statistics.median(samples[which]) for which in LIBRARIES}
    print(f"\n{'library':10} {'params':>13} {'s/step':>8} {'min':>7} {'max':>7} {'max RSS MB':>11}")
    for which in LIBRARIES:
        print(f"{which:10} {params[which]:>13,} {sec[which]:>8.3f} {min(samples[which]):>7.3f} "
              f"{max(samples[which]):>7.3f} {memory[which]:>11.0f}")
    ratio = sec["diffusekit"] / sec["diffusers"]
    per_window = [o / r for o, r in zip(samples["diffusekit"], samples["diffusers"])]
    print(f"{'ratio':10} {'':>13} {ratio:>7.3f}x {min(per_window):>6.3f}x {max(per_window):>6.3f}x "
          f"{memory['diffusekit'] / memory['diffusers']:>10.3f}x")
    print(f"\ndiffusekit / diffusers step time: {ratio:.3f} (goal <= 0.9: {'met' if ratio <= 0.9 else 'not met'}); "
          f"per-window ratios {', '.join(f'{r:.3f}' for r in per_window)}")


# ---------------------------------------------------------------------------------------------
# Part `pipeline`
# ---------------------------------------------------------------------------------------------


def run_pipeline(args) -> None:
    """The whole text-to-image call at the `tiny` config (random weights, saved once as a diffusers
    folder and loaded by both libraries): prompt encoding, 20 DPM-Solver++(2M) steps with
    classifier-free guidance, VAE decode. Both start from the same latents; the images are checked
    to agree before timing."""
    import tempfile

    import diffusers
    import numpy as np

    from diffusekit import StableDiffusion

    torch.set_num_threads(args.threads)
    steps, prompt = 20, "a futuristic city with flying cars"
    with tempfile.TemporaryDirectory() as tmp:
        folder = StableDiffusion.from_config("tiny").save_pretrained(f"{tmp}/tiny-sd")
        ours = StableDiffusion.from_pretrained(folder)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                requires_safety_checker=False)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    ref.set_progress_bar_config(disable=True)
    size = ours.unet.config.image_size * ours.vae_scale
    latents = torch.randn(1, 4, size // ours.vae_scale, size // ours.vae_scale, generator=torch.Generator().manual_seed(0))
    fns = {
        "diffusers": lambda: ref(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                                 latents=latents.clone(), output_type="np").images[0],
        # a new prompt each call would defeat our per-prompt text cache; diffusers has none, so clear ours
        "diffusekit": lambda: (ours.text_encoder._cache.clear(), np.asarray(
            ours(prompt, num_inference_steps=steps, guidance_scale=7.5, sampler="dpmpp_2m", spacing="trailing",
                 latents=latents, progress=False).images[0], dtype=np.float32) / 255)[1],
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), tiny Stable Diffusion ({size}x{size} images, "
          f"{sum(p.numel() for p in ours.unet.parameters()):,}-parameter U-Net, CLIP-sized text encoder), {steps} "
          f"DPM-Solver++(2M) steps with guidance, float32; medians of {args.repeats} alternating windows")
    with torch.inference_mode():
        diff = float(np.abs(fns["diffusekit"]() - fns["diffusers"]()).max())
        print(f"images: max abs diff {diff:.2e} on [0, 1] pixels (ours are 8-bit PNG-ready, so <= 1/255 + 1e-3)")
        if diff > 1 / 255 + 1e-3:
            raise SystemExit("the two pipelines disagree: the timing below would compare different computations")
        samples = {which: [] for which in LIBRARIES}
        for window in range(args.repeats):
            for which in (LIBRARIES if window % 2 == 0 else LIBRARIES[::-1]):
                start = time.perf_counter()
                fns[which]()
                samples[which].append(time.perf_counter() - start)
    sec = {which: statistics.median(samples[which]) for which in LIBRARIES}
    print(f"\n{'library':10} {'s/image':>8} {'min':>7} {'max':>7}")
    for which in LIBRARIES:
        print(f"{which:10} {sec[which]:>8.3f} {min(samples[which]):>7.3f} {max(samples[which]):>7.3f}")
    print(f"{'ratio':10} {sec['diffusekit'] / sec['diffusers']:>7.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="unet", choices=["unet", "pipeline"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="alternating timing windows per library")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per window")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per library before timing")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one library's memory in a fresh process
        torch.set_num_threads(args.threads)
        print(json.dumps(memory_worker(args.worker)))
        return
    if args.part == "unet":
        run_unet(args)
    else:
        run_pipeline(args)


if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
