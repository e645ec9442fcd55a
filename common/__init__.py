"""Thin shared package of vit-recipes: data, augmentation, schedules, checkpoints, conversion.

Nothing here knows about a single recipe: each recipe script defines its own model, loss and
train step, and uses these modules for the plumbing around them.
"""


class UserError(Exception):
    """Bad input from the user (flags, data, checkpoints): reported as one `error:` line, exit 2."""
