"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: trains with `fit` data-parallel,
then rank 0 trains the same start in this process alone (the process group torn down) and writes both
results to OUT as JSON, with each rank's weights fingerprint so the test can check the replicas agree.

    torchrun --nproc_per_node 2 tests/ddp_fit.py OUT CASE
CASE: "plain" (adamw, uneven 7-row batches split 3/4, an extra parameter outside the model, SAM),
      "bn" (BatchNorm1d on rows and BatchNorm2d on images, normalised over the global batch: matches
      one process, running statistics included),
      "qat" (an activation quantizer that keeps observing while training, with a percentile observer:
      it must see the global batch's rows).
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from nncompress.core import TrainConfig, distributed, fit

out, case = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x = torch.randn(63, 10)
y = (x[:, 0] + x[:, 1] > 0).long()
loader = [(x[i:i + 7], y[i:i + 7]) for i in range(0, 63, 7)]  # every batch 7 rows: ranks get 3 and 4
if case == "bn":
    # no bias before a BatchNorm: its true gradient is zero, and Adam would turn the float noise in it
    # into steps of size lr that differ between runs (harmless: the output does not depend on it)
    model = nn.Sequential(nn.Linear(10, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Unflatten(1, (4, 2, 2)),
                          nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=None), nn.Flatten(),
                          nn.Linear(16, 2))
elif case == "qat":
    from nncompress.quant.fake_quant import FakeQuant
    from nncompress.quant.spec import QuantSpec

    act = FakeQuant(QuantSpec.from_dict({"format": {"kind": "int", "bits": 4}, "observer": "percentile",
                                         "observer_args": {"percentile": 90.0}}), "activation")
    act.track = True
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), act, nn.Linear(16, 2))
else:
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))
extra = nn.Parameter(torch.zeros(2))  # trained beside the model, as feature adapters are
start = copy.deepcopy(model)


def loss_fn(m, batch):
    return nn.functional.cross_entropy(m(batch[0]) + extra, batch[1])


cfg = TrainConfig(epochs=3, lr=0.01, sam_rho=0.05 if case == "plain" else 0.0)


def train(m):
    extra.data.zero_()
    opt = torch.optim.AdamW([*m.parameters(), extra], lr=cfg.lr)
    return fit(m, loader, loss_fn, cfg, optimizer=opt)


distributed.init_from_env()
parallel = train(model)
state = torch.cat([t.detach().reshape(-1) for t in (*model.state_dict().values(), extra) if t.is_floating_point()])
fingerprints = [None] * dist.get_world_size()
dist.all_gather_object(fingerprints, state.tolist())
rank = dist.get_rank()
distributed.shutdown()
if rank == 0:
    os.environ["WORLD_SIZE"] = "1"  # fit joins torchrun's group by itself otherwise
    alone = copy.deepcopy(start)
    single = train(alone)
    ref = torch.cat([t.detach().reshape(-1) for t in (*alone.state_dict().values(), extra)
                     if t.is_floating_point()])
    with open(out, "w") as f:
        json.dump({"parallel": parallel, "single": single, "ranks": fingerprints, "single_state": ref.tolist()}, f)
