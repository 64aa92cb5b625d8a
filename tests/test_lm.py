"""The causal language-model workload: byte-level text held out by topic, a small LLaMA trained on it,
perplexity as its quality, and a recipe that compresses it end to end."""
import copy
import json

import pytest
import torch

from nncompress import load
from nncompress.core import DataError, ModelLoadError, Targets, TrainConfig, fit
from nncompress.core.objectives import tokens_as_rows
from nncompress.eval.metrics import perplexity
from nncompress.recipe import parse_recipe
from nncompress.recipe.runner import run_recipe
from nncompress.zoo.lm import TEST_EVERY, docs_topics, legal_text, text, tiny_llama

SMALL = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}


def test_text_tests_on_whole_topics_that_training_and_calibration_never_see():
    data = text(batch_size=4, seq_len=32, calib=8)
    topics = docs_topics()
    held = [k for i, k in enumerate(sorted(topics)) if i % TEST_EVERY == 3]
    test_bytes = bytes(data.test.dataset.tokens.tolist()).decode()
    train_bytes = bytes(data.train.dataset.tokens.tolist()).decode()
    assert all(topics[k] in test_bytes and topics[k] not in train_bytes for k in held)
    assert len(train_bytes) > 5 * len(test_bytes)
    calib = torch.cat([x for x, _ in data.calib])
    assert torch.equal(calib, torch.stack([data.train.dataset[i][0] for i in range(8)]))  # train's head, in order
    x, y = data.train.dataset[3]
    assert torch.equal(x[1:], y[:-1]) and x.dtype == torch.long and data.num_classes == 256
    legal = text(seq_len=32, domain="legal")
    assert bytes(legal.test.dataset.tokens.tolist()).decode() == legal_text()
    with pytest.raises(DataError, match="domain must be 'docs'"):
        text(domain="news")
    with pytest.raises(DataError, match="lower seq_len or calib"):
        text(seq_len=10**7)


def test_tiny_llama_rejects_shapes_attention_cannot_split():
    with pytest.raises(ModelLoadError, match="heads by kv_heads"):
        tiny_llama(hidden=64, heads=4, kv_heads=3)
    with pytest.raises(ModelLoadError, match="layers must be a positive integer"):
        tiny_llama(layers=0)


def test_training_lowers_perplexity_from_the_uniform_guess():
    torch.manual_seed(0)
    data = text(batch_size=8, seq_len=64, calib=8)
    model = tiny_llama(**SMALL)
    before = perplexity(model, data.test)["perplexity"]

    def loss(m, batch):
        out, _, y = tokens_as_rows(m(batch[0]), None, batch[1])
        return torch.nn.functional.cross_entropy(out, y)

    fit(model, data.train, loss, TrainConfig(epochs=1, lr=3e-3, max_steps=60))
    after = perplexity(model, data.test)
    assert 200 < before < 400  # untrained: about the vocabulary (256 byte values)
    assert after["perplexity"] < 30 and after["tokens"] == len(data.test.dataset) * 64


RECIPE = {
    "name": "lm-smoke",
    "model": {"name": "tiny_llama", "kwargs": SMALL, "pretrain": {"epochs": 1, "lr": 0.003, "max_steps": 60}},
    "data": {"name": "text", "kwargs": {"batch_size": 8, "seq_len": 64, "calib": 16}},
    "measure": {"batch_sizes": [1, 4], "threads": 2, "repeats": 3, "onnx": False},
    "stages": [
        {"kind": "gptq", "weight": {"format": {"kind": "int", "bits": 4},
                                    "granularity": {"kind": "per_group", "size": 32}},
         "targets": {"types": ["Linear"]}},
    ],
}


def test_a_recipe_compresses_the_lm_and_reports_perplexity(tmp_path):
    result = run_recipe(parse_recipe(RECIPE), tmp_path / "run", cache_dir=tmp_path / "cache", progress=False,
                        log=lambda _: None)
    base, w4 = result.report.stages
    assert base.quality_name == w4.quality_name == "perplexity"
    assert base.quality < 30 and abs(w4.quality - base.quality) < 0.05 * base.quality  # W4 g32 GPTQ: close
    assert w4.delta == pytest.approx(w4.quality - base.quality)
    assert w4.file_bytes < 0.5 * base.file_bytes
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["stages"][1]["quality_name"] == "perplexity"
    again = load(tmp_path / "run" / "model")
    x = next(iter(text(batch_size=2, seq_len=64).test))[0]
    with torch.no_grad():
        assert torch.equal(again(x), result.model.eval()(x))
    # the pretrained weights come from the cache the second time: same baseline, bit for bit
    second = run_recipe(parse_recipe({**RECIPE, "stages": []}), tmp_path / "run2", cache_dir=tmp_path / "cache",
                        progress=False, log=lambda _: None)
    assert second.report.stages[0].quality == base.quality


def test_sensitivity_ranks_layers_by_the_rise_in_perplexity():
    from nncompress.analysis.sensitivity import sensitivity

    torch.manual_seed(0)
    data = text(batch_size=8, seq_len=64, calib=8)
    model = tiny_llama(**SMALL)
    fit(model, data.train, lambda m, b: torch.nn.functional.cross_entropy(*tokens_as_rows(m(b[0]), None, b[1])[::2]),
        TrainConfig(epochs=1, lr=3e-3, max_steps=40))
    names = ["model.model.layers.0.mlp.down_proj", "model.model.layers.1.self_attn.o_proj"]
    result = sensitivity(model, data, ratios=(0.0, 0.9), targets=Targets(include=tuple(names)), max_batches=2)
    assert result.metric == "perplexity" and result.units == names
    for u in names:  # pruning 90% of a layer's weights makes perplexity rise: a positive drop, as for accuracy
        (q0, q9), (d0, d9) = result.quality[u], result.drop(u)
        assert q0 == result.baseline and d0 == 0 and q9 > result.baseline and d9 == pytest.approx(q9 - result.baseline)
    assert result.most_sensitive()[0] == max(names, key=lambda u: result.drop(u)[1])
    assert result.max_ratio(names[0], threshold=result.drop(names[0])[1] + 1) == 0.9


@pytest.mark.slow
def test_search_ranks_candidates_by_perplexity_lower_first(tmp_path):
    from nncompress.cli import main

    recipe = {**RECIPE, "name": "lm-search", "search": {
        "space": {"stages[0].weight.format.bits": [2, 8]}, "proxy": {"epochs": 0}, "promote": 2}}
    (tmp_path / "lm.yaml").write_text(json.dumps(recipe))
    args = ["search", str(tmp_path / "lm.yaml"), "--trials", "5", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main(args + ["--max-drop", "0.05"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["objectives"][0] == "perplexity (min)"
    ref, points = report["reference"]["quality"], {p["point"]["stages[0].weight.format.bits"]: p for p in report["points"]}
    assert sorted(points) == [2, 8] and 1 < ref < 30  # perplexities, as measured: positive
    w2, w8 = points[2], points[8]
    assert w8["quality"] < w2["quality"] and abs(w8["quality"] - ref) < 0.05 < w2["quality"] - ref
    # W8 is better (lower perplexity), W2 smaller: both on the front; only W8 is within a rise of 0.05
    assert {p["label"] for p in report["front"]} == {w2["label"], w8["label"]}
    assert report["goal"]["met"] and dict(report["goal"]["picks"])["smallest"] == w8["label"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{w8['quality']:.4f} (+{w8['quality'] - ref:.4f})" in md


class _Branches(torch.nn.Module):  # a ModuleList whose members do not chain: each reads the input
    def __init__(self):
        super().__init__()
        self.paths = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        return sum(p(x) for p in self.paths)


def test_block_chain_finds_the_decoder_stack_and_refuses_parallel_branches():
    from nncompress.core.calibration import block_chain

    data = text(batch_size=2, seq_len=16, calib=2)
    model = tiny_llama(**SMALL)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    assert block_chain(model, names, data.calib) == ["model.model.layers.0", "model.model.layers.1"]
    assert block_chain(model, ["model.lm_head"], data.calib) == []
    assert block_chain(_Branches(), ["paths.0"], [(torch.randn(2, 4), None)]) == []


@pytest.mark.parametrize("module, kind, fields", [
    ("nncompress.quant.gptq", "gptq", {"weight": {"format": {"kind": "int", "bits": 4},
                                                  "granularity": {"kind": "per_group", "size": 32}}}),
    ("nncompress.prune.sparsity", "sparsify", {"granularity": {"kind": "nm", "n": 2, "m": 4},
                                               "importance": "sparsegpt"}),
])
def test_block_by_block_calibration_gives_the_weights_of_the_layer_by_layer_passes(monkeypatch, module, kind,
                                                                                     fields):
    """The layer stack is calibrated one block at a time on cached inputs; inside a block, group by group.
    That is what the passes through the whole model did, one per group: same weights, bit for bit."""
    import importlib

    from nncompress.core import Context
    from nncompress.recipe.runner import apply_stage

    torch.manual_seed(0)
    data = text(batch_size=4, seq_len=32, calib=8)
    model = tiny_llama(**SMALL)
    recipe = parse_recipe({**RECIPE, "stages": [{"kind": kind, **fields, "targets": {"types": ["Linear"]}}]})
    blockwise = apply_stage(recipe, recipe.stages[0], copy.deepcopy(model), Context(data=data))
    monkeypatch.setattr(importlib.import_module(module), "block_chain", lambda *a, **k: [])  # the whole-model path
    whole = apply_stage(recipe, recipe.stages[0], copy.deepcopy(model), Context(data=data))
    a, b = blockwise.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = next(iter(data.test))[0]
    assert not torch.equal(blockwise(x), model(x))  # it did compress
