"""Pure decisions driven by the policy file: no network, no disk, no clock.

Modules here import nothing of ours outside ``policies``.
"""
