"""Decode against a KV cache: a compiled mask's new tokens attend to their cached keys (docs/SERVING.md)."""

from maskdsl.codegen.decode.attention import CompiledDecode, DecodeError, decode_call, decoder

__all__ = ["CompiledDecode", "DecodeError", "decode_call", "decoder"]
