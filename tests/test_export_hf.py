"""Hugging Face folders: transformers alone (no nncompress imported) loads them with the right weights,
and a model the config cannot express is an error, never a folder that loads with wrong weights."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.cli import main
from nncompress.core import Context, Targets
from nncompress.export.hf import ExportError, save_hf, token_inputs
from nncompress.prune import PruneConfig
from nncompress.quant import GPTQConfig, QuantizeConfig, QuantSpec
from nncompress.formats import IntFormat, PerGroup
from nncompress.zoo.lm import text, tiny_llama

SMALL = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}
BLOCKS = Targets(include=("*layers*",), types=(nn.Linear,))

# run by a fresh interpreter that imports transformers only: loads the folder, prints the largest
# difference from the outputs nncompress computed, and whether nncompress got imported
ALONE = """
import sys, torch, transformers
folder, x, y, kind = sys.argv[1:5]
x, y = torch.load(x), torch.load(y)
if kind == "lm":
    out = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=x).logits
else:  # all-MiniLM-L6-v2's sentence embedding: mean over tokens, unit norm
    h = transformers.AutoModel.from_pretrained(folder).eval()(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).float()
    out = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
print((out - y).abs().max().item(), "nncompress" in sys.modules)
"""


def loaded_alone(folder, model, inputs, kind, tmp_path):
    torch.save(inputs, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model.eval()(**inputs) if isinstance(inputs, dict) else model.eval()(inputs), tmp_path / "y.pt")
    out = subprocess.run([sys.executable, "-c", ALONE, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"),
                          kind], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    diff, imported = out.stdout.split()
    assert imported == "False"
    return float(diff)


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_a_pruned_and_quantized_llama_loads_in_transformers_alone_with_its_outputs(tmp_path):
    torch.manual_seed(0)
    data = text(batch_size=4, seq_len=32, calib=8)
    model = tiny_llama(**SMALL)
    ctx = Context(data=data)
    model = nncompress.apply(model, PruneConfig(ratio=0.5, importance="l2"), targets=BLOCKS, context=ctx)
    w4 = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=16))
    model = nncompress.apply(model, GPTQConfig(weight=w4), targets=BLOCKS, context=ctx)
    folder = save_hf(model, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    merged = nncompress.merge(copy.deepcopy(model)).model.model.layers[0]
    assert config["intermediate_size"] == merged.mlp.gate_proj.out_features == 64
    assert config["num_key_value_heads"] == merged.self_attn.k_proj.out_features // 16
    x = token_inputs(model, batch=3, length=20)
    assert loaded_alone(folder, model, x, "lm", tmp_path) < 1e-4


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_an_int8_minilm_loads_in_transformers_alone_with_its_embeddings(tmp_path):
    """The trap: the inner model's own save_pretrained writes wrapper names that transformers ignores
    and loads random weights without a word. save_hf writes the layers the wrappers compute."""
    model, tok = nncompress.zoo.load_hf("minilm")
    w8 = QuantSpec(format=IntFormat(bits=8))
    model = nncompress.apply(model, QuantizeConfig(weight=w8), targets=Targets(include=("*encoder*",), types=(nn.Linear,)))
    folder = save_hf(model, tmp_path / "hf")
    batch = tok(["A sentence about compression.", "Another one, longer than the first."], padding=True,
                return_tensors="pt")
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert loaded_alone(folder, model, x, "encoder", tmp_path) < 1e-5


@pytest.mark.slow  # MiniLM pruned by heads, and a global LLaMA pruning: ~4 s on 2 cores
def test_what_a_config_cannot_express_is_an_error_and_writes_nothing(tmp_path):
    data = text(batch_size=4, seq_len=32, calib=8)
    ctx = Context(data=data)
    uneven = nncompress.apply(tiny_llama(**SMALL), PruneConfig(ratio=0.5, scope="global", importance="l2"),
                              targets=Targets(include=("*mlp*",), types=(nn.Linear,)), context=ctx)
    widths = {layer.mlp.gate_proj.out_features for layer in uneven.model.model.layers}
    if len(widths) > 1:  # global ranking gave the layers different widths
        with pytest.raises(ExportError, match="intermediate_size differs between layers"):
            save_hf(uneven, tmp_path / "uneven")
        assert not (tmp_path / "uneven").exists()
    model, tok = nncompress.zoo.load_hf("minilm")  # BERT's config ties head size to hidden / heads
    sentences = nncompress.zoo.build_data({"name": "sentences", "kwargs": {"n": 64}}, tokenizer=tok)
    heads = nncompress.apply(model, PruneConfig(ratio=0.25, importance="l2"),
                             targets=Targets(include=("*attention*",), types=(nn.Linear,)),
                             context=Context(data=sentences))
    with pytest.raises(ExportError, match="mismatched keys|cannot load"):
        save_hf(heads, tmp_path / "heads")
    assert not (tmp_path / "heads").exists() and not list(tmp_path.glob(".*"))
    with pytest.raises(ExportError, match="not a transformers model"):
        save_hf(nn.Linear(2, 2), tmp_path / "linear")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        save_hf(tiny_llama(**SMALL), tmp_path / "taken")


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_cli_exports_a_saved_model(tmp_path):
    model, _ = nncompress.zoo.build_model({"name": "tiny_llama", "kwargs": SMALL})
    nncompress.save(model, tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), "--out", str(tmp_path / "hf")]) == 0
    assert loaded_alone(tmp_path / "hf", model, token_inputs(model), "lm", tmp_path) < 1e-5
    assert main(["export", str(tmp_path / "saved"), "--out", str(tmp_path / "hf")]) == 2  # exists: refused
    assert main(["export", str(tmp_path / "saved"), "--format", "compressed-tensors", "--out",
                 str(tmp_path / "ct")]) == 2  # a float model: nothing to pack, said so
    assert not (tmp_path / "ct").exists()


@pytest.mark.slow  # sentence-transformers and MiniLM loaded twice: ~5 s on 2 cores
def test_a_compressed_minilm_is_a_sentence_transformers_folder_that_encodes_alike(tmp_path):
    from nncompress.export.hf import save_sentence_transformers

    model, tok = nncompress.zoo.load_hf("minilm")
    w8 = QuantSpec(format=IntFormat(bits=8))
    model = nncompress.apply(model, QuantizeConfig(weight=w8), targets=Targets(include=("*encoder*",), types=(nn.Linear,)))
    sentences = ["The licence grants the right to copy.", "Pruning removes whole channels.", "Short."]
    folder = save_sentence_transformers(model, tmp_path / "st", tok, sentences)
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.eval()(batch["input_ids"], batch["attention_mask"])
    code = ("import sys, torch, sentence_transformers; m = sentence_transformers.SentenceTransformer(sys.argv[1], "
            "device='cpu'); e = m.encode(sys.argv[2:], convert_to_tensor=True); torch.save(e, sys.argv[1] + '.pt'); "
            "print('nncompress' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(folder), *sentences], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert out.returncode == 0 and out.stdout.split()[-1] == "False", out.stderr[-2000:]
    theirs = torch.load(str(folder) + ".pt")
    assert (theirs - ours).abs().max() < 1e-5
    with pytest.raises(ExportError, match="SentenceEncoder"):
        save_sentence_transformers(tiny_llama(**SMALL), tmp_path / "lm", tok)


@pytest.mark.slow  # sentence-transformers and MiniLM loaded twice: ~5 s on 2 cores
def test_cli_writes_a_sentence_transformers_folder_only_for_an_encoder(tmp_path):
    model, _ = nncompress.zoo.build_model({"name": "hf:minilm"})
    nncompress.save(model, tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), "--format", "sentence-transformers", "--out",
                 str(tmp_path / "st")]) == 0
    assert (tmp_path / "st" / "modules.json").is_file() and (tmp_path / "st" / "tokenizer.json").is_file()
    lm, _ = nncompress.zoo.build_model({"name": "tiny_llama", "kwargs": SMALL})
    nncompress.save(lm, tmp_path / "lm")
    assert main(["export", str(tmp_path / "lm"), "--format", "sentence-transformers", "--out",
                 str(tmp_path / "lm-st")]) == 2
    assert not (tmp_path / "lm-st").exists()


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_w4_weights_leave_in_the_compressed_tensors_format_that_transformers_loads(tmp_path):
    from nncompress.export.hf import save_compressed_tensors

    torch.manual_seed(0)
    data = text(batch_size=4, seq_len=32, calib=8)
    w4 = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=32))
    model = nncompress.apply(tiny_llama(**SMALL), GPTQConfig(weight=w4), targets=BLOCKS, context=Context(data=data))
    packed = save_compressed_tensors(model, tmp_path / "ct")
    flat = save_hf(model, tmp_path / "hf")
    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (weights,) = [g["weights"] for g in qc["config_groups"].values()]
    assert weights["num_bits"] == 4 and weights["group_size"] == 32 and weights["strategy"] == "group"
    size = lambda folder: sum(f.stat().st_size for f in folder.iterdir())  # noqa: E731
    assert size(packed) < 0.6 * size(flat)  # the decoder's Linears at 4 bits (embeddings and lm_head float)
    assert loaded_alone(packed, model, token_inputs(model, batch=3, length=20), "lm", tmp_path) < 1e-4
    w8a8 = nncompress.apply(tiny_llama(**SMALL), QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=8)),
                                                                activation=QuantSpec(format=IntFormat(bits=8))),
                            targets=BLOCKS, context=Context(data=data))
    with pytest.raises(ExportError, match="activations are quantized too"):
        save_compressed_tensors(w8a8, tmp_path / "w8a8")
    assert not (tmp_path / "w8a8").exists()


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_w4_weights_run_in_onnx_runtime_as_matmulnbits(tmp_path):
    import onnx

    from nncompress.eval.latency import ort_feed, ort_session
    from nncompress.export.onnx_nbits import export_nbits_onnx

    torch.manual_seed(0)
    data = text(batch_size=4, seq_len=32, calib=8)
    w4 = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=32))
    model = nncompress.apply(tiny_llama(**SMALL), GPTQConfig(weight=w4), targets=BLOCKS, context=Context(data=data))
    x = data.example_batch(2)
    path = export_nbits_onnx(model, x, tmp_path / "w4.onnx")
    nodes = onnx.load(str(path)).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 14  # every Linear of the two decoder blocks
    other = next(iter(data.test))[0][:3]  # another batch size and text than the export saw
    session = ort_session(path)
    with torch.no_grad():
        ours = model(other).numpy()
    got = session.run(None, ort_feed(session, other))[0]
    assert abs(got - ours).max() < 1e-3 * abs(ours).max()
    rtn_g8 = nncompress.apply(tiny_llama(**SMALL), QuantizeConfig(weight=QuantSpec(
        format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=8))), targets=BLOCKS)
    with pytest.raises(nncompress.core.UnsupportedOpError, match="power of two >= 16"):
        export_nbits_onnx(rtn_g8, x, tmp_path / "g8.onnx")
    assert not (tmp_path / "g8.onnx").exists()


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_cli_writes_matmulnbits_onnx_from_a_saved_w4_model(tmp_path):
    model, _ = nncompress.zoo.build_model({"name": "tiny_llama", "kwargs": SMALL})
    w4 = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=16))
    nncompress.save(nncompress.apply(model, QuantizeConfig(weight=w4), targets=BLOCKS), tmp_path / "w4")
    out = tmp_path / "w4.onnx"
    assert main(["export", str(tmp_path / "w4"), "--format", "onnx-nbits", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["export", str(tmp_path / "w4"), "--format", "onnx-nbits", "--out", str(out)]) == 2  # exists
