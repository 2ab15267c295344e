"""Model definitions (installed as ``mocha_edge.models``): the builtin teacher's crop encoder, and the
student-side modules of the distillation (translator, pooling) as they land."""
