"""Data: synthetic scenes (retrieval and NLVR2), file formats (ALBEF / X-VLM JSON, Hugging Face datasets), collators and
the synthetic-caption tokenizer."""
