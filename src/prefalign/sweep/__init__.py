"""`prefalign sweep SWEEP.yaml`: a grid of training runs (methods × seeds × any config key), run resumably,
and a report of what separates them with honest intervals (docs/sweep.md)."""
