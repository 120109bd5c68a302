"""A local web page for a trained generator (`python -m dnd_jax.serve`): prompts in, adapter out, answers compared.

runs (which generator runs a directory holds, their report numbers) -> studio (models loaded once, adapters, answers,
one worker thread) -> page (the HTML) -> server (the HTTP API).
"""
