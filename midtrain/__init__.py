"""RUN: the built-in GPT mid-training loop (model, data, phases, loop, CLI).

    midtrain train            # default recipe on embedded data, tiny preset, CPU
"""

__version__ = "0.1.0"
