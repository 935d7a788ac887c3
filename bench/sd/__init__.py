"""SD-scale memory and speed on random-weight replicas; shared settings in shared.py."""
