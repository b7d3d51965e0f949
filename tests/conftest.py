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
