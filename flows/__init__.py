"""Prefect flows of opticam (:mod:`flows.explain`); the only package that imports Prefect.

Importing this package imports nothing; ``import flows.explain`` imports Prefect.
"""
