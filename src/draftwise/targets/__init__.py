"""The target models that verify draft trees: transformers (`hf`), draftwise's compact llama path (`lean`) and
llama.cpp (`llama_cpp`), each satisfying `draftwise.core.target.Target`; `models` finds and loads the weights."""
