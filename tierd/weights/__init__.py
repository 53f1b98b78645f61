"""Model weights held once by the daemon and mapped read-only into every worker.

`sources` reads a model (a safetensors directory or file, or a GGUF file), `area` lays its
tensors out in one sealed memory file and keeps a verified copy on disk, `registry`
decides who may see which model and how much the daemon holds.
"""
