"""Attacks by category: evasion (white-box and black-box), poisoning, backdoor."""
