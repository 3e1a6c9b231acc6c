"""Which model runs where: engines for the roles, the evaluator, the strong judge and the prompter, on this
machine or on a Ray cluster (``cluster``)."""
