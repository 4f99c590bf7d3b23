"""Backends: each turns a verified Graph into files (hf: safetensors + config.json; torch: generated code)."""
