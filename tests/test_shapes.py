import pytest
import torch

from diffusekit.data.shapes import (
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    TRAIN_PAIRS,
    Scene,
    Shape,
    ShapesDataset,
    parse_caption,
    render,
)
from diffusekit.metrics.shapes import analyser_accuracy, degrade, prompt_adherence, read_image


def pairs_of(scene):
    return {(s.shape, s.colour) for s in scene.shapes}


def test_items_are_deterministic_and_differ_by_index_and_seed():
    a, b = ShapesDataset(seed=1), ShapesDataset(seed=1, length=10)
    for i in (0, 5, 9):
        x, caption, scene = a[i]
        y, caption2, scene2 = b[i]
        assert torch.equal(x, y) and caption == caption2 and scene == scene2
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    images, captions = a.batch(torch.arange(8))[0], a.captions(torch.arange(8))
    assert all(not torch.equal(images[i], images[i + 1]) for i in range(7))
    assert len(set(captions)) == 8
    other, _ = ShapesDataset(seed=2).batch(range(8))
    assert not torch.equal(images, other)
    assert torch.equal(images[3], a[3][0]) and captions[3] == a[3][1]
    assert ShapesDataset(size=48)[0][0].shape == (3, 48, 48)


def test_heldout_pairs_never_in_train_and_only_in_heldout():
    assert 0.1 < len(HELDOUT_PAIRS) / (len(HELDOUT_PAIRS) + len(TRAIN_PAIRS)) < 0.2
    train, heldout = ShapesDataset(split="train"), ShapesDataset(split="heldout")
    seen = set()
    for i in range(3000):
        scene = train.describe(i)[0]
        assert not pairs_of(scene) & set(HELDOUT_PAIRS)
        seen |= pairs_of(scene)
    assert seen == set(TRAIN_PAIRS)
    seen = set()
    for i in range(500):
        seen |= pairs_of(heldout.describe(i)[0])
    assert seen == set(HELDOUT_PAIRS)


def test_every_layout_occurs():
    scenes = [ShapesDataset().describe(i)[0] for i in range(500)]
    assert {s.shapes[0].position for s in scenes if len(s.shapes) == 1} == set(POSITIONS)
    assert {s.relation for s in scenes if len(s.shapes) == 2} == {"left of", "above"}
    assert {s.shape for scene in scenes for s in scene.shapes} == set(SHAPES)
    assert {s.size for scene in scenes for s in scene.shapes} == {"small", "large"}


def test_captions_parse_back_to_their_attributes():
    for split in ("train", "heldout"):
        data = ShapesDataset(split=split, seed=7)
        for i in range(1000):
            scene, caption = data.describe(i)
            assert parse_caption(caption) == scene, caption


def test_parse_handwritten_prompts():
    assert parse_caption("a small red circle on the left") == Scene([Shape("circle", "red", "small", "left")])
    assert parse_caption("red circle, small, left") == Scene([Shape("circle", "red", "small", "left")])
    green = Scene([Shape("triangle", "green", "large", "centre")])
    assert parse_caption("There is a large green triangle in the centre.") == green
    blue_above = Scene([Shape("square", "blue"), Shape("triangle", "yellow")], "above")
    assert parse_caption("a blue square above a yellow triangle") == blue_above
    assert parse_caption("a yellow triangle below a blue square") == blue_above  # stored canonically
    assert Scene([Shape("circle"), Shape("cross")], "right of") == Scene([Shape("cross"), Shape("circle")], "left of")


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a photo of a cat", "unknown words"),
        ("", "no shape"),
        ("a red circle and a blue square", "no relation"),
        ("a red blue circle", "2 colours"),
        ("a red circle above", "no shape on one side"),
        ("a red circle on the left of a blue square above a cross", "more than one relation"),
        ("a red circle at the top above a cross", "beside a relation"),
    ],
)
def test_unreadable_prompts_raise(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(prompt)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="size >= 16"):
        ShapesDataset(size=8)
    with pytest.raises(ValueError, match="size >= 16"):
        render(Scene([Shape("circle")]), 15)
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset(split="test")
    with pytest.raises(ValueError, match="unknown shape"):
        Shape("star")
    with pytest.raises(ValueError, match="exactly two shapes"):
        Scene([Shape("circle")], "above")
    with pytest.raises(IndexError):
        ShapesDataset(length=5)[5]


def test_render_reproduces_dataset_images():
    for size in (16, 32, 48):
        data = ShapesDataset(size=size, seed=4)
        for i in range(10):
            image, _, scene = data[i]
            assert torch.equal(render(scene, size), image)


def test_render_parsed_prompt_reads_back():
    for prompt in ("a small cyan diamond at the top", "a big white cross left of a small blue triangle", "a magenta square"):
        scene = parse_caption(prompt)
        assert prompt_adherence(render(scene, 32)[None], [prompt])["all"] == 1.0


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_analyser_accuracy_clean_and_noisy(split):
    clean = analyser_accuracy(120, split=split, seed=11)
    noisy = analyser_accuracy(120, split=split, seed=12, noise_std=0.1, blur_sigma=0.5)
    for name in ("shape", "colour", "size", "position", "count"):
        assert clean[name] >= 0.98, (name, clean)
        assert noisy[name] >= 0.95, (name, noisy)
    assert clean["all"] >= 0.98 and noisy["all"] >= 0.95


def test_adherence_high_for_own_captions_low_for_shuffled():
    ds = ShapesDataset(seed=5)
    images, captions = ds.batch(range(60))[0], ds.captions(range(60))
    images = degrade(images, 0.1, 0.5, torch.Generator().manual_seed(0))
    assert prompt_adherence(images, captions)["all"] == 1.0
    shuffled = prompt_adherence(images, captions[1:] + captions[:1])
    assert shuffled["all"] < 0.1 and shuffled["shape"] < 0.4 and shuffled["colour"] < 0.4


def test_adherence_scores_each_attribute():
    image = render(parse_caption("a large red circle in the centre"), 32)[None]
    assert prompt_adherence(image, ["a red circle"])["all"] == 1.0  # unspecified attributes match
    score = prompt_adherence(image, ["a large blue circle on the left"])
    assert score["shape"] == score["size"] == score["count"] == 1.0 and score["colour"] == score["position"] == 0.0
    score = prompt_adherence(image, ["a red circle above a blue square"])
    assert score["count"] == 0.0 and score["all"] == 0.0
    empty = read_image(-torch.ones(3, 32, 32))
    assert empty.shapes == []
    assert prompt_adherence(-torch.ones(1, 3, 32, 32), ["a red circle"])["all"] == 0.0
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        prompt_adherence(torch.zeros(2, 3, 32, 32), ["a red circle"])


def test_analyser_reads_dim_shapes():
    """Generated images often paint shapes below full intensity; size must not shrink with them."""
    ds = ShapesDataset(seed=6)
    images, captions = ds.batch(range(60))[0], ds.captions(range(60))
    dim = degrade(-1 + 0.7 * (images + 1), 0.1, 0.5, torch.Generator().manual_seed(0))
    assert prompt_adherence(dim, captions)["all"] >= 0.95
