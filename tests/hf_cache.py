"""The empty cache the tests pass HF models, under the keyword their forward takes."""

import inspect


def empty_cache_kwargs(model, config) -> dict:
    """``use_cache=False`` and a new, empty ``transformers.DynamicCache`` under the name
    `model`'s forward gives it: ``cache`` in newer transformers, ``past_key_values`` in older
    ones. (An empty cache keeps HF from reading a shard's non-consecutive position ids as
    packed sequences, and its checkpointed layers from warning about the cache.)"""
    import transformers

    forward = getattr(model, "_orig_mod", model).forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {"use_cache": False, name: transformers.DynamicCache(config=config)}
