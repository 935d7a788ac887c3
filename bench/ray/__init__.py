"""Scale-out on Ray: scaling (toy measurements on a local instance) and model (step time on W workers)."""
