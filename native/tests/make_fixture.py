"""Writes native/tests/data/tiny/model.onnx, the small model the C tests and the
fuzzer start from (int4 MatMulNBits, fp16 embedding, GQA, Steer). Rerun after a
change to the model-folder contract:  python native/tests/make_fixture.py"""
from pathlib import Path

from edgeact.converters.convert import convert
from edgeact.converters.model import ModelConfig
from edgeact.converters.random_model import random_source

OUT = Path(__file__).resolve().parent / "data" / "tiny"

if __name__ == "__main__":
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16, rope_theta=10000.0, max_position_embeddings=64, bos_token_id=1, eos_token_ids=[2])
    convert(random_source(cfg, seed=0), OUT, quant="int4", overwrite=True, progress=False)
    for extra in ("edgeact.json", "tokenizer.json"):
        (OUT / extra).unlink(missing_ok=True)
    print(OUT / "model.onnx", (OUT / "model.onnx").stat().st_size, "bytes")
