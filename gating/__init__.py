"""MetaGater's algorithm in plain PyTorch; it knows nothing of Flower.

- ``gating.model``: the gated network (shape, gates, norm, Conv-N) and its MAC accounting
- ``gating.meta``: two-stage ``Adapt``, meta-gradients, the dense baselines' local updates
- ``gating.data``: datasets and the federated split into per-node tasks
- ``gating.federated``: one federation round (a client's update per strategy, the server step),
  the config-to-objects builders and the message keys client and server share
- ``gating.deploy``: sliced inference of an adapted model (``python -m analysis.export`` writes
  one from a finished run)
"""
