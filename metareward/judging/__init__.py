"""Judging, apart from any run: the judge and meta-judge prompts (``prompts``), reading their verdicts
(``parsing``), the field's preference suites (``suites``), judge metrics and each benchmark's own score
(``judge_metrics``), evaluating a judge on suites (``evaluation``), escalation to a stronger judge
(``escalation``) and held-out answers in AlpacaEval's and FastChat's formats (``exports``)."""
