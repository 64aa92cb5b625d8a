"""graph/flow.py: module-level data flow from one trace (who reads each module's output, how often each
module runs, what feeds each call, which blocks add their input). Oracles: the data flow of hand-built
models, written out by reading their forward."""
import doctest

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nncompress.graph.flow as flow_mod
from nncompress.core import UnsupportedOpError
from nncompress.graph import DataFlow, Use, guess_inputs
from nncompress.zoo.models import BasicBlock, mnist1d_cnn


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine


def labels(uses):
    return [u.label for u in uses]


def test_docstring_examples_run():
    result = doctest.testmod(flow_mod)
    assert result.attempted > 0 and result.failed == 0


class Branchy(nn.Module):
    """conv's output feeds the BN and, a second time, the residual add."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_consumers_are_modules_ops_and_the_output():
    flow = DataFlow(Branchy().eval(), torch.randn(2, 2, 8))
    assert labels(flow.consumers("conv")) == ["bn", "op:add"] and flow.sole_consumer("conv") is None
    add = flow.sole_consumer("bn")
    assert add.label == "op:add" and add.module is None
    assert flow.consumers(add) == (Use("model output"),) and flow.consumers(Use("model output")) == ()
    assert flow.calls == {"": 1, "conv": 1, "bn": 1}
    assert flow.consumers("no.such.module") == ()


class Twice(nn.Module):
    """fc runs twice; a functional relu; an Identity before the BN; one module never runs."""

    def __init__(self):
        super().__init__()
        self.fc, self.unused, self.id, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.Identity(), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.id(F.relu(self.fc(self.fc(x)))))


def test_calls_functional_ops_and_identity():
    flow = DataFlow(Twice().eval(), torch.randn(2, 4))
    assert flow.calls == {"": 1, "fc": 2, "bn": 1}                  # Identity and unused leave no node
    assert labels(flow.consumers("fc")) == ["fc", "op:relu"]         # its two calls: into itself, into relu
    assert flow.sole_consumer("fc") is None                          # called twice: never a sole producer
    relu = flow.consumers("fc")[1]
    assert flow.sole_consumer(relu).module == "bn"                   # looked through the Identity
    assert flow.sources("fc") == ("model input", "fc") and flow.sources("bn") == ("op:relu",)
    assert flow.sources("unused") == ()
    again = DataFlow.from_trace(flow.trace)                            # a trace can be reused
    assert again.calls == flow.calls and again.consumers("fc") == flow.consumers("fc")


class Aliases(nn.Module):
    """ln's output reaches fc through no-op aliases, the head through a reshape that changes the shape,
    and the model output through detach."""

    def __init__(self):
        super().__init__()
        self.ln, self.drop, self.fc, self.head = nn.LayerNorm(4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x):
        h = self.ln(x)
        a = self.drop(h).contiguous().view(2, 3, 4).to(torch.float32)   # eval dropout, same-shape view, same dtype
        return self.fc(a), self.head(h.reshape(2, 12)[:, :8]), h.detach()


def test_no_op_aliases_are_looked_through():
    flow = DataFlow(Aliases(), torch.randn(2, 3, 4))
    assert labels(flow.consumers("ln")) == ["fc", "op:reshape", "model output"]
    assert flow.sources("fc") == ("ln",) and flow.sources("head") == ("op:slice",)
    train = DataFlow(Aliases().train(), torch.randn(2, 3, 4))        # traced in eval mode whatever the mode
    assert labels(train.consumers("ln")) == ["fc", "op:reshape", "model output"]


class Residual(nn.Module):
    def __init__(self, inplace=False, through_dropout=False):
        super().__init__()
        self.f, self.drop = nn.Linear(4, 4), nn.Dropout()
        self.inplace, self.through_dropout = inplace, through_dropout

    def forward(self, x):
        y = self.f(x)
        if self.inplace:
            y += x
            return y
        return (self.drop(x) if self.through_dropout else x) + y


class TwoBranches(nn.Module):
    """Adds two functions of its input, never the input itself."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("block, expected", [
    (BasicBlock(4, 4), True),                       # relu(bn2(...) + Identity(x))
    (BasicBlock(4, 8), False),                      # the shortcut is a projection
    (Residual(), True),
    (Residual(inplace=True), True),                 # y += x
    (Residual(through_dropout=True), True),         # eval dropout of x is x
    (TwoBranches(), False),
    (nn.Sequential(Residual(), nn.Linear(4, 4)), False),   # the add is inside a child: g(x + f(x))
], ids=["basic-identity", "basic-projection", "add", "iadd", "dropout-alias", "two-branches", "nested"])
def test_reads_its_input_into_add(block, expected):
    x = torch.randn(2, 4, 8, 8) if isinstance(block, BasicBlock) else torch.randn(2, 4)
    assert DataFlow(block, x).reads_its_input_into_add("") is expected


def test_blocks_of_a_whole_model_from_one_trace():
    flow = DataFlow(mnist1d_cnn(widths=(8, 16)), torch.randn(2, 40))   # forward branches on x.dim()
    assert [n for n in ("layers.0", "layers.1", "stem") if flow.reads_its_input_into_add(n)] == ["layers.0"]
    nested = DataFlow(nn.Sequential(nn.Sequential(Residual(), nn.Linear(4, 4))), torch.randn(2, 4))
    assert not nested.reads_its_input_into_add("0") and nested.reads_its_input_into_add("0.0")


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x                      # data-dependent: no single graph


def test_untraceable_model_raises_a_typed_error():
    with pytest.raises(UnsupportedOpError, match="ValueBranch: torch.export cannot trace the model"):
        DataFlow(ValueBranch(), torch.randn(2, 4))


def test_guessed_inputs():
    net = mnist1d_cnn(widths=(8,))
    assert tuple(guess_inputs(net).shape) == (2, 40)                  # model.input_shape
    assert tuple(guess_inputs(nn.Sequential(nn.Linear(5, 3))).shape) == (2, 5)
    assert tuple(guess_inputs(nn.Sequential(nn.Conv3d(2, 3, 3))).shape) == (2, 2, 32, 32, 32)
    ids = guess_inputs(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
    assert ids.dtype == torch.long and tuple(ids.shape) == (2, 8)
    assert guess_inputs(nn.Sequential(nn.Linear(5, 3)).double()).dtype == torch.float64
    with pytest.raises(UnsupportedOpError, match="no example inputs"):
        guess_inputs(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))
    assert DataFlow(nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3))).sole_consumer("0").label == "1"
