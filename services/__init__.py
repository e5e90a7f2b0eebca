"""The services of a DisagFusion deployment, one package each (``python -m services.<name>``)."""
