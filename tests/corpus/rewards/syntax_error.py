"""A reward file that does not even import (the mistake is on purpose)."""

def reward(prompt, completion)
    return 1.0
