"""zoo/: built-in models and data, the Hugging Face encoder and the spec loaders, each with an oracle."""
from __future__ import annotations

import doctest
import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import nncompress.zoo as zoo
from nncompress.core import DataError, ModelLoadError, model_source, names
from nncompress.zoo import (DataBundle, BasicBlock, InvertedResidual, build_data, build_model, digits,
                            example_input, hf_from_config, load_hf, mnist1d, sentence_corpus, sentences)
from nncompress.zoo import data as data_mod
from nncompress.zoo import hf as hf_mod
from nncompress.zoo import loaders as loaders_mod
from nncompress.zoo import models as models_mod


@pytest.fixture(scope="module")
def minilm():
    return load_hf("minilm")


@pytest.mark.parametrize("module", [models_mod, data_mod, hf_mod, loaders_mod, zoo])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---- models -------------------------------------------------------------------------------------

def test_builtin_models_are_registered():
    assert set(names("model")) >= {"mnist1d_cnn", "mlp", "resnet20", "resnet56", "mobilenetv2", "vgg11"}


@pytest.mark.parametrize("name", ["mnist1d_cnn", "mlp", "resnet20", "resnet56", "mobilenetv2", "vgg11"])
def test_builtin_model_maps_example_input_to_logits(name):
    model, tok = build_model({"name": name})
    x = example_input(model, batch=2)
    assert tok is None and tuple(x.shape) == (2, *model.input_shape)
    with torch.no_grad():
        out = model.eval()(x)
        assert tuple(out.shape) == (2, 10) and torch.isfinite(out).all()
        model7, _ = build_model({"name": name, "kwargs": {"num_classes": 7}})
        assert tuple(model7.eval()(x[:1]).shape) == (1, 7)


def test_example_input_by_name_matches_built_module_and_is_seeded():
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64}})
    by_name = example_input("mlp", {"in_features": 64}, batch=2)
    assert torch.equal(by_name, example_input(model, batch=2)) and tuple(by_name.shape) == (2, 64)
    with pytest.raises(ModelLoadError, match="known: .*mnist1d_cnn"):
        example_input("no_such_model")


def test_mnist1d_cnn_is_large_enough_and_accepts_both_input_layouts():
    model = zoo.mnist1d_cnn().eval()
    assert sum(p.numel() for p in model.parameters()) >= 100_000
    x = torch.randn(5, 40)  # (N, L)
    assert torch.equal(model(x), model(x.unsqueeze(1)))  # (N, 1, L) gives the same logits


@pytest.mark.parametrize("factory, n", [(zoo.resnet20, 3), (zoo.resnet56, 9)])
def test_cifar_resnet_depth_is_6n_plus_2(factory, n):
    model = factory()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    # weighted layers on the main path: the stem conv, two convs per block, the linear head
    assert 1 + 2 * len(blocks) + 1 == 6 * n + 2
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 2  # option B: a 1x1 conv where the width doubles


def test_residual_blocks_are_identity_when_the_branch_is_zeroed():
    torch.manual_seed(0)
    block = InvertedResidual(16, 16, stride=1, expand=6).eval()
    nn.init.zeros_(block.conv[-1].weight)  # final BN scale 0 and shift 0: the branch outputs zeros
    nn.init.zeros_(block.conv[-1].bias)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)
    basic = BasicBlock(8, 8, dim=1).eval()
    nn.init.zeros_(basic.bn2.weight)
    nn.init.zeros_(basic.bn2.bias)
    x = torch.randn(2, 8, 10)
    assert torch.equal(basic(x), torch.relu(x))


# ---- data ---------------------------------------------------------------------------------------

def _first_batches(loader, k=2):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def test_mnist1d_bundle_shapes_determinism_and_cache(tmp_path, monkeypatch):
    mnist1d_cache = tmp_path / "cache"  # created by the builder
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    a = mnist1d(batch_size=32, cache_dir=mnist1d_cache)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    files = sorted(os.listdir(mnist1d_cache))
    assert len(files) == 1 and files[0].endswith(".npz")  # no temp file left behind
    (mnist1d_cache / files[0]).write_bytes(b"not a zip file")  # a corrupt cache is regenerated
    assert torch.equal(mnist1d(cache_dir=mnist1d_cache).train.dataset.tensors[0], a.train.dataset.tensors[0])

    import mnist1d.data as generator
    monkeypatch.setattr(generator, "make_dataset", lambda *a, **k: pytest.fail("cache was not used"))
    b = mnist1d(batch_size=32, cache_dir=mnist1d_cache)
    assert isinstance(a, DataBundle) and a.task == "classification" and a.num_classes == 10
    assert (len(a.train.dataset), len(a.test.dataset), len(a.calib.dataset)) == (4000, 1000, 512)
    # the same shuffle order epoch after epoch (each epoch draws from the bundle's own generator)
    for _ in range(2):
        for (xa, ya), (xb, yb) in zip(_first_batches(a.train), _first_batches(b.train)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = next(iter(a.train))
    assert tuple(x.shape) == (32, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(torch.cat([t[1] for t in a.test]).tolist()) == set(range(10))
    assert torch.equal(a.calib.dataset.tensors[0], b.calib.dataset.tensors[0])
    c, d = (mnist1d(batch_size=32, seed=s, cache_dir=mnist1d_cache) for s in (1, 0))
    assert not torch.equal(next(iter(c.train))[0], next(iter(d.train))[0])
    assert torch.equal(c.test.dataset.tensors[0], a.test.dataset.tensors[0])  # same standard split


def test_digits_bundle_is_a_stratified_deterministic_split():
    a, b = digits(batch_size=50), digits(batch_size=50)
    x_tr, y_tr = a.train.dataset.tensors
    x_te, y_te = a.test.dataset.tensors
    assert (len(x_tr), len(x_te)) == (1437, 360) and tuple(x_tr.shape[1:]) == (64,)
    assert x_tr.dtype == torch.float32 and 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    assert float(x_tr.max()) == 1.0
    totals = torch.bincount(torch.cat([y_tr, y_te]), minlength=10).double()
    in_test = torch.bincount(y_te, minlength=10).double()
    assert float((in_test - 0.2 * totals).abs().max()) <= 1.0  # stratified: 20% of every class
    assert torch.equal(x_te, b.test.dataset.tensors[0])
    for (xa, _), (xb, _) in zip(_first_batches(a.train), _first_batches(b.train)):
        assert torch.equal(xa, xb)


def test_example_batch_is_the_first_calibration_samples():
    data = digits(batch_size=16)
    batch = data.example_batch(40)  # spans three calibration batches
    assert torch.equal(batch, data.calib.dataset.tensors[0][:40])
    with pytest.raises(DataError, match="at most 512"):
        data.example_batch(10_000)


@pytest.mark.parametrize("call, culprit", [
    (lambda: digits(batch_size=0), "batch_size"),
    (lambda: digits(seed="a"), "seed"),
    (lambda: mnist1d(batch_size=-1), "batch_size"),
    (lambda: sentences(None), "tokenizer"),
])
def test_invalid_data_arguments_raise_one_line_data_errors(call, culprit):
    with pytest.raises(DataError, match=culprit) as info:
        call()
    assert "\n" not in str(info.value)


def test_sentence_corpus_is_deterministic_real_prose():
    a, b = sentence_corpus(), sentence_corpus()
    assert a == b and len(a) >= 200 and len(set(a)) == len(a)
    assert all(40 <= len(s) <= 200 and s[0].isupper() for s in a)
    words = {w.lower().strip(".,") for s in a for w in s.split()}
    assert {"the", "is", "and", "of"} <= words and len(words) > 1000
    assert sentence_corpus(10) == a[:10]


def test_sentences_bundle_shapes_and_split(minilm):
    _, tok = minilm
    data = sentences(tok, batch_size=8, max_length=32, n=200)
    assert data.task == "embedding" and data.num_classes is None
    assert (len(data.train.dataset), len(data.test.dataset), len(data.calib.dataset)) == (150, 50, 128)
    batch = next(iter(data.train))
    assert sorted(batch) == ["attention_mask", "input_ids"]
    assert tuple(batch["input_ids"].shape) == (8, 32) and batch["input_ids"].dtype == torch.int64
    test_ids = data.test.dataset.tensors["input_ids"]
    expected = tok(sentence_corpus(200)[150:], padding="max_length", max_length=32, truncation=True,
                   return_tensors="pt")["input_ids"]
    assert torch.equal(test_ids, expected)  # test = the last 25% of the corpus order
    ex = data.example_batch(3)
    assert torch.equal(ex["input_ids"], data.calib.dataset.tensors["input_ids"][:3])
    with pytest.raises(DataError, match="n=100000"):
        sentences(tok, n=100_000)


# ---- Hugging Face -------------------------------------------------------------------------------

def test_minilm_gives_unit_norm_embeddings_that_separate_sentences(minilm):
    model, tok = minilm
    texts = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "The cat sat on the mat."]
    batch = tok(texts, padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        emb = model(batch["input_ids"], batch["attention_mask"])  # (3, 384)
    assert tuple(emb.shape) == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert float(sim[0, 2]) > 0.999 and float(sim[0, 1]) < 0.5
    # mean pooling ignores padding: the unpadded sentence embeds the same
    alone = tok(texts[:1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(alone["input_ids"], alone["attention_mask"])[0], emb[0],
                                   atol=1e-5, rtol=0)
    assert any(n.startswith("model.encoder.layer.0.attention") for n, _ in model.named_modules())


def test_hf_from_config_rebuilds_the_same_architecture(minilm):
    model, tok = minilm
    twin = hf_from_config(model.model.config.to_dict())
    twin.load_state_dict(model.state_dict())
    batch = tok(["A sentence to embed twice."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(twin(batch["input_ids"], batch["attention_mask"]),
                           model(batch["input_ids"], batch["attention_mask"]))
    with pytest.raises(ModelLoadError, match="model_type"):
        hf_from_config({"hidden_size": 8})


def test_hf_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=str(missing)):
        build_model({"name": f"hf:{missing}"})
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf(tmp_path)


# ---- loaders ------------------------------------------------------------------------------------

USER_MODULE = '''
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
import torch

def make(width=4):
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))

def not_a_model():
    return "hello"

def loaders(n=12):
    ds = TensorDataset(torch.randn(n, 3), torch.randint(0, 2, (n,)))
    return DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=4)

def embedding_loaders():
    ds = [{"input_ids": torch.ones(5, dtype=torch.long), "attention_mask": torch.ones(5, dtype=torch.long)}] * 4
    dl = DataLoader(ds, batch_size=2)
    return {"train": dl, "test": dl}

def bad_data():
    return 42
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_factories_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_module_factory_model_is_built_and_sys_path_restored(user_module):
    before = list(sys.path)
    model, tok = build_model({"name": f"{user_module}:make", "kwargs": {"width": 6}})
    assert sys.path == before and tok is None
    assert isinstance(model, nn.Sequential) and model[0].out_features == 6
    assert model_source(model) == {"name": f"{user_module}:make", "kwargs": {"width": 6}}  # for save/load
    with pytest.raises(ModelLoadError, match="not an nn.Module"):
        build_model({"name": f"{user_module}:not_a_model"})
    with pytest.raises(ModelLoadError, match="has no attribute 'nope'"):
        build_model({"name": f"{user_module}:nope"})
    with pytest.raises(ModelLoadError, match="bad kwargs.*it takes width"):
        build_model({"name": f"{user_module}:make", "kwargs": {"depth": 2}})


def test_bad_import_and_unknown_names_raise_model_load_errors():
    before = list(sys.path)
    with pytest.raises(ModelLoadError, match=r"cannot import module 'no_such_pkg_xyz\.models'.*importable") as info:
        build_model({"name": "no_such_pkg_xyz.models:make"})
    assert "\n" not in str(info.value) and sys.path == before
    with pytest.raises(ModelLoadError, match="known: hf_config, mlp, mnist1d_cnn"):
        build_model({"name": "resnet1000"})
    with pytest.raises(ModelLoadError, match="name"):
        build_model({"kwargs": {}})


def test_module_factory_data_is_wrapped(user_module):
    data = build_data({"name": f"{user_module}:loaders"})
    assert isinstance(data, DataBundle) and data.task == "classification" and data.calib is data.train
    assert tuple(data.example_batch(2).shape) == (2, 3)
    emb = build_data({"name": f"{user_module}:embedding_loaders"})
    assert emb.task == "embedding" and tuple(emb.example_batch(3)["input_ids"].shape) == (3, 5)
    with pytest.raises(DataError, match="returned int"):
        build_data({"name": f"{user_module}:bad_data"})
    with pytest.raises(DataError, match="cannot import module"):
        build_data({"name": "no_such_pkg_xyz:data"})
    with pytest.raises(DataError, match="known: digits, mnist1d, sentences"):
        build_data({"name": "imagenet"})


def test_hf_spec_gives_a_tokenizer_that_build_data_passes_on(minilm):
    model, tok = build_model({"name": "hf:minilm"})
    assert isinstance(model, hf_mod.SentenceEncoder) and tok is not None
    data = build_data({"name": "sentences", "kwargs": {"n": 40, "batch_size": 4}}, tokenizer=tok)
    batch = data.example_batch(2)
    with torch.no_grad():
        assert tuple(model(**batch).shape) == (2, 384)
