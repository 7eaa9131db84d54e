"""The remote backend: captions from a fleet of OpenAI-compatible servers (vLLM).

``chat_api`` speaks chat-completions over HTTP, ``encode`` turns a safely decoded image into the
data URL a request carries, ``pool`` keeps each endpoint's adaptive in-flight limit and circuit
breaker, and ``captioner`` implements the ``phicapd.captioner.Captioner`` seam on top of them.
Nothing here imports torch or transformers: a remote-only daemon needs no GPU.
"""
