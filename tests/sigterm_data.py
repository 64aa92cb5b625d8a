"""A data factory for recipes (`data: sigterm_data:make`): scikit-learn digits whose training set
sends SIGTERM (or the signal named by NNCOMPRESS_TEST_SIGNAL, e.g. KILL) to its own process when the
N-th training sample is read, N taken from the environment variable NNCOMPRESS_TEST_SIGTERM_AT
(unset: never).

A test stops a real `nncompress run` in the middle of a chosen stage this way, at a point fixed by
the sample count rather than by racing the run with sleeps. Without the variable it is plain digits.
"""
import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset

from nncompress.zoo import DataBundle, digits

ENV = "NNCOMPRESS_TEST_SIGTERM_AT"
SIGNAL_ENV = "NNCOMPRESS_TEST_SIGNAL"


class _Tripwire(Dataset):
    def __init__(self, inner: Dataset, at: int | None, signum: int):
        self.inner, self.at, self.signum, self.read = inner, at, signum, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.read += 1
        if self.read == self.at:
            os.kill(os.getpid(), self.signum)
        return self.inner[i]


def make() -> DataBundle:
    base = digits()
    at = int(os.environ[ENV]) if os.environ.get(ENV) else None
    signum = signal.Signals["SIG" + os.environ.get(SIGNAL_ENV, "TERM")]
    train = DataLoader(_Tripwire(base.train.dataset, at, signum), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return DataBundle(train, base.test, base.calib, task="classification", num_classes=10, name="sigterm_data")
