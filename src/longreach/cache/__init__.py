"""KV-side state kept in and beside the Hugging Face cache: cache layers that grow in place or hold only some
keys, presses (what to keep), and byte accounting."""
