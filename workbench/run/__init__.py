"""One run of a profile: the stages, preflight, resource accounting, inspection."""
