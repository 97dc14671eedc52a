"""A tiny sentence encoder the tests build themselves: a real ONNX graph and tokenizer.

The graph is BERT-shaped where the backend looks (inputs input_ids, attention_mask,
token_type_ids; output last_hidden_state [batch, tokens, DIM]): each token's vector is a
row of a fixed embedding table plus a token-type row, so expected sentence vectors can be
computed by hand with numpy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["[PAD]", "[UNK]", "bug", "crash", "segfault", "feature", "add", "question", "how", "the"]
VOCAB = {word: i for i, word in enumerate(WORDS)}
DIM = 8
TABLE = np.random.default_rng(7).standard_normal((len(WORDS), DIM)).astype(np.float32)
TYPES = np.random.default_rng(8).standard_normal((2, DIM)).astype(np.float32)


def build(folder: Path) -> Path:
    """Writes model.onnx and tokenizer.json into `folder` and returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    dyn = ["batch", "tokens"]
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["words"]),
            helper.make_node("Gather", ["types", "token_type_ids"], ["kinds"]),
            helper.make_node("Add", ["words", "kinds"], ["last_hidden_state"]),
        ],
        "tiny-encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, dyn),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dyn),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, dyn),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dyn, DIM])],
        initializer=[
            numpy_helper.from_array(TABLE, "table"),
            numpy_helper.from_array(TYPES, "types"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime reads across its supported range
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def expected(text: str, max_tokens: int = 256) -> np.ndarray:
    """The sentence vector by hand: mean of the token rows (type 0), L2-normalised."""
    ids = [VOCAB.get(w, VOCAB["[UNK]"]) for w in text.split()][:max_tokens]
    mean = (TABLE[ids] + TYPES[0]).mean(axis=0)
    return mean / np.linalg.norm(mean)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
