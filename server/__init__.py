"""ServerApp and strategy: aggregate meta-gradients, evaluate fast adaptation at new nodes."""
