"""safedl: assess and harden PyTorch image classifiers against evasion, poisoning and backdoor attacks."""
__version__ = "0.1.0"
