"""Training a judge toward the spread of human labels: alignment rows in every suite format (``data``),
the distribution and point objectives (``loss``), and the Trainer that runs them (``trainer``)."""
