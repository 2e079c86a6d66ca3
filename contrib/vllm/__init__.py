"""Real CPU vLLM servers as Sluice upstreams: environment, tiny model, launcher, load signals.

Not part of the installed ``sluice`` package; run from a checkout
(``python -m contrib.vllm.launch``). See ``contrib/vllm/README.md``.
"""
