"""Where a text-to-image shapes model loses two-shape prompts: a diagnosis, not a score.

    python benchmarks/shapes_binding.py RUN [--n 300] [--guidance 2]

1. Samples --n seen two-shape prompts (as benchmarks/text_to_image.py does) and reads each slot
   back (the left/top shape and the right/bottom one): per attribute, how often both slots are
   right, swapped, or both drawn with one word of the prompt (e.g. two circles for "a circle left
   of a square"), split by whether the prompt names the left/top shape first.
2. Noises real pair images (two different shapes in two different colours) to a few timesteps and
   reads every cross-attention layer's weights at each shape's centre: the mass on that shape's
   own noun and colour word against the other shape's. Binding needs own > other.
3. Word order: the x0 error on noised real pair images with the right caption, with the caption
   whose relation is flipped (the same words describing the mirrored scene), with another image's
   caption and with none. A model that binds predicts the flipped scene badly at high noise; one
   that reads the prompt as a bag of words scores it as well as the right one.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_to_image import prompts_for, sample  # noqa: E402

from diffusekit.data.shapes import ShapesDataset, parse_caption, render  # noqa: E402
from diffusekit.metrics.shapes import read_images  # noqa: E402
from diffusekit.nn.unet import Attention  # noqa: E402
from diffusekit.train import load  # noqa: E402


def slot_outcome(want: tuple, got: tuple) -> str:
    (wa, wb), (ga, gb) = want, got
    if (ga, gb) == (wa, wb):
        return "right"
    if wa == wb:
        return "wrong (same word in both slots)"
    if (ga, gb) == (wb, wa):
        return "swapped"
    if ga == gb and ga in want:
        return "both drawn as the " + ("first-named" if ga == want[0] else "second-named")
    return "other"


def slots(model, n: int, guidance: float) -> None:
    prompts = [p for p in prompts_for("train", 8 * n) if len(parse_caption(p).shapes) == 2][:n]
    got = read_images(sample(model, prompts, guidance, 0, 20))
    counts, totals = collections.Counter(), collections.Counter()
    for prompt, scene in zip(prompts, got):
        want = parse_caption(prompt)
        if len(scene.shapes) != 2 or scene.relation != want.relation:
            totals["layout wrong"] += 1
            continue
        a, b = want.shapes
        words = prompt.replace(",", " ").split()
        # the canonical first shape (left/top) named first, or not; ambiguous when both are one shape
        order = ("left/top named first" if next(w for w in words if w in (a.shape, b.shape)) == a.shape
                 else "right/bottom named first") if a.shape != b.shape else "same shape twice"
        totals[order] += 1
        for attr in ("shape", "colour", "size"):
            want_pair = (getattr(a, attr), getattr(b, attr))
            if order == "right/bottom named first":  # "first-named" means named first in the prompt
                want_pair = want_pair[::-1]
                got_pair = (getattr(scene.shapes[1], attr), getattr(scene.shapes[0], attr))
            else:
                got_pair = (getattr(scene.shapes[0], attr), getattr(scene.shapes[1], attr))
            counts[(order, attr, slot_outcome(want_pair, got_pair))] += 1
    print(f"two-shape prompts, guidance {guidance:g}: {dict(totals)}")
    for order in ("left/top named first", "right/bottom named first", "same shape twice"):
        for attr in ("shape", "colour", "size"):
            row = {k[2]: v for k, v in counts.items() if k[:2] == (order, attr)}
            total = sum(row.values())
            if total:
                print(f"  {order:25s} {attr:6s}: " + ", ".join(f"{k} {v / total:.2f}" for k, v in
                                                               sorted(row.items(), key=lambda kv: -kv[1])))


def attention(model, n: int) -> None:
    net, encoder = model.network.eval(), model.text_encoder
    data = ShapesDataset(split="train", seed=0, length=10**9)
    items, i = [], 2_000_000
    while len(items) < n:
        scene, text = data.describe(i)
        i += 1
        if len(scene.shapes) != 2 or len({s.shape for s in scene.shapes}) < 2 or len({s.colour for s in scene.shapes}) < 2:
            continue
        words = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer(text)["input_ids"])
        if not all(s.shape in words and s.colour in words for s in scene.shapes):
            continue  # a word split into sub-word tokens
        items.append((render(scene, model.image_shape[-1]), text, scene,
                      [words.index(s.shape) for s in scene.shapes], [words.index(s.colour) for s in scene.shapes]))
    x0 = torch.stack([it[0] for it in items])
    cond = encoder([it[1] for it in items]).cond(pooled=net.config.pooled_context_dim is not None)
    maps: list[torch.Tensor] = []

    def record(module, args, kwargs, out):
        x, context = args[0], args[1] if len(args) > 1 else kwargs.get("context")
        if context is None or context is x:
            return
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        b, length = x.shape[0], context.shape[1]
        q = module.to_q(x).reshape(b, x.shape[1], module.heads, -1).transpose(1, 2)
        k = module.to_k(context).reshape(b, length, module.heads, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        maps.append(logits.softmax(-1).mean(1))  # [B, pixels, tokens], mean over heads

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in net.modules()
             if isinstance(m, Attention) and m.to_k.in_features != m.to_q.in_features]
    generator = torch.Generator().manual_seed(0)
    print(f"cross-attention mass at each shape's centre, own word / the other shape's ({n} real pair images)")
    for t in (900, 700, 500, 300):
        sigma = model.schedule.sigmas[t].item()
        abar = 1 / (1 + sigma**2)
        xt = abar**0.5 * x0 + (1 - abar) ** 0.5 * torch.randn(x0.shape, generator=generator)
        maps.clear()
        with torch.no_grad():
            net(xt, torch.full((len(items),), float(t)), **cond)
        cells = []
        for layer, m in enumerate(maps):
            side = int(round(m.shape[1] ** 0.5))
            mass = collections.defaultdict(list)
            for b, (_, _, scene, nouns, colours) in enumerate(items):
                for k in range(2):
                    cx, cy = scene.shapes[k].centre
                    row = m[b, min(int(cy * side), side - 1) * side + min(int(cx * side), side - 1)]
                    for name, idx in (("noun", nouns), ("colour", colours)):
                        mass[name, "own"].append(row[idx[k]].item())
                        mass[name, "other"].append(row[idx[1 - k]].item())
            cells.append(f"#{layer} {side}x{side} noun {np.mean(mass['noun', 'own']):.2f}/{np.mean(mass['noun', 'other']):.2f} "
                         f"colour {np.mean(mass['colour', 'own']):.2f}/{np.mean(mass['colour', 'other']):.2f}")
        print(f"  t={t} (sigma {sigma:.2f}): " + " | ".join(cells))
    for h in hooks:
        h.remove()


FLIPPED = {"left": "right", "right": "left", "above": "below", "below": "above", "under": "above"}


def flip_relation(caption: str) -> str:
    """The caption of the mirrored scene: "A left of B" -> "A right of B", "A under B" -> "A above B"."""
    return re.sub(r"\b(left|right|above|below|under)\b", lambda m: FLIPPED[m.group(1)], caption)


def word_order(model, n: int) -> None:
    data = ShapesDataset(split="train", seed=0, length=10**9)
    items, i = [], 3_000_000
    while len(items) < n:
        image, text, scene = data[i]
        i += 1
        if len(scene.shapes) == 2:
            items.append((image, text))
    x0 = torch.stack([it[0] for it in items])
    captions = [it[1] for it in items]
    pooled = model.network.config.pooled_context_dim is not None
    variants = {"right": captions, "relation flipped": [flip_relation(c) for c in captions],
                "another image's": captions[1:] + captions[:1], "none": [""] * n}
    conds = {name: model.text_encoder(texts).cond(pooled) for name, texts in variants.items()}
    print(f"x0 mean squared error on {n} real pair images, by caption")
    for t in (900, 700, 500, 300):
        sigma = model.schedule.sigmas[t].float()
        x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            err = {name: ((model.denoiser(x, sigma.expand(n), **c) - x0) ** 2).mean().item() for name, c in conds.items()}
        share = (err["relation flipped"] - err["right"]) / max(err["another image's"] - err["right"], 1e-12)
        print(f"  t={t} (sigma {sigma:.2f}): " + "  ".join(f"{k} {v:.4f}" for k, v in err.items())
              + f"  | flipping the relation costs {share:.0%} of what a wrong caption costs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a text-to-image run trained on --data shapes")
    parser.add_argument("--n", type=int, default=300, help="two-shape prompts to sample (default 300)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=128,
                        help="real pair images for the attention and word-order read-outs (default 128)")
    args = parser.parse_args()
    if args.n < 1 or args.images < 1:
        raise ValueError(f"--n and --images must be at least 1, got {args.n} and {args.images}")
    model = load(args.run)
    if model.text_encoder is None or model.config["data"]["name"] != "shapes":
        raise ValueError(f"{args.run} is not a text-to-image model trained on shapes")
    slots(model, args.n, args.guidance)
    attention(model, args.images)
    word_order(model, args.images)
    return 0


if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
