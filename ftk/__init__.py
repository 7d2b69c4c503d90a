"""ftk: pretrain, fine-tune, evaluate and merge transformers from composed YAML configs.

Importing this package must stay cheap (no torch, transformers or peft): the CLI imports it
to print help, and heavy imports happen inside the recipe a subcommand runs.
"""

__version__ = "0.1.0"
