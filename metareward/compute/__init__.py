"""The machine and the weights: where a model's files come from (``models``: the embedded SmolLM2, any
Hugging Face directory, tiny test models), what the hardware computes natively (``hardware``), and how
freed memory is kept for reuse (``allocator``)."""
