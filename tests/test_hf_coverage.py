"""Coverage of transformers architectures and the built-in models by the dependency graph.

Each family is built from a tiny config with random weights (nothing is downloaded) and traced
once; decoders keep their default config (`use_cache=True`: the trace switches caches off). For
every family, 30% of every prunable group's channels are removed at once and the forward must
still run with the same output shapes, and the record must replay on a fresh model; a group that
cannot be pruned must say which module and op stop it. Each group is also pruned alone (a family's
code may read one tensor's width to reshape another), and removing channels must equal masking
them (zeroing the consumers' input columns) for every group that only passes through linear
layers, attention heads included.
"""
import copy
import functools
import json
import re

import pytest
import torch
import torch.nn as nn

from nncompress.core import UnsupportedOpError
from nncompress.graph import DependencyGraph
from nncompress.graph.walk import OUTPUT_REASON
from nncompress.prune import apply_record, remove_groups
from nncompress.zoo.models import MobileNetV2, ResNetCifar, mlp, mnist1d_cnn, vgg11

transformers = pytest.importorskip("transformers")

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=32)
# GQA: 2 query heads per KV head; the FFN width differs from q_proj's 64 so the config sync can tell them apart
DECODER = dict(TEXT, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=48)
VISION = dict(image_size=32, patch_size=8, num_channels=3)
MIX = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
           strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])  # SegFormer / GLPN encoder
WAVE = dict(TEXT, conv_dim=[16, 16], conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4)
HF = {  # family -> (model_type, config fields, input kind); decoders keep use_cache at its default (True)
    # encoders
    "bert": ("bert", TEXT, "text"),
    "roberta": ("roberta", dict(TEXT, pad_token_id=1), "text"),
    "xlm-roberta": ("xlm-roberta", dict(TEXT, pad_token_id=1), "text"),
    "distilbert": ("distilbert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100,
                                      max_position_embeddings=32), "text"),
    "albert": ("albert", dict(TEXT, embedding_size=16), "text"),
    "electra": ("electra", dict(TEXT, embedding_size=16), "text"),
    "deberta-v2": ("deberta-v2", dict(TEXT, max_relative_positions=16, position_buckets=8), "text"),
    "mpnet": ("mpnet", dict(TEXT, pad_token_id=1), "text"),
    "modernbert": ("modernbert", dict(TEXT, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), "text"),
    # decoders
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=1,
                          eos_token_id=2), "ids"),
    "gpt_neo": ("gpt_neo", dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                window_size=4, vocab_size=100, max_position_embeddings=32, intermediate_size=64,
                                bos_token_id=1, eos_token_id=2), "ids"),
    "gptj": ("gptj", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=100, n_positions=32,
                          bos_token_id=1, eos_token_id=2), "ids"),
    "gpt_neox": ("gpt_neox", dict(TEXT, bos_token_id=1, eos_token_id=2), "ids"),
    "opt": ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                        max_position_embeddings=32, word_embed_proj_dim=32), "ids"),
    "bloom": ("bloom", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=100), "ids"),
    "falcon": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                              bos_token_id=1, eos_token_id=2), "ids"),
    "llama": ("llama", DECODER, "ids"),
    "mistral": ("mistral", dict(DECODER, sliding_window=None), "ids"),
    "qwen2": ("qwen2", DECODER, "ids"),
    "qwen3": ("qwen3", DECODER, "ids"),
    "gemma": ("gemma", DECODER, "ids"),
    "gemma2": ("gemma2", DECODER, "ids"),
    "phi": ("phi", DECODER, "ids"),
    "phi3": ("phi3", dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2), "ids"),
    "stablelm": ("stablelm", DECODER, "ids"),
    # vision
    "vit": ("vit", dict(TEXT, **VISION), "pixels"),
    "deit": ("deit", dict(TEXT, **VISION), "pixels"),
    "beit": ("beit", dict(TEXT, **VISION), "pixels"),
    "dinov2": ("dinov2", dict(TEXT, **VISION, mlp_ratio=2), "pixels"),
    "resnet": ("resnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), "pixels"),
    "convnext": ("convnext", dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), "pixels"),
    "mobilenet_v2": ("mobilenet_v2", dict(depth_multiplier=0.25, image_size=32), "pixels"),
    "swin": ("swin", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                          window_size=4), "pixels"),
    "efficientnet": ("efficientnet", dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                          hidden_dim=320), "pixels"),  # hidden_dim: the head's width, 1280 * 0.25
    "regnet": ("regnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8), "pixels"),
    # segmentation and depth
    "segformer": ("segformer", dict(MIX, decoder_hidden_size=32, num_labels=3), "segmentation"),
    "mobilevit": ("mobilevit", dict(image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=2, num_labels=3,
                                    neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], patch_size=2, aspp_out_channels=16),
                  "segmentation"),
    "dpt": ("dpt", dict(TEXT, **VISION, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], fusion_hidden_size=16,
                        reassemble_factors=[2, 1], num_labels=3, head_in_index=-1), "segmentation"),
    "glpn": ("glpn", dict(MIX, decoder_hidden_size=16), "depth"),
    # audio
    "whisper": ("whisper", dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                num_mel_bins=8, max_source_positions=16, vocab_size=100, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, decoder_start_token_id=1), "audio"),
    "wav2vec2": ("wav2vec2", WAVE, "wave"),
    "hubert": ("hubert", WAVE, "wave"),
}
DECODERS = sorted(f for f, (_, _, kind) in HF.items() if kind == "ids")
# what stops the groups a family cannot prune: "module: op" fragments its reasons must contain
WHY = {
    "gpt2": ["h.0.attn: aten.split"],  # fused c_attn split into Q, K, V
    # fused query_key_value cut into q, k, v: sliced, or split (transformers >= 5.25)
    "falcon": [("h.0.self_attention: aten.slice", "h.0.self_attention: aten.split_with_sizes")],
    "bloom": ["h.0.self_attention: aten.reshape merges"],  # fused QKV viewed as (heads, 3, head_dim)
    "deberta-v2": ["encoder.layer.0.attention.self: aten.view merges"],  # heads folded into the batch dim
    "modernbert": ["layers.0.attn: aten.unbind", "layers.0.mlp: aten.chunk"],  # fused Wqkv, GLU Wi
    "phi3": ["layers.0.self_attn: aten.slice", "layers.0.mlp: aten.chunk"],  # fused qkv_proj, gate_up_proj
    "swin": ["attention.relative_position_bias: no channel rule for aten.index"],
    "regnet": ["layer.1.convolution: grouped aten.conv2d (groups=2)"],
    "wav2vec2": ["encoder.pos_conv_embed.conv: grouped aten.conv1d"],
    "hubert": ["encoder.pos_conv_embed.conv: grouped aten.conv1d"],
    # one head: view(..., -1, self.head_dim) fixes the head's width in code
    "segformer": ["stages.0.blocks.0.attention: aten.view splits a dim of 16 into (1, 16)"],
    "glpn": ["block.0.0.attention.self: aten.view splits a dim of 16 into (1, 16)"],
    "mobilevit": ["encoder.layer.2: aten.reshape reshapes"],  # patches unfolded across channels
}
NOTHING_PRUNABLE = {"modernbert", "phi3"}  # fused QKV and GLU projections in every layer
# families whose attention heads are pruned (and checked against masking)
HEADS = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "gpt_neo", "gptj", "gpt_neox", "opt",
         "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "stablelm", "vit", "deit", "beit", "dinov2",
         "segformer", "mobilevit", "dpt", "glpn", "whisper", "wav2vec2", "hubert"}
BUILTINS = {
    "mnist1d_cnn": lambda: mnist1d_cnn(widths=(16, 32, 32)),
    "mlp": lambda: mlp(hidden=(32, 24)),
    "resnet20": lambda: ResNetCifar(3, size=16),
    "resnet56": lambda: ResNetCifar(9, size=16),
    "mobilenetv2": lambda: MobileNetV2(width_mult=0.25, size=16),
    "vgg11": lambda: vgg11(width=8),
}
_HEADS_OF = {"segmentation": "AutoModelForSemanticSegmentation", "depth": "AutoModelForDepthEstimation"}


def _hf(family: str):
    """A tiny randomly initialised model of `family` and matching example inputs."""
    model_type, fields, kind = HF[family]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = getattr(transformers, _HEADS_OF.get(kind, "AutoModel")).from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # biases and norm scales off their 0/1 init: on tiny inputs some nets output zeros else
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    if kind == "text":
        inputs = {"input_ids": torch.randint(0, 100, (2, 6), generator=g),
                  "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    elif kind == "ids":
        inputs = {"input_ids": torch.randint(0, 100, (2, 6), generator=g)}
    elif kind == "wave":
        inputs = {"input_values": torch.randn(2, 200, generator=g)}
    elif kind == "audio":  # whisper: the encoder alone, on (N, mel bins, 2 * max_source_positions) features
        model = model.get_encoder()
        inputs = {"input_features": torch.randn(2, 8, 32, generator=g)}
    else:
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return model, inputs


@functools.cache
def _traced(family: str):
    """`(model, inputs, graph)`, traced once per session; tests prune deep copies."""
    model, inputs = _hf(family)
    return model, inputs, DependencyGraph(model, inputs)


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.values() if isinstance(v, torch.Tensor)] if hasattr(out, "values") else list(out)


def _plan_30(model, groups) -> list:
    """30% of every prunable group: the lowest L2 of the producers' output rows."""
    return [(g, _weakest(model, g, int(0.3 * g.size))) for g in groups if g.prunable and int(0.3 * g.size)]


def _prune_30(model, inputs) -> tuple[list, dict]:
    """Remove 30% of every prunable group of a fresh graph; returns the prunable groups and the record."""
    groups = [g for g in DependencyGraph(model, inputs).groups() if g.prunable]
    return groups, remove_groups(model, _plan_30(model, groups))


def _weakest(model, group, k: int) -> list[int]:
    score = torch.zeros(group.size)
    for m in group.members:
        if m.role != "out":
            continue
        t = model.get_submodule(m.module).get_parameter(m.param).detach()
        t = t.movedim(m.dim, 0)[m.offset:m.offset + group.size * m.stride]  # (size*stride, ...)
        score += t.reshape(group.size, -1).pow(2).sum(1)
    return torch.argsort(score)[:k].tolist()


def _names_module_and_op(reason: str, model) -> bool:
    """A reason is `model output ...`, or starts with a module of the model and names an aten op."""
    if reason in (OUTPUT_REASON, "a single channel cannot be removed"):
        return True
    where = re.match(r"([\w.]+): ", reason)
    modules = dict(model.named_modules())
    return bool(where) and (where[1] in modules or where[1] == type(model).__name__) and "aten." in reason


@pytest.mark.parametrize("family", sorted(HF))
def test_hf_family_prunes_30_percent_or_says_why(family):
    base, inputs, graph = _traced(family)
    groups = graph.groups()
    blocked = [g.reason for g in groups if not g.prunable]
    assert [r for r in blocked if not _names_module_and_op(r, base)] == []
    for fragment in WHY.get(family, []):
        either = fragment if isinstance(fragment, tuple) else (fragment,)  # alternatives across versions
        assert any(f in r for f in either for r in blocked), f"{family}: no reason mentions {fragment!r}: {set(blocked)}"
    plan = _plan_30(base, groups)
    assert bool(plan) == (family not in NOTHING_PRUNABLE), f"{family}: {len(plan)} groups to prune"
    if not plan:
        return
    model = copy.deepcopy(base)
    before = [o.shape for o in _outputs(model, inputs)]
    record = remove_groups(model, plan)
    after = _outputs(model, inputs)
    assert [o.shape for o in after] == before
    assert all(torch.isfinite(o).all() for o in after if o.is_floating_point())
    twin = apply_record(_hf(family)[0], json.loads(json.dumps(record)))  # the record alone rebuilds the shapes
    twin.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_outputs(twin, inputs), after))


@pytest.mark.parametrize("family", sorted(HF.keys() - NOTHING_PRUNABLE))
def test_each_group_prunes_alone(family):
    """A third of one group at a time: catches code that reshapes a tensor with another tensor's width."""
    base, inputs, graph = _traced(family)
    before = [o.shape for o in _outputs(base, inputs)]
    for group in (g for g in graph.groups() if g.prunable):
        model = copy.deepcopy(base)
        remove_groups(model, [(group, list(range(0, group.size, 3))[:max(1, group.size // 3)])])
        assert [o.shape for o in _outputs(model, inputs)] == before, str(group)


_LINEAR = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def _exact(model, group) -> bool:
    """Only linear layers and eval-mode BNs touch these channels: removing them equals zeroing them."""
    conv1d = transformers.pytorch_utils.Conv1D
    return all(isinstance(model.get_submodule(m.module), (*_LINEAR, conv1d)) for m in group.members)


def _mask(model, plan):
    """The oracle: zero the consumers' input columns of the dropped channels."""
    masked = copy.deepcopy(model)
    for group, drop in plan:
        for m in group.members:
            if m.role == "in":
                w = masked.get_submodule(m.module).get_parameter(m.param)
                cols = [m.offset + c * m.stride + j for c in drop for j in range(m.stride)]
                with torch.no_grad():
                    w.index_fill_(m.dim, torch.tensor(cols), 0.0)
    return masked


@pytest.mark.parametrize("family", sorted(HF.keys() - NOTHING_PRUNABLE))
def test_removing_channels_equals_masking_them(family):
    base, inputs, graph = _traced(family)
    groups = [g for g in graph.groups() if g.prunable and g.size > 1 and _exact(base, g)]
    assert groups, f"{family}: no group passes through linear layers only"
    plan = [(g, list(range(1, g.size, 3))[:max(1, g.size // 3)]) for g in groups]
    heads = [g for g in groups if any(m.stride > 1 and m.role == "in" for m in g.members)]
    assert bool(heads) == (family in HEADS), f"{family}: {len(heads)} head groups"
    pruned = copy.deepcopy(base)
    remove_groups(pruned, plan)
    want, got = _outputs(_mask(base, plan), inputs)[0], _outputs(pruned, inputs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (_outputs(base, inputs)[0] - want).abs().max() > 0  # the channels mattered


@pytest.mark.parametrize("family", DECODERS)
def test_pruned_decoder_with_default_config_decodes_with_its_cache(family):
    """The oracle: decoding the last 2 tokens on the cache of the first 4 equals one pass over all 6."""
    base, inputs, graph = _traced(family)
    assert base.config.use_cache  # the trace switched it off only while tracing
    model = copy.deepcopy(base)
    remove_groups(model, _plan_30(model, graph.groups()))
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model(ids).last_hidden_state
        head = model(ids[:, :4])
        tail = model(ids[:, 4:], cache=head.cache).last_hidden_state
    torch.testing.assert_close(tail, full[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_prunes_30_percent_and_runs(name):
    torch.manual_seed(0)
    model = BUILTINS[name]().eval()
    x = torch.randn((2, *model.input_shape), generator=torch.Generator().manual_seed(0))
    before = model(x).shape
    _, record = _prune_30(model, x)
    assert record["params"]
    assert model(x).shape == before


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


@pytest.mark.parametrize("family, ffn, field", [("llama", ".mlp.", "intermediate_size"), ("opt", ".fc1", "ffn_dim")])
def test_ffn_width_syncs_the_config_and_round_trips(family, ffn, field, tmp_path):
    model, inputs = _hf(family)
    groups = [g for g in DependencyGraph(model, inputs).groups() if g.prunable and ffn in g.producers[0]]
    assert len(groups) == 2  # one per layer
    record = remove_groups(model, [(g, [0, 5]) for g in groups])
    assert record["configs"] == {"": {field: getattr(_hf(family)[0].config, field) - 2}}
    model.save_pretrained(tmp_path)
    twin = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_outputs(twin, inputs)[0], _outputs(model, inputs)[0])


def test_whisper_encoder_syncs_only_the_encoder_ffn_width():
    model, inputs = _hf("whisper")  # the encoder alone shares the config that also describes the decoder
    groups = [g for g in DependencyGraph(model, inputs).groups() if g.prunable and g.producers[0].endswith("fc1")]
    record = remove_groups(model, [(g, [0]) for g in groups])
    assert record["configs"] == {"": {"encoder_ffn_dim": 63}} and model.config.decoder_ffn_dim == 64


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


def test_width_read_from_the_input_ties_the_reduction_conv_to_the_stream():
    model, inputs, graph = _traced("segformer")  # reshape(batch, num_channels, -1) after the reduction conv
    conv = "segformer.stages.0.blocks.0.attention.sequence_reduction.sequence_reduction"
    group = graph.group_of(conv)
    assert group.prunable and "segformer.stages.0.patch_embeddings.proj" in group.producers
    assert {m.dim for m in group.members if m.module == conv and m.param == "weight"} == {0, 1}
    assert "(same width)" in str(group)


def test_unhandled_coupling_names_module_op_and_exclude():
    model, inputs = _hf("gpt2")  # fused c_attn split into Q, K, V by aten.split: heads cannot move
    group = DependencyGraph(model, inputs).group_of("h.0.attn.c_attn")
    assert not group.prunable and "h.0.attn" in group.reason and "aten.split" in group.reason
    with pytest.raises(UnsupportedOpError, match="h.0.attn.c_attn: these channels cannot be removed"):
        remove_groups(model, [(group, [0])])
