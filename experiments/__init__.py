"""Config-driven training experiments built on jaxbn (not part of the installed package)."""
