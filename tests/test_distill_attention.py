"""distill/: attention-probability KL and hidden-state distillation for transformer students (the
finetune stage's attention_kl_weight, hidden_weight, distill_layers, attention_heads), on tiny random
BERTs built here: nothing is downloaded."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel

import nncompress
from nncompress.core import ConfigError, Context
from nncompress.distill import FinetuneConfig
from nncompress.distill.features import attention_modules, capture_attention
from nncompress.distill.finetune import Objective, TransformerTerms
from nncompress.distill.losses import attention_kl_loss, attention_kl_matrix, hidden_state_loss
from nncompress.prune.structured import PruneConfig
from nncompress.recipe import parse_recipe
from nncompress.zoo.hf import SentenceEncoder


class Tokens:
    """One batch of 16 token sequences of length 8, every other one padded after 5 tokens."""

    task, num_classes = "embedding", None

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        mask = torch.ones(16, 8, dtype=torch.long)
        mask[::2, 5:] = 0
        self.batch = {"input_ids": torch.randint(1, 50, (16, 8), generator=gen), "attention_mask": mask}
        self.train = self.calib = self.test = [self.batch]

    def example_batch(self, n):
        return {k: v[:n] for k, v in self.batch.items()}


def tiny_bert(seed=0, hidden=32, layers=2, heads=4, dropout=0.0):
    """A SentenceEncoder over a random BERT whose query/key weights are large enough that every head attends
    in its own way (at the usual init scale all heads are near uniform and indistinguishable)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=16, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    bert = BertModel(cfg)
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.normal_(0, 0.6)
    return SentenceEncoder(bert).eval()


def terms_of(student, teacher, config, data):
    """The unweighted transformer terms of `config` between student and teacher on the data's batch."""
    base = Objective(True, teacher, torch.device("cpu"))
    terms = TransformerTerms.build(student, base, config, data.example_batch(8))
    with torch.no_grad():
        _, parts = terms.parts(student.eval(), data.batch)
    return {k: float(v) for k, v in parts.items()}


def kept_heads(model, head_size):
    """Per attention layer, the teacher heads a structured prune kept (read from the model's history)."""
    edit = next(e for entry in nncompress.history(model) for e in entry["edits"] if e.get("edit") == "remove_channels")
    return {p["name"].rsplit(".", 2)[0]: sorted({i // head_size for i in edit["keeps"][p["keep"]]})
            for p in edit["record"]["params"] if p["name"].endswith("query.weight") and p["dim"] == 0}


# ------------------------------------------------------------------------------------------ losses

def test_masked_attention_kl_and_hidden_losses_by_hand():
    t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]], dtype=torch.float64)     # (N, H, Q, K)
    s = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]], dtype=torch.float64)
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    second = math.log(1.0 / 0.5)
    assert float(attention_kl_loss(s, t)) == pytest.approx((first + second) / 2, rel=1e-12)
    assert float(attention_kl_loss(s, t, mask=torch.tensor([[1, 0]]))) == pytest.approx(first, rel=1e-12)
    cost = attention_kl_matrix(s, t, torch.tensor([[1, 0]]))                # (Hs, Ht) = (1, 1)
    assert float(cost[0, 0]) == pytest.approx(first, rel=1e-12)
    a, b = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    assert float(hidden_state_loss(a, 2 * b, mask=torch.tensor([[0, 1]]))) == 4.0


def test_capture_attention_gives_probabilities_and_restores_the_model():
    model = tiny_bert(dropout=0.5).train()
    data = Tokens()
    names = attention_modules(model)
    assert names == ["model.encoder.layer.0.attention.self", "model.encoder.layer.1.attention.self"]
    with capture_attention(model, names) as probs:
        model(**data.batch)
    p = probs[names[0]]                                                     # (N, H, Q, K)
    assert tuple(p.shape) == (16, 4, 8, 8) and p.requires_grad
    # no attention dropout inside (rows sum to 1), padded keys get nothing
    assert torch.allclose(p.sum(-1), torch.ones(16, 4, 8), atol=1e-6)
    assert float(p[::2, :, :, 5:].detach().abs().max()) == 0.0
    # the kernel and the modules' modes come back
    assert model.model.config._attn_implementation == "sdpa"
    assert all(m.training for m in model.modules())


# -------------------------------------------------------------------------- the finetune stage

def test_terms_are_zero_when_the_student_is_the_teacher():
    teacher = tiny_bert()
    cfg = FinetuneConfig(attention_kl_weight=1.0, hidden_weight=1.0)
    assert terms_of(copy.deepcopy(teacher), teacher, cfg, Tokens()) == {"attention_kl": 0.0, "hidden": 0.0}


def test_perturbed_student_gets_positive_terms_that_training_lowers():
    teacher, student = tiny_bert(), tiny_bert()
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(teacher.get_parameter(name))
            if "attention.self" in name or "output.dense" in name:
                p.add_(0.3 * torch.randn_like(p))
    data = Tokens()
    cfg = FinetuneConfig(epochs=12, lr=3e-3, lr_schedule="constant", attention_kl_weight=1.0, hidden_weight=1.0)
    before = terms_of(student, teacher, cfg, data)
    assert before["attention_kl"] > 0.05 and before["hidden"] > 0.05
    out = nncompress.apply(student, cfg, context=Context(data=data, teacher=teacher))
    after = terms_of(out, teacher, cfg, data)
    losses = nncompress.history(out)[-1]["record"]["epoch_losses"]
    assert losses[-1] < 0.7 * losses[0]
    assert after["attention_kl"] < 0.7 * before["attention_kl"] and after["hidden"] < 0.7 * before["hidden"]


def test_pruned_heads_are_paired_with_the_teacher_heads_they_were_cut_from():
    teacher = tiny_bert()
    data = Tokens()
    student = nncompress.apply(copy.deepcopy(teacher), PruneConfig(ratio=0.5, importance="l2"),
                               context=Context(data=data))
    heads = [layer.attention.self.num_attention_heads for layer in student.model.encoder.layer]
    ffn = [layer.intermediate.dense.out_features for layer in student.model.encoder.layer]
    assert heads == [2, 2] and ffn == [32, 32]                               # heads and FFN neurons pruned
    paired = nncompress.apply(copy.deepcopy(student), FinetuneConfig(epochs=0, attention_kl_weight=1.0),
                              context=Context(data=data, teacher=teacher))
    assert nncompress.history(paired)[-1]["record"]["attention_heads"] == kept_heads(student, head_size=8)


def test_training_a_head_pruned_student_lowers_both_terms():
    teacher = tiny_bert()
    data = Tokens()
    student = nncompress.apply(copy.deepcopy(teacher), PruneConfig(ratio=0.5, importance="l2"),
                               context=Context(data=data))
    with torch.no_grad():  # the refit prune is already close to the teacher: move it away first
        for name, p in student.named_parameters():
            if "attention.self" in name or "output.dense" in name:
                p.add_(0.2 * torch.randn_like(p))
    cfg = FinetuneConfig(epochs=20, lr=3e-3, lr_schedule="constant", attention_kl_weight=1.0, hidden_weight=1.0)
    before = terms_of(student, teacher, cfg, data)
    out = nncompress.apply(student, cfg, context=Context(data=data, teacher=teacher))
    record = nncompress.history(out)[-1]["record"]
    assert set(record["hidden_adapters"].values()) == {"Identity"}          # the hidden width is unchanged
    after = terms_of(out, teacher, cfg, data)
    assert after["attention_kl"] < 0.7 * before["attention_kl"] and after["hidden"] < 0.7 * before["hidden"]
    mean = FinetuneConfig(attention_kl_weight=1.0, attention_heads="mean")
    # head-averaged: the teacher's average holds the removed heads too, which the kept ones cannot reproduce
    assert terms_of(out, teacher, mean, data)["attention_kl"] > after["attention_kl"]


class Widened(nn.Module):
    """A narrower encoder whose embeddings a Linear maps to the teacher's width (for the cosine term)."""

    def __init__(self, encoder, width):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.model.config.hidden_size, width)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.encoder(input_ids, attention_mask))


def test_narrower_shallower_student_reads_uniformly_spaced_layers_through_an_adapter():
    teacher, student = tiny_bert(layers=4), Widened(tiny_bert(seed=1, hidden=16, layers=2, heads=2), 32)
    cfg = FinetuneConfig(epochs=2, lr=1e-3, attention_kl_weight=1.0, hidden_weight=1.0, distill_layers=(-1, 0))
    out = nncompress.apply(student, cfg, context=Context(data=Tokens(), teacher=teacher))
    record = nncompress.history(out)[-1]["record"]
    s, t = "encoder.model.encoder.layer.{}.attention.self", "model.encoder.layer.{}.attention.self"
    assert record["distill_layers"] == [[s.format(0), t.format(1)], [s.format(1), t.format(3)]]  # paired by order
    # each of the 2 student heads paired with its own one of the teacher's 4 (the closest, one-to-one)
    assert all(len(set(h)) == 2 and set(h) <= set(range(4)) for h in record["attention_heads"].values())
    assert set(record["hidden_adapters"].values()) == {"FeatureAdapter"}    # 16 -> 32 wide
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]
    assert not any("adapter" in n for n, _ in out.named_parameters())       # adapters not kept in the model


# ----------------------------------------------------------------------------- errors, recipes

def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="attention_kl_weight: must be >= 0"):
        FinetuneConfig(attention_kl_weight=-1.0)
    with pytest.raises(ConfigError, match="hidden_weight: must be >= 0"):
        FinetuneConfig(hidden_weight=-0.5)
    with pytest.raises(ConfigError, match="distill_layers: picks layers for attention_kl_weight and hidden_weight"):
        FinetuneConfig(distill_layers=(-1,))
    with pytest.raises(ConfigError, match="distill_layers: lists a layer twice"):
        FinetuneConfig(attention_kl_weight=1.0, distill_layers=(1, 1))
    with pytest.raises(ConfigError, match="attention_heads"):
        FinetuneConfig.from_dict({"attention_heads": "kept"})
    teacher, data = tiny_bert(), Tokens()
    with pytest.raises(ConfigError, match=r"finetune.distill_layers: layer 5 does not exist: the student has 2"):
        nncompress.apply(copy.deepcopy(teacher), FinetuneConfig(attention_kl_weight=1.0, distill_layers=(5,)),
                         context=Context(data=data, teacher=teacher))
    with pytest.raises(ConfigError, match="finetune.attention_kl_weight: distilling attention or hidden states "
                                          "needs a teacher"):
        nncompress.apply(copy.deepcopy(teacher), FinetuneConfig(attention_kl_weight=1.0), context=Context(data=data))


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids).mean(1)


def test_a_model_without_attention_is_a_one_line_config_error():
    model = NoAttention()
    with pytest.raises(ConfigError) as err:
        nncompress.apply(model, FinetuneConfig(hidden_weight=1.0),
                         context=Context(data=Tokens(), teacher=NoAttention()))
    text = str(err.value)
    assert "\n" not in text and text.startswith("finetune.hidden_weight: the student (NoAttention) has no attention")


def test_attention_fields_round_trip_dicts_and_recipes():
    cfg = FinetuneConfig.from_dict({"attention_kl_weight": 1.0, "hidden_weight": 0.5, "distill_layers": [-1, 0],
                                    "attention_heads": "mean", "epochs": 2})
    assert cfg.distill_layers == (-1, 0) and cfg.attention_heads == "mean"
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    recipe = parse_recipe({"name": "x", "stages": [{"kind": "finetune", "attention_kl_weight": 2.0,
                                                    "distill_layers": [-1]}]})
    assert recipe.stages[0].config == FinetuneConfig(attention_kl_weight=2.0, distill_layers=(-1,))
