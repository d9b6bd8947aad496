"""Stage "export": plans in the formats serving engines load. ``export`` (SGLang, vLLM, DeepSeek EPLB tensors;
entry point ``export``), ``checkpoint`` (a Hugging Face checkpoint with experts permuted to the plan) and
``common`` (error type, result record, atomic outputs)."""
