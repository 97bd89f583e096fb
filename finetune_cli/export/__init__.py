"""`ftune merge-adapter` (merge.merge) and `ftune export --format gguf` (gguf_export.export)."""
