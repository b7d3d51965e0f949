import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run single-threaded: with another process on the same 2 cores, multi-threaded PyTorch can
# run 50x slower (DESIGN.md, environment facts).
torch.set_num_threads(1)


@pytest.fixture
def mixture_2d():
    from diffusekit import GaussianMixture

    # multi-modal, anisotropic, unequal weights
    means = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
    stds = [[0.3, 0.5], [0.6, 0.2], [0.4, 0.4]]
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])


# -- reference implementations (test-only dependencies) ------------------------------------------


def _share_tables(ref, sched):
    """Give a diffusers scheduler our float64 tables, so a comparison tests the step algorithm alone
    (the tables' parity is tested in test_schedules.py)."""
    ref.alphas_cumprod, ref.betas, ref.alphas = sched.alphas_cumprod, sched.betas, sched.alphas
    if hasattr(ref, "final_alpha_cumprod") and ref.config.get("set_alpha_to_one", True) is False:
        ref.final_alpha_cumprod = sched.alphas_cumprod[0]


@pytest.fixture
def share_tables():
    return _share_tables


@pytest.fixture(scope="session")
def k_sampling():
    """k-diffusion's sampling.py as a reference (loaded without torchvision, as the bench does)."""
    from diffusekit.bench.samplers import load_k_diffusion_sampling

    try:
        return load_k_diffusion_sampling()
    except ValueError as e:
        pytest.skip(str(e))
