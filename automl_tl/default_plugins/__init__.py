"""Built-in components, registered exactly like third-party plugins."""
