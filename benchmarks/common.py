"""Shared by the benchmarks: each one owns a section of BENCHMARKS.md between markers and rewrites it."""
from __future__ import annotations

import re
from pathlib import Path

HEADER = """# Benchmarks

Every figure here was measured by `make bench` (or the per-benchmark target named in each section)
on the machine named in the section, in the same run as the peers it is compared with.
Latency is the median of repeated runs after warm-up at a fixed thread count; a speedup is a ratio of
two such medians. Nothing is estimated: what was not measured says so.
"""


def update_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the section `name` of the Markdown file at `path`."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def checkpoint_size(model, where: str | Path, compress: bool = True) -> int:
    """Bytes of every file needed to load `model` (weights + manifest with its recorded history), as the
    run reports count them. A model a peer tool changed has no nncompress history: its manifest is empty."""
    from nncompress.core import history
    from nncompress.export.checkpoint import checkpoint_bytes, write_checkpoint

    folder = write_checkpoint(model, where, {"name": "-"}, history(model), compress=compress, overwrite=True)
    return checkpoint_bytes(folder)["total"]


def trained_reference(tmp: str | Path, epochs: int, lr: float = 3e-3):
    """The MNIST-1D data (cached under `tmp`) and the reference CNN trained the demo's way, seeded."""
    import torch
    import torch.nn.functional as F

    from nncompress.core import TrainConfig, fit
    from nncompress.zoo.loaders import build_data, build_model

    data = build_data({"name": "mnist1d", "kwargs": {"cache_dir": str(Path(tmp) / "data")}})
    torch.manual_seed(0)
    reference, _ = build_model({"name": "mnist1d_cnn"})
    fit(reference, data.train, lambda m, b: F.cross_entropy(m(b[0]), b[1]), TrainConfig(epochs=epochs, lr=lr))
    return data, reference.eval()


def minilm_in_and_out_of_domain():
    """all-MiniLM-L6-v2 in eval mode, the sentences data, the legal sentences (another domain, never
    calibrated on) and the model's reference embeddings on both: `(model, data, ood, ref, ref_ood)`."""
    from mixed_precision import encoded, legal_sentences

    from nncompress.eval.metrics import embed
    from nncompress.zoo.loaders import build_data, build_model

    model, tok = build_model({"name": "hf:minilm"})
    model.eval()
    data = build_data({"name": "sentences"}, tokenizer=tok)
    ood = encoded(tok, legal_sentences())
    return model, data, ood, embed(model, data.test), embed(model, ood)
