"""The training core: config schema and validation, workdir, data, models, the train loop,
evaluation, progress, the allocator, many processes, shared figure helpers. Nothing here
imports a study."""
