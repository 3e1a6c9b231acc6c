"""Judging, apart from any run: the judge and meta-judge prompts (``prompts``), reading their verdicts
(``parsing``), asking a judge through a generator (``requests``), the field's preference suites
(``suites``), judge metrics (``judge_metrics``), evaluating a judge on suites (``evaluation``, with
``context_fit`` for pairs too long for it) and an actor on held-out prompts (``heldout``), escalation
to a stronger judge (``escalation``) and its cascade curve (``cascade``), and held-out answers in
AlpacaEval's and FastChat's formats (``exports``)."""
