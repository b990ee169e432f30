"""Unconditional text generation (OpenWebText, the paper's section 4.2): corpus, samples, metrics, Table 2."""
