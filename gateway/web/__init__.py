"""The HTTP front door: Basic/Bearer guard, whoami, forward-auth and reverse proxy."""
