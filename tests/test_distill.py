"""distill/: KD losses against hand-computed values, feature capture and adapters, the finetune stage
with logits/feature/attention distillation, and stage-wise (progressive) distillation."""
import copy
import doctest
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TinyData

import nncompress
from nncompress.core import ConfigError, Context, DataError
from nncompress.distill import (FeatureAdapter, FinetuneConfig, ProgressiveConfig, adapter_for, attention_kl_loss,
                                attention_map, attention_transfer_loss, capture, embedding_distill_loss,
                                feature_kd_loss, kd_logits_loss, kd_loss, output_of)
from nncompress.distill import features, losses
from nncompress.distill.finetune import build_adapters, feature_terms
from nncompress.recipe import parse_recipe
from nncompress.zoo.loaders import build_model


@pytest.mark.parametrize("module", [losses, features], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ losses, by hand

def test_kd_logits_loss_hand_computed_with_temperature_squared():
    # T = 2, teacher logits (2 ln 3, 0) -> softened (3/4, 1/4); student (0, 0) -> (1/2, 1/2)
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[2 * math.log(3), 0.0]], dtype=torch.float64)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_logits_loss(s, t, temperature=2.0)) == pytest.approx(4 * kl, rel=1e-12)  # T^2 = 4


def test_kd_logits_loss_scales_with_t_squared_for_the_same_soft_targets():
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    base = float(kd_logits_loss(s, t, temperature=1.0))
    # logits scaled by T give the same softened distributions, so only the T^2 factor remains
    assert float(kd_logits_loss(4 * s, 4 * t, temperature=4.0)) == pytest.approx(16 * base, rel=1e-10)


def test_kd_loss_mixes_labels_and_soft_targets_by_alpha():
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[2 * math.log(3), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    kd = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert float(kd_loss(s, t, y, alpha=0.9, temperature=2.0)) == pytest.approx(0.1 * math.log(2) + 0.9 * kd)
    assert float(kd_loss(s, t, y, alpha=0.0)) == pytest.approx(math.log(2))  # labels only


def test_feature_kd_loss_hand_computed():
    s, t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert float(feature_kd_loss(s, t)) == pytest.approx((1 + 4 + 9) / 4)
    # normalized: s = (3, 4), t = (4, 3): cos = 24/25, distance^2 = 2 - 2 cos = 0.08; scale-free
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[40.0, 30.0]])
    assert float(feature_kd_loss(s, t, normalize=True)) == pytest.approx(0.08, rel=1e-6)
    with pytest.raises(DataError, match="FeatureAdapter"):
        feature_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_attention_map_and_transfer_hand_computed():
    a = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # (N=1, C=2, L=2)
    # p = 2: mean over channels of a^2 = (5, 2), then L2-normalized
    assert torch.allclose(attention_map(a), torch.tensor([[5.0, 2.0]]) / math.sqrt(29))
    s = torch.tensor([[[1.0, 0.0]]])                          # one channel -> map (1, 0)
    t = torch.tensor([[[0.0, 2.0], [0.0, -1.0], [0.0, 0.0]]])  # three channels -> map (0, 1)
    assert float(attention_transfer_loss(s, t)) == pytest.approx(2.0)  # |(1,0)-(0,1)|^2, widths differ
    s2, t2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)  # Conv2d features, flattened H*W
    ref = (F.normalize(s2.pow(2).mean(1).flatten(1), dim=1) - F.normalize(t2.pow(2).mean(1).flatten(1), dim=1))
    assert float(attention_transfer_loss(s2, t2)) == pytest.approx(float(ref.pow(2).sum(1).mean()), rel=1e-6)
    with pytest.raises(DataError, match="spatial sizes differ"):
        attention_transfer_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 8))


def test_attention_kl_and_embedding_losses_hand_computed():
    t = torch.tensor([[[[0.5, 0.5]]]], dtype=torch.float64)   # (N, H, Q, K)
    s = torch.tensor([[[[0.25, 0.75]]]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(attention_kl_loss(s, t)) == pytest.approx(expected, rel=1e-12)
    e_s, e_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert float(embedding_distill_loss(e_s, e_t)) == pytest.approx(1 - 1 / math.sqrt(2))
    assert float(embedding_distill_loss(e_s, e_t, mode="mse")) == pytest.approx(0.5)


# ------------------------------------------------------------------------- capture and adapters

def test_capture_records_outputs_and_removes_hooks():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with capture(net, ["1"]) as feats:
        net(x)
    assert torch.equal(feats["1"], torch.relu(net[0](x)))
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ConfigError, match=r"features: no module named 'fc'.*close names"):
        with capture(net, ["fc"]):
            pass


def test_output_of_stops_the_forward_at_the_module():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("later layers must not run")

    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), Boom())
    x = torch.randn(2, 4)
    assert torch.equal(output_of(net, "1", x), torch.relu(net[0](x)))
    assert not net[1]._forward_hooks


def test_feature_adapter_is_a_1x1_conv():
    adapter = FeatureAdapter(3, 5, dim=1)
    conv = nn.Conv1d(3, 5, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(adapter.proj.weight.unsqueeze(-1))  # (5, 3) -> (5, 3, 1)
    x = torch.randn(2, 3, 7)
    assert torch.allclose(adapter(x), conv(x), atol=1e-6)
    assert isinstance(adapter_for(torch.zeros(2, 4, 6), torch.zeros(2, 4, 6), "x"), nn.Identity)
    tokens = adapter_for(torch.zeros(2, 6, 8), torch.zeros(2, 6, 16), "x")  # (N, T, D): the last axis
    assert tokens.dim == 2 and tuple(tokens(torch.zeros(2, 6, 8)).shape) == (2, 6, 16)
    with pytest.raises(DataError, match="more than the width"):
        adapter_for(torch.zeros(2, 4, 6), torch.zeros(2, 8, 3), "layers.1 -> layers.1")


# ------------------------------------------------------------------------------- the finetune stage

def tiny_cnn(widths, seed=0):
    torch.manual_seed(seed)
    model, _ = build_model({"name": "mnist1d_cnn", "kwargs": {"num_classes": 3, "widths": list(widths)}})
    return model


@pytest.fixture
def tiny_data():
    gen = torch.Generator().manual_seed(0)
    return TinyData(torch.randn(16, 40, generator=gen), torch.randint(0, 3, (16,), generator=gen))


def test_finetune_config_features_round_trip_yaml_shapes():
    cfg = FinetuneConfig.from_dict({"features": ["layers.0", ["layers.2", "encoder.2"]], "attention_weight": 1e3,
                                    "kd_alpha": 0.9})
    assert cfg.features == ("layers.0", ("layers.2", "encoder.2"))
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"features\[0\]"):
        FinetuneConfig.from_dict({"features": [["a", "b", "c"]]})
    with pytest.raises(ConfigError, match="attention_weight: attention transfer needs module pairs"):
        FinetuneConfig(attention_weight=1.0)
    recipe = parse_recipe({"name": "x", "stages": [
        {"kind": "finetune", "features": ["layers.1"], "kd_alpha": 0.9},
        {"kind": "progressive_distill", "stages": ["stem", "layers.0"], "head_epochs": 0}]})
    assert recipe.stages[0].config.features == ("layers.1",)
    assert recipe.stages[1].config.stages == ("stem", "layers.0")


def test_feature_terms_are_zero_for_a_copy_of_the_teacher(tiny_data):
    teacher = tiny_cnn((8, 16, 16)).eval()
    student = copy.deepcopy(teacher)
    pairs = [("stem", "stem"), ("layers.1", "layers.1")]
    adapters = build_adapters(student, teacher, pairs, tiny_data.x[:2])
    assert all(isinstance(a, nn.Identity) for a in adapters)
    cfg = FinetuneConfig(features=("stem", "layers.1"), attention_weight=1.0)
    with capture(student, ["stem", "layers.1"]) as sf, capture(teacher, ["stem", "layers.1"]) as tf:
        student(tiny_data.x)
        teacher(tiny_data.x)
    with torch.no_grad():
        assert float(feature_terms(sf, tf, pairs, adapters, cfg)) == 0.0


def test_finetune_with_feature_kd_from_a_wider_teacher(tiny_data, tmp_path):
    teacher = tiny_cnn((8, 16, 16), seed=1).eval()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_cnn((4, 8, 8))  # same module names, half the channels (as after structured pruning)
    cfg = FinetuneConfig(epochs=8, lr=1e-2, kd_alpha=0.9, features=("layers.0", "layers.2"),
                         attention_weight=10.0)
    out = nncompress.apply(student, cfg, context=Context(data=tiny_data, teacher=teacher))
    record = nncompress.history(out)[-1]["record"]
    assert record["adapters"] == {"layers.0": "FeatureAdapter", "layers.2": "FeatureAdapter"}
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())  # teacher untouched
    assert not any(n.startswith("adapter") for n, _ in out.named_parameters())  # adapters not in the model
    nncompress.save(out, tmp_path / "ck")
    again = nncompress.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(out(tiny_data.x), again(tiny_data.x))


def test_finetune_feature_errors_name_the_culprit(tiny_data):
    teacher, student = tiny_cnn((8, 16, 16)), tiny_cnn((4, 8, 8))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ConfigError, match=r"features: no module named 'layer.1' in MNIST1DCNN; close names: layers.1"):
        nncompress.apply(student, FinetuneConfig(features=("layer.1",)), context=Context(data=tiny_data,
                                                                                           teacher=teacher))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # failed before training
    with pytest.raises(ConfigError, match="finetune.features: distillation needs a teacher"):
        nncompress.apply(student, FinetuneConfig(features=("layers.1",)), context=Context(data=tiny_data))
    with pytest.raises(DataError, match="more than the width"):  # layers.0 (L=40) vs layers.1 (L=20)
        nncompress.apply(student, FinetuneConfig(features=(("layers.0", "layers.1"),)),
                         context=Context(data=tiny_data, teacher=teacher))


# ------------------------------------------------------------------------------ progressive stage

def test_progressive_trains_only_the_listed_blocks(tiny_data):
    teacher = tiny_cnn((8, 16, 16), seed=1).eval()
    student = tiny_cnn((4, 8, 8))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = ProgressiveConfig(stages=("stem", "layers.0"), epochs=5, lr=1e-2, head_epochs=0)
    out = nncompress.apply(student, cfg, context=Context(data=tiny_data, teacher=teacher))
    after = out.state_dict()
    for k, v in after.items():
        trained = k.startswith(("stem.", "layers.0."))
        if trained and v.is_floating_point() and "running" not in k:
            assert not torch.equal(v, before[k]), k
        if not trained:
            assert torch.equal(v, before[k]), k  # frozen: parameters and BatchNorm buffers, bit for bit
    stage_losses = nncompress.history(out)[-1]["record"]["stage_losses"]
    assert set(stage_losses) == {"stem", "layers.0"}
    assert all(v[-1] < v[0] for v in stage_losses.values())


def test_progressive_finished_blocks_stay_frozen_while_later_ones_train(tiny_data, tmp_path):
    teacher = tiny_cnn((8, 16, 16), seed=1).eval()
    ctx = Context(data=tiny_data, teacher=teacher)
    torch.manual_seed(5)
    only_first = nncompress.apply(tiny_cnn((4, 8, 8)), ProgressiveConfig(stages=("layers.0",), epochs=3, lr=1e-2,
                                                                         head_epochs=0), context=ctx)
    torch.manual_seed(5)
    cfg = ProgressiveConfig(stages=("layers.0", "layers.1", "layers.2"), epochs=3, head_epochs=4, lr=1e-2,
                            final="head")
    full = nncompress.apply(tiny_cnn((4, 8, 8)), cfg, context=ctx)
    first, done = only_first.layers[0].state_dict(), full.layers[0].state_dict()
    assert all(torch.equal(first[k], done[k]) for k in first)  # untouched by layers.1/2 and the head phase
    record = nncompress.history(full)[-1]["record"]
    assert record["head_losses"][-1] < record["head_losses"][0]
    nncompress.save(full, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(full(tiny_data.x), nncompress.load(tmp_path / "ck")(tiny_data.x))


def test_progressive_config_errors():
    with pytest.raises(ConfigError, match="stages: list the blocks"):
        ProgressiveConfig()
    cfg = ProgressiveConfig.from_dict({"stages": ["stem", ["layers.0", "layers.0"]], "head_epochs": 2})
    assert ProgressiveConfig.from_dict(cfg.to_dict()) == cfg
    data = TinyData(torch.randn(4, 40), torch.randint(0, 3, (4,)))
    m = tiny_cnn((4, 8, 8))
    with pytest.raises(ConfigError, match="stages: no module named 'layers.9'"):
        nncompress.apply(m, ProgressiveConfig(stages=("layers.9",)), context=Context(data=data, teacher=m))
    with pytest.raises(ConfigError, match="head_epochs: every parameter belongs to a stage"):
        nncompress.apply(m, ProgressiveConfig(stages=("",), epochs=0, final="head"), context=Context(data=data,
                                                                                       teacher=copy.deepcopy(m)))


def test_fitted_adapter_of_a_pruned_student_passes_the_kept_channels_through():
    from nncompress.distill.progressive import fitted_adapter
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    student = copy.deepcopy(teacher)
    kept = [0, 2, 5]
    student[0] = nn.Linear(5, 3)
    with torch.no_grad():  # the student is the teacher with channels 1, 3, 4 removed
        student[0].weight.copy_(teacher[0].weight[kept])
        student[0].bias.copy_(teacher[0].bias[kept])
    x = torch.randn(256, 5)
    adapter = fitted_adapter(student, teacher, "1", "1", x, damp=1e-6)
    s_out, t_out = student(x), teacher(x)
    with torch.no_grad():
        mapped = adapter(s_out)
    assert torch.allclose(mapped[:, kept], t_out[:, kept], atol=1e-3)  # the kept channels, as they are
    w = adapter.proj.weight
    assert torch.allclose(w[kept], torch.eye(3), atol=1e-3)
    # the removed channels: the least-squares prediction from the kept ones, better than zero
    removed = [1, 3, 4]
    assert (mapped[:, removed] - t_out[:, removed]).pow(2).sum() <= t_out[:, removed].pow(2).sum()


def test_progressive_outputs_target_trains_each_block_through_the_teachers_remaining_layers(tiny_data):
    teacher = tiny_cnn((8, 16, 16), seed=1).eval()
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = tiny_cnn((4, 8, 8))
    before = copy.deepcopy(student.state_dict())
    # layers.2's output reaches the loss only through the teacher's pool and fc: the block must still learn
    cfg = ProgressiveConfig(stages=("layers.2",), epochs=6, lr=1e-2, head_epochs=0, target="outputs")
    out = nncompress.apply(student, cfg, context=Context(data=tiny_data, teacher=teacher))
    after = out.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("layers.2.") and "running" not in k)
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("layers.2."))
    losses = nncompress.history(out)[-1]["record"]["stage_losses"]["layers.2"]
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())  # read, never trained


def test_a_teacher_is_given_back_trainable_and_in_its_mode(tiny_data):
    teacher = tiny_cnn((8, 16, 16), seed=1)  # in train mode, every parameter trainable
    nncompress.apply(tiny_cnn((4, 8, 8)), FinetuneConfig(epochs=1, kd_alpha=0.9),
                     context=Context(data=tiny_data, teacher=teacher))
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    teacher.eval()
    nncompress.apply(tiny_cnn((4, 8, 8)), ProgressiveConfig(stages=("layers.0",), epochs=1, head_epochs=1),
                     context=Context(data=tiny_data, teacher=teacher))
    assert not teacher.training
    nncompress.apply(teacher, FinetuneConfig(epochs=1), context=Context(data=tiny_data))  # still trainable


def test_progressive_final_all_trains_the_staged_blocks_too(tiny_data):
    teacher = tiny_cnn((8, 16, 16), seed=1).eval()
    ctx = Context(data=tiny_data, teacher=teacher)
    runs = {}
    for final in ("head", "all"):
        torch.manual_seed(3)
        cfg = ProgressiveConfig(stages=("layers.0",), epochs=1, lr=1e-2, head_epochs=2, final=final,
                                target="features")
        runs[final] = nncompress.apply(tiny_cnn((4, 8, 8)), cfg, context=ctx).state_dict()
    # the same block phase; then only "all" moves layers.0's weights
    assert any(not torch.equal(runs["head"][k], runs["all"][k]) for k in runs["head"] if k.startswith("layers.0."))


def test_progressive_new_field_errors():
    with pytest.raises(ConfigError, match="target: must be one of"):
        ProgressiveConfig(stages=("stem",), target="logits")
    with pytest.raises(ConfigError, match="final: must be one of"):
        ProgressiveConfig(stages=("stem",), final="everything")
    cfg = ProgressiveConfig.from_dict({"stages": ["stem"], "target": "both", "final": "all"})
    assert ProgressiveConfig.from_dict(cfg.to_dict()) == cfg


class TinyEncoder(nn.Module):
    """Token embedding -> Linear (N, T, D) -> masked mean: a sentence encoder with dict inputs."""

    def __init__(self, width):
        super().__init__()
        self.emb = nn.Embedding(20, width)
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, 6)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.proj(self.emb(input_ids)))                 # (N, T, D)
        m = attention_mask.unsqueeze(-1).float()                        # (N, T, 1)
        return self.out((h * m).sum(1) / m.sum(1))                      # (N, 6)


class TinyText:
    task, num_classes = "embedding", None

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.batch = {"input_ids": torch.randint(0, 20, (8, 5), generator=gen),
                      "attention_mask": torch.ones(8, 5, dtype=torch.long)}
        self.train = self.calib = self.test = [self.batch]

    def example_batch(self, n):
        return {k: v[:n] for k, v in self.batch.items()}


def test_embedding_distillation_with_token_features():
    torch.manual_seed(0)
    teacher, student = TinyEncoder(8).eval(), TinyEncoder(4)
    cfg = FinetuneConfig(epochs=10, lr=1e-2, embedding_loss="mse", features=("proj",))
    out = nncompress.apply(student, cfg, context=Context(data=TinyText(), teacher=teacher))
    record = nncompress.history(out)[-1]["record"]
    assert record["adapters"] == {"proj": "FeatureAdapter"}  # (N, T, 4) -> (N, T, 8) on the last axis
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]


def test_progressive_outputs_target_on_an_embedding_model_with_dict_inputs():
    torch.manual_seed(0)
    teacher, student = TinyEncoder(8).eval(), TinyEncoder(4)
    cfg = ProgressiveConfig(stages=("proj",), epochs=10, lr=1e-2, head_epochs=2, final="all")
    out = nncompress.apply(student, cfg, context=Context(data=TinyText(), teacher=teacher))
    record = nncompress.history(out)[-1]["record"]
    losses = record["stage_losses"]["proj"]  # (N, T, 4) through the adapter into the teacher's masked mean + out
    assert losses[-1] < losses[0] and record["head_losses"][-1] <= record["head_losses"][0]


def test_finetune_after_sparsify_keeps_the_pruned_zeros():
    """Prune, then recover: the fine-tune trains the surviving weights only."""
    from helpers import TinyData

    import nncompress
    from nncompress.distill import FinetuneConfig
    from nncompress.prune.sparsity import SparsityConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    data = TinyData(torch.randn(64, 16), torch.randint(0, 3, (64,)))
    model = nncompress.apply(model, SparsityConfig(ratio=0.8))
    zeros = [(m.weight == 0).clone() for m in (model[0], model[2])]
    before = model[0].weight.detach().clone()
    model = nncompress.apply(model, FinetuneConfig(epochs=3, lr=1e-2), context=nncompress.Context(data=data))
    assert [torch.equal(m.weight == 0, z) for m, z in zip((model[0], model[2]), zeros)] == [True, True]
    assert not torch.equal(model[0].weight, before)  # the survivors did train
