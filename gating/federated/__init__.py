"""One round of federated meta-learning, Flower-free: what the ClientApp and the strategy call.

``updates`` (a client's update, per strategy), ``server_step`` (the weighted mean and the
server optimizers), ``round`` (sampling and a bare in-process round), ``target`` (a target
node's one ``Adapt``), ``evaluation`` (its report, and the run's figures from many),
``settings`` and ``nodes`` (config -> model, task, inner-loop settings), ``protocol`` (message
keys and the config's wire form).
"""
