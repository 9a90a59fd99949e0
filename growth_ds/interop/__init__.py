"""Mappings between growth-ds's reference model and other frameworks (megatron-core, ...)."""
