"""Stateful LLMs: a KV cache as CoreML state, prefill and decode functions, chunks, generate."""
