"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: calibration with the batches
dealt out across the ranks (3 batches: rank 0 feeds two, rank 1 one) and the sums all-reduced, then
GPTQ and SparseGPT block by block on a small LLaMA; rank 0 then does the same alone (the process group
torn down) and writes both results to OUT as JSON.

    torchrun --nproc_per_node 2 tests/ddp_calib.py OUT
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import nncompress
from nncompress.core import Context, Targets, distributed
from nncompress.core.calibration import calibrate
from nncompress.formats import IntFormat, PerGroup
from nncompress.prune.sparsity import SparsityConfig
from nncompress.quant import GPTQConfig, QuantSpec
from nncompress.zoo.lm import text, tiny_llama

out = sys.argv[1]
torch.manual_seed(0)
data = text(batch_size=4, seq_len=32, calib=12)  # 3 calibration batches
start = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
BLOCKS = Targets(include=("*layers*",), types=(nn.Linear,))
WANTS = {"model.model.layers.0.mlp.down_proj": ("gram", "absmax", "mean", "sqnorm", "out_absmean"),
         "model.model.layers.1.self_attn.q_proj": ("count", "gram")}


def run() -> dict:
    fed = []
    with start.register_forward_pre_hook(lambda m, args: fed.append(1)):  # the batches this rank fed
        stats = calibrate(start, data.calib, WANTS, batches=8)
    ctx = Context(data=data)
    w4 = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=16))
    gptq = nncompress.apply(copy.deepcopy(start), GPTQConfig(weight=w4), targets=BLOCKS, context=ctx)
    sparse = nncompress.apply(copy.deepcopy(start), SparsityConfig(ratio=0.5, importance="sparsegpt"),
                              targets=BLOCKS, context=ctx)
    x = next(iter(data.test))[0]
    with torch.no_grad():
        outputs = {"gptq": gptq.eval()(x), "sparsegpt": sparse.eval()(x)}
    return {"stats": {n: {"count": s.count, "gram": s.gram(), "absmax": s.absmax, "mean": s.mean() if s.sum is not None
                          else None, "out": s.out_absmean() if s.out_abs is not None else None}
                      for n, s in stats.items()}, "outputs": outputs, "fed": len(fed)}


def flat(result: dict) -> dict:
    return {f"{n}.{k}": (v.flatten().tolist() if torch.is_tensor(v) else v)
            for n, s in result["stats"].items() for k, v in s.items() if v is not None} | \
        {k: v.flatten().tolist() for k, v in result["outputs"].items()} | {"fed": result["fed"]}


distributed.init_from_env()
parallel = flat(run())
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, parallel)
rank = dist.get_rank()
distributed.shutdown()
if rank == 0:
    os.environ["WORLD_SIZE"] = "1"
    alone = flat(run())
    with open(out, "w") as f:
        json.dump({"ranks": everyone, "single": alone}, f)
