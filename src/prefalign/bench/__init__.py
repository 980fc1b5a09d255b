"""`prefalign bench`: the standard offline benchmarks papers report ranking accuracy on, scored as their
official code does — RewardBench v1 (`rewardbench.py`) and RM-Bench (`rmbench.py`) — with a language model
as an implicit reward model (`scoring.py`); `run.py` ties them together and writes the results."""
