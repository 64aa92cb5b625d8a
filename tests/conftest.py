import os

import pytest
import torch

# Tests never touch the network or the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention (and tests run beside other work)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "nncompress-cache"


@pytest.fixture(scope="session")
def digits_mlp():
    """An MLP trained 8 epochs on scikit-learn's digits (seconds): `(data, model)`; copy before changing it."""
    import torch.nn as nn

    from nncompress.zoo.loaders import build_data, build_model

    torch.manual_seed(0)
    data = build_data({"name": "digits"})
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64, 64]}})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        for x, y in data.train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return data, model.eval()
