"""Flower client side: a node's data, its task, and its local meta-training."""
