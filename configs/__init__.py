"""Model presets and stage recipes as ml_collections files; load with ``infinitevl_jax.config.load_config``."""
