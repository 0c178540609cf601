"""Data: the procedural 'shapes' world (TFDS array_record builder), its tokenizer, and the grain pipeline."""
