"""The evaluation wing: loading a model, restoring images (precision, tiles, memory), scores,
results, the report page, export."""
