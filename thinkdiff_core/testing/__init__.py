"""Test and demo infrastructure, not the method: `tiny_models` writes tiny random models in the released on-disk
formats (the test suite, the demo without --models-dir and `make-tiny-models` run on them)."""
