"""Contract tests over every registered transform (STYLE.md), on a tiny MLP, a tiny CNN and a tiny BERT:

- the forward keeps its output shape; a transform that does not apply to a model says so with a typed
  error naming the stage;
- `merge` keeps the numbers: exactly for weight-only wrappers, above a stated SQNR where activation
  quantization is dropped;
- save -> load gives identical outputs, and the config's YAML form round-trips;
- every ordered pair of transforms composes (save -> load identical) or refuses with a typed error;
  the refusals are listed below with their reason, so a pair that stops composing fails the suite.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import yaml

import nncompress
from contract_cases import MODELS, refusal, transforms
from nncompress.core import Context, NNCompressError, names, tag_source
from nncompress.core.calibration import feed, first_tensor

@functools.lru_cache(maxsize=None)
def _base(model: str):
    torch.manual_seed(0)
    net, source, data = MODELS[model]()
    return tag_source(net.eval(), source), data


def _fresh(model: str):
    net, data = _base(model)
    return copy.deepcopy(net), data


def _apply(net, config, data):
    teacher = copy.deepcopy(net).eval()
    return nncompress.apply(net, config, context=Context(data=data, teacher=teacher)).eval()


def _out(net, data) -> torch.Tensor:
    with torch.no_grad():
        return first_tensor(feed(net, data.example_batch(8)))


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def _reloads_exactly(net, data, tmp_path) -> None:
    nncompress.save(net, tmp_path / "ck")
    again = nncompress.load(tmp_path / "ck")
    assert torch.equal(_out(again, data), _out(net, data))


def test_every_registered_transform_has_a_contract_case():
    kinds = {c.kind for c in transforms("mlp").values()}
    registered = {n for n in names() if not n.startswith("_")}  # "_..." are other tests' doubles
    assert kinds == registered, f"add a case to tests/contract_cases.py for {sorted(registered - kinds)}"


CASES = [(m, t) for m in MODELS for t in transforms(m)]


@pytest.mark.parametrize("model,name", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_transform_contract(model, name, tmp_path):
    config = transforms(model)[name]
    assert type(config).from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    net, data = _fresh(model)
    before = _out(net, data)
    reason = refusal(model, None, name)
    if reason:
        with pytest.raises(NNCompressError, match=reason):
            _apply(net, config, data)
        return
    out = _apply(net, config, data)
    y = _out(out, data)
    assert y.shape == before.shape and torch.isfinite(y).all()
    merged = nncompress.merge(copy.deepcopy(out))
    assert not any(isinstance(m, nncompress.core.Wrapper) for m in merged.modules())
    assert _sqnr_db(y, _out(merged, data)) >= (25.0 if name in ("quantize_w8a8", "int8_dynamic") else 60.0)
    _reloads_exactly(out, data, tmp_path)
    _reloads_exactly(merged, data, tmp_path / "merged")


# Every ordered pair of transforms on the three models either composes (and reloads exactly) or
# refuses as `contract_cases.refusal` says. The default tier runs the set of seven on each
# model and every pair with BERT's smoothquant; the slow tier (CI runs it) the whole matrix.
PAIR_SET = ("quantize_w8a8", "quantize_w4", "lowrank", "cluster", "sparsify_50", "sparsify_24", "prune")
FAST = [(m, a, b) for m in MODELS for a in PAIR_SET for b in PAIR_SET]
FAST += [("bert", a, b) for a in (*PAIR_SET, "gptq", "qat", "int8_dynamic", "smoothquant")
         for b in ("smoothquant", "int8_dynamic")]
PAIRS = [pytest.param(m, a, b, id=f"{m}-{a}-then-{b}",
                      marks=() if (m, a, b) in FAST else pytest.mark.slow)
         for m in MODELS for a in transforms(m) for b in transforms(m)]


@pytest.mark.parametrize("model,first,second", PAIRS)
def test_pairs_compose_or_refuse_with_a_typed_error(model, first, second, tmp_path):
    cases = transforms(model)
    net, data = _fresh(model)
    alone = refusal(model, None, first)
    if alone:  # the first stage does not apply to this model: the pair is that refusal
        with pytest.raises(NNCompressError, match=alone):
            _apply(net, cases[first], data)
        return
    net = _apply(net, cases[first], data)
    reason = refusal(model, first, second)
    if reason:
        with pytest.raises(NNCompressError, match=reason):
            _apply(net, cases[second], data)
        return
    out = _apply(net, cases[second], data)
    assert _out(out, data).shape == _out(_base(model)[0], data).shape
    _reloads_exactly(out, data, tmp_path)
