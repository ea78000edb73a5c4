"""The offline side: trace a checkpoint into per-rank shards (trace_workers.py, encoder_checkpoint.py,
decoder_checkpoint.py, shards.py), import a GGUF (gguf_import.py), package a .mar (archive.py)."""
