"""Coverage of transformers architectures and the built-in models by the dependency graph.

Each family is built from a tiny config with random weights (nothing is downloaded), traced once,
and 30% of every prunable group's channels are removed at once; the forward must still run with
the same output shapes. Attention heads are pruned as units; the oracle for heads is masking: a
removed head equals the unpruned model with that head's columns of the output projection zeroed.
"""
import copy
import json

import pytest
import torch

from nncompress.core import UnsupportedOpError
from nncompress.graph import DependencyGraph
from nncompress.prune import apply_record, remove_groups
from nncompress.zoo.models import MobileNetV2, ResNetCifar, mlp, mnist1d_cnn, vgg11

transformers = pytest.importorskip("transformers")

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=32, use_cache=False)
DECODER = dict(TEXT, num_attention_heads=8, num_key_value_heads=4, head_dim=8)  # GQA: 2 query heads per KV head
VISION = dict(image_size=32, patch_size=8, num_channels=3)
HF = {  # family -> (model_type, config fields, input kind)
    "bert": ("bert", TEXT, "text"),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=1,
                          eos_token_id=2, use_cache=False), "ids"),
    "llama": ("llama", DECODER, "ids"),
    "mistral": ("mistral", dict(DECODER, sliding_window=None), "ids"),
    "vit": ("vit", dict(TEXT, **VISION), "pixels"),
    "resnet": ("resnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), "pixels"),
    "convnext": ("convnext", dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), "pixels"),
    "mobilenet_v2": ("mobilenet_v2", dict(depth_multiplier=0.25, image_size=32), "pixels"),
    "swin": ("swin", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                          window_size=4), "pixels"),
    "whisper": ("whisper", dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                num_mel_bins=8, max_source_positions=16, vocab_size=100, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, decoder_start_token_id=1, use_cache=False), "audio"),
}
BUILTINS = {
    "mnist1d_cnn": lambda: mnist1d_cnn(widths=(16, 32, 32)),
    "mlp": lambda: mlp(hidden=(32, 24)),
    "resnet20": lambda: ResNetCifar(3, size=16),
    "resnet56": lambda: ResNetCifar(9, size=16),
    "mobilenetv2": lambda: MobileNetV2(width_mult=0.25, size=16),
    "vgg11": lambda: vgg11(width=8),
}


def _hf(family: str):
    """A tiny randomly initialised model of `family` and matching example inputs."""
    model_type, fields, kind = HF[family]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = transformers.AutoModel.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        inputs = {"input_ids": torch.randint(0, 100, (2, 6), generator=g),
                  "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    elif kind == "ids":
        inputs = {"input_ids": torch.randint(0, 100, (2, 6), generator=g)}
    elif kind == "pixels":
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    else:  # whisper: the encoder alone, on (N, mel bins, 2 * max_source_positions) features
        model = model.get_encoder()
        inputs = {"input_features": torch.randn(2, 8, 32, generator=g)}
    return model, inputs


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.values() if isinstance(v, torch.Tensor)] if hasattr(out, "values") else list(out)


def _prune_30(model, inputs) -> tuple[list, dict]:
    """Remove 30% of every prunable group (lowest L2 of the producers' output rows); returns groups, record."""
    groups = [g for g in DependencyGraph(model, inputs).groups() if g.prunable]
    plan = []
    for group in groups:
        k = int(0.3 * group.size)
        if k:
            plan.append((group, _weakest(model, group, k)))
    return groups, remove_groups(model, plan)


def _weakest(model, group, k: int) -> list[int]:
    score = torch.zeros(group.size)
    for m in group.members:
        if m.role != "out":
            continue
        t = model.get_submodule(m.module).get_parameter(m.param).detach()
        t = t.movedim(m.dim, 0)[m.offset:m.offset + group.size * m.stride]  # (size*stride, ...)
        score += t.reshape(group.size, -1).pow(2).sum(1)
    return torch.argsort(score)[:k].tolist()


@pytest.mark.parametrize("family", sorted(HF))
def test_hf_family_prunes_30_percent_and_runs(family):
    model, inputs = _hf(family)
    before = [o.shape for o in _outputs(model, inputs)]
    groups, record = _prune_30(model, inputs)
    assert groups and record["params"], f"{family}: nothing prunable"
    after = _outputs(model, inputs)
    assert [o.shape for o in after] == before
    assert all(torch.isfinite(o).all() for o in after if o.is_floating_point())


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_prunes_30_percent_and_runs(name):
    torch.manual_seed(0)
    model = BUILTINS[name]().eval()
    x = torch.randn((2, *model.input_shape), generator=torch.Generator().manual_seed(0))
    before = model(x).shape
    _, record = _prune_30(model, x)
    assert record["params"]
    assert model(x).shape == before


HEADS = {"bert": ("encoder.layer.0.attention.self.query", 4), "vit": ("layers.0.attention.q_proj", 4),
         "llama": ("layers.0.self_attn.q_proj", 4), "mistral": ("layers.0.self_attn.q_proj", 4),
         "whisper": ("layers.0.self_attn.q_proj", 4)}


def _mask_heads(model, group, drop):
    """The oracle: zero the output projection's input columns of the dropped heads."""
    masked = copy.deepcopy(model)
    for m in group.members:
        if m.role == "in":
            w = masked.get_submodule(m.module).get_parameter(m.param)
            cols = [m.offset + h * m.stride + j for h in drop for j in range(m.stride)]
            with torch.no_grad():
                w.index_fill_(m.dim, torch.tensor(cols), 0.0)
    return masked


@pytest.mark.parametrize("family", sorted(HEADS))
def test_removing_heads_equals_masking_them(family):
    model, inputs = _hf(family)
    producer, size = HEADS[family]
    group = DependencyGraph(model, inputs).group_of(producer)
    assert group.prunable and group.size == size, str(group)
    drop = [1, 2]
    masked = _mask_heads(model, group, drop)
    pruned = copy.deepcopy(model)
    remove_groups(pruned, [(group, drop)])
    want, got = _outputs(masked, inputs)[0], _outputs(pruned, inputs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (_outputs(model, inputs)[0] - want).abs().max() > 1e-4  # the heads mattered


def test_gqa_prunes_whole_kv_groups_and_config_round_trips(tmp_path):
    model, inputs = _hf("llama")
    group = DependencyGraph(model, inputs).group_of("layers.0.self_attn.k_proj")
    widths = {m.module.rsplit(".", 1)[-1]: m.stride for m in group.members if m.param == "weight"}
    assert group.size == 4 and widths == {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16}
    groups = [g for g in DependencyGraph(model, inputs).groups() if g.prunable and "self_attn" in g.producers[0]]
    record = remove_groups(model, [(g, [0, 3]) for g in groups])
    assert record["configs"] == {"": {"num_attention_heads": 4, "num_key_value_heads": 2}}
    ref = _outputs(model, inputs)[0]
    model.save_pretrained(tmp_path)
    twin = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_outputs(twin, inputs)[0], ref)


def test_bert_heads_update_module_attributes_and_replay():
    model, inputs = _hf("bert")
    groups = [g for g in DependencyGraph(model, inputs).groups() if g.prunable and g.size == 4]
    record = remove_groups(model, [(g, [0]) for g in groups])
    attn = model.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size, attn.attention_head_size) == (3, 24, 8)
    assert record["modules"]["encoder.layer.1.attention.self"] == {"num_attention_heads": 3, "all_head_size": 24}
    assert record["configs"] == {} and model.config.num_attention_heads == 4  # BERT derives head size from it
    fresh = apply_record(_hf("bert")[0], json.loads(json.dumps(record)))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_outputs(fresh, inputs)[0], _outputs(model, inputs)[0])


def test_unhandled_coupling_names_module_op_and_exclude():
    model, inputs = _hf("gpt2")  # fused c_attn split into Q, K, V by aten.split: heads cannot move
    group = DependencyGraph(model, inputs).group_of("h.0.attn.c_attn")
    assert not group.prunable and "h.0.attn" in group.reason and "aten.split" in group.reason
    with pytest.raises(UnsupportedOpError, match="h.0.attn.c_attn: these channels cannot be removed"):
        remove_groups(model, [(group, [0])])
