"""Where masks and embeddings are kept: byte caches (embedded or Redis) and the keyed ``MaskStore`` over them."""
