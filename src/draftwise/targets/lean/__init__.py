"""The lean target: a compact llama forward (`model`), its quantised linear layers (`linears`) and the memory
helpers that lay its weights out in huge pages (`memory`)."""
