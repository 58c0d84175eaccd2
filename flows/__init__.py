"""Prefect flows of opticam, installed as ``opticam_flows`` (the folder is ``flows/``).

The only package that imports Prefect (:mod:`opticam_flows.explain`). Importing this
package imports nothing; ``import opticam_flows.explain`` imports Prefect. Modules here
import each other relatively, so the package works under its installed name.
"""
