"""Built-in models and data, and the loaders that resolve `{"name": ..., "kwargs": ...}` specs.

Importing this package registers the built-ins (`names("model")`, `names("data")`).
transformers is imported only when an `hf:` model is loaded.

>>> from nncompress.zoo import build_model, build_data, example_input
>>> model, _ = build_model({"name": "mnist1d_cnn"})
>>> tuple(model.eval()(example_input(model, batch=2)).shape)
(2, 10)
"""
from .data import DataBundle, batch_inputs, default_cache_dir, digits, mnist1d, sentence_corpus, sentences
from .hf import SentenceEncoder, hf_from_config, load_hf, resolve_hf_path
from .lm import CausalLM, text, tiny_llama
from .loaders import build_data, build_model, import_factory
from .models import (MLP, MNIST1DCNN, BasicBlock, InvertedResidual, MobileNetV2, ResNetCifar, VGG,
                     example_input, mlp, mnist1d_cnn, mobilenetv2, resnet20, resnet56, vgg11)

__all__ = [
    "DataBundle", "batch_inputs", "default_cache_dir", "digits", "mnist1d", "sentence_corpus", "sentences",
    "SentenceEncoder", "hf_from_config", "load_hf", "resolve_hf_path",
    "CausalLM", "text", "tiny_llama",
    "build_data", "build_model", "import_factory",
    "MLP", "MNIST1DCNN", "BasicBlock", "InvertedResidual", "MobileNetV2", "ResNetCifar", "VGG",
    "example_input", "mlp", "mnist1d_cnn", "mobilenetv2", "resnet20", "resnet56", "vgg11",
]
