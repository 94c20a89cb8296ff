"""Adapters that put moe_ext layers into models from other libraries (transformers: :mod:`.transformers`)."""
