"""Privacy: defenses at their pipeline steps, the attacks that test them, DP accounting and metrics.

- ``defenses/``: client-side ``Defense`` components registered by name (``privacy.defenses`` in a config).
- ``tap``: the server-side recorder of what the server received, which attacks read.
- ``attacks/``: an honest-but-curious server's reconstructions from a recorded run (``splitlm attack``).
- ``hijack`` / ``detect``: an active attack (FSHA) and the client's detector of it (SplitGuard-style).
- ``accounting``: epsilon over a run; ``metrics``: ROUGE-L and token accuracy of a reconstruction.
"""
