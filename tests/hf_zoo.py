"""The Hugging Face zoo now lives in the package, shared with ``morphc bench``: this re-exports it
for tests that still import ``tests.hf_zoo``."""

from morphc.bench.hf_zoo import (  # noqa: F401
    ZOO,
    ZooEntry,
    audio_inputs,
    available,
    entry,
    image_inputs,
    text_inputs,
)
