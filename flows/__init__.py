"""Prefect flows: thin orchestration over the plain functions in core/ and modalities/."""
