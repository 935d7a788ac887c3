"""Toy-world quality: held-out concepts, zoodip methods against backprop TI; shared settings in shared.py."""
