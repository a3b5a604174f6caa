"""P3: cross-attention maps of every generated word, drawn as figures."""
