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


def _load_k_diffusion_sampling():
    """k-diffusion's `sampling` module. `import k_diffusion` imports every submodule, and its
    `utils` imports torchvision (a CUDA build from PyPI that fails beside the CPU torch), so the file
    `k_diffusion/sampling.py` is loaded alone, with a `utils` that holds the one helper it uses."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    for dep in ("scipy", "torchsde", "torchdiffeq"):
        pytest.importorskip(dep)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    if "_k_diffusion_ref.sampling" in sys.modules:
        return sys.modules["_k_diffusion_ref.sampling"]
    package = types.ModuleType("_k_diffusion_ref")
    package.__path__ = []
    utils = types.ModuleType("_k_diffusion_ref.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules["_k_diffusion_ref"], sys.modules["_k_diffusion_ref.utils"] = package, utils
    path = Path(spec.submodule_search_locations[0]) / "sampling.py"
    file_spec = importlib.util.spec_from_file_location("_k_diffusion_ref.sampling", path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules["_k_diffusion_ref.sampling"] = module
    file_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def k_sampling():
    return _load_k_diffusion_sampling()
