"""The attention runtime: the stages of ``longreach.stages`` run per layer (``layer``), with padding recovery
(``masks``) and density accounting (``density``)."""
