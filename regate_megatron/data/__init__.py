"""Data: LLaVA-format conversations with images, the tokenizer, deterministic global batches."""
