"""Privacy: defenses at their pipeline steps, the attacks that test them, DP accounting and metrics.

- ``defenses/``: client-side ``Defense`` components registered by name (``privacy.defenses`` in a config).
- ``detectors/``: client-side ``Detector`` components of a malicious server (``privacy.detectors``: the active
  SplitGuard, the passive Gradients Scrutinizer and SplitOut).
- ``guards/``: server-side ``Guard`` components that watch each client's change to the trunk adapter and its client side
  (``privacy.guards``: SafeSplit); a flagged client's round is rolled back and run again without it.
- ``tap``: the server-side recorder of what the server received, which attacks read.
- ``attacks/``: an honest-but-curious server's reconstructions from a recorded run (``splitlm attack``), and
  active ones, FSHA (``attacks/fsha.py``) and SplitSpy (``attacks/splitspy.py``, FSHA that evades SplitGuard), that
  the simulated server runs while the client trains.
- ``server_attack``: the registry of active attacks (``privacy.server_attack``), which names their modules so that
  training installs one by name without importing ``attacks``.
- ``client_attack``: the same for malicious clients (``privacy.client_attack``: label_flip, smash_poison, backdoor,
  boost in ``attacks/``), which a client runs when its index is among an attack's ``clients``.
- ``accounting``: epsilon over a run; ``metrics``: ROUGE-L and token accuracy of a reconstruction.
"""
