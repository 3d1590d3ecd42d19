"""The params schemas, one module per params.yaml section (prepare.py, ..., report.py) on a shared base (base.py),
combined in all.py.

Nothing is imported here: DVC makes a stage depend on every module its imports reach, and a stage that only needs
one section must not rerun when another section's schema is edited. Import from the module itself
(`from pipeline.config.train import TrainConfig`).
"""
