"""Reconstruction after pruning: least-squares refits reproduce the reference, BatchNorm re-estimated."""
import copy

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, Context, history
from nncompress.core.reconstruct import recalibrate_norms, refit_to_reference
from nncompress.eval.metrics import accuracy
from nncompress.prune.structured import PruneConfig


def _batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), None) for _ in range(n)]


def test_a_removed_channel_that_others_span_is_recovered_exactly():
    """Hidden unit 5 = 2 x unit 0 (no nonlinearity): after removing it, the refit consumer reads unit 0
    twice as hard and the output is the reference's, to float precision."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        ref[0].weight[5], ref[0].bias[5] = 2 * ref[0].weight[0], 2 * ref[0].bias[0]
    small = nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        small[0].weight.copy_(ref[0].weight[:5]), small[0].bias.copy_(ref[0].bias[:5])
        small[1].weight.copy_(ref[1].weight[:, :5]), small[1].bias.copy_(ref[1].bias)
    data = _batches((32, 8))
    x = data[0][0]
    assert not torch.allclose(small(x), ref(x), atol=1e-3)
    err = refit_to_reference(small, ref, ["1"], data, batches=4, damp=1e-9)
    assert err["1"]["after"] < 1e-10 < err["1"]["before"]
    with torch.no_grad():
        assert torch.allclose(small(x), ref(x), atol=1e-4)


def test_convolutions_refit_on_their_patches_and_keep_only_their_kept_outputs():
    """Conv1d chain: input channel 3 of the consumer duplicates channel 1; the consumer also lost its
    output channel 0 (`outputs` says which it keeps). Exact recovery checks the patch/row order."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 5, 3, padding=1)).eval()
    with torch.no_grad():
        ref[0].weight[3], ref[0].bias[3] = ref[0].weight[1], ref[0].bias[1]
    small = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(3, 4, 3, padding=1)).eval()
    with torch.no_grad():
        small[0].weight.copy_(ref[0].weight[:3]), small[0].bias.copy_(ref[0].bias[:3])
        small[1].weight.copy_(ref[1].weight[1:, :3]), small[1].bias.copy_(ref[1].bias[1:])
    data = _batches((16, 2, 12))
    refit_to_reference(small, ref, ["1"], data, batches=4, damp=1e-9, outputs={"1": [1, 2, 3, 4]})
    x = data[1][0]
    with torch.no_grad():
        assert torch.allclose(small(x), ref(x)[:, 1:], atol=1e-4)


def test_batchnorm_statistics_are_the_calibration_data_s():
    net = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(5.0), net[1].running_var.fill_(7.0)
    data = _batches((8, 1, 10), n=3)
    assert recalibrate_norms(net, data, batches=3) == 1
    with torch.no_grad():
        feats = torch.cat([net[0](x) for x, _ in data])          # equal batches: the mean of the means
    assert torch.allclose(net[1].running_mean, feats.mean((0, 2)), atol=1e-5)
    assert not net.training and net[1].momentum == 0.1          # the mode and the momentum come back


def test_pruning_reconstructs_by_default_and_it_recovers_accuracy(digits_mlp, tmp_path):
    data, model = digits_mlp
    runs = {}
    for how in ("auto", "none", "bn"):
        cfg = PruneConfig(ratio=0.75, importance="l2", reconstruct=how)
        runs[how] = nncompress.apply(copy.deepcopy(model), cfg, context=Context(data=data))
    rec = history(runs["auto"])[-1]["record"]["reconstruct"][0]
    assert rec["layers"] == 2 and rec["error_after"] < rec["error_before"]
    assert "reconstruct" not in history(runs["none"])[-1]["record"]
    assert history(runs["bn"])[-1]["record"]["reconstruct"] == [{"norms": 0}]   # an MLP has no BatchNorm
    assert accuracy(runs["auto"], data.test) > accuracy(runs["none"], data.test)
    nncompress.save(runs["auto"], tmp_path / "m")     # the refitted weights are the checkpoint's
    x = data.example_batch(16)
    with torch.no_grad():
        assert torch.equal(nncompress.load(tmp_path / "m")(x), runs["auto"](x))


def test_reconstruction_without_data_is_skipped_or_refused():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net.input_shape = (4,)   # traced on zeros of this shape: no data at all
    out = nncompress.apply(copy.deepcopy(net), PruneConfig(ratio=0.5))
    assert "reconstruct" not in history(out)[-1]["record"]
    with pytest.raises(ConfigError, match="prune.reconstruct: needs calibration data"):
        nncompress.apply(copy.deepcopy(net), PruneConfig(ratio=0.5, reconstruct="lstsq"))


def test_lowrank_refits_each_chain_s_last_factor_to_the_dense_layer(digits_mlp):
    from nncompress.lowrank import LowRankConfig

    data, model = digits_mlp
    outs = {how: nncompress.apply(copy.deepcopy(model), LowRankConfig(rank=6, reconstruct=how),
                                  context=Context(data=data)) for how in ("auto", "none")}
    layers = history(outs["auto"])[-1]["record"]["layers"]
    assert layers and all(v["output_error_after"] < v["output_error_before"] for v in layers.values())
    x = torch.cat([b[0] for b in data.test])     # never seen by the refit: it generalises
    with torch.no_grad():
        ref = model(x)
        err = {how: float((m(x) - ref).pow(2).sum()) for how, m in outs.items()}
    assert err["auto"] < err["none"]


@pytest.mark.parametrize("bias", [True, False])
def test_a_grouped_conv_is_refit_group_by_group_exactly(bias):
    """A reference grouped conv (2 groups) is recovered exactly from random weights: each group's outputs
    are solved from that group's inputs only (the block order of the patches and of the weight)."""
    torch.manual_seed(0)
    ref = nn.Conv1d(4, 6, 3, padding=1, groups=2, bias=bias).eval()
    small = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1, groups=2, bias=bias)).eval()
    reference = nn.Sequential(ref)
    data = _batches((16, 4, 10))
    err = refit_to_reference(small, reference, ["0"], data, batches=4, damp=1e-9)
    assert err["0"]["after"] < 1e-10 < err["0"]["before"]
    x = data[0][0]
    with torch.no_grad():
        assert torch.allclose(small(x), ref(x), atol=1e-4)
