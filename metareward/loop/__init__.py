"""The Meta-Rewarding run: its order of work and resume (``run``), the actor, judge and meta-judge stages
(``stages``), preference pairs (``pairs``, with the meta-judge's Elo in ``elo``), the stage alarms
(``guards``), self-made prompts (``synthesis``), the dry-run plan (``plan``) and the per-iteration
metrics (``metrics``).

Nothing else in the package imports this package; only the CLI does."""
